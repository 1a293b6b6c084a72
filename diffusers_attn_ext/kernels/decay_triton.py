"""A fused Triton attention kernel for a :class:`~diffusers_attn_ext.call.DecayRule` (CUDA only).

FlashAttention-2 forward (online softmax over key blocks) with the rule inside the inner loop. For each query
block the key blocks fall into three classes, each with its own loop: near blocks (every pair within ``far``,
and for horizon queries inside the horizon) run plain attention; far blocks (every pair beyond ``far``) apply
the sign rule as ``min(s, alpha * s)``, which equals "alpha * s if s > 0" for alpha <= 1 at the cost of one
multiply and one min; the few boundary blocks apply the whole rule per element. Scores are kept in the log2
domain (scale * log2(e)), where scaling a logit by alpha is the same operation. Tiles move through tensor
descriptors (zero rows past the sequence); only the partial last key block needs a ``-inf`` mask.

Supports rules whose span is the whole sequence (it starts at token 0 and fills it), head dims 64 and 128,
fp16/bf16. Everything else goes through FlexAttention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..call import DecayRule
from ..validation import real
from .flash_triton import decay_rule, load_rows, online_softmax_step, store_rows, tensor_descriptor

LOG2E = 1.4426950408889634


# What a range of key blocks needs: nothing, the sign rule only, or the whole rule per element.
NEAR, FAR, RULE = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _attend_blocks(
    acc, l_i, m_i, q, k_desc, v_desc, z, h, first, last, offs_m, offs_n, N,
    qk_scale, alpha, far, horizon_queries, horizon_keys, blocked_logit,
    MODE: tl.constexpr, BOUNDS: tl.constexpr, HORIZON: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    """Attend to key blocks ``[first, last)``, all of one class (``MODE``)."""
    for start_n in range(first * BLOCK_N, last * BLOCK_N, BLOCK_N):
        offs_kv = start_n + offs_n
        k = load_rows(k_desc, z, h, start_n, BLOCK_N, HEAD_DIM)
        v = load_rows(v_desc, z, h, start_n, BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, k.T) * qk_scale
        if MODE == FAR:
            # Every pair is far: alpha * s for s > 0, s otherwise, which for alpha <= 1 is min(s, alpha * s).
            qk = tl.minimum(qk, qk * alpha)
        if MODE == RULE:
            qk = decay_rule(qk, offs_m, offs_kv, alpha, far, horizon_queries, horizon_keys, blocked_logit, HORIZON)
        if BOUNDS:
            qk = tl.where((offs_kv < N)[None, :], qk, float("-inf"))
        acc, l_i, m_i = online_softmax_step(acc, l_i, m_i, qk, v)
    return acc, l_i, m_i


@triton.jit
def _decay_forward(
    q_desc, k_desc, v_desc, o_desc,
    H, N, qk_scale, alpha, far, horizon_queries, horizon_keys, blocked_logit,
    HORIZON: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    z, h = off_hz // H, off_hz % H

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = load_rows(q_desc, z, h, start_m * BLOCK_M, BLOCK_M, HEAD_DIM)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    # Key blocks of this query block, in order: [0, a) far | [a, lo) rule | [lo, hi) near | [hi, b) rule |
    # [b, n_full) far | [n_full, n_blocks) the partial last block, rule with bounds.
    q_first = start_m * BLOCK_M
    q_last = tl.minimum(q_first + BLOCK_M, N) - 1
    n_full = N // BLOCK_N
    n_blocks = tl.cdiv(N, BLOCK_N)
    lo = tl.minimum(tl.maximum(tl.cdiv(q_last - far, BLOCK_N), 0), n_full)
    hi = tl.minimum(tl.maximum((q_first + far + 1) // BLOCK_N, 0), n_full)
    a = tl.minimum(tl.maximum(q_first - far, 0) // BLOCK_N, lo)
    b = (q_last + far) // BLOCK_N + 1
    if HORIZON:
        if q_first < horizon_queries:  # horizon queries: the blocked rule applies beyond the horizon
            hi = tl.minimum(hi, horizon_keys // BLOCK_N)
            a = 0
            b = n_full
    hi = tl.maximum(hi, lo)
    b = tl.maximum(tl.minimum(b, n_full), hi)

    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, z, h, 0, a, offs_m, offs_n, N,
                                   qk_scale, alpha, far, horizon_queries, horizon_keys, blocked_logit,
                                   MODE=FAR, BOUNDS=False, HORIZON=HORIZON, BLOCK_N=BLOCK_N,
                                   HEAD_DIM=HEAD_DIM)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, z, h, a, lo, offs_m, offs_n, N,
                                   qk_scale, alpha, far, horizon_queries, horizon_keys, blocked_logit,
                                   MODE=RULE, BOUNDS=False, HORIZON=HORIZON, BLOCK_N=BLOCK_N,
                                   HEAD_DIM=HEAD_DIM)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, z, h, lo, hi, offs_m, offs_n, N,
                                   qk_scale, alpha, far, horizon_queries, horizon_keys, blocked_logit,
                                   MODE=NEAR, BOUNDS=False, HORIZON=HORIZON, BLOCK_N=BLOCK_N,
                                   HEAD_DIM=HEAD_DIM)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, z, h, hi, b, offs_m, offs_n, N,
                                   qk_scale, alpha, far, horizon_queries, horizon_keys, blocked_logit,
                                   MODE=RULE, BOUNDS=False, HORIZON=HORIZON, BLOCK_N=BLOCK_N,
                                   HEAD_DIM=HEAD_DIM)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, z, h, b, n_full, offs_m, offs_n, N,
                                   qk_scale, alpha, far, horizon_queries, horizon_keys, blocked_logit,
                                   MODE=FAR, BOUNDS=False, HORIZON=HORIZON, BLOCK_N=BLOCK_N,
                                   HEAD_DIM=HEAD_DIM)
    acc, l_i, m_i = _attend_blocks(acc, l_i, m_i, q, k_desc, v_desc, z, h, n_full, n_blocks, offs_m, offs_n, N,
                                   qk_scale, alpha, far, horizon_queries, horizon_keys, blocked_logit,
                                   MODE=RULE, BOUNDS=True, HORIZON=HORIZON, BLOCK_N=BLOCK_N,
                                   HEAD_DIM=HEAD_DIM)

    acc = acc / l_i[:, None]
    store_rows(o_desc, z, h, start_m * BLOCK_M, acc, BLOCK_M, HEAD_DIM)


# Chosen by measurement on the H100 (docs/benchmarks.md); overridable for tuning.
DEFAULT_CONFIG = dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3)


def supports(query: torch.Tensor, rule: DecayRule) -> bool:
    """Whether the fused kernel handles this call (else FlexAttention does)."""
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] in (64, 128)
        and rule.start == 0
        and rule.length == query.shape[1]
    )


def decay_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rule: DecayRule, scale: float | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Attention with ``rule`` on ``[B, N, H, D]`` CUDA tensors (the rule spanning the sequence), ``[B, N, H, D]``."""
    if not supports(query, rule):
        raise ValueError("decay_attention needs CUDA fp16/bf16 [B, N, H, 64|128] tensors and a rule spanning them")
    return launch_decay(query, key, value, rule, scale, config)


def launch_decay(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rule: DecayRule, scale: float | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """:func:`decay_attention` without the device check (Triton's CPU interpreter runs it in the tests)."""
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(f"query, key and value must have one shape [B, N, H, D], got {tuple(query.shape)}, "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    real("alpha", rule.alpha, 0.0, 1.0, low_open=True)
    config = {**DEFAULT_CONFIG, **(config or {})}
    batch, n, heads, head_dim = query.shape
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # contiguous: the descriptor writes it
    scale = head_dim**-0.5 if scale is None else scale
    grid = (triton.cdiv(n, config["BLOCK_M"]), batch * heads)
    _decay_forward[grid](
        tensor_descriptor(query, config["BLOCK_M"]), tensor_descriptor(key, config["BLOCK_N"]),
        tensor_descriptor(value, config["BLOCK_N"]), tensor_descriptor(out, config["BLOCK_M"]),
        heads, n, scale * LOG2E, rule.alpha, rule.far, rule.horizon_queries, rule.horizon_keys, rule.blocked * LOG2E,
        HORIZON=rule.has_horizon, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], HEAD_DIM=head_dim,
        num_warps=config["num_warps"], num_stages=config["num_stages"],
    )
    return out
