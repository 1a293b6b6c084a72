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

import functools

import torch

from ..call import AttentionCall
from ..kernels.block_sparse_table import mark_static
from ..masks import NOT_GIVEN, radial_block_mask, radial_sink
from ..validation import integer, real
from .base import AttnExtProcessor


def sequence_layout(call: AttentionCall) -> tuple[int, int, int, int, int]:
    """(tokens, video start, video stop, text start, text stop) of the call's sequence; text (0, 0) without text."""
    text = (0, 0) if call.text is None else (call.text.start, call.text.stop)
    return (call.query.shape[1], call.visual.start, call.visual.stop, *text)


def joint_block_mask(video_mask: torch.Tensor, call: AttentionCall, block_size: int) -> torch.Tensor:
    """Block table ``[1, 1, blocks, blocks]`` of the call's whole sequence from a mask over its video tokens
    (:func:`joint_block_table` of the call's layout)."""
    return joint_block_table(video_mask, *sequence_layout(call), block_size)


def joint_block_table(video_mask: torch.Tensor, total: int, video_start: int, video_stop: int, text_start: int,
                      text_stop: int, block_size: int) -> torch.Tensor:
    """Block table ``[1, 1, blocks, blocks]`` of a ``total``-token sequence from a mask over its video tokens.

    Blocks holding text tokens are dense (rows and columns). When the video starts mid-block (text first and
    its length not a multiple of ``block_size``), a sequence block is kept when it overlaps any kept video block
    (the cover of the video mask, slightly denser than it).
    """
    if video_start == 0 and total == video_stop:
        return video_mask[None, None]
    blocks = -(-total // block_size)
    video_blocks = video_mask.shape[0]
    start = video_start
    # Sequence block b covers video blocks floor((b*bs - start)/bs) .. floor(((b+1)*bs - 1 - start)/bs).
    first = (torch.arange(blocks) * block_size - start).clamp(min=0, max=video_blocks * block_size - 1) // block_size
    last = ((torch.arange(blocks) + 1) * block_size - 1 - start).clamp(min=0, max=video_blocks * block_size - 1)
    last = last // block_size
    covers = (torch.arange(video_blocks)[None, :] >= first[:, None]) & (torch.arange(video_blocks)[None, :] <= last[:, None])
    covers &= ((torch.arange(blocks) + 1) * block_size > start)[:, None]  # blocks of text only cover no video
    mask = (covers.float() @ video_mask.float().to(covers.device) @ covers.float().T) > 0
    return (mask | text_block_table(text_start, text_stop, blocks, block_size, mask.device))[None, None]


def dense_text_blocks(call: AttentionCall, blocks: int, block_size: int, device) -> torch.Tensor:
    """``[blocks, blocks]`` table of the rows and columns of blocks that hold text tokens (none without text)."""
    return text_block_table(*sequence_layout(call)[3:], blocks, block_size, device)


def text_block_table(text_start: int, text_stop: int, blocks: int, block_size: int, device) -> torch.Tensor:
    """``[blocks, blocks]`` table of the rows and columns of blocks that hold tokens ``text_start:text_stop``."""
    text = torch.zeros(blocks, dtype=torch.bool, device=device)
    if text_stop > text_start:
        text[text_start // block_size:-(-text_stop // block_size)] = True
    return text[:, None] | text[None, :]


@functools.lru_cache(maxsize=32)
def radial_table(frames: int, tokens_per_frame: int, block_size: int, decay_factor: float, sink_first_frame: bool,
                 total: int, video_start: int, video_stop: int, text_start: int, text_stop: int,
                 device: str) -> torch.Tensor:
    """The joint block table ``[1, 1, blocks, blocks]`` of :func:`~diffusers_attn_ext.masks.radial_block_mask` for
    one grid and sequence layout, on ``device``: a pure function of its arguments, one shared static tensor each."""
    video = radial_block_mask(frames, tokens_per_frame, block_size, decay_factor, sink_first_frame=sink_first_frame)
    table = joint_block_table(video, total, video_start, video_stop, text_start, text_stop, block_size)
    return mark_static(table.to(device))


# In a compiled region the table comes from this operator, opaque to dynamo: traced, the rule's Python loop over
# frame pairs would put hundreds of slice updates into every graph (441 pairs for a 21-frame video: the H200
# compile that never finished), and a trace-time constant cannot follow a length that dynamo made symbolic. The
# operator looks the table up in the cache at run time (a copy: an operator returns a fresh tensor).
@torch.library.custom_op("diffusers_attn_ext::radial_table", mutates_args=())
def _radial_table_op(frames: int, tokens_per_frame: int, block_size: int, decay_factor: float,
                     sink_first_frame: bool, total: int, video_start: int, video_stop: int, text_start: int,
                     text_stop: int, device: str) -> torch.Tensor:
    return radial_table(frames, tokens_per_frame, block_size, decay_factor, sink_first_frame, total, video_start,
                        video_stop, text_start, text_stop, device).clone()


@_radial_table_op.register_fake
def _radial_table_fake(frames, tokens_per_frame, block_size, decay_factor, sink_first_frame, total, video_start,
                       video_stop, text_start, text_stop, device):
    blocks = -(-total // block_size)
    return torch.empty((1, 1, blocks, blocks), dtype=torch.bool, device=device)


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
        # phase flags, not the block's name or the step: under torch.compile each read is a guard, and a guard on
        # the name or the step would make every block or step compile its own graph
        if call.in_first_blocks(self.dense_layers):
            return False
        return self.dense_steps == 0 or call.context.in_steps(self.dense_steps, None)


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

    def block_mask(self, call: AttentionCall) -> torch.Tensor:
        """The call's block table (:func:`radial_table`: built once per grid and layout; compiled, looked up by an
        opaque operator)."""
        grid = call.require_grid(self)
        args = (grid.frames, grid.tokens_per_frame, self.block_size, self.decay_factor, self.sink_first_frame,
                *sequence_layout(call), str(call.query.device))
        return _radial_table_op(*args) if torch.compiler.is_compiling() else radial_table(*args)

    def edit_attention(self, call: AttentionCall) -> None:
        call.add_block_mask(self.block_mask(call), self.block_size)

    def __repr__(self) -> str:
        return (
            f"RadialSparseProcessor(decay_factor={self.decay_factor}, dense_steps={self.dense_steps}, "
            f"dense_layers={self.dense_layers}, block_size={self.block_size}, "
            f"sink_first_frame={self.sink_first_frame})"
        )
