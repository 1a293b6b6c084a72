"""The quantizer arithmetic of the quantized attention kernel, in torch: the statistics the kernel's launcher
computes (key means, value channel scales) and, in any dtype (float64 for tests), a restatement of everything the
Triton kernel computes, so the kernel is checked against it (:func:`quantized_attention_reference`).

After SageAttention (Zhang et al., ICLR 2025, arXiv 2410.02367, sections 3.2-3.4: per-block INT8 Q and K, K
smoothed by its mean over tokens) and SageAttention2 (arXiv 2411.10958, section 3: FP8 E4M3 P and V for the PV
product, P with the static scale 448 since P is in [0, 1], V per channel); the authors' code is
thu-ml/SageAttention (``sageattention/triton/quant_per_block.py``, ``attn_qk_int8_per_block.py``). For one batch row
and head, with blocks of 128 tokens:

- smoothing: ``k' = k - mean_t(k)``. Softmax is invariant to it, since ``q_i . k'_j = q_i . k_j - q_i . mean(k)`` only
  shifts row i by a constant; a rule that is not invariant (a DecayRule's sign test) gets ``q_i . mean(k)`` added back.
- INT8 per block: ``sigma_b = max_{t in b, c} |x_tc| / 127``, ``x^_tc = round_half_away(x_tc / sigma_b)`` in
  [-127, 127]; the scores are ``(q^_i . k^_j) * sigma_q(b_i) * sigma_k(b_j) * scale`` (integer dot products, exact).
- FP8 V per channel: ``tau_c = max_t |v_tc| / 448``, ``v^_tc = e4m3(v_tc / tau_c)``.
- FP8 P: online softmax in log2 units ``u = score * log2(e)`` over kept key blocks in ascending order, with the
  running row max ``m``; the weights of a block are ``w_ij = 2^(u_ij - m_i + log2 448)`` (in (0, 448]), its PV
  product uses ``e4m3(w_ij)``, the row sum ``l_i`` the unrounded ``w_ij``; the output is
  ``o_ic = tau_c * acc_ic / l_i``. With ``pv_dtype="bf16"`` (SageAttention v1: INT8 QK only) the weights are
  ``2^(u - m)`` rounded to the value's dtype and V is used as given.
"""

from __future__ import annotations

import math

import torch

from ..call import DecayRule
from .block_sparse_table import BLOCK

INT8_MAX = 127.0
FP8_MAX = 448.0  # largest finite float8 e4m3 (e4m3fn) value
LOG2E = 1.4426950408889634
LOG2_FP8_MAX = math.log2(FP8_MAX)
TINY = 1e-20  # floor of a block's absolute maximum, so an all-zero block quantizes to zeros
PV_DTYPES = ("fp8", "bf16")
# The PV precision when none is named: 16 bits, as fast as FP8 on the H200 at a third to a ninth of its error
# (docs/benchmarks.md, 2026-12-02).
DEFAULT_PV = "bf16"


def key_mean(key: torch.Tensor) -> torch.Tensor:
    """Mean of ``key [B, N, H, D]`` over tokens, ``[B, H, D]`` float32 (float64 for a float64 key)."""
    dtype = torch.float64 if key.dtype == torch.float64 else torch.float32
    return key.mean(dim=1, dtype=dtype)


def value_channel_scale(value: torch.Tensor) -> torch.Tensor:
    """``tau [B, H, D]``: the largest ``|v|`` of each channel over tokens over 448 (float32; float64 for float64)."""
    dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    peak = torch.maximum(value.amax(dim=1), value.amin(dim=1).neg()).to(dtype)
    return peak.clamp_min(TINY) / FP8_MAX


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Nearest integer, ties away from zero (as the kernel's ``trunc(x + 0.5 sign(x))``)."""
    return torch.trunc(x + torch.where(x >= 0, 0.5, -0.5))


def e4m3(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest float8 e4m3 value (ties to even; |x| <= 448), in ``x``'s dtype."""
    return x.to(torch.float8_e4m3fn).to(x.dtype)


def quantize_int8_blocks(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block INT8 of ``x [B, N, H, D]``: (integer values in ``x``'s dtype ``[B, N, H, D]``, scales
    ``sigma [B, H, blocks]``) with ``x ~ values * sigma`` of the token's block."""
    batch, n, heads, dim = x.shape
    blocks = -(-n // block)
    padded = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, blocks * block - n)).unflatten(1, (blocks, block))
    peak = padded.abs().amax(dim=(2, 4))  # [B, blocks, H]
    sigma = peak.clamp_min(TINY) / INT8_MAX
    values = round_half_away(padded / sigma[:, :, None, :, None]).clamp(-INT8_MAX, INT8_MAX)
    return values.flatten(1, 2)[:, :n], sigma.transpose(1, 2).contiguous()


def dequantize_int8_blocks(values: torch.Tensor, sigma: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``values * sigma`` of each token's block: the inverse of :func:`quantize_int8_blocks` up to rounding."""
    n = values.shape[1]
    per_token = sigma.transpose(1, 2).repeat_interleave(block, dim=1)[:, :n]  # [B, N, H]
    return values * per_token[..., None]


def quantize_fp8_channels(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel FP8 of ``value [B, N, H, D]``: (e4m3 values in ``value``'s dtype, ``tau [B, H, D]``), with
    ``value ~ values * tau``."""
    tau = value_channel_scale(value).to(value.dtype)
    return e4m3(value / tau[:, None]), tau


def smooth_keys(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``key - mean``, ``mean [B, H, D]``) with the mean over tokens."""
    mean = key_mean(key).to(key.dtype)
    return key - mean[:, None], mean


def apply_decay_rule(scores: torch.Tensor, rule: DecayRule, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """A :class:`~diffusers_attn_ext.call.DecayRule` on natural-log scores of queries ``q_idx`` and keys ``kv_idx``
    (broadcasting sequence positions): far pairs in its span take ``alpha * s`` where ``s > 0``; horizon queries get
    ``blocked`` for keys at or past the horizon."""
    a, b = q_idx - rule.start, kv_idx - rule.start
    span = (a >= 0) & (a < rule.length) & (b >= 0) & (b < rule.length)
    far = span & ((a - b).abs() > rule.far) & (scores > 0)
    scores = torch.where(far, scores * rule.alpha, scores)
    if rule.has_horizon:
        blocked = span & (a < rule.horizon_queries) & (b >= rule.horizon_keys)
        scores = torch.where(blocked, torch.full_like(scores, rule.blocked), scores)
    return scores


def _block_rows(table: torch.Tensor | None, batch: int, heads: int, n: int, kv_block: int, device) -> torch.Tensor:
    """Which query rows keep key block ``kv_block``: ``[B, H, N]`` bool."""
    if table is None:
        return torch.ones(batch, heads, n, dtype=torch.bool, device=device)
    rows = table[..., kv_block].repeat_interleave(BLOCK, dim=-1)[..., :n]
    return rows.expand(batch, heads, n)


def quantized_attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor | None = None,
    scale: float | None = None, *, pv_dtype: str = DEFAULT_PV, smooth: bool = True, rule: DecayRule | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """What the quantized kernel computes (module docstring), step by step in ``dtype``: ``[B, N, H, D]``.

    ``query``/``key``/``value`` are ``[B, N, H, D]``; ``blocks`` a bool ``[1|B, 1|H, q_blocks, kv_blocks]`` table of
    128-token blocks (None: every block); ``rule`` a :class:`~diffusers_attn_ext.call.DecayRule`
    applied to the scores with ``q . mean(k)`` added back. Query rows
    that keep no block give zeros. In PV, the weights round to e4m3 (``pv_dtype="fp8"``) or to ``value.dtype``
    (``"bf16"``, V unquantized). The inputs' own rounding (bf16) is taken as given: they are cast to ``dtype``.
    """
    batch, n, heads, dim = query.shape
    scale = dim**-0.5 if scale is None else scale
    q, k, v = (x.to(dtype) for x in (query, key, value))
    mean = key_mean(k) if smooth else torch.zeros(batch, heads, dim, dtype=dtype, device=q.device)
    q_int, q_sigma = quantize_int8_blocks(q)
    k_int, k_sigma = quantize_int8_blocks(k - mean[:, None])
    if pv_dtype == "fp8":
        v_hat, tau = quantize_fp8_channels(v)
        offset = LOG2_FP8_MAX
    else:
        v_hat, tau, offset = v, torch.ones(batch, heads, dim, dtype=dtype, device=q.device), 0.0
    q_int, k_int, v_hat = (x.transpose(1, 2) for x in (q_int, k_int, v_hat))  # [B, H, N, D]
    q_row_sigma = q_sigma.repeat_interleave(BLOCK, dim=-1)[..., :n]  # [B, H, N]
    bias = (q.transpose(1, 2) @ mean[..., None])[..., 0] * scale if rule else None  # q . mean(k) [B, H, N]
    idx = torch.arange(n, device=q.device)

    m = torch.full((batch, heads, n), -math.inf, dtype=dtype, device=q.device)
    row_sum = torch.zeros(batch, heads, n, dtype=dtype, device=q.device)
    acc = torch.zeros(batch, heads, n, dim, dtype=dtype, device=q.device)
    for kv_block in range(-(-n // BLOCK)):
        cols = slice(kv_block * BLOCK, min(n, (kv_block + 1) * BLOCK))
        scores = (q_int @ k_int[:, :, cols].transpose(-1, -2)) * q_row_sigma[..., None] * k_sigma[..., kv_block, None, None]
        scores = scores * scale
        if rule is not None:
            scores = apply_decay_rule(scores + bias[..., None], rule, idx[:, None], idx[cols][None, :])
        u = scores * LOG2E
        keep = _block_rows(blocks, batch, heads, n, kv_block, q.device)
        m_new = torch.where(keep, torch.maximum(m, u.amax(-1)), m)
        weights = torch.where(keep[..., None], torch.exp2(u - m_new[..., None] + offset), 0.0)
        correction = torch.where(keep, torch.exp2(m - m_new), 1.0)
        rounded = e4m3(weights) if pv_dtype == "fp8" else weights.to(value.dtype).to(dtype)
        row_sum = row_sum * correction + weights.sum(-1)
        acc = acc * correction[..., None] + rounded @ v_hat[:, :, cols]
        m = m_new
    out = torch.where(row_sum[..., None] > 0, acc * tau[:, :, None, :] / row_sum[..., None], 0.0)
    return out.transpose(1, 2)


def exact_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor | None = None,
                    scale: float | None = None, rule: DecayRule | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """softmax(scale q k^T [rule] [block mask]) v in ``dtype``, ``[B, N, H, D]``: the unquantized formula
    (rows keeping no block: zeros)."""
    n, dim = query.shape[1], query.shape[-1]
    scale = dim**-0.5 if scale is None else scale
    q, k, v = (x.to(dtype).transpose(1, 2) for x in (query, key, value))
    scores = q @ k.transpose(-1, -2) * scale
    if rule is not None:
        idx = torch.arange(n, device=q.device)
        scores = apply_decay_rule(scores, rule, idx[:, None], idx[None, :])
    if blocks is not None:
        keep = blocks.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)[..., :n, :n]
        scores = scores.masked_fill(~keep, -math.inf)
    return (scores.softmax(-1).nan_to_num(0.0) @ v).transpose(1, 2)


def quantization_error_bound(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor | None = None,
    scale: float | None = None, *, pv_dtype: str = DEFAULT_PV, smooth: bool = True, rule: DecayRule | None = None,
) -> torch.Tensor:
    """A bound ``[B, N, H, D]`` (float64) on ``|quantized_attention_reference - exact_attention|`` per element, from
    the quantizers' rounding alone (explicit N x N scores: small inputs only).

    Scores: with ``q = q~ + e_q`` (``q~`` dequantized, ``|e_q| <= sigma_q / 2``) and likewise for the smoothed keys,
    ``|s^_ij - s_ij| <= eps_i = scale (||q~_i||_1 max sigma_k / 2 + sigma_q(i) / 2 max_j ||k~_j||_1 + D sigma_q(i)
    max sigma_k / 4)``; the decay rule is 1-Lipschitz (``alpha <= 1``) and the added-back ``q . mean(k)`` exact, so
    the softmax weights ``w^`` of the quantized scores are within ``exp(+-2 eps_i)`` of the exact ``w``, and
    ``|sum_j (w^_j - w_j) v_jc| <= (exp(2 eps_i) - 1) sum_j w_j |v_jc|``. PV: a weight rounds with relative error
    ``u_p`` (e4m3: 2^-4; 16 bits: 2^-8) or, below e4m3's smallest normal, absolute ``2^-10`` on a scale where the row
    sum is at least 448; a value with ``u_v = 2^-4`` or absolute ``2^-10 tau_c``. So
    ``|o - o^| <= sum_j (u_p w^_j + a_p) |tau v^_jc| + w^_j |tau v^_jc - v_jc|`` with ``a_p = 2^-10 / 448`` for
    e4m3, the value error taken exactly.
    """
    batch, n, heads, dim = query.shape
    scale = dim**-0.5 if scale is None else scale
    q, k, v = (x.double() for x in (query, key, value))
    mean = key_mean(k) if smooth else torch.zeros(batch, heads, dim, dtype=torch.float64, device=q.device)
    q_int, q_sigma = quantize_int8_blocks(q)
    k_smooth = k - mean[:, None]
    k_int, k_sigma = quantize_int8_blocks(k_smooth)
    q_deq, k_deq = dequantize_int8_blocks(q_int, q_sigma), dequantize_int8_blocks(k_int, k_sigma)
    q_row_sigma = q_sigma.repeat_interleave(BLOCK, dim=-1)[..., :n]  # [B, H, N]
    k_max_sigma = k_sigma.amax(-1)[..., None]  # [B, H, 1]
    q_l1 = q_deq.abs().sum(-1).transpose(1, 2)  # [B, H, N]
    k_l1_max = k_deq.abs().sum(-1).amax(1)[..., None]  # [B, H, 1]
    eps = scale * (q_l1 * k_max_sigma / 2 + q_row_sigma / 2 * k_l1_max + dim * q_row_sigma * k_max_sigma / 4)

    def scores(qq, kk):
        s = qq.transpose(1, 2) @ kk.transpose(1, 2).transpose(-1, -2) * scale
        if rule is not None:
            idx = torch.arange(n, device=q.device)
            bias = (q.transpose(1, 2) @ mean[..., None]) * scale
            s = apply_decay_rule(s + bias, rule, idx[:, None], idx[None, :])
        if blocks is not None:
            keep = blocks.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)[..., :n, :n]
            s = s.masked_fill(~keep, -math.inf)
        return s

    exact_w = scores(q, k_smooth).softmax(-1).nan_to_num(0.0)
    quant_w = scores(q_deq, k_deq).softmax(-1).nan_to_num(0.0)
    kept = (quant_w > 0).double()
    v_abs = v.abs().transpose(1, 2)
    qk_term = (torch.exp(2 * eps) - 1)[..., None] * (exact_w @ v_abs)
    if pv_dtype == "fp8":
        v_hat, tau = quantize_fp8_channels(v)
        v_used = (v_hat * tau[:, None]).transpose(1, 2)
        u_p, a_p = 2.0**-4, 2.0**-10 / FP8_MAX
    else:
        v_used, u_p, a_p = v.transpose(1, 2), (2.0**-8 if value.dtype in (torch.bfloat16, torch.float16) else 2.0**-24), 0.0
    pv_term = (u_p * quant_w + a_p * kept) @ v_used.abs() + quant_w @ (v_used - v.transpose(1, 2)).abs()
    bound = qk_term + pv_term
    return bound.transpose(1, 2)
