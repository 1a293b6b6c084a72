"""Wan2.1 / Wan2.2 (``WanTransformer3DModel``, ``WanAttention``): video. Self-attention over video tokens with 3D
RoPE in attn1, cross-attention to text in attn2, and for image-to-video an added K/V branch on the image context.
The video sequence is frame-major, ``frames x height x width`` tokens after the ``patch_size`` patching; no text
tokens in the self-attention sequence."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import _get_added_kv_projections, _get_qkv_projections

from ..context import TokenGrid
from .base import AttentionCall, FamilyAdapter

# Text context length of Wan's T5 encoder; the image context of I2V precedes it (as in diffusers).
WAN_TEXT_CONTEXT_LENGTH = 512


@dataclass(frozen=True)
class WanCheckpointLine:
    """What the checkpoints of one Wan line were trained on (the model cards and the authors' configs).

    ``latent_channels``: the VAE's ``z_dim``, which is the transformer's ``in_channels`` of its text-to-video
    models; ``trained_frames``: frames of a training clip; the VAE compresses ``temporal_compression`` frames and
    ``spatial_compression`` pixels a side into one latent (its first frame alone)."""

    name: str
    latent_channels: int
    trained_frames: int
    temporal_compression: int
    spatial_compression: int

    @property
    def latent_frames(self) -> int:
        """Latent frames of a training clip: ``(frames - 1) // temporal_compression + 1``."""
        return (self.trained_frames - 1) // self.temporal_compression + 1


# Wan2.1 (T2V/I2V 1.3B, 14B) and Wan2.2-A14B (T2V/I2V, two experts): 81 frames -> 21 latent frames.
WAN21_LINE = WanCheckpointLine("Wan2.1, Wan2.2-A14B", 16, 81, 4, 8)
# Wan2.2-TI2V-5B: the high-compression VAE (z_dim 48, 4x16x16), 121 frames at 24 fps -> 31 latent frames.
WAN22_TI2V_LINE = WanCheckpointLine("Wan2.2-TI2V-5B", 48, 121, 4, 16)


def wan_apply_rotary(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved-pair RoPE on ``[B, N, H, D]``, as diffusers' ``WanAttnProcessor`` computes it."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


def wan_checkpoint_line(config) -> WanCheckpointLine:
    """The line of a Wan transformer config: TI2V-5B by its 48 input channels, else Wan2.1 / Wan2.2-A14B (16, or
    36 for image-to-video: latents, mask and image latents)."""
    return WAN22_TI2V_LINE if config.get("in_channels") == WAN22_TI2V_LINE.latent_channels else WAN21_LINE


class WanAdapter(FamilyAdapter):
    family = "wan"
    media = "video"
    transformer_classes = ("WanTransformer3DModel",)
    attention_classes = ("WanAttention",)
    rotary = True
    text_cross_attention = True

    def checkpoint_latent_frames(self, config):
        if config is None:
            return None
        return wan_checkpoint_line(config).latent_frames

    def forward_layout(self, module, inputs, context):
        hidden = inputs["hidden_states"]  # [B, C, frames, height, width]
        p_t, p_h, p_w = module.config.patch_size
        return TokenGrid(hidden.shape[2] // p_t, hidden.shape[3] // p_h, hidden.shape[4] // p_w), 0

    def gather_rotary(self, rotary, index):
        # (cos, sin), each [1, N, 1, head_dim] over the video tokens
        return tuple(table.index_select(1, index) for table in rotary)

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

        added_kv = None
        if image_context is not None:
            key_img, value_img = _get_added_kv_projections(attn, image_context)
            key_img = attn.norm_added_k(key_img)
            added_kv = (key_img.unflatten(2, (attn.heads, -1)), value_img.unflatten(2, (attn.heads, -1)))
        return AttentionCall(
            module=attn, family=self.family, kind="cross" if is_cross else "self", query=query, key=key, value=value,
            text=None, visual=slice(0, query.shape[1]), context=context, rotary=rotary, attn_mask=attention_mask,
            added_kv=added_kv,
        )

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
        if call.added_kv is not None:
            key_img, value_img = call.added_kv
            out_img = dispatch_attention_fn(
                call.query, key_img, value_img, attn_mask=None, dropout_p=0.0, is_causal=False,
                backend=call.backend, parallel_config=None,
            )
            out = out + out_img.flatten(2, 3).type_as(call.query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)
