"""Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``; ``Attention`` with ``JointAttnProcessor2_0``): images.
Joint attention with image tokens first (row-major after ``patch_size`` patching) and text tokens after; SD3.5's
``attn2`` is self-attention over image tokens only. No RoPE. The stock processor calls
``F.scaled_dot_product_attention`` on ``[B, H, N, D]`` directly."""

from __future__ import annotations

import torch

from ..context import TokenGrid
from .base import AttentionCall, FamilyAdapter

# Image tokens at SD3's default 1024x1024 (128x128 latents, 2x2 patches).
TRAINED_IMAGE_TOKENS = 64 * 64


def _heads_first(x, batch_size, heads, head_dim):
    return x.view(batch_size, -1, heads, head_dim).transpose(1, 2)


class SD3Adapter(FamilyAdapter):
    family = "sd3"
    media = "image"
    transformer_classes = ("SD3Transformer2DModel",)

    def checkpoint_image_tokens(self, config):
        return TRAINED_IMAGE_TOKENS

    def forward_layout(self, module, inputs, context):
        hidden, text = inputs["hidden_states"], inputs.get("encoder_hidden_states")  # hidden: [B, C, height, width]
        p = module.config.patch_size
        return TokenGrid(1, hidden.shape[-2] // p, hidden.shape[-1] // p), 0 if text is None else text.shape[1]

    def project(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, context):
        batch_size, image_len = hidden_states.shape[0], hidden_states.shape[1]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (_heads_first(x, batch_size, attn.heads, head_dim) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:
            encoder_query = _heads_first(attn.add_q_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            encoder_key = _heads_first(attn.add_k_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            encoder_value = _heads_first(attn.add_v_proj(encoder_hidden_states), batch_size, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=2)
            key = torch.cat([key, encoder_key], dim=2)
            value = torch.cat([value, encoder_value], dim=2)

        total = query.shape[2]
        joint = encoder_hidden_states is not None
        return AttentionCall(
            module=attn, family=self.family, kind="joint" if joint else "self",
            # [B, H, N, D] -> [B, N, H, D] as a view: the dense kernel hands SDPA the stock tensors.
            query=query.transpose(1, 2), key=key.transpose(1, 2), value=value.transpose(1, 2),
            text=slice(image_len, total) if joint else None, visual=slice(0, image_len),
            context=context, attn_mask=attention_mask, dense_via="sdpa",
        )

    def finish(self, attn, call, out):
        batch_size = out.shape[0]
        out = out.reshape(batch_size, -1, call.heads * call.head_dim).to(call.query.dtype)
        encoder_out = None
        if call.kind == "joint":
            image_len = call.visual.stop
            out, encoder_out = out[:, :image_len], out[:, image_len:]
            if not attn.context_pre_only:
                encoder_out = attn.to_add_out(encoder_out)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        return (out, encoder_out) if encoder_out is not None else out

