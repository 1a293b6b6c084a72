"""The attention math: :func:`attend` runs the explicit request of an attention call
(:meth:`~diffusers_attn_ext.call.AttentionCall.kernel_request`) on the kernel that computes it.

- ``dense`` (no score modification, no block mask): the dense kernel of the stock processor (bit-identical to it);
- ``block_sparse`` (a block mask alone), on CUDA inputs with 128-token blocks: the block-sparse Triton kernel;
- ``fused_rule`` (a :class:`~diffusers_attn_ext.call.DecayRule` as the only score change), on CUDA inputs the
  fused kernel supports: the decay kernel (with a block mask too, the block-sparse kernel with the rule inside);
- otherwise FlexAttention with the composed ``score_mod`` and the block mask (compiled on CUDA, eager on CPU, the
  same function either way).

Opt-in, never by default: :class:`use_quantized_attention` routes the requests the quantized Triton kernel
(``quantized_triton``: INT8 QK with smoothed keys, FP8 or 16-bit PV; SageAttention's arithmetic) supports to it
instead: block-sparse and fused-rule requests, and dense self-attention (one shape for query, key and value, no
attention mask, no context parallelism) of the calls our processors make. It approximates attention (error bound:
``quantize.quantization_error_bound``); everything it does not support keeps its kernel above.

The Triton kernels are launched as torch custom operators (``triton_ops``), opaque to ``torch.compile``.
"""

from __future__ import annotations

import torch

from ..call import BLOCK_SPARSE, DENSE, FUSED_RULE, AttentionCall, KernelRequest
from ..parallel import ParallelLayout, offset_block_mask, parallel_attention
from ..validation import boolean, choice
from .block_sparse_table import BLOCK
from .dense import dense_attention
from .flex import compose_score_mods, flex_attention_bnhd, flex_block_mask
from .quantize import PV_DTYPES
from .xformers_backend import xformers_status

FLEX, FUSED, QUANTIZED = "flex", "fused", "quantized"  # kernels chosen besides DENSE and BLOCK_SPARSE

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

    ``use_quantized_attention(True, pv="fp8")`` takes effect at once and stays until changed; used as a context
    manager, the setting before it comes back on exit::

        kernels.use_quantized_attention(pv="fp8")           # on from here
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
        pv: the PV product's precision: "fp8" (P and V in e4m3, SageAttention2; needs FP8 tensor cores, compute
            capability 8.9+, else ValueError: no silent change of precision) or "bf16" (P in the value's 16-bit
            dtype, V unquantized: INT8 QK only, SageAttention v1). On a machine without CUDA any value is accepted
            (no call takes the kernel there).

    The setting is read while ``torch.compile`` traces: a compiled region makes one graph per setting and guards
    on it, so changing it between generations recompiles once, not per call. Set it outside compiled code.
    """

    def __init__(self, enabled: bool = True, pv: str = "fp8"):
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


def _quantized_kernel(request: KernelRequest):
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


def _fused_kernel(request: KernelRequest):
    """The fused kernel that computes a ``fused_rule`` request exactly, or None."""
    if request.kind != FUSED_RULE or not request.query.is_cuda:
        return None
    from . import block_sparse_triton, decay_triton, triton_ops

    query, key, value, rule = request.query, request.key, request.value, request.rule
    if not decay_triton.supports(query, rule) or key.shape != query.shape or value.shape != query.shape:
        return None
    if request.block_mask is None:
        return lambda: triton_ops.decay(query, key, value, rule, request.scale)
    if block_sparse_triton.supports(query, key, request.block_size):  # the rule inside the block-sparse kernel
        return lambda: triton_ops.block_sparse(query, key, value, request.block_mask, request.scale, rule)
    return None


def choose_kernel(call: AttentionCall | KernelRequest) -> str:
    """The kernel for a call (or its request): dense unless methods modified scores or gave a block mask; the
    quantized kernel for the requests it supports while :class:`use_quantized_attention` is on."""
    request = call.kernel_request() if isinstance(call, AttentionCall) else call
    if request.kind == DENSE:
        return QUANTIZED if _quantized_kernel(request) is not None else DENSE
    if request.attn_mask is not None:
        raise ValueError(
            "attention_mask together with a score modification or block mask is not supported: the model passed a "
            "mask to this attention call"
        )
    if _quantized_kernel(request) is not None:
        return QUANTIZED
    if _fused_kernel(request) is not None:
        return FUSED
    if request.kind == BLOCK_SPARSE and request.query.is_cuda:
        from . import block_sparse_triton

        if (block_sparse_triton.supports(request.query, request.key, request.block_size)
                and request.value.shape == request.query.shape):
            return BLOCK_SPARSE
    return FLEX


def attend(call: AttentionCall) -> torch.Tensor:
    """Run the attention of ``call``; returns ``[B, N, H, D]`` (the rows of ``call.query_rows`` when set).

    Under diffusers' context parallelism (``call.parallel_config``), dense calls go through diffusers' own
    Ulysses / ring attention as the stock processor's do; score-modified and block-sparse calls run our
    kernels on global indices through :func:`diffusers_attn_ext.parallel.parallel_attention`.
    """
    request = call.kernel_request()
    if request.kind == DENSE:
        quantized = _quantized_kernel(request)
        if quantized is not None:
            return quantized()
        return dense_attention(
            request.query, request.key, request.value, attn_mask=request.attn_mask, scale=request.scale,
            via=request.dense_via, backend=request.backend, parallel_config=request.parallel_config,
        )
    layout = ParallelLayout.from_config(request.parallel_config)
    if layout is not None:
        return parallel_attention(call, layout, _local_attend, _offset_attend)
    return _run(request)


def _offset_attend(call: AttentionCall, query_offset: int) -> torch.Tensor:
    """FlexAttention for queries starting at global token ``query_offset`` (score_mods already shifted); the
    block mask's rows are read at the queries' global blocks."""
    request = call.kernel_request()
    block_mask = None
    if request.block_mask is not None:
        block_mask = offset_block_mask(
            request.block_mask, request.block_size, query_offset, request.query.shape[1], request.key.shape[1]
        )
    return flex_attention_bnhd(
        request.query, request.key, request.value, score_mod=compose_score_mods(list(request.score_mods)),
        block_mask=block_mask, scale=request.scale,
    )


def _local_attend(call: AttentionCall) -> torch.Tensor:
    """Our kernel for a call whose queries and keys are the whole sequence."""
    return _run(call.kernel_request())


def _run(request: KernelRequest) -> torch.Tensor:
    """The kernel :func:`choose_kernel` picks for a score-modified or block-sparse request."""
    kernel = choose_kernel(request)
    if kernel == QUANTIZED:
        return _quantized_kernel(request)()
    if kernel == FUSED:
        return _fused_kernel(request)()
    if kernel == BLOCK_SPARSE:
        from .triton_ops import block_sparse

        return block_sparse(request.query, request.key, request.value, request.block_mask, request.scale)
    block_mask = None
    if request.block_mask is not None:
        block_mask = flex_block_mask(request.block_mask, request.block_size, request.query.shape[1],
                                     request.key.shape[1])
    return flex_attention_bnhd(
        request.query, request.key, request.value, score_mod=compose_score_mods(list(request.score_mods)),
        block_mask=block_mask, scale=request.scale,
    )


def _triton_status(cuda: bool) -> str:
    """Whether our Triton kernels can run here."""
    if not cuda:
        return "needs CUDA"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton not installed"
    return "available"


def _quantized_report(cuda: bool, triton_reason: str) -> str:
    """The quantized kernel's setting, what it takes while on, and whether it can run here."""
    if triton_reason != "available":
        where = f"{triton_reason}: these calls run the kernels above"
    else:
        problem = _quantized_problem(_quantized_pv or "fp8")
        where = "available" if problem is None else f"unavailable: {problem}"
    if _quantized_pv is None:
        return f"off (opt-in: diffusers_attn_ext.kernels.use_quantized_attention; {where})"
    pv = "FP8 PV" if _quantized_pv == "fp8" else "16-bit PV"
    return f"on: INT8 QK + {pv} Triton kernel for dense self-attention, block-sparse, fused rule ({where})"


def kernel_report() -> dict[str, str]:
    """What is available on this machine and which kernel each kind of call gets."""
    cuda = torch.cuda.is_available()
    report = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "dense": "stock kernel (diffusers dispatch_attention_fn or F.scaled_dot_product_attention)",
        "flex": "compiled FlexAttention (Triton)" if cuda else "eager FlexAttention (reference, CPU)",
    }
    if cuda:
        from torch.backends import cuda as cuda_backends

        report["sdpa_backends"] = ", ".join(
            name for name, on in (
                ("cudnn", cuda_backends.cudnn_sdp_enabled()), ("flash", cuda_backends.flash_sdp_enabled()),
                ("efficient", cuda_backends.mem_efficient_sdp_enabled()), ("math", cuda_backends.math_sdp_enabled()),
            ) if on
        )
    triton_reason = _triton_status(cuda)
    report["decay_rule"] = f"fused Triton kernel ({triton_reason})" if triton_reason == "available" else (
        f"FlexAttention score_mod (fused Triton kernel: {triton_reason})"
    )
    report["block_sparse"] = f"Triton block-sparse kernel ({triton_reason})" if triton_reason == "available" else (
        f"FlexAttention block mask (Triton kernel: {triton_reason})"
    )
    report["quantized"] = _quantized_report(cuda, triton_reason)
    works, reason = xformers_status()
    report["xformers"] = reason
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        report["diffusers_active_backend"] = str(_AttentionBackendRegistry.get_active_backend()[0].value)
    except (ImportError, AttributeError) as error:
        report["diffusers_active_backend"] = f"unknown ({error})"
    return report


__all__ = ["BLOCK_SPARSE", "DENSE", "FLEX", "FUSED", "QUANTIZED", "attend", "choose_kernel", "dense_attention",
           "flex_attention_bnhd", "flex_block_mask", "kernel_report", "quantized_setting", "use_quantized_attention"]
