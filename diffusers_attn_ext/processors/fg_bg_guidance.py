"""Foreground-background separation guidance: DiTraj's masked cross-attention to two prompts.

Paper: "DiTraj: training-free trajectory control for video diffusion transformer" (arXiv 2509.21839),
Sec. 3.2; the authors' code (HaofeiDing/DiTraj ``module/pipe.py``: ``create_cross_attention_mask``, the
``mask_step`` loop; ``module/attention_processor.py``).

On the conditional forwards of steps ``0 .. steps - 1`` the text context is the background prompt's tokens
followed by the foreground prompt's, ``[c_bg; c_fg]`` (the pipeline swaps it in), and in every cross-attention
from the video tokens to the text a video token ``i`` attends only to its half::

    out_i = softmax(q_i K_fg^T / sqrt(d)) V_fg   if i is inside its frame's box
    out_i = softmax(q_i K_bg^T / sqrt(d)) V_bg   otherwise

which is the authors' boolean mask on ``[c_bg; c_fg]``, computed as two dense attentions with no ``N x L``
mask: the kernel attends the background keys for all queries (``attend_keys``), then the box's queries are
recomputed over the foreground keys. Unconditional forwards are stock.
"""

from __future__ import annotations

import functools

import torch

from ..call import AttentionCall
from ..context import TokenGrid
from ..kernels.dense import dense_attention
from ..trajectory import Trajectory, check_method_arguments, foreground_mask, trajectory_key, trajectory_of_key
from ..validation import integer
from .base import AttnExtProcessor, require

DEFAULT_MASK_STEPS = 30  # the authors' mask_step


@torch.compiler.assume_constant_result
def foreground_token_index(key: str, frames: int, height: int, width: int, device: str) -> torch.Tensor:
    """Flat indices of the video tokens inside their frame's box, for the trajectory of ``key``
    (:func:`~diffusers_attn_ext.trajectory.trajectory_key`) on a grid: a pure function of its arguments, cached across
    generations. Inside a compiled region dynamo runs it at trace time and bakes the result in as a constant (a
    ``nonzero`` traced would be data-dependent), guarded by the arguments' values."""
    return _foreground_token_index(key, frames, height, width, device)


@functools.lru_cache(maxsize=16)
def _foreground_token_index(key: str, frames: int, height: int, width: int, device: str) -> torch.Tensor:
    trajectory, frame_stride = trajectory_of_key(key)
    grid = TokenGrid(frames, height, width)
    mask = foreground_mask(trajectory.token_boxes(grid, frame_stride), grid)
    return mask.flatten().nonzero().squeeze(1).to(device)


class ForegroundBackgroundCrossAttnProcessor(AttnExtProcessor):
    """Foreground video tokens attend to the foreground prompt, background tokens to the background prompt.

    Args:
        trajectory: the foreground box of every video frame.
        background_tokens: length of the background prompt's part of the text context (first part); the
            foreground prompt's tokens follow it (each prompt padded to the text encoder's length).
        foreground_tokens: length of the foreground prompt's part.
        steps: acts on denoising steps ``0 .. steps - 1`` (the authors' ``mask_step``, 30 of 50); an integer >= 0.
        frame_stride: video frames per latent token frame (the VAE's temporal compression times the temporal
            patch).

    Only conditional rows are changed ("cond" branch of the context); video families whose video tokens attend
    the text in separate cross-attention calls only.
    """

    media = ("video",)
    needs_text_cross_attention = True
    context_parallel = None
    kernel = ("rows",)

    def __init__(self, trajectory: Trajectory | None = None, background_tokens: int | None = None,
                 foreground_tokens: int | None = None,
                 steps: int = DEFAULT_MASK_STEPS, frame_stride: int = 4):
        require("ForegroundBackgroundCrossAttnProcessor", trajectory=trajectory)
        self.frame_stride = check_method_arguments(trajectory, frame_stride)
        self.trajectory = trajectory
        self.background_tokens = integer("background_tokens", background_tokens, 1)
        self.foreground_tokens = integer("foreground_tokens", foreground_tokens, 1)
        self.steps = integer("steps", steps, 0)
        self._key = trajectory_key(trajectory, self.frame_stride)

    def applies_to(self, call: AttentionCall) -> bool:
        context = call.context
        if call.kind != "cross" or context is None or not context.in_steps(0, self.steps):
            return False
        cond_rows = context.rows("cond")
        if not cond_rows:
            return False
        if len(cond_rows) != context.batch_size:
            raise ValueError("ForegroundBackgroundCrossAttnProcessor needs conditional and unconditional rows in "
                             f"separate forwards, got branches {context.branch_labels}")
        expected = self.background_tokens + self.foreground_tokens
        if call.key.shape[1] != expected:
            raise ValueError(
                f"the text context has {call.key.shape[1]} tokens but background_tokens + foreground_tokens = "
                f"{expected}: on conditional forwards of steps < {self.steps} the text must be [background; foreground]"
            )
        return True

    def foreground_index(self, call: AttentionCall) -> torch.Tensor:
        """Flat indices of the video tokens inside their frame's box (:func:`foreground_token_index`)."""
        grid = call.require_grid(self)
        return foreground_token_index(self._key, grid.frames, grid.height, grid.width, str(call.query.device))

    def edit_attention(self, call: AttentionCall) -> None:
        call.attend_keys(slice(0, self.background_tokens))  # every query over the background prompt

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """The box's queries over the foreground prompt's keys, in place of their background rows."""
        index = self.foreground_index(call)
        split = self.background_tokens
        foreground = dense_attention(
            call.query.index_select(1, index), call.key[:, split:], call.value[:, split:], scale=call.scale,
            via=call.dense_via, backend=call.backend,
        )
        return out.index_copy(1, index, foreground.to(out.dtype))

    def __repr__(self) -> str:
        return (f"ForegroundBackgroundCrossAttnProcessor(trajectory=<{self.trajectory.num_frames} boxes>, "
                f"background_tokens={self.background_tokens}, foreground_tokens={self.foreground_tokens}, "
                f"steps={self.steps}, frame_stride={self.frame_stride})")
