"""FLUX.1 (``FluxTransformer2DModel``, ``FluxAttention``): images. Double blocks project text and image separately
and attend jointly (text first); single blocks receive the joint sequence already concatenated. RoPE on all tokens,
as diffusers' real ``(cos, sin)`` over the whole sequence; image tokens row-major after the 2x2 latent packing."""

from __future__ import annotations

import math

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from ..call import accumulation_dtype
from ..context import TokenGrid
from .base import AttentionCall, FamilyAdapter

# Image tokens at FLUX.1's default 1024x1024 (64x64 tokens after the VAE's 8x and the 2x2 packing).
TRAINED_IMAGE_TOKENS = 64 * 64


class FluxKeyRotation:
    """FLUX's RoPE moving an already rotated key: diffusers' ``apply_rotary_emb`` (``use_real_unbind_dim=-1``) is
    ``x cos + rot(x) sin`` per channel pair, a rotation, so ``R(m) k = R(m - n) R(n) k`` with
    ``cos(m - n) = cos m cos n + sin m sin n`` and ``sin(m - n) = sin m cos n - cos m sin n``."""

    def __init__(self, rotary):
        if not (isinstance(rotary, tuple) and len(rotary) == 2):
            raise ValueError(f"FLUX's rotary embedding is (cos, sin) over the whole sequence; got {type(rotary).__name__}")
        self.cos, self.sin = rotary

    def deltas(self, targets, sources, key):
        if self.cos.shape[0] != key.shape[0]:
            raise ValueError(
                f"FLUX's (cos, sin) cover {self.cos.shape[0]} tokens, but the keys to move are a sequence of "
                f"{key.shape[0]}: the rotary embedding must cover the whole sequence"
            )
        cos, sin = (r.to(key.device, accumulation_dtype(key.dtype)) for r in (self.cos, self.sin))
        cos_m, sin_m = cos[targets][:, None], sin[targets][:, None]
        cos_n, sin_n = cos[sources], sin[sources]
        # in place, so that the temporaries stay at twice the result
        return (cos_m * cos_n).addcmul_(sin_m, sin_n), (sin_m * cos_n).addcmul_(cos_m, sin_n, value=-1)

    def rotate_(self, x, deltas):
        # diffusers' real RoPE on [P, H, D] with per-token (cos, sin) [P, D]: the same operations, the same rounding
        cos, sin = deltas
        real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack([-imag, real], -1).flatten(-2)
        return x.mul_(cos[:, None]).add_(rotated.mul_(sin[:, None]))


def _flux_grid(img_ids: torch.Tensor, num_tokens: int, context) -> TokenGrid | None:
    """FLUX's token grid from its image ids (row, column in channels 1, 2). Reading them is a Python scalar from a
    tensor, so it happens eagerly only; inside a compiled region the grid comes from the last eager forward with
    as many tokens, else from a square grid, else None (methods that need it then say so)."""
    memo = context.grid_of_tokens
    if torch.compiler.is_compiling():
        side = math.isqrt(num_tokens)
        return memo.get(num_tokens, TokenGrid(1, side, side) if side * side == num_tokens else None)
    img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
    height, width = int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1
    grid = TokenGrid(1, height, width) if height * width == num_tokens else None
    if grid is not None:
        memo[num_tokens] = grid
    return grid


class FluxAdapter(FamilyAdapter):
    family = "flux"
    media = "image"
    transformer_classes = ("FluxTransformer2DModel",)
    attention_classes = ("FluxAttention",)
    rotary = True

    def checkpoint_image_tokens(self, config):
        return TRAINED_IMAGE_TOKENS

    def forward_layout(self, module, inputs, context):
        text = inputs.get("encoder_hidden_states")
        text_len = 0 if text is None else text.shape[1]
        img_ids = inputs.get("img_ids")
        if img_ids is None:
            return None, text_len
        return _flux_grid(img_ids, inputs["hidden_states"].shape[1], context), text_len

    def key_rotation(self, rotary):
        return None if rotary is None else FluxKeyRotation(rotary)

    def project(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, context):
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states
        )
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        if attn.added_kv_proj_dim is not None:
            encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
            encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            encoder_query = attn.norm_added_q(encoder_query)
            encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)

        total = query.shape[1]
        if encoder_hidden_states is not None:
            text_len, kind = encoder_hidden_states.shape[1], "joint"
        else:
            text_len, kind = (context.text_len if context is not None else None), "single"
        text = slice(0, text_len) if text_len is not None else None
        visual = slice(text_len, total) if text_len is not None else slice(0, total)
        return AttentionCall(
            module=attn, family=self.family, kind=kind, query=query, key=key, value=value,
            text=text, visual=visual, context=context, rotary=rotary, attn_mask=attention_mask,
            encoder_tokens=None if encoder_hidden_states is None else encoder_hidden_states.shape[1],
        )

    def apply_rotary(self, call):
        if call.rotary is None:
            return
        call.query = apply_rotary_emb(call.query, call.rotary, sequence_dim=1)
        call.key = apply_rotary_emb(call.key, call.rotary, sequence_dim=1)

    def finish(self, attn, call, out):
        out = out.flatten(2, 3).to(call.query.dtype)
        encoder_len = call.encoder_tokens
        if encoder_len is None:
            return out
        encoder_out, out = out.split_with_sizes([encoder_len, out.shape[1] - encoder_len], dim=1)
        out = attn.to_out[0](out.contiguous())
        out = attn.to_out[1](out)
        return out, attn.to_add_out(encoder_out.contiguous())

