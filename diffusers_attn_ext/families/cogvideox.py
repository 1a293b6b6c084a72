"""CogVideoX (``CogVideoXTransformer3DModel``; ``Attention`` with ``CogVideoXAttnProcessor2_0``): video. Text tokens
then video tokens (frame-major after the ``patch_size_t`` x ``patch_size`` patching) in one sequence; 3D RoPE on
the video tokens, ``(cos, sin)`` each ``[video tokens, head_dim]``, when the model config has
``use_rotary_positional_embeddings``. The stock processor calls ``F.scaled_dot_product_attention`` on
``[B, H, N, D]`` directly."""

from __future__ import annotations

import torch
from diffusers.models.embeddings import apply_rotary_emb

from ..context import TokenGrid
from .base import AttentionCall, FamilyAdapter


class CogVideoXAdapter(FamilyAdapter):
    family = "cogvideox"
    media = "video"
    transformer_classes = ("CogVideoXTransformer3DModel",)
    rotary = True

    def rotary_missing(self, config):
        if config is None or config.get("use_rotary_positional_embeddings", False):
            return None
        return ("this CogVideoX transformer has use_rotary_positional_embeddings=False (CogVideoX has 3D RoPE with "
                "use_rotary_positional_embeddings=True)")

    def checkpoint_latent_frames(self, config):
        """``sample_frames`` through the VAE's temporal compression and the temporal patch (1.5 pads latent frames to
        a multiple of ``patch_size_t``): 49 frames -> 13 latent frames (1.0), 81 -> 21 -> 11 (1.5, ``patch_size_t`` 2)."""
        if config is None:
            return None
        sample_frames, compression = config.get("sample_frames"), config.get("temporal_compression_ratio")
        if sample_frames is None or compression is None:
            return None
        latent = (sample_frames - 1) // compression + 1
        patch_t = config.get("patch_size_t") or 1
        return -(-latent // patch_t)

    def forward_layout(self, module, inputs, context):
        hidden, text = inputs["hidden_states"], inputs.get("encoder_hidden_states")  # hidden: [B, F, C, H, W]
        p, p_t = module.config.patch_size, module.config.patch_size_t or 1
        grid = TokenGrid(hidden.shape[1] // p_t, hidden.shape[-2] // p, hidden.shape[-1] // p)
        return grid, 0 if text is None else text.shape[1]

    def gather_rotary(self, rotary, index):
        # (cos, sin), each [N, head_dim] over the video tokens
        return tuple(table.index_select(0, index) for table in rotary)

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
