"""FLUX.1 attention (``FluxAttention``): double blocks project text and image separately and attend
jointly (text first); single blocks receive the joint sequence already concatenated. RoPE on all tokens."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections

from .base import AttentionCall, FamilyAdapter


class FluxAdapter(FamilyAdapter):
    family = "flux"

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
        call = AttentionCall(
            module=attn, family=self.family, kind=kind, query=query, key=key, value=value,
            text=text, visual=visual, context=context, rotary=rotary, attn_mask=attention_mask,
        )
        call.extras["encoder_len"] = None if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        return call

    def apply_rotary(self, call):
        if call.rotary is None:
            return
        call.query = apply_rotary_emb(call.query, call.rotary, sequence_dim=1)
        call.key = apply_rotary_emb(call.key, call.rotary, sequence_dim=1)

    def finish(self, attn, call, out):
        out = out.flatten(2, 3).to(call.query.dtype)
        encoder_len = call.extras["encoder_len"]
        if encoder_len is None:
            return out
        encoder_out, out = out.split_with_sizes([encoder_len, out.shape[1] - encoder_len], dim=1)
        out = attn.to_out[0](out.contiguous())
        out = attn.to_out[1](out)
        return out, attn.to_add_out(encoder_out.contiguous())

