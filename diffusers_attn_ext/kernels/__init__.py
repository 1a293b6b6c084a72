"""The attention math: one function, :func:`attend`, chooses the kernel for an attention call.

- no score modification and no block mask: the dense kernel of the stock processor (bit-identical to it);
- a block mask alone (no score mod), on CUDA inputs with 128-token blocks: the block-sparse Triton kernel;
- a score_mod that carries a fused kernel (``score_mod.fused = (name, params)``), alone and on CUDA
  inputs the fused kernel supports: that kernel (UltraViCo's Triton kernel; with a block mask too, the
  block-sparse kernel with UltraViCo's rule inside);
- otherwise FlexAttention with the composed ``score_mod`` and the block mask (compiled on CUDA, eager on
  CPU, the same function either way).
"""

from __future__ import annotations

import torch

from ..families.base import AttentionCall
from ..parallel import ParallelLayout, offset_block_mask, parallel_attention
from .dense import dense_attention
from .flex import compose_score_mods, flex_attention_bnhd, flex_block_mask
from .xformers_backend import xformers_status

DENSE, FLEX, FUSED, BLOCK_SPARSE = "dense", "flex", "fused", "block_sparse"


def _fused_kernel(call: AttentionCall):
    """The fused kernel that computes ``call`` exactly, or None."""
    if len(call.score_mods) != 1 or not call.query.is_cuda:
        return None
    name, params = getattr(call.score_mods[0], "fused", (None, None))
    if name != "ultravico":
        return None
    from . import block_sparse_triton, ultravico_triton

    if not ultravico_triton.supports(call.query, params["window"]):
        return None
    if call.block_mask is None:
        return lambda: ultravico_triton.ultravico_attention(call.query, call.key, call.value, scale=call.scale, **params)
    if block_sparse_triton.supports(call.query, call.key, call.block_size):  # UltraViCo composed with a sparse method
        return lambda: block_sparse_triton.block_sparse_attention(
            call.query, call.key, call.value, call.block_mask, scale=call.scale, ultravico=params
        )
    return None


def choose_kernel(call: AttentionCall) -> str:
    """The kernel for ``call``: dense unless methods modified scores or gave a block mask."""
    if not call.score_mods and call.block_mask is None:
        return DENSE
    if call.attn_mask is None and _fused_kernel(call) is not None:
        return FUSED
    if call.attn_mask is None and not call.score_mods and call.query.is_cuda:
        from . import block_sparse_triton

        if block_sparse_triton.supports(call.query, call.key, call.block_size):
            return BLOCK_SPARSE
    if call.attn_mask is not None:
        raise ValueError(
            "attention_mask together with a score modification or block mask is not supported: the "
            f"{call.family} model passed a mask to {type(call.module).__name__}"
        )
    return FLEX


def attend(call: AttentionCall) -> torch.Tensor:
    """Run the attention of ``call``; returns ``[B, N, H, D]``.

    Under diffusers' context parallelism (``call.parallel_config``), dense calls go through diffusers' own
    Ulysses / ring attention as the stock processor's do; score-modified and block-sparse calls run our
    kernels on global indices through :func:`diffusers_attn_ext.parallel.parallel_attention`.
    """
    kernel = choose_kernel(call)
    if kernel == DENSE:
        return dense_attention(
            call.query, call.key, call.value, attn_mask=call.attn_mask, scale=call.scale, via=call.dense_via,
            backend=call.backend, parallel_config=call.parallel_config,
        )
    layout = ParallelLayout.from_config(call.parallel_config)
    if layout is not None:
        return parallel_attention(call, layout, _local_attend, _offset_attend)
    return _local_attend(call)


def _offset_attend(call: AttentionCall, query_offset: int) -> torch.Tensor:
    """FlexAttention for queries starting at global token ``query_offset`` (score_mods already shifted); the
    block mask's rows are read at the queries' global blocks."""
    block_mask = None
    if call.block_mask is not None:
        block_mask = offset_block_mask(
            call.block_mask, call.block_size, query_offset, call.query.shape[1], call.key.shape[1]
        )
    return flex_attention_bnhd(
        call.query, call.key, call.value, score_mod=compose_score_mods(call.score_mods),
        block_mask=block_mask, scale=call.scale,
    )


def _local_attend(call: AttentionCall) -> torch.Tensor:
    """Our kernel for a call whose queries and keys are the whole sequence."""
    kernel = choose_kernel(call)
    if kernel == FUSED:
        return _fused_kernel(call)()
    if kernel == BLOCK_SPARSE:
        from .block_sparse_triton import block_sparse_attention

        return block_sparse_attention(call.query, call.key, call.value, call.block_mask, scale=call.scale)
    block_mask = None
    if call.block_mask is not None:
        block_mask = flex_block_mask(call.block_mask, call.block_size, call.query.shape[1], call.key.shape[1])
    return flex_attention_bnhd(
        call.query, call.key, call.value, score_mod=compose_score_mods(call.score_mods),
        block_mask=block_mask, scale=call.scale,
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
    report["ultravico"] = f"fused Triton kernel ({triton_reason})" if triton_reason == "available" else (
        f"FlexAttention score_mod (fused Triton kernel: {triton_reason})"
    )
    report["block_sparse"] = f"Triton block-sparse kernel ({triton_reason})" if triton_reason == "available" else (
        f"FlexAttention block mask (Triton kernel: {triton_reason})"
    )
    works, reason = xformers_status()
    report["xformers"] = reason
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        report["diffusers_active_backend"] = str(_AttentionBackendRegistry.get_active_backend()[0].value)
    except (ImportError, AttributeError) as error:
        report["diffusers_active_backend"] = f"unknown ({error})"
    return report


__all__ = ["BLOCK_SPARSE", "DENSE", "FLEX", "FUSED", "attend", "choose_kernel", "dense_attention", "flex_attention_bnhd", "flex_block_mask", "kernel_report"]
