"""Masks and score modifiers, each a small generator returning a named closure (attention-gym style).

Score modifiers follow FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)`` signature, where
``score`` is the scaled logit q.k * scale; block masks are boolean tables ``[q_blocks, kv_blocks]``.
Each generator has a ``draw_*`` counterpart or a dense form so that the pattern can be plotted and tested.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The authors' constant for "may not attend" (a logit of -1e4 in their Wan kernel); exp(-1e4) is 0.
ULTRAVICO_BLOCKED_LOGIT = -1.0e4


@dataclass(frozen=True)
class ExtrapolationWindow:
    """The training window of a video model, in tokens of the frame-major flattened video sequence.

    Attributes:
        frame_tokens: tokens per latent frame (height x width after patching).
        train_frames: latent frames the model was trained on (Wan2.1: 21; CogVideoX: 13).
        video_start: index of the first video token in the attention sequence (text tokens before it,
            as in CogVideoX, are left unchanged).
        video_tokens: number of video tokens.
    """

    frame_tokens: int
    train_frames: int
    video_start: int
    video_tokens: int

    @property
    def train_tokens(self) -> int:
        return self.frame_tokens * self.train_frames

    @property
    def half_window(self) -> int:
        """W / 2: a query-key pair farther apart than this is "far"."""
        return self.train_tokens // 2

    @property
    def extrapolates(self) -> bool:
        """Whether the video is longer than the training window. UltraViCo is an extrapolation method: at
        or below the training length the model is in distribution and the method is the identity."""
        return self.video_tokens > self.train_tokens


def ultravico_score_mod(window: ExtrapolationWindow, alpha: float, restrict_first_frame: bool = True):
    """UltraViCo's score modification (arXiv 2511.20123; the authors' Wan attention kernel).

    On scaled logits s_ij of video query i and video key j (indices within the video sequence):

    - far pair, |i - j| > W/2 with W = frame_tokens * train_frames: s_ij <- alpha * s_ij when s_ij > 0;
      negative logits and near pairs are unchanged;
    - queries of the first latent frame (i < frame_tokens) do not attend to keys beyond the training
      length (j >= W): s_ij <- -1e4.

    Pairs involving text tokens are unchanged.
    """
    start, end = window.video_start, window.video_start + window.video_tokens
    half, frame, train = window.half_window, window.frame_tokens, window.train_tokens

    def ultravico(score, b, h, q_idx, kv_idx):
        i, j = q_idx - start, kv_idx - start
        video = (q_idx >= start) & (q_idx < end) & (kv_idx >= start) & (kv_idx < end)
        far = video & ((i - j).abs() > half)
        score = torch.where(far & (score > 0), score * alpha, score)
        if restrict_first_frame:
            blocked = video & (i < frame) & (j >= train)
            score = torch.where(blocked, torch.full_like(score, ULTRAVICO_BLOCKED_LOGIT), score)
        return score

    # Lets the kernel layer run the fused CUDA kernel instead when this is the only score change.
    ultravico.fused = ("ultravico", dict(window=window, alpha=alpha, restrict_first_frame=restrict_first_frame))
    return ultravico


def ultravico_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, window: ExtrapolationWindow, alpha: float,
    restrict_first_frame: bool = True,
) -> torch.Tensor:
    """Float64 reference of UltraViCo attention on ``[B, N, H, D]``, with the explicit N x N score matrix
    (tests and small inputs only)."""
    q, k, v = (x.double().transpose(1, 2) for x in (query, key, value))
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    n = scores.shape[-1]
    idx = torch.arange(n, device=scores.device)
    i, j = (idx[:, None] - window.video_start), (idx[None, :] - window.video_start)
    in_video = (idx >= window.video_start) & (idx < window.video_start + window.video_tokens)
    video = in_video[:, None] & in_video[None, :]
    far = video & ((i - j).abs() > window.half_window)
    scores = torch.where(far & (scores > 0), alpha * scores, scores)
    if restrict_first_frame:
        blocked = video & (i < window.frame_tokens) & (j >= window.train_tokens)
        scores = scores.masked_fill(blocked, ULTRAVICO_BLOCKED_LOGIT)
    return (scores.softmax(-1) @ v).transpose(1, 2)


def ultravico_block_classes(window: ExtrapolationWindow, seq_len: int, block_size: int) -> torch.Tensor:
    """Per (q-block, kv-block): 0 where UltraViCo changes nothing (all pairs near, no blocked pair),
    1 where it may change some pairs. Kernels skip the modification on class-0 blocks.

    Shape ``[q_blocks, kv_blocks]`` (int8), computed from block index ranges without any N x N tensor.
    """
    blocks = -(-seq_len // block_size)
    lo = torch.arange(blocks) * block_size
    hi = torch.clamp(lo + block_size, max=seq_len) - 1
    start, end = window.video_start, window.video_start + window.video_tokens - 1
    # Video index ranges of each block (clipped to the video span); blocks without video tokens stay 0.
    v_lo, v_hi = torch.clamp(lo, min=start) - start, torch.clamp(hi, max=end) - start
    has_video = (hi >= start) & (lo <= end)
    max_distance = torch.maximum(v_hi[:, None] - v_lo[None, :], v_hi[None, :] - v_lo[:, None])
    maybe_far = max_distance > window.half_window
    maybe_blocked = (v_lo[:, None] < window.frame_tokens) & (v_hi[None, :] >= window.train_tokens)
    both_video = has_video[:, None] & has_video[None, :]
    return (both_video & (maybe_far | maybe_blocked)).to(torch.int8)
