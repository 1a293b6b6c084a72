"""Explicit attention probabilities of a call, for inspection on small inputs or sampled query rows."""

from __future__ import annotations

import torch

from ..families.base import AttentionCall
from .flex import compose_score_mods


def explicit_probabilities(call: AttentionCall, query_rows: torch.Tensor | None = None) -> torch.Tensor:
    """softmax over keys of the scores this call's kernel computes (score mods and block mask included),
    in float32, shape ``[B, H, rows, keys]``. ``query_rows`` (indices) limits the rows: at video lengths
    pass a sample, since the result holds rows x keys values per head.
    """
    rows = torch.arange(call.query.shape[1], device=call.query.device) if query_rows is None else query_rows
    q = call.query[:, rows].transpose(1, 2).float()
    k = call.key.transpose(1, 2).float()
    scale = call.head_dim**-0.5 if call.scale is None else call.scale
    scores = q @ k.transpose(-1, -2) * scale
    b = torch.arange(scores.shape[0], device=scores.device)[:, None, None, None]
    h = torch.arange(scores.shape[1], device=scores.device)[None, :, None, None]
    q_idx, kv_idx = rows[None, None, :, None], torch.arange(k.shape[2], device=scores.device)[None, None, None, :]
    mod = compose_score_mods(call.score_mods)
    if mod is not None:
        scores = mod(scores, b, h, q_idx, kv_idx)
    if call.block_mask is not None:
        keys = torch.arange(k.shape[2], device=scores.device)
        keep = call.block_mask[:, :, (rows // call.block_size)[:, None], (keys // call.block_size)[None, :]]
        scores = scores.masked_fill(~keep, float("-inf"))
    if call.attn_mask is not None:
        mask = call.attn_mask[..., rows, :]
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(-1)
