"""A block-sparse FlashAttention-2 forward in Triton (CUDA only), for block tables of 128x128 blocks.

Each program takes one 128-row query block of one (batch, head) and loops over the key blocks its row of the
block table keeps, in ascending order; the kernel reads the compressed form of the table (count and indices
per query block, as FlexAttention's ``BlockMask`` stores it). Only the partial last key block of a sequence
that is not a multiple of 128 loads with bounds checks. A query block that keeps no key block outputs zeros
(as FlexAttention does).

Measured against FlexAttention's block-sparse kernel on the H100: see docs/benchmarks.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..masks import ULTRAVICO_BLOCKED_LOGIT, ExtrapolationWindow
from .flash_triton import load_kv_block, online_softmax_step, ultravico_rule

LOG2E = 1.4426950408889634
BLOCK = 128


@triton.jit
def _sparse_block(acc, l_i, m_i, q, K, V, start_n, offs_m, offs_n, offs_d, stride_kn, stride_vn, N, qk_scale,
                  alpha, half, frame_tokens, train_tokens, blocked_logit,
                  BOUNDS: tl.constexpr, ULTRAVICO: tl.constexpr, RESTRICT: tl.constexpr):
    offs_kv = start_n + offs_n
    k, v = load_kv_block(K, V, offs_kv, offs_d, stride_kn, stride_vn, N, BOUNDS)
    qk = tl.dot(q, k) * qk_scale
    if ULTRAVICO:
        qk = ultravico_rule(qk, offs_m, offs_kv, alpha, half, frame_tokens, train_tokens, blocked_logit, RESTRICT)
    if BOUNDS:
        qk = tl.where((offs_kv < N)[None, :], qk, float("-inf"))
    return online_softmax_step(acc, l_i, m_i, qk, v)


@triton.jit
def _block_sparse_forward(
    Q, K, V, Out, Counts, Indices,
    stride_qz, stride_qm, stride_qh, stride_kz, stride_kn, stride_kh,
    stride_vz, stride_vn, stride_vh, stride_oz, stride_om, stride_oh,
    stride_cz, stride_ch, stride_cm, stride_iz, stride_ih, stride_im,
    H, N, qk_scale, alpha, half, frame_tokens, train_tokens, blocked_logit,
    ULTRAVICO: tl.constexpr, RESTRICT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    z, h = off_hz // H, off_hz % H
    Q += z * stride_qz + h * stride_qh
    K += z * stride_kz + h * stride_kh
    V += z * stride_vz + h * stride_vh
    Out += z * stride_oz + h * stride_oh
    row = z * stride_cz + h * stride_ch + start_m * stride_cm
    count = tl.load(Counts + row)
    Indices += z * stride_iz + h * stride_ih + start_m * stride_im

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :], mask=offs_m[:, None] < N, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Indices ascend, so a kept partial last block is the last entry: the loop before it needs no bounds.
    n_full = N // BLOCK_N
    last = tl.load(Indices + tl.maximum(count - 1, 0))
    has_partial = (count > 0) & (last >= n_full)
    n_unbounded = count - has_partial.to(tl.int32)
    following = tl.load(Indices)
    for i in range(0, n_unbounded):
        # The next index is loaded one iteration ahead, so that K/V addresses do not wait on it.
        start_n = following * BLOCK_N
        following = tl.load(Indices + tl.minimum(i + 1, n_unbounded - 1))
        acc, l_i, m_i = _sparse_block(acc, l_i, m_i, q, K, V, start_n, offs_m, offs_n, offs_d, stride_kn, stride_vn,
                                      N, qk_scale, alpha, half, frame_tokens, train_tokens, blocked_logit,
                                      BOUNDS=False, ULTRAVICO=ULTRAVICO, RESTRICT=RESTRICT)
    if has_partial:
        acc, l_i, m_i = _sparse_block(acc, l_i, m_i, q, K, V, last * BLOCK_N, offs_m, offs_n, offs_d, stride_kn,
                                      stride_vn, N, qk_scale, alpha, half, frame_tokens, train_tokens, blocked_logit,
                                      BOUNDS=True, ULTRAVICO=ULTRAVICO, RESTRICT=RESTRICT)

    acc = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
    tl.store(Out + offs_m[:, None] * stride_om + offs_d[None, :], acc.to(Out.dtype.element_ty), mask=offs_m[:, None] < N)


def supports(query: torch.Tensor, key: torch.Tensor, block_size: int) -> bool:
    """Whether this kernel handles the call (else FlexAttention does)."""
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] in (64, 128)
        and query.shape[1] == key.shape[1]
        and block_size == BLOCK
    )


def compress_block_table(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(counts ``[B, H, q_blocks]``, ascending kept indices ``[B, H, q_blocks, kv_blocks]``) of a bool table."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), indices.contiguous()


DEFAULT_CONFIG = dict(num_warps=8, num_stages=3)


def block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor,
                           scale: float | None = None, config: dict | None = None,
                           ultravico: dict | None = None) -> torch.Tensor:
    """Block-sparse attention on ``[B, N, H, D]`` CUDA tensors with a bool table ``[B|1, H|1, q_blocks, kv_blocks]``
    of 128x128 blocks; returns ``[B, N, H, D]``. ``ultravico`` (``window``, ``alpha``, ``restrict_first_frame``,
    as the UltraViCo score_mod carries them) applies UltraViCo's rule inside the kept blocks: the two methods
    composed in one kernel. The window must cover the whole sequence (video only)."""
    if not supports(query, key, BLOCK):
        raise ValueError("block_sparse_attention needs CUDA fp16/bf16 [B, N, H, 64|128] self-attention tensors")
    batch, n, heads, head_dim = query.shape
    q_blocks = triton.cdiv(n, BLOCK)
    if blocks.shape[-2:] != (q_blocks, q_blocks):
        raise ValueError(f"block table of shape {tuple(blocks.shape)} does not cover {n} tokens in blocks of {BLOCK}")
    window: ExtrapolationWindow | None = ultravico["window"] if ultravico else None
    if window is not None and (window.video_start != 0 or window.video_tokens != n):
        raise ValueError("the fused UltraViCo rule needs a video-only sequence (video_start 0, all tokens video)")
    counts, indices = compress_block_table(blocks)
    out = torch.empty_like(query)
    scale = head_dim**-0.5 if scale is None else scale

    def broadcast_stride(tensor, dim):
        return 0 if tensor.shape[dim] == 1 else tensor.stride(dim)

    _block_sparse_forward[(q_blocks, batch * heads)](
        query, key, value, out, counts, indices,
        query.stride(0), query.stride(1), query.stride(2), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2), out.stride(0), out.stride(1), out.stride(2),
        broadcast_stride(counts, 0), broadcast_stride(counts, 1), counts.stride(2),
        broadcast_stride(indices, 0), broadcast_stride(indices, 1), indices.stride(2),
        heads, n, scale * LOG2E,
        ultravico["alpha"] if window else 1.0, window.half_window if window else 0,
        window.frame_tokens if window else 0, window.train_tokens if window else 0, ULTRAVICO_BLOCKED_LOGIT * LOG2E,
        ULTRAVICO=window is not None, RESTRICT=bool(ultravico and ultravico["restrict_first_frame"]),
        BLOCK_M=BLOCK, BLOCK_N=BLOCK, HEAD_DIM=head_dim, **{**DEFAULT_CONFIG, **(config or {})},
    )
    return out
