"""A quantized block-sparse FlashAttention-2 forward in Triton (CUDA only, opt-in): INT8 Q/K with per-block
scales and key smoothing, P and V for the PV product in 16 bits (the default) or in FP8 (e4m3; Ada and Hopper),
fp32 online softmax, bf16/fp16 output.

The arithmetic is SageAttention's (SageAttention, arXiv 2410.02367, section 3; SageAttention2, arXiv 2411.10958,
section 3; thu-ml/SageAttention ``sageattention/triton/``) and is restated step by step in torch by
:func:`diffusers_attn_ext.kernels.quantize.quantized_attention_reference`, which the tests hold this kernel to.
Two passes:

1. quantize (three small kernels, memory bound): Q and K to INT8 per 128-token block of one (batch, head),
   ``x^ = round_half_away(x / sigma)``, ``sigma = max |x| / 127``, K after subtracting its mean over tokens
   (``quantize.key_mean``), Q's scale folding in ``scale * log2(e)``; V to FP8 e4m3 per channel
   (``tau = max_t |v| / 448``), stored transposed ``[B*H, D, N_pad]`` so that the PV product reads it K-major, as
   Hopper's 8-bit tensor-core instructions need.
2. attention: each program takes one 128-row query block and loops over the key blocks its row of the block table
   keeps (or all of them), as :mod:`block_sparse_triton` does (compressed table, next index loaded ahead, longest
   rows first): ``s = (q^ . k^) sigma_q sigma_k`` from an INT8 dot with INT32 accumulation, online softmax in
   log2 units with the weights scaled to (0, 448] (``2^(s - m + log2 448)``), their e4m3 rounding times the FP8 V
   block in an FP8 dot (fp32 result, added to an fp32 accumulator), and at the end ``o = tau * acc / l``.

With a :class:`~diffusers_attn_ext.call.DecayRule`, the rule acts on the scores with ``q . mean(k)``
added back (its sign test is not invariant to the smoothing; ``quantize`` module docstring). ``pv_dtype="bf16"`` keeps P and V in 16 bits
(INT8 QK only, SageAttention v1). Kernel tiles are the table's 128x128 blocks; ``config`` tunes warps and stages.

INT32 scores to float32 (``config["int_to_float"]``, :data:`INT_TO_FLOAT`): a plain conversion (I2F) is a
quarter-rate instruction on sm90 (16 per SM per clock, as the softmax's EX2). The magic-number cast avoids it: for
an int32 ``|s| <= 2^22``, the bits of ``s + 0x4B400000`` (0x4B400000 is 1.5 * 2^23: the integer lands in the
mantissa) are the float32 ``12582912 + s`` exactly (|s| <= 127^2 D = 2,064,512 for D <= 128). "magic" then
subtracts ``12582912.0`` (exact: bit for bit "convert"); the default "magic-fma" folds ``12582912 * factor`` into
the exponent's per-row constant instead, one FADD per score fewer (not bit-exact: :func:`_quantized_block`).
With a rule both subtract first. Measured on the H200 (docs/benchmarks.md, dense, 1.3B shape): the exact cast
alone gains nothing over I2F (FP8 PV 11.61 vs 11.67 ms; 16-bit PV 3.8% slower): the kernel is not bound by I2F;
the fold is 7.6% faster than I2F with FP8 PV, 3.1% with 16-bit PV. Letting the INT8 dot accumulate onto the magic
constant, so that no integer add is left either, gained nothing on the dense kernel and was removed.

The kernel layer runs it only when asked (``kernels.use_quantized_attention``), launched as the custom operator
``triton_ops.quantized`` so that compiled regions can call it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..call import DecayRule
from ..validation import boolean, choice, real
from .block_sparse_table import BLOCK, check_block_table, compressed_table
from .flash_triton import decay_rule, load_rows, store_rows, tensor_descriptor
from .quantize import (
    DEFAULT_PV,
    FP8_MAX,
    INT8_MAX,
    LOG2_FP8_MAX,
    LOG2E,
    PV_DTYPES,
    TINY,
    key_mean,
    value_channel_scale,
)

_INT8_MAX, _TINY, _LOG2_FP8_MAX = tl.constexpr(INT8_MAX), tl.constexpr(TINY), tl.constexpr(LOG2_FP8_MAX)
MAGIC_INT = 0x4B400000  # the float32 1.5 * 2^23: int32 s added to its bits reads as 12582912 + s for |s| <= 2^22
MAGIC_FLOAT = 12582912.0
_MAGIC_INT, _MAGIC_FLOAT = tl.constexpr(MAGIC_INT), tl.constexpr(MAGIC_FLOAT)
INT_TO_FLOAT = ("magic-fma", "magic", "convert")  # config["int_to_float"]; the first is the default


@triton.jit
def _quantize_int8(X, Mean, Out, Sigma, Bias, stride_xz, stride_xn, stride_xh, H, N, N_PAD, factor,
                   SUBTRACT: tl.constexpr, BIAS: tl.constexpr, BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One 128-token block of one (batch, head) to INT8 rows of ``Out [B*H, N_PAD, D]`` and ``factor * sigma``;
    ``SUBTRACT``: minus ``Mean [B*H, D]`` first (rows past ``N`` stay zero); ``BIAS``: also
    ``factor * x . Mean`` per row into ``Bias [B*H, N_PAD]``."""
    blk, bh = tl.program_id(0), tl.program_id(1)
    z, h = bh // H, bh % H
    rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, HEAD_DIM)
    valid = rows < N
    x = tl.load(X + z * stride_xz + h * stride_xh + rows[:, None] * stride_xn + cols[None, :],
                mask=valid[:, None], other=0.0).to(tl.float32)
    if SUBTRACT or BIAS:
        mean = tl.load(Mean + bh * HEAD_DIM + cols)
        if BIAS:
            tl.store(Bias + bh * N_PAD + rows, tl.sum(x * mean[None, :], 1) * factor)
        if SUBTRACT:
            x = tl.where(valid[:, None], x - mean[None, :], 0.0)
    sigma = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), _TINY) / _INT8_MAX
    y = x / sigma
    y = y + tl.where(y >= 0, 0.5, -0.5)  # round half away from zero: the cast truncates
    tl.store(Out + (bh * N_PAD + rows)[:, None] * HEAD_DIM + cols[None, :], y.to(tl.int8))
    tl.store(Sigma + bh * (N_PAD // BLOCK_T) + blk, sigma * factor)


@triton.jit
def _quantize_fp8_transposed(X, Tau, Out, stride_xz, stride_xn, stride_xh, H, N, N_PAD,
                             BLOCK_T: tl.constexpr, HEAD_DIM: tl.constexpr):
    """One 128-token block of V to e4m3 ``v / tau`` (per channel), written transposed into ``Out [B*H, D, N_PAD]``."""
    blk, bh = tl.program_id(0), tl.program_id(1)
    z, h = bh // H, bh % H
    rows = blk * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, HEAD_DIM)
    x = tl.load(X + z * stride_xz + h * stride_xh + rows[:, None] * stride_xn + cols[None, :],
                mask=(rows < N)[:, None], other=0.0).to(tl.float32)
    tau = tl.load(Tau + bh * HEAD_DIM + cols)
    y = (x / tau[None, :]).to(tl.float8e4nv)
    tl.store(Out + (bh * HEAD_DIM + cols)[:, None] * N_PAD + rows[None, :], tl.trans(y))


@triton.jit
def _quantized_block(acc, l_i, m_i, q, q_sigma, bias, k_desc, v_desc, KSigma, z, h, bh, start_n, offs_m, offs_n,
                     N, N_PAD, alpha, far, horizon_queries, horizon_keys, blocked_logit,
                     BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BOUNDS: tl.constexpr,
                     RULE: tl.constexpr, HORIZON: tl.constexpr, PV_FP8: tl.constexpr, INT_TO_FLOAT: tl.constexpr):
    """One kept key block: INT8 scores, online softmax step (log2 units), PV in FP8 or 16 bits.

    ``INT_TO_FLOAT`` (module docstring): "convert" ``s = float(s_int)``; "magic" ``s = bits(s_int + 0x4B400000) -
    12582912``, exact, so bit for bit "convert"; "magic-fma" (no rule) keeps ``s' = 12582912 + s`` and computes
    ``2^(s' f - c)`` with ``c = m - offset + 12582912 f`` rounded once per row and key block. The FMA's product is
    exact, so the only change is the rounding of ``c`` (and of ``12582912 f`` within it), at most ``2^-23 |c|`` in
    log2 units: one row of one key block scaled by a factor within ``1 ± 9e-8 |c|``. ``12582912 f`` is 12582912 / (127^2 D), about 6 (D 128) or 12
    (D 64), times the largest score the block's scales allow (``D max|q| max|k| scale log2 e``); for |c| up to
    1e4 the change stays below 9e-4, under P's own rounding (e4m3 2^-4, bf16 2^-9), though it moves some of P's
    roundings to the neighbouring value (on the tests' D 64 inputs, |c| about 2000: 0.17% rel. L2 of the output
    from "magic", against about 4% for the FP8 path from exact attention). The largest weight becomes at most
    ``448 (1 + 9e-4)``, which e4m3 rounds to 448.
    """
    if PV_FP8:  # weights in (0, 448] for e4m3, (0, 1] otherwise
        offset = _LOG2_FP8_MAX
    else:
        offset = 0.0
    k = k_desc.load([bh * N_PAD + start_n, 0])
    factor = q_sigma * tl.load(KSigma + bh * (N_PAD // BLOCK_N) + start_n // BLOCK_N)
    s = tl.dot(q, k.T, out_dtype=tl.int32)
    if INT_TO_FLOAT == "convert":
        s = s.to(tl.float32)
    else:  # |s| <= 127^2 * 128 < 2^22: 12582912 + s exactly
        s = (s + _MAGIC_INT).to(tl.float32, bitcast=True)
    folded = INT_TO_FLOAT == "magic-fma" and not RULE
    if INT_TO_FLOAT != "convert" and not folded:
        s = s - _MAGIC_FLOAT  # exact: an integer below 2^22
    if RULE:
        s = decay_rule(s * factor + bias[:, None], offs_m, start_n + offs_n, alpha, far, horizon_queries,
                       horizon_keys, blocked_logit, HORIZON)
        if BOUNDS:
            s = tl.where((start_n + offs_n < N)[None, :], s, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - (m_ij - offset)[:, None])
    else:  # the scale is positive: the row max of s times it is the max of the scores (one FMA per score)
        if BOUNDS:
            s = tl.where((start_n + offs_n < N)[None, :], s, float("-inf"))
        if folded:  # s is 12582912 + the integer: the row max less that is exact
            m_ij = tl.maximum(m_i, (tl.max(s, 1) - _MAGIC_FLOAT) * factor)
            p = tl.math.exp2(s * factor - (m_ij - offset + _MAGIC_FLOAT * factor)[:, None])
        else:
            m_ij = tl.maximum(m_i, tl.max(s, 1) * factor)
            p = tl.math.exp2(s * factor - (m_ij - offset)[:, None])
    correction = tl.math.exp2(m_i - m_ij)
    l_i = l_i * correction + tl.sum(p, 1)
    if PV_FP8:
        vt = v_desc.load([bh * HEAD_DIM, start_n])  # [HEAD_DIM, BLOCK_N]: V^T, K-major for the 8-bit dot
        pv = tl.dot(p.to(tl.float8e4nv), vt.T)
    else:
        v = load_rows(v_desc, z, h, start_n, BLOCK_N, HEAD_DIM)
        pv = tl.dot(p.to(v.dtype), v)
    return acc * correction[:, None] + pv, l_i, m_ij


@triton.jit
def _quantized_forward(
    q_desc, k_desc, v_desc, o_desc, QSigma, KSigma, Tau, Bias, Counts, Indices, Order,
    stride_cz, stride_ch, stride_cm, stride_iz, stride_ih, stride_im,
    H, N, N_PAD, alpha, far, horizon_queries, horizon_keys, blocked_logit,
    SPARSE: tl.constexpr, RULE: tl.constexpr, HORIZON: tl.constexpr, PV_FP8: tl.constexpr,
    INT_TO_FLOAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    bh = tl.program_id(1)
    z, h = bh // H, bh % H
    if SPARSE:
        table_row = z * stride_cz + h * stride_ch
        start_m = tl.load(Order + table_row + tl.program_id(0) * stride_cm)  # longest rows first
        count = tl.load(Counts + table_row + start_m * stride_cm)
        Indices += z * stride_iz + h * stride_ih + start_m * stride_im
    else:
        start_m = tl.program_id(0)

    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = q_desc.load([bh * N_PAD + start_m * BLOCK_M, 0])
    q_sigma = tl.load(QSigma + bh * (N_PAD // BLOCK_M) + start_m)
    if RULE:
        bias = tl.load(Bias + bh * N_PAD + offs_m)
    else:
        bias = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    n_full = N // BLOCK_N
    if SPARSE:
        # Indices ascend, so a kept partial last block is the last entry: the loop before it needs no mask.
        last = tl.load(Indices + tl.maximum(count - 1, 0))
        has_partial = (count > 0) & (last >= n_full)
        n_unmasked = count - has_partial.to(tl.int32)
        following = tl.load(Indices)
        for i in range(0, n_unmasked):
            start_n = following * BLOCK_N
            following = tl.load(Indices + tl.minimum(i + 1, n_unmasked - 1))  # one iteration ahead
            acc, l_i, m_i = _quantized_block(
                acc, l_i, m_i, q, q_sigma, bias, k_desc, v_desc, KSigma, z, h, bh, start_n, offs_m, offs_n, N, N_PAD,
                alpha, far, horizon_queries, horizon_keys, blocked_logit, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
                BOUNDS=False, RULE=RULE, HORIZON=HORIZON, PV_FP8=PV_FP8,
                INT_TO_FLOAT=INT_TO_FLOAT)
        if has_partial:
            acc, l_i, m_i = _quantized_block(
                acc, l_i, m_i, q, q_sigma, bias, k_desc, v_desc, KSigma, z, h, bh, last * BLOCK_N, offs_m, offs_n,
                N, N_PAD, alpha, far, horizon_queries, horizon_keys, blocked_logit, BLOCK_N=BLOCK_N,
                HEAD_DIM=HEAD_DIM, BOUNDS=True, RULE=RULE, HORIZON=HORIZON, PV_FP8=PV_FP8,
                INT_TO_FLOAT=INT_TO_FLOAT)
    else:
        for start_n in range(0, n_full * BLOCK_N, BLOCK_N):
            acc, l_i, m_i = _quantized_block(
                acc, l_i, m_i, q, q_sigma, bias, k_desc, v_desc, KSigma, z, h, bh, start_n, offs_m, offs_n, N, N_PAD,
                alpha, far, horizon_queries, horizon_keys, blocked_logit, BLOCK_N=BLOCK_N, HEAD_DIM=HEAD_DIM,
                BOUNDS=False, RULE=RULE, HORIZON=HORIZON, PV_FP8=PV_FP8,
                INT_TO_FLOAT=INT_TO_FLOAT)
        if n_full * BLOCK_N < N:
            acc, l_i, m_i = _quantized_block(
                acc, l_i, m_i, q, q_sigma, bias, k_desc, v_desc, KSigma, z, h, bh, n_full * BLOCK_N, offs_m, offs_n,
                N, N_PAD, alpha, far, horizon_queries, horizon_keys, blocked_logit, BLOCK_N=BLOCK_N,
                HEAD_DIM=HEAD_DIM, BOUNDS=True, RULE=RULE, HORIZON=HORIZON, PV_FP8=PV_FP8,
                INT_TO_FLOAT=INT_TO_FLOAT)

    if PV_FP8:
        acc = acc * tl.load(Tau + bh * HEAD_DIM + tl.arange(0, HEAD_DIM))[None, :]
    acc = tl.where(l_i[:, None] > 0, acc / l_i[:, None], 0.0)
    store_rows(o_desc, z, h, start_m * BLOCK_M, acc, BLOCK_M, HEAD_DIM)


def supports(query: torch.Tensor, key: torch.Tensor, block_size: int = BLOCK) -> bool:
    """Whether this kernel handles the call: CUDA fp16/bf16 self-attention ``[B, N, H, 64|128]``, 128-token
    blocks. FP8 P/V needs compute capability 8.9 or higher (:func:`fp8_supported`)."""
    return (
        query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and query.shape[-1] in (64, 128)
        and query.shape == key.shape
        and block_size == BLOCK
    )


def fp8_supported(device: torch.device | int | None = None) -> bool:
    """Whether the GPU has FP8 tensor cores (Ada sm89, Hopper sm90 and later). Call it outside compiled code."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 9)


DEFAULT_CONFIG = dict(num_warps=8, num_stages=3)


def quantized_block_sparse_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor | None = None,
    scale: float | None = None, *, pv_dtype: str = DEFAULT_PV, smooth_keys: bool = True, rule: DecayRule | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """Quantized attention on ``[B, N, H, D]`` CUDA tensors, returning ``[B, N, H, D]`` in the query's dtype.

    Args:
        blocks: bool table ``[B|1, H|1, q_blocks, kv_blocks]`` of 128x128 blocks, as
            :func:`~diffusers_attn_ext.kernels.block_sparse_triton.block_sparse_attention` takes it; None attends to
            every key (the quantized dense-equivalent kernel). Query blocks that keep nothing output zeros.
        scale: logit scale, default ``D ** -0.5``.
        pv_dtype: "bf16" (the default: P in V's 16-bit dtype, V unquantized; INT8 QK only, SageAttention v1) or
            "fp8" (P and V in e4m3, SageAttention2; needs :func:`fp8_supported`).
        smooth_keys: subtract K's mean over tokens before quantizing (softmax-invariant; default on).
        rule: a :class:`~diffusers_attn_ext.call.DecayRule` applied inside the kept blocks, on the
            scores with ``q . mean(k)`` added back; it must span the whole sequence.
        config: Triton launch options (``num_warps``, ``num_stages``) and ``int_to_float``, how the INT32 scores
            become float32: one of :data:`INT_TO_FLOAT`, default "magic-fma" (module docstring).
    """
    if not supports(query, key) or value.shape != query.shape:
        raise ValueError("quantized_block_sparse_attention needs CUDA fp16/bf16 [B, N, H, 64|128] self-attention "
                         "tensors (query, key and value of one shape)")
    return launch_quantized(query, key, value, blocks, scale, pv_dtype=pv_dtype, smooth_keys=smooth_keys,
                            rule=rule, config=config)


def _int8_descriptor(x: torch.Tensor) -> TensorDescriptor:
    """``[B*H, N_PAD, D]`` int8 rows as a 2D descriptor of 128-row tiles."""
    rows = x.shape[0] * x.shape[1]
    return TensorDescriptor(x, [rows, x.shape[2]], [x.shape[2], 1], [BLOCK, x.shape[2]])


def launch_quantized(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor | None = None,
    scale: float | None = None, *, pv_dtype: str = DEFAULT_PV, smooth_keys: bool = True, rule: DecayRule | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """:func:`quantized_block_sparse_attention` without the device check (Triton's CPU interpreter runs it in the
    tests)."""
    pv_dtype = choice("pv_dtype", pv_dtype, PV_DTYPES)
    smooth_keys = boolean("smooth_keys", smooth_keys)
    launch = {**DEFAULT_CONFIG, **(config or {})}
    int_to_float = choice("config['int_to_float']", launch.pop("int_to_float", INT_TO_FLOAT[0]), INT_TO_FLOAT)
    if key.shape != query.shape or value.shape != query.shape:
        raise ValueError(f"query, key and value must have one shape [B, N, H, D], got {tuple(query.shape)}, "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    batch, n, heads, head_dim = query.shape
    if blocks is not None:
        check_block_table(blocks, batch, heads, n)
    if rule is not None and (rule.start != 0 or rule.length != n):
        raise ValueError(f"the fused rule spans tokens {rule.start}..{rule.start + rule.length - 1}: it must span the "
                         f"whole sequence of {n} tokens")
    if rule is not None:
        real("alpha", rule.alpha, 0.0, 1.0, low_open=True)  # far scores take min(s, alpha * s): alpha <= 1
    scale = head_dim**-0.5 if scale is None else scale
    q_blocks = triton.cdiv(n, BLOCK)
    n_pad = q_blocks * BLOCK
    device, bh = query.device, batch * heads
    grid = (q_blocks, bh)

    mean = key_mean(key).contiguous() if smooth_keys else None
    add_back = rule is not None and smooth_keys  # the rule needs the unsmoothed scores: + q . mean(k)
    q_int = torch.empty(bh, n_pad, head_dim, dtype=torch.int8, device=device)
    k_int = torch.empty_like(q_int)
    q_sigma = torch.empty(bh, q_blocks, dtype=torch.float32, device=device)
    k_sigma = torch.empty_like(q_sigma)
    bias = q_sigma  # unread without a rule
    if rule is not None:  # filled by Q's quantization, or zero without smoothing
        bias = (torch.empty if add_back else torch.zeros)(bh, n_pad, dtype=torch.float32, device=device)
    query, key, value = (x if x.stride(-1) == 1 else x.contiguous() for x in (query, key, value))
    _quantize_int8[grid](query, mean if add_back else q_sigma, q_int, q_sigma, bias,
                         query.stride(0), query.stride(1), query.stride(2), heads, n, n_pad, scale * LOG2E,
                         SUBTRACT=False, BIAS=add_back, BLOCK_T=BLOCK, HEAD_DIM=head_dim, num_warps=4)
    _quantize_int8[grid](key, mean if smooth_keys else k_sigma, k_int, k_sigma, k_sigma,
                         key.stride(0), key.stride(1), key.stride(2), heads, n, n_pad, 1.0,
                         SUBTRACT=smooth_keys, BIAS=False, BLOCK_T=BLOCK, HEAD_DIM=head_dim, num_warps=4)
    if pv_dtype == "fp8":
        tau = value_channel_scale(value).contiguous()
        v_fp8 = torch.empty(bh, head_dim, n_pad, dtype=torch.float8_e4m3fn, device=device)
        _quantize_fp8_transposed[grid](value, tau, v_fp8, value.stride(0), value.stride(1), value.stride(2),
                                       heads, n, n_pad, BLOCK_T=BLOCK, HEAD_DIM=head_dim, num_warps=4)
        v_desc = TensorDescriptor(v_fp8, [bh * head_dim, n_pad], [n_pad, 1], [head_dim, BLOCK])
    else:
        tau, v_desc = q_sigma, tensor_descriptor(value, BLOCK)

    if blocks is not None:
        counts, indices, order = compressed_table(blocks)
    else:
        counts = indices = order = q_sigma  # unread: the dense loop visits every key block

    def broadcast_stride(tensor, dim):
        return 0 if blocks is None or tensor.shape[dim] == 1 else tensor.stride(dim)

    out = torch.empty(query.shape, dtype=query.dtype, device=device)  # contiguous: the descriptor writes it
    _quantized_forward[grid](
        _int8_descriptor(q_int), _int8_descriptor(k_int), v_desc, tensor_descriptor(out, BLOCK),
        q_sigma, k_sigma, tau, bias, counts, indices, order,
        broadcast_stride(counts, 0), broadcast_stride(counts, 1), counts.stride(-1),
        broadcast_stride(indices, 0), broadcast_stride(indices, 1), indices.stride(-2) if blocks is not None else 0,
        heads, n, n_pad,
        rule.alpha if rule else 1.0, rule.far if rule else 0, rule.horizon_queries if rule else 0,
        rule.horizon_keys if rule else 0, (rule.blocked if rule else 0.0) * LOG2E,
        SPARSE=blocks is not None, RULE=rule is not None, HORIZON=bool(rule and rule.has_horizon),
        PV_FP8=pv_dtype == "fp8", INT_TO_FLOAT=int_to_float,
        BLOCK_M=BLOCK, BLOCK_N=BLOCK, HEAD_DIM=head_dim, **launch,
    )
    return out


__all__ = ["DEFAULT_CONFIG", "FP8_MAX", "INT_TO_FLOAT", "MAGIC_FLOAT", "MAGIC_INT", "fp8_supported",
           "launch_quantized", "quantized_block_sparse_attention", "supports"]
