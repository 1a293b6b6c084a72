"""Optional xformers backend: detected by a real call, never required.

When it works, diffusers' own dispatcher runs it for our dense path: ``set_attention_backend("xformers")``.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def xformers_status() -> tuple[bool, str]:
    """(works, reason). xformers counts as available only if its memory-efficient attention runs here."""
    try:
        import xformers.ops as xops
    except Exception as error:  # ImportError, or a broken binary raising anything at import
        return False, f"not importable: {type(error).__name__}: {error}"
    if not torch.cuda.is_available():
        return False, "importable, but no CUDA device to run its kernels"
    try:
        q = torch.randn(1, 8, 1, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
    except Exception as error:
        return False, f"importable, but its CUDA kernels fail: {type(error).__name__}: {error}"
    return True, "works"

