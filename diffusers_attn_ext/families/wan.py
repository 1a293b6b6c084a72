"""Wan2.1 / Wan2.2 attention (``WanAttention``): self-attention over video tokens with 3D RoPE in attn1,
cross-attention to text in attn2, and for image-to-video an added K/V branch on the image context."""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

from .base import AttentionCall, FamilyAdapter

# Text context length of Wan's T5 encoder; the image context of I2V precedes it (as in diffusers).
WAN_TEXT_CONTEXT_LENGTH = 512


def wan_apply_rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved-pair RoPE on ``[B, N, H, D]``, as diffusers' ``WanAttnProcessor`` computes it."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanAdapter(FamilyAdapter):
    family = "wan"

    def project(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, context):
        image_context = None
        if attn.add_k_proj is not None:
            image_context_length = encoder_hidden_states.shape[1] - WAN_TEXT_CONTEXT_LENGTH
            image_context = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]
        is_cross = encoder_hidden_states is not None

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        call = AttentionCall(
            module=attn,
            family=self.family,
            kind="cross" if is_cross else "self",
            query=query,
            key=key,
            value=value,
            text=None,
            visual=slice(0, query.shape[1]),
            context=context,
            rotary=rotary,
            attn_mask=attention_mask,
        )
        if image_context is not None:
            key_img, value_img = _get_added_kv_projections(attn, image_context)
            key_img = attn.norm_added_k(key_img)
            call.extras["image_kv"] = (key_img.unflatten(2, (attn.heads, -1)), value_img.unflatten(2, (attn.heads, -1)))
        return call

    def apply_rotary(self, call):
        if call.rotary is None:
            return
        call.query = wan_apply_rotary(call.query, *call.rotary)
        call.key = wan_apply_rotary(call.key, *call.rotary)

    def parallel_config(self, call, processor_config):
        # diffusers passes the context-parallel config to self-attention only (diffusers PR 12909).
        return processor_config if call.kind == "self" else None

    def finish(self, attn, call, out):
        out = out.flatten(2, 3).type_as(call.query)
        if "image_kv" in call.extras:
            key_img, value_img = call.extras["image_kv"]
            out_img = dispatch_attention_fn(
                call.query, key_img, value_img, attn_mask=None, dropout_p=0.0, is_causal=False,
                backend=call.backend, parallel_config=None,
            )
            out = out + out_img.flatten(2, 3).type_as(call.query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)
