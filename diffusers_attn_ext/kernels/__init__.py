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

from collections.abc import Callable

import torch

from ..call import BLOCK_SPARSE, DENSE, FUSED_RULE, AttentionCall, KernelRequest
from ..parallel import ParallelLayout, offset_block_mask, parallel_attention
from .dense import dense_attention
from .flex import compose_score_mods, flex_attention_bnhd, flex_block_mask
from .quantized_choice import QUANTIZED, quantized_kernel, quantized_report, quantized_setting, use_quantized_attention
from .xformers_backend import xformers_status

FLEX, FUSED = "flex", "fused"  # kernels chosen besides DENSE, BLOCK_SPARSE and QUANTIZED


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
    return _selected(call.kernel_request() if isinstance(call, AttentionCall) else call)[0]


def _selected(request: KernelRequest) -> tuple[str, Callable[[], torch.Tensor] | None]:
    """:func:`choose_kernel`'s answer, with the launch of the quantized or fused kernel it chose (else None), so
    that a call decides once."""
    if request.kind == DENSE:
        quantized = quantized_kernel(request)
        return (QUANTIZED, quantized) if quantized is not None else (DENSE, None)
    if request.attn_mask is not None:
        raise ValueError(
            "attention_mask together with a score modification or block mask is not supported: the model passed a "
            "mask to this attention call"
        )
    quantized = quantized_kernel(request)
    if quantized is not None:
        return QUANTIZED, quantized
    fused = _fused_kernel(request)
    if fused is not None:
        return FUSED, fused
    if request.kind == BLOCK_SPARSE and request.query.is_cuda:
        from . import block_sparse_triton

        if (block_sparse_triton.supports(request.query, request.key, request.block_size)
                and request.value.shape == request.query.shape):
            return BLOCK_SPARSE, None
    return FLEX, None


def attend(call: AttentionCall) -> torch.Tensor:
    """Run the attention of ``call``; returns ``[B, N, H, D]`` (the rows of ``call.query_rows`` when set).

    Under diffusers' context parallelism (``call.parallel_config``), dense calls go through diffusers' own
    Ulysses / ring attention as the stock processor's do; score-modified and block-sparse calls run our
    kernels on global indices through :func:`diffusers_attn_ext.parallel.parallel_attention`.
    """
    request = call.kernel_request()
    if request.kind == DENSE:
        _, quantized = _selected(request)
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
    kernel, launch = _selected(request)
    if launch is not None:  # the quantized or the fused kernel
        return launch()
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
    report["quantized"] = quantized_report(triton_reason)
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
