"""FlashAttention-2 building blocks shared by our Triton kernels (inlined by Triton at compile time)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_block(K, V, offs_kv, offs_d, stride_kn, stride_vn, N, BOUNDS: tl.constexpr):
    """K^T ``[HEAD_DIM, BLOCK_N]`` and V ``[BLOCK_N, HEAD_DIM]`` of the keys ``offs_kv``; only a partial last
    block (``BOUNDS``) pays for bounds-checked loads."""
    if BOUNDS:
        in_range = offs_kv < N
        k = tl.load(K + offs_kv[None, :] * stride_kn + offs_d[:, None], mask=in_range[None, :], other=0.0)
        v = tl.load(V + offs_kv[:, None] * stride_vn + offs_d[None, :], mask=in_range[:, None], other=0.0)
    else:
        k = tl.load(K + offs_kv[None, :] * stride_kn + offs_d[:, None])
        v = tl.load(V + offs_kv[:, None] * stride_vn + offs_d[None, :])
    return k, v


@triton.jit
def online_softmax_step(acc, l_i, m_i, qk, v):
    """One online-softmax update with log2-domain scores ``qk [BLOCK_M, BLOCK_N]``: returns (acc, l, m)."""
    m_ij = tl.maximum(m_i, tl.max(qk, 1))
    p = tl.math.exp2(qk - m_ij[:, None])
    correction = tl.math.exp2(m_i - m_ij)
    l_i = l_i * correction + tl.sum(p, 1)
    acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_ij


@triton.jit
def ultravico_rule(qk, offs_m, offs_kv, alpha, half, frame_tokens, train_tokens, blocked_logit,
                   RESTRICT: tl.constexpr):
    """UltraViCo's rule per element on log2-domain scores: far pairs (|i - j| > half) take min(s, alpha * s),
    i.e. alpha * s for s > 0 (alpha <= 1); first-frame queries get ``blocked_logit`` for keys beyond the
    training length. Indices are positions in the video sequence."""
    far = tl.abs(offs_m[:, None] - offs_kv[None, :]) > half
    qk = tl.where(far, tl.minimum(qk, qk * alpha), qk)
    if RESTRICT:
        blocked = (offs_m[:, None] < frame_tokens) & (offs_kv[None, :] >= train_tokens)
        qk = tl.where(blocked, blocked_logit, qk)
    return qk
