"""Dense attention exactly as the stock processors run it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    via: str = "dispatch",
    backend=None,
    parallel_config=None,
) -> torch.Tensor:
    """softmax(scale * q k^T + mask) v on ``[B, N, H, D]`` tensors.

    ``via="dispatch"`` goes through diffusers' ``dispatch_attention_fn`` (so ``set_attention_backend``,
    the ``attention_backend`` context manager and context parallelism apply), as the FLUX and Wan stock
    processors do; ``via="sdpa"`` calls ``F.scaled_dot_product_attention`` on ``[B, H, N, D]`` views, as the
    SD3 and CogVideoX stock processors do.
    """
    if via == "dispatch":
        return dispatch_attention_fn(
            query, key, value, attn_mask=attn_mask, dropout_p=0.0, is_causal=False, scale=scale,
            backend=backend, parallel_config=parallel_config,
        )
    if via == "sdpa":
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            attn_mask=attn_mask, dropout_p=0.0, is_causal=False, scale=scale,
        )
        return out.transpose(1, 2)
    raise ValueError(f"via={via!r} is not one of ('dispatch', 'sdpa')")
