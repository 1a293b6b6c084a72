"""The quantized attention path: the reference quantizer in float64 (kernels/quantize.py) and the Triton kernel
(kernels/quantized_triton.py) under Triton's CPU interpreter.

The interpreter needs TRITON_INTERPRET=1 before Triton is imported, so the kernel check runs in a subprocess. Two
of the interpreter's emulations are wrong for this kernel and are replaced there (the GPU does neither): its
float32 -> bf16 / fp8 casts do not round to nearest (bf16 truncates; e4m3 drops the carry into the next binade, so
125.5 becomes 64), so they go through torch's round-to-nearest-even casts; and its 16-bit dot products multiply the
raw bit patterns, so the 16-bit PV path (``pv_dtype="bf16"``) is checked on float32 inputs, where P is not rounded.
The INT8 QK dot and the FP8 PV dot are emulated correctly and checked on bf16 inputs. On a GPU,
benchmarks/quantized_kernel.py checks the compiled kernel against the same references.
"""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from diffusers_attn_ext.kernels.quantize import (
    FP8_MAX,
    apply_decay_rule,
    dequantize_int8_blocks,
    e4m3,
    exact_attention,
    quantization_error_bound,
    quantize_fp8_channels,
    quantize_int8_blocks,
    quantized_attention_reference,
    smooth_keys,
)
from diffusers_attn_ext.masks import ExtrapolationWindow, ultravico_rule, ultravico_score_mod


def _qkv(n=300, heads=2, dim=64, batch=2, key_offset=0.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, heads, dim, generator=g, dtype=torch.float64) for _ in range(3))
    k = k + key_offset * torch.randn(dim, generator=g, dtype=torch.float64).abs()  # a shared offset, as in DiT keys
    return [x.to(dtype) for x in (q, k, v)]


def _table(heads, n, seed=1):
    nb = -(-n // 128)
    table = torch.rand(1, heads, nb, nb, generator=torch.Generator().manual_seed(seed)) < 0.5
    table[..., -1, -1] = True
    table[0, 0, 0] = False  # a query block that keeps nothing
    return table


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_int8_blocks_round_trip_within_half_a_step():
    x = torch.randn(2, 300, 3, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x[:, 128:256] *= 50.0  # blocks of very different magnitude
    x[0, 256:, 1] = 0.0  # an all-zero block (of the partial last one)
    values, sigma = quantize_int8_blocks(x)
    assert sigma.shape == (2, 3, 3)
    assert torch.equal(values, values.round()) and values.abs().max() <= 127
    per_token = sigma.transpose(1, 2).repeat_interleave(128, 1)[:, :300, :, None]
    assert torch.allclose(sigma[:, :, :2], x[:, :256].unflatten(1, (2, 128)).abs().amax((2, 4)).transpose(1, 2) / 127)
    error = (dequantize_int8_blocks(values, sigma) - x).abs()
    assert (error <= per_token / 2 * (1 + 1e-12)).all()
    assert (values.unflatten(1, (1, 300))[..., :128, :, :].abs().amax((2, 4)) == 127).all()  # the block max maps to 127
    assert (values[0, 256:, 1] == 0).all()
    assert error.max() > 0.3 * per_token.min()  # it does round


def test_fp8_channels_round_trip_within_half_an_e4m3_step():
    v = torch.randn(1, 400, 2, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v[..., 5] *= 1e-3  # a small channel: its own scale
    values, tau = quantize_fp8_channels(v)
    assert torch.equal(e4m3(values), values)  # on the e4m3 grid
    assert torch.allclose(values.abs().amax(1), torch.full_like(tau, FP8_MAX))  # each channel's max maps to 448
    error = (values * tau[:, None] - v).abs()
    assert (error <= 2.0**-4 * v.abs() + 2.0**-10 * tau[:, None] + 1e-15).all()
    assert error[..., 5].max() < 1e-2 * error.max()  # the small channel's error scales with it
    e = 2.0 ** torch.arange(-6, 9, dtype=torch.float64)  # e4m3 normal binades: steps of 1/8 of the binade
    assert torch.equal(e4m3(e * 1.0625), e) and torch.equal(e4m3(e * 1.1), e * 1.125)


def test_smoothing_keys_leaves_softmax_unchanged_but_not_the_decay_rule():
    q, k, v = _qkv(key_offset=3.0)
    k_smooth, mean = smooth_keys(k)
    assert torch.allclose(k_smooth.mean(1), torch.zeros_like(mean), atol=1e-12)
    assert torch.allclose(exact_attention(q, k_smooth, v), exact_attention(q, k, v), atol=1e-12)
    logits = q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2)
    smoothed = q.transpose(1, 2) @ k_smooth.transpose(1, 2).transpose(-1, -2)
    assert torch.allclose(logits.softmax(-1), smoothed.softmax(-1), atol=1e-12) and not torch.allclose(logits, smoothed)
    rule = ultravico_rule(ExtrapolationWindow(30, 3, 0, 300), 0.5)  # a sign rule: not invariant to the shift
    assert _rel(exact_attention(q, k_smooth, v, rule=rule), exact_attention(q, k, v, rule=rule)) > 1e-2


def test_decay_rule_restatement_equals_ultravico_score_mod():
    window = ExtrapolationWindow(30, 3, 0, 300)
    scores = torch.randn(2, 300, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    idx = torch.arange(300)
    ours = apply_decay_rule(scores, ultravico_rule(window, 0.7), idx[:, None], idx[None, :])
    theirs = ultravico_score_mod(window, 0.7)(scores, 0, 0, idx[:, None], idx[None, :])
    assert torch.equal(ours, theirs) and not torch.equal(ours, scores)


def test_online_blocks_compute_the_softmax_of_the_dequantized_scores():
    """Without PV rounding (16-bit mode on float64 values), the reference's block-by-block online softmax is exactly
    softmax of the dequantized INT8 scores (smoothed keys, rule with q . mean(k) added back, block table)."""
    q, k, v = _qkv(key_offset=2.0)
    rule = ultravico_rule(ExtrapolationWindow(30, 3, 0, 300), 0.6)
    table = _table(2, 300)
    out = quantized_attention_reference(q, k, v, table, pv_dtype="bf16", rule=rule)  # value float64: weights unrounded
    k_smooth, mean = smooth_keys(k)
    q_deq, k_deq = (dequantize_int8_blocks(*quantize_int8_blocks(x)) for x in (q, k_smooth))
    scores = q_deq.transpose(1, 2) @ k_deq.transpose(1, 2).transpose(-1, -2) * 64**-0.5
    idx = torch.arange(300)
    scores = apply_decay_rule(scores + (q.transpose(1, 2) @ mean[..., None]) * 64**-0.5, rule, idx[:, None], idx[None, :])
    keep = table.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :300, :300]
    expected = (scores.masked_fill(~keep, -math.inf).softmax(-1).nan_to_num(0.0) @ v.transpose(1, 2)).transpose(1, 2)
    assert torch.allclose(out, expected, atol=1e-12)
    assert (out[:, :128, 0] == 0).all()  # the query block that keeps nothing


@pytest.mark.parametrize("pv_dtype", ["fp8", "bf16"])
@pytest.mark.parametrize("case", ["dense", "sparse", "rule", "unsmoothed"])
def test_quantized_reference_is_within_the_quantization_bound(pv_dtype, case):
    dtype = torch.bfloat16  # model inputs: the 16-bit PV path rounds P to bf16
    q, k, v = _qkv(key_offset=2.0, dtype=dtype)
    table = _table(2, 300) if case == "sparse" else None
    rule = ultravico_rule(ExtrapolationWindow(30, 3, 0, 300), 0.6) if case == "rule" else None
    smooth = case != "unsmoothed"
    out = quantized_attention_reference(q, k, v, table, pv_dtype=pv_dtype, smooth=smooth, rule=rule)
    exact = exact_attention(q, k, v, table, rule=rule)
    bound = quantization_error_bound(q, k, v, table, pv_dtype=pv_dtype, smooth=smooth, rule=rule)
    assert ((out - exact).abs() <= bound + 1e-12).all()
    assert 1e-4 < _rel(out, exact) < (0.1 if pv_dtype == "fp8" else 0.05)  # quantized, and still attention


def test_smoothing_keeps_offset_keys_accurate():
    """Keys with a large shared offset (as in DiT attention) waste the INT8 range without smoothing."""
    q, k, v = _qkv(key_offset=20.0, dtype=torch.bfloat16)
    exact = exact_attention(q, k, v)
    smoothed = _rel(quantized_attention_reference(q, k, v, pv_dtype="bf16"), exact)
    raw = _rel(quantized_attention_reference(q, k, v, pv_dtype="bf16", smooth=False), exact)
    assert smoothed * 3 < raw


def test_kernel_rejects_bad_arguments_before_any_launch():
    from diffusers_attn_ext.call import DecayRule
    from diffusers_attn_ext.kernels.quantized_triton import launch_quantized, quantized_block_sparse_attention

    q = torch.randn(2, 300, 4, 64)
    good = torch.ones(1, 4, 3, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="pv_dtype='int4' is not one of"):
        launch_quantized(q, q, q, good, pv_dtype="int4")
    with pytest.raises(ValueError, match="smooth_keys=1 is not allowed"):
        launch_quantized(q, q, q, smooth_keys=1)
    for bad in (good[:, :2], good.to(torch.uint8), good[..., :2, :2]):
        with pytest.raises(ValueError, match="block table"):
            launch_quantized(q, q, q, bad)
    with pytest.raises(ValueError, match="one shape"):
        launch_quantized(q, q[:, :128], q[:, :128])
    with pytest.raises(ValueError, match="must span the whole sequence"):
        launch_quantized(q, q, q, rule=DecayRule(start=10, length=290, far=100, alpha=0.5))
    with pytest.raises(ValueError, match="alpha=1.5 is outside the allowed range"):
        launch_quantized(q, q, q, rule=DecayRule(start=0, length=300, far=100, alpha=1.5))
    with pytest.raises(ValueError, match=r"config\['int_to_float'\]='i2f' is not one of \('magic-fma', 'magic'"):
        launch_quantized(q, q, q, config={"int_to_float": "i2f", "num_warps": 4})
    with pytest.raises(ValueError, match="needs CUDA"):
        quantized_block_sparse_attention(q, q, q)


def test_magic_cast_is_exact_for_int8_dot_products():
    """The kernel's INT32 -> float32 cast: the bits of ``s + 0x4B400000`` read as float32 are ``12582912 + s``
    exactly for ``|s| <= 2^22``, so that less 12582912 is ``s``; the INT8 dot of head dim 128 stays within
    127^2 * 128 = 2,064,512. Past the bound the mantissa overflows into the exponent and the cast is wrong."""
    from diffusers_attn_ext.kernels.quantized_triton import MAGIC_FLOAT, MAGIC_INT

    assert MAGIC_FLOAT == 1.5 * 2**23 and torch.tensor([MAGIC_INT], dtype=torch.int32).view(torch.float32) == MAGIC_FLOAT
    largest = 127 * 127 * 128
    s = torch.tensor([-largest, -largest + 1, -1, 0, 1, 12345, largest - 1, largest, 2**22 - 1, -2**22 + 1, 2**22,
                      -2**22], dtype=torch.int32)
    as_float = (s + MAGIC_INT).view(torch.float32)
    assert torch.equal(as_float.double(), MAGIC_FLOAT + s.double())  # float64: no rounding in the check itself
    assert torch.equal(as_float - MAGIC_FLOAT, s.float())  # the float32 subtraction is exact too
    past = torch.tensor([2**22 + 1, 2**22 + 3, -2**22 - 1], dtype=torch.int32)  # 2^22 itself lands on 2^24 exactly
    wrong = (past + MAGIC_INT).view(torch.float32).double() - MAGIC_FLOAT
    assert torch.equal(wrong, torch.tensor([2**22 + 2, 2**22 + 6, -2**22 - 0.5], dtype=torch.float64))
    # The INT8 dot products reach the bound's order: extreme rows give +-2,064,512 exactly.
    rows = torch.full((2, 128), 127, dtype=torch.int32)
    rows[1] = -127
    dots = rows @ rows[0]
    assert dots.tolist() == [largest, -largest]
    assert torch.equal((dots + MAGIC_INT).view(torch.float32) - MAGIC_FLOAT, dots.float())


CHECK = textwrap.dedent(
    """
    import numpy as np, torch, triton, triton.language as tl
    from triton.runtime import interpreter

    # The interpreter's float32 -> bf16/e4m3 casts do not round to nearest (module docstring): use torch's.
    TORCH = {tl.float8e4nv: torch.float8_e4m3fn, tl.bfloat16: torch.bfloat16}
    BITS = {torch.float8_e4m3fn: torch.uint8, torch.bfloat16: torch.int16}
    cast, fp_to_fp = interpreter.InterpreterBuilder.cast_impl, interpreter.InterpreterBuilder.create_fp_to_fp

    def rounded(src, dst_type):
        dst = TORCH.get(dst_type.scalar)
        if dst is None or src.dtype.scalar not in (tl.float32, tl.float64):
            return None
        data = torch.from_numpy(np.ascontiguousarray(src.data)).to(dst).view(BITS[dst]).numpy()
        return interpreter.TensorHandle(data.view(interpreter._get_np_dtype(dst_type)), dst_type.scalar)

    def cast_impl(self, src, dst_type):
        out = rounded(src, dst_type)
        return cast(self, src, dst_type) if out is None else out

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        out = rounded(src, dst_type)
        return fp_to_fp(self, src, dst_type, rounding_mode) if out is None else out

    interpreter.InterpreterBuilder.cast_impl = cast_impl
    interpreter.InterpreterBuilder.create_fp_to_fp = create_fp_to_fp

    from diffusers_attn_ext.kernels import quantized_triton as qt
    from diffusers_attn_ext.kernels.quantize import (exact_attention, quantization_error_bound, quantize_fp8_channels,
        quantize_int8_blocks, quantized_attention_reference, value_channel_scale)
    from diffusers_attn_ext.masks import ExtrapolationWindow, ultravico_rule

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    g = torch.Generator().manual_seed(0)
    n, heads, dim = 300, 2, 64
    base = [torch.randn(2, n, heads, dim, generator=g) for _ in range(3)]
    base[1] = base[1] + 2.0 * torch.randn(dim, generator=g).abs()  # keys with a shared offset
    nb = triton.cdiv(n, 128)
    table = torch.rand(2, heads, nb, nb, generator=g) < 0.5
    table[..., -1, -1] = True
    table[0, 0, 0] = False  # a query block that keeps nothing
    rule = ultravico_rule(ExtrapolationWindow(30, 3, 0, n), 0.7)

    # The quantizers: the reference's integers and e4m3 values, but for rare ties of float32 vs float64 division.
    q, k, v = (x.to(torch.bfloat16) for x in base)
    q_int = torch.empty(2 * heads, nb * 128, dim, dtype=torch.int8)
    sigma = torch.empty(2 * heads, nb)
    qt._quantize_int8[(nb, 2 * heads)](q, sigma, q_int, sigma, sigma, q.stride(0), q.stride(1), q.stride(2), heads,
                                       n, nb * 128, 1.0, SUBTRACT=False, BIAS=False, BLOCK_T=128, HEAD_DIM=dim)
    ref_int, ref_sigma = quantize_int8_blocks(q.double())
    ref_int = ref_int.transpose(1, 2).reshape(2 * heads, n, dim)
    assert torch.allclose(sigma.double(), ref_sigma.reshape(2 * heads, nb), rtol=1e-6)
    diff = (q_int[:, :n].double() - ref_int).abs()
    assert diff.max() <= 1 and (diff > 0).double().mean() < 1e-3 and (q_int[:, n:] == 0).all(), diff.sum()
    tau = value_channel_scale(v).contiguous()
    v8 = torch.empty(2 * heads, dim, nb * 128, dtype=torch.float8_e4m3fn)
    qt._quantize_fp8_transposed[(nb, 2 * heads)](v, tau, v8, v.stride(0), v.stride(1), v.stride(2), heads, n, nb * 128,
                                                 BLOCK_T=128, HEAD_DIM=dim)
    ref_v = quantize_fp8_channels(v.double())[0].transpose(1, 2).reshape(2 * heads, n, dim)
    assert ((v8.double().transpose(1, 2)[:, :n] != ref_v).double().mean() < 1e-3)

    # The attention kernel: the reference up to the output's rounding and rare ties; far from exact attention.
    cases = [  # (input dtype, pv_dtype, table, rule, smooth)
        (torch.bfloat16, "fp8", table, None, True),
        (torch.bfloat16, "fp8", None, rule, True),
        (torch.float32, "bf16", table[:1], rule, False),  # 16-bit PV on float32 inputs: the interpreter's dot
        (torch.float32, "bf16", None, None, True),
    ]
    for dtype, pv, blocks, r, smooth in cases:
        q, k, v = (x.to(dtype) for x in base)
        case = (dtype, pv, blocks is not None, r is not None, smooth)
        by_cast = {how: qt.launch_quantized(q, k, v, blocks, pv_dtype=pv, rule=r, smooth_keys=smooth,
                                            config={"int_to_float": how}) for how in qt.INT_TO_FLOAT}
        out = qt.launch_quantized(q, k, v, blocks, pv_dtype=pv, rule=r, smooth_keys=smooth)  # the default cast
        assert qt.INT_TO_FLOAT[0] == "magic-fma" and torch.equal(out, by_cast["magic-fma"]), case
        ref = quantized_attention_reference(q, k, v, blocks, pv_dtype=pv, rule=r, smooth=smooth)
        exact = exact_attention(q, k, v, blocks, rule=r)
        # INT32 -> float32 by I2F or by the exact magic cast: bit for bit one result. The folded form (the offset
        # in the exponent's per-row constant) equals "magic" with a rule (it subtracts first), else nearly.
        exact_cast = by_cast["magic"]
        assert torch.equal(by_cast["convert"], exact_cast), (case, (by_cast["convert"] - exact_cast).abs().max())
        if r is not None:
            assert torch.equal(by_cast["magic-fma"], exact_cast), case
        else:
            fma = by_cast["magic-fma"]  # folded: not bit-exact (its docstring), but as close to the reference
            assert not torch.equal(fma, exact_cast) and rel(fma, exact_cast) < 4e-3, case
        for how, result in by_cast.items():
            assert rel(result, ref.to(dtype)) < 4e-3, (case, how)
        assert out.dtype == dtype and out.shape == q.shape, case
        to_ref, to_exact = rel(out, ref.to(dtype)), rel(out, exact)
        assert to_ref < 4e-3 and to_exact > 5 * to_ref, (case, to_ref, to_exact)
        bound = quantization_error_bound(q, k, v, blocks, pv_dtype=pv, rule=r, smooth=smooth)
        slack = 2.0**-8 * exact.abs() + 1e-6 if dtype == torch.bfloat16 else 1e-6  # the output's own rounding
        assert ((out.double() - exact).abs() <= 1.01 * bound + slack).all(), case
        if blocks is not None:
            assert (out[0, :128, 0] == 0).all(), case
    print("ok")
    """
)


def test_kernel_matches_reference_in_interpreter(interpreter_env):
    pytest.importorskip("triton")
    env = interpreter_env
    result = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
