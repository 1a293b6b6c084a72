"""FlashAttention-2 building blocks shared by our Triton kernels (inlined by Triton at compile time).

Q, K, V and outputs move through tensor descriptors (the bulk tensor copy engine on Hopper): measured on the
H100, 7-10% faster than pointer loads for both kernels (docs/benchmarks.md)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


def tensor_descriptor(x: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """A descriptor of ``[B, N, H, D]`` with ``block_rows x D`` tiles of one (batch, head), for Hopper's bulk
    tensor copy engine: rows past ``N`` read as zeros and are not written. The engine needs a unit last stride
    and a 16-byte aligned base and other strides; ``x`` is copied otherwise (never pass an output that would be
    copied)."""
    if (x.stride(-1) != 1 or x.data_ptr() % 16
            or any(stride * x.element_size() % 16 for stride in x.stride()[:-1])):
        x = x.contiguous()
    return TensorDescriptor(x, list(x.shape), list(x.stride()), [1, block_rows, 1, x.shape[-1]])


@triton.jit
def load_rows(desc, z, h, start, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows ``[start, start + ROWS)`` of batch ``z``, head ``h`` as a ``[ROWS, HEAD_DIM]`` tile."""
    return desc.load([z, start, h, 0]).reshape(ROWS, HEAD_DIM)


@triton.jit
def store_rows(desc, z, h, start, tile, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Write a ``[ROWS, HEAD_DIM]`` tile at rows ``[start, start + ROWS)`` (rows past the end are dropped)."""
    desc.store([z, start, h, 0], tile.to(desc.dtype).reshape(1, ROWS, 1, HEAD_DIM))


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
def decay_rule(qk, offs_m, offs_kv, alpha, far, horizon_queries, horizon_keys, blocked_logit,
               HORIZON: tl.constexpr):
    """A :class:`~diffusers_attn_ext.call.DecayRule` per element on log2-domain scores: far pairs
    (``|i - j| > far``) take ``min(s, alpha * s)``, i.e. ``alpha * s`` for ``s > 0`` (alpha <= 1); with a horizon,
    queries ``i < horizon_queries`` get ``blocked_logit`` for keys ``j >= horizon_keys``. Indices are positions in
    the rule's span."""
    is_far = tl.abs(offs_m[:, None] - offs_kv[None, :]) > far
    qk = tl.where(is_far, tl.minimum(qk, qk * alpha), qk)
    if HORIZON:
        blocked = (offs_m[:, None] < horizon_queries) & (offs_kv[None, :] >= horizon_keys)
        qk = tl.where(blocked, blocked_logit, qk)
    return qk
