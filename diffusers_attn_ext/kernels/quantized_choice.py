"""The quantized kernel's opt-in: :class:`use_quantized_attention` (the setting, process-wide) and
:func:`quantized_kernel`, which the dispatcher (``kernels.choose_kernel``) asks first for every request.

Off by default: the quantized Triton kernel (``quantized_triton``: INT8 QK with smoothed keys, FP8 or 16-bit PV;
SageAttention's arithmetic) approximates attention (3.6-6.7% relative L2 error vs bf16, docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from ..call import BLOCK_SPARSE, DENSE, FUSED_RULE, KernelRequest
from ..validation import boolean, choice
from .block_sparse_table import BLOCK
from .quantize import DEFAULT_PV, PV_DTYPES

QUANTIZED = "quantized"  # the dispatcher's name for this kernel

# The quantized kernel's PV precision while opted in (use_quantized_attention), None while off. A module global read
# while tracing: a compiled region guards on it (one graph per setting).
_quantized_pv: str | None = None


def _quantized_problem(pv: str) -> str | None:
    """Why the quantized kernel with PV precision ``pv`` cannot run on this machine's CUDA device, or None (also None
    without CUDA: then no call takes the kernel). Imports the kernel here, outside compiled code."""
    if not torch.cuda.is_available():
        return None
    try:
        from .quantized_triton import fp8_supported
    except ImportError as error:
        return f"the quantized kernel needs Triton ({error})"
    if pv != "fp8" or fp8_supported():
        return None
    major, minor = torch.cuda.get_device_capability()
    return (f"pv='fp8' needs FP8 tensor cores (compute capability 8.9 or higher): {torch.cuda.get_device_name()} "
            f"has {major}.{minor}; use pv='bf16'")


class use_quantized_attention:  # noqa: N801 - a setter that is also a context manager, as torch.set_grad_enabled
    """Opt in to (or out of) the quantized attention kernel for every call our processors make in this process.

    ``use_quantized_attention(True)`` takes effect at once and stays until changed; used as a context
    manager, the setting before it comes back on exit::

        kernels.use_quantized_attention()                   # on from here
        with kernels.use_quantized_attention(False):        # off inside, on again after
            ...

    While on, :func:`choose_kernel` returns :data:`QUANTIZED` for the CUDA requests the kernel supports
    (``quantized_triton.supports``: fp16/bf16, head dim 64 or 128, one shape for query, key and value, 128-token
    blocks; a rule spanning the whole sequence): dense self-attention without an attention mask or context
    parallelism, block-sparse, and fused-rule (decay rule) requests, with or without a block table. Other requests
    (cross-attention, score_mods, masks, float32, CPU tensors) keep their kernel. Stock diffusers processors never
    reach the dispatcher, so they stay unquantized.

    Args:
        enabled: True to route supported calls to the quantized kernel, False for the default kernels.
        pv: the PV product's precision: "bf16" (the default: P in the value's 16-bit dtype, V unquantized; INT8 QK
            only, SageAttention v1) or "fp8" (P and V in e4m3, SageAttention2; needs FP8 tensor cores, compute
            capability 8.9+, else ValueError: no silent change of precision). On the H200 "fp8" is no faster
            (dense 10.79 vs 10.90 ms, block-sparse slower; docs/benchmarks.md) and has more error (3.6-6.7% rel.
            L2 vs 0.6-5.9% on three kinds of inputs; world-model video 41.1 vs 43.2 dB against bf16 attention),
            hence the default. On a machine without CUDA any value is accepted (no call takes the kernel there).

    The setting is read while ``torch.compile`` traces: a compiled region makes one graph per setting and guards
    on it, so changing it between generations recompiles once, not per call. Set it outside compiled code.
    """

    def __init__(self, enabled: bool = True, pv: str = DEFAULT_PV):
        global _quantized_pv
        enabled = boolean("enabled", enabled)
        pv = choice("pv", pv, PV_DTYPES)
        problem = _quantized_problem(pv) if enabled else None
        if problem is not None:
            raise ValueError(problem)
        self._previous = _quantized_pv
        _quantized_pv = pv if enabled else None

    def __enter__(self) -> use_quantized_attention:
        return self

    def __exit__(self, *exc_info) -> None:
        global _quantized_pv
        _quantized_pv = self._previous


def quantized_setting() -> str | None:
    """The quantized kernel's PV precision ("fp8" or "bf16") while opted in, None while off."""
    return _quantized_pv


def quantized_kernel(request: KernelRequest):
    """The quantized kernel for ``request`` while opted in and it supports the request exactly, or None."""
    pv = _quantized_pv  # read first: a compiled region guards on the setting whatever the device
    if pv is None or not request.query.is_cuda or request.kind not in (DENSE, BLOCK_SPARSE, FUSED_RULE):
        return None
    from . import quantized_triton, triton_ops

    query, key, value, rule = request.query, request.key, request.value, request.rule
    if not quantized_triton.supports(query, key) or value.shape != query.shape:
        return None
    if request.kind == DENSE:
        if request.attn_mask is not None or request.parallel_config is not None:
            return None
        return lambda: triton_ops.quantized(query, key, value, None, request.scale, pv_dtype=pv)
    if request.block_mask is not None and request.block_size != BLOCK:
        return None
    if rule is not None and (rule.start != 0 or rule.length != query.shape[1]):
        return None
    return lambda: triton_ops.quantized(query, key, value, request.block_mask, request.scale, rule, pv_dtype=pv)


def quantized_report(triton_reason: str) -> str:
    """The quantized kernel's setting, what it takes while on, and whether it can run here."""
    if triton_reason != "available":
        where = f"{triton_reason}: these calls run the kernels above"
    else:
        problem = _quantized_problem(_quantized_pv or DEFAULT_PV)
        where = "available" if problem is None else f"unavailable: {problem}"
    if _quantized_pv is None:
        return f"off (opt-in: diffusers_attn_ext.kernels.use_quantized_attention; {where})"
    pv = "FP8 PV" if _quantized_pv == "fp8" else "16-bit PV"
    return f"on: INT8 QK + {pv} Triton kernel for dense self-attention, block-sparse, fused rule ({where})"
