"""A block-sparse FlashAttention-2 forward in Triton (CUDA only), for block tables of 128x128 blocks.

Each program takes one 128-row query block of one (batch, head) and loops over the key blocks its row of the
block table keeps, in ascending order; the kernel reads the compressed form of the table (count and indices
per query block, as FlexAttention's ``BlockMask`` stores it). A query block that keeps no key block outputs
zeros (as FlexAttention does).

What made it fast on the H100 (each measured, docs/benchmarks.md): Q, K, V and the output move through
tensor descriptors (Hopper's bulk tensor copy engine; rows past the sequence read as zeros, so only the
partial last key block needs a ``-inf`` mask); the next block index is loaded one iteration ahead, so K/V
addresses do not wait on it; and programs start longest row first (query blocks ordered by how many key
blocks they keep), so the last wave is not one long row on an otherwise idle GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..call import DecayRule
from ..validation import real
from .block_sparse_table import BLOCK, check_block_table, compressed_table
from .flash_triton import decay_rule, load_rows, online_softmax_step, store_rows, tensor_descriptor

LOG2E = 1.4426950408889634


@triton.jit
def _sparse_block(acc, l_i, m_i, q, k_desc, v_desc, z, h, start_n, offs_m, offs_n, N, qk_scale,
                  alpha, far, horizon_queries, horizon_keys, blocked_logit,
                  BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BOUNDS: tl.constexpr, RULE: tl.constexpr, HORIZON: tl.constexpr):
    offs_kv = start_n + offs_n
    k = load_rows(k_desc, z, h, start_n, BLOCK_N, HEAD_DIM)
    v = load_rows(v_desc, z, h, start_n, BLOCK_N, HEAD_DIM)
    qk = tl.dot(q, k.T) * qk_scale
    if RULE:
        qk = decay_rule(qk, offs_m, offs_kv, alpha, far, horizon_queries, horizon_keys, blocked_logit, HORIZON)
    if BOUNDS:
        qk = tl.where((offs_kv < N)[None, :], qk, float("-inf"))
    return online_softmax_step(acc, l_i, m_i, qk, v)


@triton.jit
def _block_sparse_forward(
    q_desc, k_desc, v_desc, o_desc, Counts, Indices, Order,
    stride_cz, stride_ch, stride_cm, stride_iz, stride_ih, stride_im,
    H, N, qk_scale, alpha, far, horizon_queries, horizon_keys, blocked_logit,
    RULE: tl.constexpr, HORIZON: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    off_hz = tl.program_id(1)
    z, h = off_hz // H, off_hz % H
    table_row = z * stride_cz + h * stride_ch
    start_m = tl.load(Order + table_row + tl.program_id(0) * stride_cm)  # longest rows first
    count = tl.load(Counts + table_row + start_m * stride_cm)
    Indices += z * stride_iz + h * stride_ih + start_m * stride_im

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = load_rows(q_desc, z, h, start_m * BLOCK_M, BLOCK_M, HEAD_DIM)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Indices ascend, so a kept partial last block is the last entry: the loop before it needs no mask.
    n_full = N // BLOCK_N
    last = tl.load(Indices + tl.maximum(count - 1, 0))
    has_partial = (count > 0) & (last >= n_full)
    n_unmasked = count - has_partial.to(tl.int32)
    following = tl.load(Indices)
    for i in range(0, n_unmasked):
        # The next index is loaded one iteration ahead, so that K/V addresses do not wait on it.
        start_n = following * BLOCK_N
        following = tl.load(Indices + tl.minimum(i + 1, n_unmasked - 1))
        acc, l_i, m_i = _sparse_block(acc, l_i, m_i, q, k_desc, v_desc, z, h, start_n, offs_m, offs_n, N, qk_scale,
                                      alpha, far, horizon_queries, horizon_keys, blocked_logit, BLOCK_N=BLOCK_N,
                                      HEAD_DIM=HEAD_DIM, BOUNDS=False, RULE=RULE, HORIZON=HORIZON)
    if has_partial:
        acc, l_i, m_i = _sparse_block(acc, l_i, m_i, q, k_desc, v_desc, z, h, last * BLOCK_N, offs_m, offs_n, N,
                                      qk_scale, alpha, far, horizon_queries, horizon_keys, blocked_logit,
                                      BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM, BOUNDS=True, RULE=RULE,
                                      HORIZON=HORIZON)

    acc = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
    store_rows(o_desc, z, h, start_m * BLOCK_M, acc, BLOCK_M, HEAD_DIM)


def supports(query: torch.Tensor, key: torch.Tensor, block_size: int) -> bool:
    """Whether this kernel handles the call (else FlexAttention does)."""
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] in (64, 128)
        and query.shape == key.shape
        and block_size == BLOCK
    )


DEFAULT_CONFIG = dict(num_warps=8, num_stages=3)


def block_sparse_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor,
                           scale: float | None = None, config: dict | None = None,
                           rule: DecayRule | None = None) -> torch.Tensor:
    """Block-sparse attention on ``[B, N, H, D]`` CUDA tensors with a bool table ``[B|1, H|1, q_blocks, kv_blocks]``
    of 128x128 blocks; returns ``[B, N, H, D]``. ``rule`` (a :class:`~diffusers_attn_ext.call.DecayRule`) is
    applied inside the kept blocks: a score rule and a block mask in one kernel. The rule must span the whole
    sequence."""
    if not supports(query, key, BLOCK) or value.shape != query.shape:
        raise ValueError("block_sparse_attention needs CUDA fp16/bf16 [B, N, H, 64|128] self-attention tensors "
                         "(query, key and value of one shape)")
    return launch_block_sparse(query, key, value, blocks, scale, config, rule)


def launch_block_sparse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor,
                        scale: float | None = None, config: dict | None = None,
                        rule: DecayRule | None = None) -> torch.Tensor:
    """:func:`block_sparse_attention` without the device check (Triton's CPU interpreter runs it in the tests)."""
    batch, n, heads, head_dim = query.shape
    q_blocks = triton.cdiv(n, BLOCK)
    check_block_table(blocks, batch, heads, n)
    if rule is not None and (rule.start != 0 or rule.length != n):
        raise ValueError(f"the fused rule spans tokens {rule.start}..{rule.start + rule.length - 1}: it must span the "
                         f"whole sequence of {n} tokens")
    if rule is not None:
        real("alpha", rule.alpha, 0.0, 1.0, low_open=True)
    counts, indices, order = compressed_table(blocks)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # contiguous: the descriptor writes it
    scale = head_dim**-0.5 if scale is None else scale

    def broadcast_stride(tensor, dim):
        return 0 if tensor.shape[dim] == 1 else tensor.stride(dim)

    _block_sparse_forward[(q_blocks, batch * heads)](
        tensor_descriptor(query, BLOCK), tensor_descriptor(key, BLOCK), tensor_descriptor(value, BLOCK),
        tensor_descriptor(out, BLOCK), counts, indices, order,
        broadcast_stride(counts, 0), broadcast_stride(counts, 1), counts.stride(2),
        broadcast_stride(indices, 0), broadcast_stride(indices, 1), indices.stride(2),
        heads, n, scale * LOG2E,
        rule.alpha if rule else 1.0, rule.far if rule else 0, rule.horizon_queries if rule else 0,
        rule.horizon_keys if rule else 0, (rule.blocked if rule else 0.0) * LOG2E,
        RULE=rule is not None, HORIZON=bool(rule and rule.has_horizon),
        BLOCK_M=BLOCK, BLOCK_N=BLOCK, HEAD_DIM=head_dim, **{**DEFAULT_CONFIG, **(config or {})},
    )
    return out
