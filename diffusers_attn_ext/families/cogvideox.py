"""CogVideoX attention (``Attention`` with ``CogVideoXAttnProcessor2_0``): text tokens then video tokens
in one sequence; 3D RoPE on the video tokens when the model config has ``use_rotary_positional_embeddings``.
The stock processor calls ``F.scaled_dot_product_attention`` on ``[B, H, N, D]`` directly."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from .base import AttentionCall, FamilyAdapter


class CogVideoXAdapter(FamilyAdapter):
    family = "cogvideox"

    def project(self, attn, hidden_states, encoder_hidden_states, attention_mask, rotary, context):
        text_len = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        return AttentionCall(
            module=attn, family=self.family, kind="joint",
            # [B, H, N, D] -> [B, N, H, D] as a view: the dense kernel hands SDPA the stock tensors.
            query=query.transpose(1, 2), key=key.transpose(1, 2), value=value.transpose(1, 2),
            text=slice(0, text_len), visual=slice(text_len, sequence_length),
            context=context, rotary=rotary, attn_mask=attention_mask, dense_via="sdpa",
        )

    def apply_rotary(self, call):
        if call.rotary is None:
            return
        # In place on the video part of [B, H, N, D], as the stock processor does.
        query, key = call.query.transpose(1, 2), call.key.transpose(1, 2)
        start = call.visual.start
        query[:, :, start:] = apply_rotary_emb(query[:, :, start:], call.rotary)
        if not call.module.is_cross_attention:
            key[:, :, start:] = apply_rotary_emb(key[:, :, start:], call.rotary)

    def finish(self, attn, call, out):
        batch_size = out.shape[0]
        out = out.reshape(batch_size, -1, call.heads * call.head_dim)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        text_len = call.text.stop
        encoder_out, out = out.split([text_len, out.size(1) - text_len], dim=1)
        return out, encoder_out
