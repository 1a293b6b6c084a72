"""Masks and score modifiers, each a small generator returning a named closure (attention-gym style).

Score modifiers follow FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)`` signature, where
``score`` is the scaled logit q.k * scale; block masks are boolean tables ``[q_blocks, kv_blocks]``.
Each generator has a ``draw_*`` counterpart or a dense form so that the pattern can be plotted and tested.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .call import DecayRule
from .validation import boolean, choice, integer, real

# The authors' constant for "may not attend" (a logit of -1e4 in their Wan kernel); exp(-1e4) is 0.
ULTRAVICO_BLOCKED_LOGIT = -1.0e4


@dataclass(frozen=True)
class ExtrapolationWindow:
    """The training window of a video model, in tokens of the frame-major flattened video sequence.

    Attributes:
        frame_tokens: tokens per latent frame (height x width after patching).
        train_frames: latent frames the model was trained on (the family adapter knows it per checkpoint).
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
        """Whether the video is longer than the training window (only then can the first-frame rule block a
        key). The far-pair rule does not depend on it: the authors' kernel damps pairs farther than W/2 apart
        at any length (``UltraViCoProcessor(stock_within_training=True)`` skips shorter videos)."""
        return self.video_tokens > self.train_tokens


@functools.lru_cache(maxsize=64)
def ultravico_score_mod(window: ExtrapolationWindow, alpha: float, restrict_first_frame: bool = True):
    """UltraViCo's score modification (arXiv 2511.20123; the authors' Wan attention kernel).

    On scaled logits s_ij of video query i and video key j (indices within the video sequence):

    - far pair, |i - j| > W/2 with W = frame_tokens * train_frames: s_ij <- alpha * s_ij when s_ij > 0;
      negative logits and near pairs are unchanged;
    - queries of the first latent frame (i < frame_tokens) do not attend to keys beyond the training
      length (j >= W): s_ij <- -1e4.

    Pairs involving text tokens are unchanged. One closure per parameter set (cached): compiled
    FlexAttention guards on the closure, and a new one per call would recompile until dynamo's limit.
    :func:`ultravico_rule` is the same function as a rule the fused kernels compute.
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

    return ultravico


@functools.lru_cache(maxsize=64)
def ultravico_rule(window: ExtrapolationWindow, alpha: float, restrict_first_frame: bool = True) -> DecayRule:
    """:func:`ultravico_score_mod` as a :class:`~diffusers_attn_ext.call.DecayRule` (the fused kernels' request):
    the span is the video, far pairs are those beyond W/2, and with ``restrict_first_frame`` the first frame's
    queries have the training length as their horizon."""
    return DecayRule(
        start=window.video_start, length=window.video_tokens, far=window.half_window, alpha=alpha,
        horizon_queries=window.frame_tokens if restrict_first_frame else 0, horizon_keys=window.train_tokens,
        blocked=ULTRAVICO_BLOCKED_LOGIT,
    )


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


# Radial Attention (mit-han-lab/radial-attention, NeurIPS 2025): the frame-pair rule keeps the pair of frames
# (i, j) only every int(128 / L) frames once its decay length L = 2^bitlen(tpf) / 2^bitlen(|i-j|) drops
# below this constant, which the authors hard-code to 128 whatever the block size (``get_diagonal_split_mask``).
RADIAL_SPLIT_THRESHOLD = 128
# The authors' names of their two mask rules, after the models they wrote them for (``radial_attn/attn_mask.py``):
# "wan" keeps key frame 0 for every query frame (an attention sink), "hunyuan" does not. Accepted as ``model`` for
# ``sink_first_frame``.
RADIAL_MODELS = ("wan", "hunyuan")
NOT_GIVEN = object()  # the default of ``model``: None is not a rule name


def radial_sink(model=NOT_GIVEN, sink_first_frame: bool | None = None) -> bool:
    """Whether key frame 0 is an attention sink, from ``sink_first_frame`` (None: the default, a sink) or the
    authors' rule name ``model`` (:data:`RADIAL_MODELS`); ValueError when both are given and disagree."""
    sink = None if sink_first_frame is None else boolean("sink_first_frame", sink_first_frame)
    if model is NOT_GIVEN:
        return True if sink is None else sink
    by_model = choice("model", model, RADIAL_MODELS) == RADIAL_MODELS[0]
    if sink is not None and sink != by_model:
        raise ValueError(f"model={model!r} and sink_first_frame={sink} disagree: give one of them")
    return by_model


def radial_window(distance: int, tokens_per_frame: int, decay_factor: float, block_size: int) -> float:
    """Band half-width w(d) of Radial Attention between frames ``distance`` apart, in tokens.

    ``w(d) = tpf`` for d = 0 and d = 1 (both of the authors' rules), otherwise
    ``w(d) = max(2^bitlen(tpf) / 2^bitlen(d) * decay_factor, block_size)``
    (``get_window_width`` in ``radial_attn/attn_mask.py``; adjacent Wan frames are dense since commit 72788d4).
    """
    if distance <= 1:
        return float(tokens_per_frame)
    length = 2 ** tokens_per_frame.bit_length() / 2 ** distance.bit_length() * decay_factor
    return max(length, float(block_size))


def radial_pair_kept(distance: int, tokens_per_frame: int) -> bool:
    """Radial Attention's diagonal split: with L = 2^bitlen(tpf) / 2^bitlen(d), frames ``distance`` apart
    attend at all when ``L >= 128`` or ``d % int(128 / L) == 0`` (``get_diagonal_split_mask``; no decay)."""
    length = 2 ** tokens_per_frame.bit_length() / 2 ** distance.bit_length()
    return length >= RADIAL_SPLIT_THRESHOLD or distance % int(RADIAL_SPLIT_THRESHOLD / length) == 0


def _shrunk_band(tokens_per_frame: int, width: float, row_offset: int, col_offset: int, block_size: int) -> torch.Tensor:
    """Blocks kept by the authors' ``shrinkMaskStrict`` for one frame pair: the band ``|c - r| <= width`` of a
    ``tpf x tpf`` token mask placed at (row_offset, col_offset) in a grid of ``ceil(tpf / bs)`` blocks a side.

    Column density within a block = rows of that block in the band / block_size (counted analytically: rows
    r in [lo, hi) with c - w <= r <= c + w); a block is kept when more than 60% of its non-empty columns have
    density > 1/3. Rows and columns past ``ceil(tpf / bs) * bs`` are dropped, as in the authors' code.
    """
    blocks = -(-tokens_per_frame // block_size)
    cols = torch.arange(blocks * block_size, dtype=torch.float64) - col_offset  # frame-local column index
    row_lo = (torch.arange(blocks) * block_size - row_offset).clamp(min=0, max=tokens_per_frame)
    row_hi = (torch.arange(1, blocks + 1) * block_size - row_offset).clamp(min=0, max=tokens_per_frame)
    band_lo, band_hi = torch.ceil(cols - width), torch.floor(cols + width) + 1
    count = (torch.minimum(row_hi[:, None], band_hi[None, :]) - torch.maximum(row_lo[:, None], band_lo[None, :]))
    count = count.clamp(min=0) * ((cols >= 0) & (cols < tokens_per_frame))[None, :]
    count = count.view(blocks, blocks, block_size)  # [row block, col block, column in block]
    non_empty = (count > 0).sum(-1)
    dense_cols = (3 * count > block_size).sum(-1)  # density count / bs > 1/3, in integers
    return 5 * dense_cols > 3 * non_empty  # fraction > 0.6, in integers (an empty block is dropped)


def radial_block_mask(
    num_frames: int, tokens_per_frame: int, block_size: int = 128, decay_factor: float = 1.0,
    model: str = NOT_GIVEN, sink_first_frame: bool | None = None,
) -> torch.Tensor:
    """Radial Attention's static block mask over video tokens (arXiv 2506.19852; code mit-han-lab/radial-attention).

    The rule of ``gen_log_mask_shrinked`` in ``radial_attn/attn_mask.py`` at commit 72788d4 (2025-11-11, HEAD),
    computed block by block without token-level masks. For query frame i and key frame j, d = |i - j|:

    - key frame 0 is dense for every query frame (attention sink) with ``sink_first_frame`` (default; the authors'
      ``model="wan"`` rule, which is also accepted here: ``model="hunyuan"`` has no sink, see :func:`radial_sink`);
    - otherwise the frame pair's token mask is ``|c - r| <= w(d)`` (local token indices, see
      :func:`radial_window`) if the pair is kept by the diagonal split (:func:`radial_pair_kept`), else empty;
    - each pair's token mask is shrunk to blocks on the global block grid (the frame starts at token i * tpf,
      possibly mid-block) by the authors' ``shrinkMaskStrict`` (see :func:`_shrunk_band`), and the pairs' block
      masks are OR-ed.

    Padding: the video (N = num_frames * tokens_per_frame tokens) is padded to s = ceil(N / bs) * bs, as the
    authors' first commits (3f66894 to 2e6362f) did; their HEAD does not pad and crashes when N is not a
    multiple of bs (e.g. Wan 480p, N = 32760). As in their rule, block row and column N // bs (the partial last
    block) are dense; the padded positions themselves are not attended (FlexAttention's sequence lengths).

    Returns a bool tensor ``[s / bs, s / bs]``.
    """
    num_frames = integer("num_frames", num_frames, 1)
    tokens_per_frame = integer("tokens_per_frame", tokens_per_frame, 1)
    block_size = integer("block_size", block_size, 1)
    decay_factor = real("decay_factor", decay_factor, 0.0, low_open=True)
    sink = radial_sink(model, sink_first_frame)
    tpf, bs = tokens_per_frame, block_size
    video = num_frames * tpf
    n_blocks = -(-video // bs)
    frame_blocks = -(-tpf // bs)
    mask = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
    mask[video // bs:, :] = True
    mask[:, video // bs:] = True
    for i in range(num_frames):
        for j in range(num_frames):
            distance = abs(i - j)
            if sink and j == 0:
                width = float(tpf)  # the whole frame pair: a band at least as wide as the frame
            elif radial_pair_kept(distance, tpf):
                width = radial_window(distance, tpf, decay_factor, bs)
            else:
                continue
            blocks = _shrunk_band(tpf, width, (i * tpf) % bs, (j * tpf) % bs, bs)
            row, col = (i * tpf) // bs, (j * tpf) // bs
            mask[row:row + frame_blocks, col:col + frame_blocks] |= blocks
    return mask
