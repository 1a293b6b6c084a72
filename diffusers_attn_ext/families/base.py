"""The contract between family adapters, methods and kernels: one attention call, described.

A family adapter turns the arguments diffusers hands an attention processor into an
:class:`AttentionCall` (q, k, v projected and normalized, the RoPE still to apply, where text and visual
tokens sit), applies RoPE when asked, and turns the attention output back into what the family's
transformer block expects. Methods edit the call between those steps; they never see family code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..context import AttnContext, TokenGrid

# Kinds of attention call. "joint": text and visual tokens attend to each other in one sequence (SD3,
# FLUX double blocks, CogVideoX); "single": FLUX single blocks, the joint sequence arrives concatenated;
# "self": visual tokens only (Wan attn1, SD3.5 attn2); "cross": visual queries, text keys (Wan attn2).
SELF_ATTENTION_KINDS = ("joint", "single", "self")
# Methods that ask for the token grid and compute on global token indices under context parallelism
# (see diffusers_attn_ext.parallel); the others get a ValueError there.
CONTEXT_PARALLEL_METHODS = frozenset({"UltraViCoProcessor", "RadialSparseProcessor", "AdaptiveSparseProcessor"})


@dataclass
class AttentionCall:
    """One attention call as methods see it. Tensors are ``[batch, tokens, heads, head_dim]``.

    ``text`` and ``visual`` are slices of the query sequence (and, for self-attention kinds, of the key
    sequence). ``rotary`` is the family's rotary embedding for the visual tokens, applied by the adapter
    after methods have had the chance to change positions. ``score_mods`` (FlexAttention signature,
    applied in order) and ``block_mask`` (boolean ``[B|1, H|1, q_blocks, kv_blocks]`` with ``block_size``)
    are what methods add to the scores; with neither, the dense kernel of the stock processor runs.
    """

    module: torch.nn.Module
    family: str
    kind: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    text: slice | None
    visual: slice
    context: AttnContext | None
    rotary: Any = None
    attn_mask: torch.Tensor | None = None
    scale: float | None = None
    score_mods: list[Callable] = field(default_factory=list)
    block_mask: torch.Tensor | None = None
    block_size: int = 128
    dense_via: str = "dispatch"
    backend: Any = None
    parallel_config: Any = None
    extras: dict[str, Any] = field(default_factory=dict)
    active_methods: tuple = ()  # the methods that act on this call, in stage order (set by the processor)

    @property
    def is_self_attention(self) -> bool:
        return self.kind in SELF_ATTENTION_KINDS

    @property
    def heads(self) -> int:
        return self.query.shape[2]

    @property
    def head_dim(self) -> int:
        return self.query.shape[3]

    @property
    def module_name(self) -> str | None:
        from ..context import MODULE_NAME_ATTR

        return getattr(self.module, MODULE_NAME_ATTR, None)

    @property
    def parallel(self):
        """This rank's :class:`~diffusers_attn_ext.parallel.ParallelLayout` under diffusers' context
        parallelism, None on a single GPU."""
        from ..parallel import ParallelLayout

        return ParallelLayout.from_config(self.parallel_config)

    def require_grid(self, method: str) -> TokenGrid:
        """The visual token grid of this call; ValueError if the context cannot give it.

        Under context parallelism the grid is the whole video and the call holds this rank's tokens of it;
        only methods that compute on global token indices (:data:`CONTEXT_PARALLEL_METHODS`) may ask.
        """
        grid = self.context.grid if self.context is not None else None
        if grid is None:
            raise ValueError(
                f"{method} needs the latent token grid, but no context is attached to module "
                f"{type(self.module).__name__}: call diffusers_attn_ext.attach_context(pipe) or install()"
            )
        visual_tokens = self.visual.stop - self.visual.start
        layout = self.parallel
        if layout is not None:
            if method not in CONTEXT_PARALLEL_METHODS or self.text is not None:
                raise ValueError(
                    f"{method} does not support diffusers' context parallelism on {self.family} "
                    f"{self.kind} attention (ring_degree={layout.ring_degree}, ulysses_degree={layout.ulysses_degree}); "
                    f"supported: {sorted(CONTEXT_PARALLEL_METHODS)} on video-only sequences (Wan)"
                )
            rank_tokens = layout.token_range(grid.num_tokens)
            if len(rank_tokens) != visual_tokens:
                raise ValueError(
                    f"{method}: rank {layout.rank} of {layout.world_size} holds {visual_tokens} visual tokens, but "
                    f"its share of the grid {grid.frames}x{grid.height}x{grid.width} is {len(rank_tokens)} tokens"
                )
            return grid
        if grid.num_tokens != visual_tokens:
            raise ValueError(
                f"{method}: the grid {grid.frames}x{grid.height}x{grid.width} ({grid.num_tokens} tokens) does "
                f"not match the {visual_tokens} visual tokens of this attention call"
            )
        return grid


class FamilyAdapter:
    """How one model family runs attention. Subclasses replicate their stock processor step for step."""

    family: str = ""

    def project(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rotary: Any,
        context: AttnContext | None,
    ) -> AttentionCall:
        """Project and normalize q, k, v; describe the token layout. RoPE is not applied yet."""
        raise NotImplementedError

    def apply_rotary(self, call: AttentionCall) -> None:
        """Apply ``call.rotary`` to ``call.query`` and ``call.key`` in the family's way (no-op without)."""

    def parallel_config(self, call: AttentionCall, processor_config: Any) -> Any:
        """The context-parallel config the stock processor passes to its kernel for this call."""
        return processor_config

    def finish(self, attn: torch.nn.Module, call: AttentionCall, out: torch.Tensor):
        """Turn the attention output ``[B, N, H, D]`` into what the family's block expects."""
        raise NotImplementedError
