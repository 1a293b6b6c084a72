"""Our Triton kernels as torch custom operators, the way the kernel layer launches them.

``torch.compile`` traces the Python around a Triton launch: building the tensor descriptors reads
``tensor.data_ptr() % 16`` (an alignment test dynamo cannot trace), and compressing a static block table caches
the result on the tensor. Wrapped as ``torch.library.custom_op``s, each launch is one opaque operator in the graph
(its output's shape, dtype and layout given by a fake implementation), so a method that runs on these kernels
compiles with ``fullgraph=True`` as the stock processor does (docs/benchmarks.md, 2026-12-02, measured the
failure on the H200 before this wrapper). Eager calls pay one operator dispatch.

The operators take plain arguments (the :class:`~diffusers_attn_ext.call.DecayRule`'s fields, a float scale, the
quantized kernel's PV precision as a string); :func:`block_sparse`, :func:`decay` and :func:`quantized` take the
kernel layer's objects and unpack them. They are registered for
every device: on CUDA the compiled kernels run, on CPU Triton's interpreter (``TRITON_INTERPRET=1``, the tests).
"""

from __future__ import annotations

import torch

from ..call import DecayRule
from .quantize import DEFAULT_PV

_NO_RULE = (0, 0, 0, 1.0, 0, 0, 0.0)  # DecayRule fields when there is none (ignored by the kernels)


def _rule_fields(rule: DecayRule | None) -> tuple:
    if rule is None:
        return _NO_RULE
    return (rule.start, rule.length, rule.far, float(rule.alpha), rule.horizon_queries, rule.horizon_keys,
            float(rule.blocked))


def _output(query: torch.Tensor) -> torch.Tensor:
    """What the kernels return: a fresh contiguous tensor of the query's shape and dtype."""
    return torch.empty(query.shape, dtype=query.dtype, device=query.device)


@torch.library.custom_op("diffusers_attn_ext::block_sparse_attention", mutates_args=())
def _block_sparse_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor,
                     scale: float, has_rule: bool, start: int, length: int, far: int, alpha: float,
                     horizon_queries: int, horizon_keys: int, blocked: float) -> torch.Tensor:
    from .block_sparse_triton import launch_block_sparse

    rule = DecayRule(start, length, far, alpha, horizon_queries, horizon_keys, blocked) if has_rule else None
    return launch_block_sparse(query, key, value, blocks, scale, None, rule)


@_block_sparse_op.register_fake
def _block_sparse_fake(query, key, value, blocks, scale, has_rule, start, length, far, alpha, horizon_queries,
                       horizon_keys, blocked):
    return _output(query)


@torch.library.custom_op("diffusers_attn_ext::decay_attention", mutates_args=())
def _decay_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, start: int, length: int,
              far: int, alpha: float, horizon_queries: int, horizon_keys: int, blocked: float) -> torch.Tensor:
    from .decay_triton import launch_decay

    return launch_decay(query, key, value, DecayRule(start, length, far, alpha, horizon_queries, horizon_keys,
                                                     blocked), scale, None)


@_decay_op.register_fake
def _decay_fake(query, key, value, scale, start, length, far, alpha, horizon_queries, horizon_keys, blocked):
    return _output(query)


@torch.library.custom_op("diffusers_attn_ext::quantized_attention", mutates_args=())
def _quantized_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor | None,
                  scale: float, pv_dtype: str, has_rule: bool, start: int, length: int, far: int, alpha: float,
                  horizon_queries: int, horizon_keys: int, blocked: float) -> torch.Tensor:
    from .quantized_triton import launch_quantized

    rule = DecayRule(start, length, far, alpha, horizon_queries, horizon_keys, blocked) if has_rule else None
    return launch_quantized(query, key, value, blocks, scale, pv_dtype=pv_dtype, rule=rule)


@_quantized_op.register_fake
def _quantized_fake(query, key, value, blocks, scale, pv_dtype, has_rule, start, length, far, alpha,
                    horizon_queries, horizon_keys, blocked):
    return _output(query)


def _scale(query: torch.Tensor, scale: float | None) -> float:
    return query.shape[-1] ** -0.5 if scale is None else float(scale)


def block_sparse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor,
                 scale: float | None = None, rule: DecayRule | None = None) -> torch.Tensor:
    """``block_sparse_triton.launch_block_sparse`` (``[B, N, H, D]``, 128-token bool block table, optional rule
    inside the kept blocks) as one custom operator."""
    return _block_sparse_op(query, key, value, blocks, _scale(query, scale), rule is not None, *_rule_fields(rule))


def decay(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, rule: DecayRule,
          scale: float | None = None) -> torch.Tensor:
    """``decay_triton.launch_decay`` (``[B, N, H, D]``, the rule spanning the sequence) as one custom operator."""
    return _decay_op(query, key, value, _scale(query, scale), *_rule_fields(rule))


def quantized(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor | None = None,
              scale: float | None = None, rule: DecayRule | None = None, *, pv_dtype: str = DEFAULT_PV) -> torch.Tensor:
    """``quantized_triton.launch_quantized`` (``[B, N, H, D]``; INT8 QK with smoothed keys, PV in the value's 16-bit
    dtype, ``pv_dtype="bf16"``, the default, or in FP8 e4m3, ``"fp8"``) as one custom operator: every key without ``blocks`` (the
    dense-equivalent kernel), the kept 128x128 blocks of a bool table with them, ``rule`` inside either."""
    return _quantized_op(query, key, value, blocks, _scale(query, scale), pv_dtype, rule is not None,
                         *_rule_fields(rule))


__all__ = ["block_sparse", "decay", "quantized"]
