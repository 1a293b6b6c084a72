"""The world's text-to-video model in diffusers' Wan architecture, built offline from a config.

``build_tokenizer`` makes a word-level tokenizer over the world's vocabulary (``vocabulary.all_words``) with the
T5 conventions Wan's pipeline relies on (``</s>`` closes every prompt, ``<pad>`` is id 0); ``build_video_pipeline``
makes a ``WanPipeline`` with random weights: a small ``UMT5EncoderModel``, an ``AutoencoderKLWan`` (4x spatial and
2x temporal compression) and a ``WanTransformer3DModel``. ``world.train_video`` trains it; the trained pipeline
is saved with ``save_pretrained`` in ``diffusers_attn_ext/shipped/`` and loaded with ``WanPipeline.from_pretrained``.
"""

from __future__ import annotations

import dataclasses

import torch

from ..families.base import RECORDED_LATENT_FRAMES
from .scenes import TRAIN_FRAMES
from .vocabulary import all_words

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


@dataclasses.dataclass(frozen=True)
class VideoModelConfig:
    """Sizes of the world video model (the shipped one uses these defaults)."""

    frames: int = 9
    height: int = 64
    width: int = 64
    # VAE: each 64x64 RGB frame -> 8 x 16x16 latents (no temporal compression: see per_frame_vae)
    z_dim: int = 8
    vae_base_dim: int = 16
    vae_dim_mult: tuple[int, ...] = (1, 2, 4)
    vae_temporal_downsample: tuple[bool, ...] = (False, False)
    # text encoder
    text_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_ff: int = 256
    # transformer: patch (1, 2, 2) -> 8x8 tokens per latent frame, 576 tokens per trained 9-frame video
    heads: int = 4
    head_dim: int = 64
    ffn_dim: int = 1024
    layers: int = 6
    flow_shift: float = 3.0


def build_tokenizer():
    """A word-level tokenizer over the world's vocabulary: lower-cases, splits on spaces and punctuation, appends
    ``</s>``; unknown words become ``<unk>``. Loads back with ``AutoTokenizer.from_pretrained``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *all_words()])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", model_max_length=512
    )


def per_frame_vae(vae) -> None:
    """Zero the taps of every causal 3D convolution of ``vae`` that read earlier frames, in place.

    The VAE then codes each frame on its own, whether ``AutoencoderKLWan`` runs frames one by one with its
    feature cache (as ``WanPipeline`` decodes) or as a batch of one-frame videos (as training does, which is
    many times faster): an earlier frame only ever meets a zero weight. Training keeps the taps at zero, since
    one-frame videos give them zero gradients (their inputs are the causal zero padding).
    """
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, WanCausalConv3d) and module.weight.shape[2] > 1:
                module.weight[:, :, :-1] = 0.0


def wan_num_frames(frames: int, vae) -> int:
    """The ``num_frames`` to give ``WanPipeline`` so that it makes ``frames`` frames with this VAE.

    Wan's pipeline rounds ``num_frames`` up to ``k * scale_factor_temporal + 1``; with no temporal compression
    (factor 1) that adds a frame to every request, so ask for one fewer.
    """
    factor = vae.config.scale_factor_temporal
    return frames - 1 if factor == 1 else frames


def build_video_pipeline(config: VideoModelConfig = VideoModelConfig()):
    """A ``WanPipeline`` of the world video model with random weights (seed the torch RNG before calling)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer()
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=config.text_dim,
            d_kv=config.text_dim // config.text_heads,
            d_ff=config.text_ff,
            num_layers=config.text_layers,
            num_heads=config.text_heads,
            relative_attention_num_buckets=16,
            relative_attention_max_distance=64,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    temporal = 2 ** sum(config.vae_temporal_downsample)
    spatial = 2 ** len(config.vae_temporal_downsample)
    vae = AutoencoderKLWan(
        base_dim=config.vae_base_dim,
        z_dim=config.z_dim,
        dim_mult=list(config.vae_dim_mult),
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=list(config.vae_temporal_downsample),
        latents_mean=[0.0] * config.z_dim,
        latents_std=[1.0] * config.z_dim,
        scale_factor_temporal=temporal,
        scale_factor_spatial=spatial,
    )
    per_frame_vae(vae)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=config.heads,
        attention_head_dim=config.head_dim,
        in_channels=config.z_dim,
        out_channels=config.z_dim,
        text_dim=config.text_dim,
        freq_dim=256,
        ffn_dim=config.ffn_dim,
        num_layers=config.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=1024,
    )
    # The training length, for the methods that need it (UltraViCo): the config alone reads as Wan2.1's 21.
    transformer.register_to_config(**{RECORDED_LATENT_FRAMES: (TRAIN_FRAMES - 1) // temporal + 1})
    scheduler = FlowMatchEulerDiscreteScheduler(shift=config.flow_shift)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


SHIPPED_VIDEO_MODEL = "world-video"


def shipped_model_path(name: str = SHIPPED_VIDEO_MODEL) -> str:
    """Path of a model shipped in ``diffusers_attn_ext/shipped/`` (a ``save_pretrained`` folder)."""
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "shipped" / name
    if not (path / "model_index.json").exists():
        raise ValueError(f"shipped model {name!r} not found at {path}")
    return str(path)


def load_world_video_pipeline(path: str | None = None, *, dtype=torch.float32, pipeline_class=None):
    """The shipped world video model (or the ``save_pretrained`` folder ``path``) as ``pipeline_class``
    (default ``WanPipeline``; any of our Wan pipelines loads it too), in ``dtype``, progress bars off."""
    if pipeline_class is None:
        from diffusers import WanPipeline as pipeline_class
    pipe = pipeline_class.from_pretrained(path or shipped_model_path(), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe
