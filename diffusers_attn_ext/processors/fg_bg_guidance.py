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

from dataclasses import dataclass, field

import torch

from ..call import AttentionCall
from ..kernels.dense import dense_attention
from ..trajectory import Trajectory, check_method_arguments, foreground_mask
from ..validation import integer
from .base import AttnExtProcessor, require

DEFAULT_MASK_STEPS = 30  # the authors' mask_step


@dataclass
class ForegroundState:
    """Per generation: the flat indices of the video tokens inside their frame's box, per grid and device."""

    index: dict = field(default_factory=dict)


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

    def new_state(self) -> ForegroundState:
        return ForegroundState()

    def applies_to(self, call: AttentionCall) -> bool:
        context = call.context
        if call.kind != "cross" or context is None or context.step_index >= self.steps:
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
        """Flat indices of the video tokens inside their frame's box, once per generation and device."""
        grid = call.require_grid(self)
        cache = call.context.state_of(self).index
        key = (grid, call.query.device)
        if key not in cache:
            mask = foreground_mask(self.trajectory.token_boxes(grid, self.frame_stride), grid)
            cache[key] = mask.flatten().nonzero().squeeze(1).to(call.query.device)
        return cache[key]

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
