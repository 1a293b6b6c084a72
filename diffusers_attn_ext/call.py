"""One attention call: the contract between family adapters, methods and kernels.

A family adapter turns the arguments diffusers hands an attention processor into an :class:`AttentionCall`: q, k, v
projected and normalized (``[batch, tokens, heads, head_dim]``), the rotary embedding still to apply, where text and
visual tokens sit, and what the adapter needs back to finish (``encoder_tokens``, ``added_kv``). Methods then edit
the call in the processor's stages through typed fields and the methods below (positions: ``rotary``; scores:
:meth:`~AttentionCall.add_score_mod`, :meth:`~AttentionCall.add_block_mask`, :meth:`~AttentionCall.scale_logits`;
rows the kernel leaves to a method: :meth:`~AttentionCall.attend_rows`, :meth:`~AttentionCall.attend_keys`), and the
kernel layer reads one explicit :class:`KernelRequest` (:meth:`~AttentionCall.kernel_request`): dense,
score-modified, block-sparse, or a fused rule (:class:`DecayRule`) that a fused kernel computes in its loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .context import BLOCK_FLAGS, BLOCK_FLAGS_ATTR, MODULE_NAME_ATTR, AttnContext, TokenGrid, block_index

# Kinds of attention call. "joint": text and visual tokens attend to each other in one sequence; "single": the joint
# sequence arrives concatenated (text length from the context); "self": visual tokens only; "cross": visual queries,
# text keys.
SELF_ATTENTION_KINDS = ("joint", "single", "self")
# What a call asks of the kernel layer (KernelRequest.kind).
DENSE, SCORE_MOD, BLOCK_SPARSE, FUSED_RULE = "dense", "score_mod", "block_sparse", "fused_rule"
# A method's request that the kernel attend only some rows or keys (AttentionCall.attend_rows / attend_keys).
ROWS = "rows"

ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DecayRule:
    """A score rule that fused kernels compute inside their loops: the "fused rule" kernel request.

    On the scaled logits ``s_ij`` of query ``i`` and key ``j`` with both positions in the span
    ``[start, start + length)`` of the sequence (``a = i - start``, ``b = j - start``; other pairs unchanged):

    - far pairs, ``|a - b| > far``: ``s_ij <- alpha * s_ij`` where ``s_ij > 0``, with ``alpha`` in (0, 1];
    - horizon: queries ``a < horizon_queries`` do not attend keys ``b >= horizon_keys``: ``s_ij <- blocked``
      (``exp(blocked)`` is 0 in float32); no horizon when ``horizon_queries`` is 0.

    A method that adds this rule also adds the same function as a score_mod (for FlexAttention); the kernel layer
    takes the fused kernel when the rule is the call's only score change and the kernel supports the call. The
    kernels check ``alpha`` when they launch (a rule is built inside compiled regions, so it validates nothing).
    """

    start: int
    length: int
    far: int
    alpha: float
    horizon_queries: int = 0
    horizon_keys: int = 0
    blocked: float = -1.0e4

    @property
    def has_horizon(self) -> bool:
        return self.horizon_queries > 0


@dataclass(frozen=True)
class KernelRequest:
    """What the kernel layer computes for one call: ``softmax(scale q k^T [score_mods] [block_mask] [attn_mask]) v``
    over ``query``/``key``/``value`` (``[B, N, H, D]``, already restricted to the rows and keys the kernel attends).

    ``kind``: :data:`DENSE` (no score change: the stock processor's dense kernel), :data:`SCORE_MOD` (score_mods,
    with or without a block mask), :data:`BLOCK_SPARSE` (a block mask alone) or :data:`FUSED_RULE` (``rule`` is the
    only score change, with or without a block mask).
    """

    kind: str
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: float | None
    attn_mask: torch.Tensor | None
    score_mods: tuple[ScoreMod, ...]
    block_mask: torch.Tensor | None
    block_size: int
    rule: DecayRule | None
    dense_via: str
    backend: Any
    parallel_config: Any


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums and rotations of ``dtype`` inputs run in: float32 for half precision, else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _name(method: Any) -> str:
    if isinstance(method, str):
        return method
    return method.__name__ if isinstance(method, type) else type(method).__name__


@dataclass
class AttentionCall:
    """One attention call as methods see it. Tensors are ``[batch, tokens, heads, head_dim]``.

    Set by the family adapter: ``text`` and ``visual`` are slices of the query sequence (and, for self-attention
    kinds, of the key sequence); ``rotary`` is the family's rotary embedding, applied by the adapter after methods
    have changed positions (its layout is the adapter's: methods re-index it through ``call.adapter``);
    ``dense_via`` is how the stock processor calls its dense kernel; ``encoder_tokens`` (tokens that came from the
    encoder states, returned as a second output) and ``added_kv`` (a key/value branch the adapter attends and adds)
    are the adapter's, for :meth:`~diffusers_attn_ext.families.base.FamilyAdapter.finish`.

    Edited by methods (through the methods below): ``scale``, ``score_mods`` (FlexAttention signature, in order) and
    their fused ``rule``, ``block_mask`` (boolean ``[B|1, H|1, q_blocks, kv_blocks]`` of ``block_size``),
    ``query_rows`` and ``key_span`` (the rows and keys the kernel attends; the method that restricts them computes
    the rest in its ``edit_output`` from the call's full ``query``, ``key``, ``value``).

    Set by the processor base: ``backend``, ``parallel_config``, ``active_methods``. ``carried`` holds, per method
    object, what its ``edit_attention`` computed for its own ``edit_output`` on this call (:meth:`carry`); no other
    method reads it.
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
    dense_via: str = "dispatch"
    encoder_tokens: int | None = None
    added_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    scale: float | None = None
    score_mods: list[ScoreMod] = field(default_factory=list)
    rule: DecayRule | None = None
    block_mask: torch.Tensor | None = None
    block_size: int = 128
    query_rows: torch.Tensor | None = None
    key_span: slice | None = None
    backend: Any = None
    parallel_config: Any = None
    active_methods: tuple = ()  # the methods that act on this call, in stage order
    carried: dict = field(default_factory=dict)  # method -> what its edit_attention left for its edit_output

    # ----- what the call is

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
        return getattr(self.module, MODULE_NAME_ATTR, None)

    def in_first_blocks(self, count: int) -> bool:
        """Whether this module is in one of the transformer's first ``count`` blocks (False when its name has no
        block index). Compile-clean as :meth:`AttnContext.in_steps`: it reads a boolean the context keeps per
        threshold on the module, never the module's name or index, so a regionally compiled block guards on which
        side of ``count`` it is (two graphs), not on which block it is (one graph per block). A ``count`` of
        ``BLOCK_FLAGS`` (256) or more is answered from the name, which compiles a graph per block."""
        if count <= 0:
            return False
        flags = getattr(self.module, BLOCK_FLAGS_ATTR, None)
        if flags is None or count >= BLOCK_FLAGS:
            index = block_index(self.module_name)
            return index is not None and index < count
        return flags[count]

    @property
    def adapter(self):
        """The :class:`~diffusers_attn_ext.families.base.FamilyAdapter` of this call's family: the facts methods
        ask for (rotary-table layout, trained lengths) without naming the family."""
        from .families import adapter_named  # families build calls: imported when a method asks

        return adapter_named(self.family)

    @property
    def parallel(self):
        """This rank's :class:`~diffusers_attn_ext.parallel.ParallelLayout` under diffusers' context
        parallelism, None on a single GPU."""
        from .parallel import ParallelLayout

        return ParallelLayout.from_config(self.parallel_config)

    def require_grid(self, method: Any) -> TokenGrid:
        """The visual token grid of this call; ValueError if the context cannot give it.

        ``method`` is the processor asking (or its class, or its name). Under context parallelism the grid is the
        whole video and the call holds this rank's tokens of it: only methods that compute on global token indices
        (``context_parallel = "global"``) may ask, on sequences without text tokens.
        """
        name = _name(method)
        grid = self.context.grid if self.context is not None else None
        if grid is None:
            raise ValueError(
                f"{name} needs the latent token grid, but no context is attached to module "
                f"{type(self.module).__name__}: call diffusers_attn_ext.attach_context(pipe) or install()"
            )
        visual_tokens = self.visual.stop - self.visual.start
        layout = self.parallel
        if layout is not None:
            if getattr(method, "context_parallel", None) != "global" or self.text is not None:
                raise ValueError(
                    f"{name} does not support diffusers' context parallelism on {self.family} {self.kind} attention "
                    f"(ring_degree={layout.ring_degree}, ulysses_degree={layout.ulysses_degree}); supported: methods "
                    "that compute on global token indices (context_parallel='global') on sequences without text tokens"
                )
            rank_tokens = layout.token_range(grid.num_tokens)
            if len(rank_tokens) != visual_tokens:
                raise ValueError(
                    f"{name}: rank {layout.rank} of {layout.world_size} holds {visual_tokens} visual tokens, but "
                    f"its share of the grid {grid.frames}x{grid.height}x{grid.width} is {len(rank_tokens)} tokens"
                )
            return grid
        if grid.num_tokens != visual_tokens:
            raise ValueError(
                f"{name}: the grid {grid.frames}x{grid.height}x{grid.width} ({grid.num_tokens} tokens) does "
                f"not match the {visual_tokens} visual tokens of this attention call"
            )
        return grid

    def carry(self, method: Any, value: Any) -> None:
        """Keep ``value`` for ``method``'s own ``edit_output`` on this call (read with :meth:`carried_by`)."""
        self.carried[method] = value

    def carried_by(self, method: Any) -> Any:
        """What ``method`` kept with :meth:`carry` on this call."""
        return self.carried[method]

    # ----- what methods ask of the kernel

    def add_score_mod(self, score_mod: ScoreMod, rule: DecayRule | None = None) -> None:
        """Apply ``score_mod`` after the score mods already added. ``rule``: the same function as a
        :class:`DecayRule`, which a fused kernel computes instead when it is the call's only score change."""
        self.score_mods.append(score_mod)
        if rule is not None:
            self.rule = rule

    def add_block_mask(self, blocks: torch.Tensor, block_size: int) -> None:
        """Keep only the blocks of ``blocks``, intersected with a block mask an earlier method added (same size)."""
        if self.block_mask is None:
            self.block_mask, self.block_size = blocks, block_size
            return
        if self.block_size != block_size:
            raise ValueError(
                f"block_size={block_size} differs from the block_size={self.block_size} of a block mask set by an "
                "earlier method: composed sparse methods need one block size"
            )
        self.block_mask = self.block_mask & blocks

    def scale_logits(self, factor: float) -> None:
        """Multiply the scaled logits by ``factor`` (a Python float: no tensor read)."""
        self.scale = factor / math.sqrt(self.head_dim) if self.scale is None else self.scale * factor

    def attend_rows(self, rows: torch.Tensor) -> None:
        """The kernel attends only the query rows ``rows`` (int64 indices); its output holds those rows, in that
        order, and the method that asked adds the others in its ``edit_output``."""
        if self.query_rows is not None:
            raise ValueError("two methods restrict the query rows of one attention call; compose them differently")
        self.query_rows = rows

    def attend_keys(self, span: slice) -> None:
        """The kernel attends only the keys (and values) ``span``; the method that asked attends the others."""
        if self.key_span is not None:
            raise ValueError("two methods restrict the keys of one attention call; compose them differently")
        self.key_span = span

    def kernel_request(self) -> KernelRequest:
        """The explicit request of this call to the kernel layer (see :class:`KernelRequest`)."""
        query = self.query if self.query_rows is None else self.query.index_select(1, self.query_rows)
        key, value = self.key, self.value
        if self.key_span is not None:
            key, value = key[:, self.key_span], value[:, self.key_span]
        rule = self.rule if len(self.score_mods) == 1 else None
        if rule is not None:
            kind = FUSED_RULE
        elif self.score_mods:
            kind = SCORE_MOD
        elif self.block_mask is not None:
            kind = BLOCK_SPARSE
        else:
            kind = DENSE
        return KernelRequest(
            kind=kind, query=query, key=key, value=value, scale=self.scale, attn_mask=self.attn_mask,
            score_mods=tuple(self.score_mods), block_mask=self.block_mask, block_size=self.block_size, rule=rule,
            dense_via=self.dense_via, backend=self.backend, parallel_config=self.parallel_config,
        )


__all__ = [
    "BLOCK_SPARSE", "DENSE", "FUSED_RULE", "ROWS", "SCORE_MOD", "SELF_ATTENTION_KINDS",
    "AttentionCall", "DecayRule", "KernelRequest", "ScoreMod", "accumulation_dtype",
]
