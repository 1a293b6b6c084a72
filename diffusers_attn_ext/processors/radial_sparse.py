"""Radial Attention: a static block-sparse mask whose attention window shrinks with temporal distance.

Paper: "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video Generation"
(arXiv 2506.19852, NeurIPS 2025); code mit-han-lab/radial-attention. The mask is
:func:`diffusers_attn_ext.masks.radial_block_mask` over the video tokens, one table shared by every batch row,
head and layer, built once per grid and generation. Text tokens of a joint sequence attend and are attended
densely; cross-attention is dense. As in the authors' attention processor
(``radial_attn/models/wan/attention.py``), denoising steps with index < ``dense_steps`` and blocks with index
< ``dense_layers`` run dense attention.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from ..call import AttentionCall
from ..kernels.block_sparse_table import mark_static
from ..masks import NOT_GIVEN, radial_block_mask, radial_sink
from ..validation import integer, real
from .base import AttnExtProcessor

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)\.")


def layer_index(module_name: str | None) -> int | None:
    """Transformer block index of an attention module ("blocks.3.attn1" -> 3; None when unnamed)."""
    match = _LAYER_INDEX.search(module_name or "")
    return int(match.group(1)) if match else None


def joint_block_mask(video_mask: torch.Tensor, call: AttentionCall, block_size: int) -> torch.Tensor:
    """Block table ``[1, 1, blocks, blocks]`` of the call's whole sequence from a mask over its video tokens.

    Blocks holding text tokens are dense (rows and columns). When the video starts mid-block (text first and
    its length not a multiple of ``block_size``), a sequence block is kept when it overlaps any kept video block
    (the cover of the video mask, slightly denser than it).
    """
    total, start = call.query.shape[1], call.visual.start
    if start == 0 and total == call.visual.stop:
        return video_mask[None, None]
    blocks = -(-total // block_size)
    video_blocks = video_mask.shape[0]
    # Sequence block b covers video blocks floor((b*bs - start)/bs) .. floor(((b+1)*bs - 1 - start)/bs).
    first = (torch.arange(blocks) * block_size - start).clamp(min=0, max=video_blocks * block_size - 1) // block_size
    last = ((torch.arange(blocks) + 1) * block_size - 1 - start).clamp(min=0, max=video_blocks * block_size - 1)
    last = last // block_size
    covers = (torch.arange(video_blocks)[None, :] >= first[:, None]) & (torch.arange(video_blocks)[None, :] <= last[:, None])
    covers &= ((torch.arange(blocks) + 1) * block_size > start)[:, None]  # blocks of text only cover no video
    mask = (covers.float() @ video_mask.float() @ covers.float().T) > 0
    return (mask | dense_text_blocks(call, blocks, block_size, mask.device))[None, None]


def dense_text_blocks(call: AttentionCall, blocks: int, block_size: int, device) -> torch.Tensor:
    """``[blocks, blocks]`` table of the rows and columns of blocks that hold text tokens (none without text)."""
    text = torch.zeros(blocks, dtype=torch.bool, device=device)
    if call.text is not None and call.text.stop > call.text.start:
        text[call.text.start // block_size:-(-call.text.stop // block_size)] = True
    return text[:, None] | text[None, :]


@dataclass
class BlockMaskState:
    """Per generation: the block tables built, by grid and layout."""

    masks: dict = field(default_factory=dict)


class SparseVideoProcessor(AttnExtProcessor):
    """What sparse video methods share: video self-attention only, dense early steps and first layers.

    Args:
        dense_steps: denoising steps (0-based index < dense_steps) that run dense attention.
        dense_layers: transformer blocks (index < dense_layers) that run dense attention at every step.
        block_size: tokens per block of the block-sparse kernel.
    """

    media = ("video",)
    context_parallel = "global"
    kernel = ("block_sparse",)

    def __init__(self, dense_steps: int = 0, dense_layers: int = 0, block_size: int = 128):
        self.dense_steps = integer("dense_steps", dense_steps, 0)
        self.dense_layers = integer("dense_layers", dense_layers, 0)
        self.block_size = integer("block_size", block_size, 1)

    def applies_to(self, call: AttentionCall) -> bool:
        if not call.is_self_attention:
            return False
        call.require_grid(self)
        # the module name and the step are read only when they matter: under torch.compile each read is a guard,
        # and a guard on the block's name or on the step makes every block or step compile its own graph
        if self.dense_layers:
            layer = layer_index(call.module_name)
            if layer is not None and layer < self.dense_layers:
                return False
        return self.dense_steps == 0 or call.context.step_index >= self.dense_steps


class RadialSparseProcessor(SparseVideoProcessor):
    """Radial Attention's static block-sparse mask on video self-attention.

    Args:
        decay_factor: scales the window beyond adjacent frames, ``w(d) = max(2^bitlen(tpf) / 2^bitlen(d) *
            decay_factor, block_size)``; > 0. Default 1.0, as the authors' inference script
            (``radial-attention/wan_t2v_inference.py``) argparse and processor class; their shell scripts use 0.2
            with ``dense_steps=12, dense_layers=1`` of 50 steps.
        dense_steps, dense_layers: dense attention for the first steps / blocks (authors' defaults 0, 0).
        block_size: 128 as the authors' first model's path (their second model's path uses 64).
        sink_first_frame: key frame 0 is an attention sink, dense for every query frame (default; None is the
            default). Without it, the authors' rule without a sink.
        model: instead of ``sink_first_frame``, the authors' name of the rule, one of
            :data:`~diffusers_attn_ext.masks.RADIAL_MODELS` (named after the models they wrote each rule for: the
            first is the sink rule, the second has none; see :func:`~diffusers_attn_ext.masks.radial_sink`).
    """

    def __init__(
        self, decay_factor: float = 1.0, dense_steps: int = 0, dense_layers: int = 0, block_size: int = 128,
        model: str = NOT_GIVEN, sink_first_frame: bool | None = None,
    ):
        super().__init__(dense_steps, dense_layers, block_size)
        self.decay_factor = real("decay_factor", decay_factor, 0.0, low_open=True)
        self.sink_first_frame = radial_sink(model, sink_first_frame)

    def new_state(self) -> BlockMaskState:
        return BlockMaskState()

    def block_mask(self, call: AttentionCall) -> torch.Tensor:
        """The call's block table, cached in the per-generation state per grid and layout."""
        grid = call.require_grid(self)
        if torch.compiler.is_compiling():  # no cache filled while tracing: the mask is built into the graph
            return self._build_block_mask(call, grid)
        cache = call.context.state_of(self).masks
        key = (grid, call.visual.start, call.query.shape[1], call.query.device)
        if key not in cache:
            cache[key] = mark_static(self._build_block_mask(call, grid))
        return cache[key]

    def _build_block_mask(self, call: AttentionCall, grid) -> torch.Tensor:
        video = radial_block_mask(grid.frames, grid.tokens_per_frame, self.block_size, self.decay_factor,
                                  sink_first_frame=self.sink_first_frame)
        return joint_block_mask(video, call, self.block_size).to(call.query.device)

    def edit_attention(self, call: AttentionCall) -> None:
        call.add_block_mask(self.block_mask(call), self.block_size)

    def __repr__(self) -> str:
        return (
            f"RadialSparseProcessor(decay_factor={self.decay_factor}, dense_steps={self.dense_steps}, "
            f"dense_layers={self.dense_layers}, block_size={self.block_size}, "
            f"sink_first_frame={self.sink_first_frame})"
        )
