"""The world's text-to-image model in diffusers' FLUX.1 architecture, built offline from a config.

``build_image_pipeline`` makes a ``FluxPipeline`` with random weights: a ``FluxTransformer2DModel`` without guidance
embedding (``guidance_embeds=False``: a CFG model, not a guidance-distilled one, so classifier-free guidance runs
through ``FluxPipeline``'s ``true_cfg_scale`` with ``negative_prompt=""``, the caption that training drops to), its
own small ``AutoencoderKL`` (2x spatial compression, 4 latent channels; FLUX packs 2x2 latent patches, so a 32x32
image is 8x8 = 64 image tokens), a small ``CLIPTextModel`` (its pooled output) and a small ``T5EncoderModel`` (its
token embeddings), with word-level tokenizers over the world's vocabulary (``vocabulary.all_words``) built offline:
``build_clip_tokenizer`` (CLIP conventions: ``<|startoftext|>`` opens, ``<|endoftext|>`` closes and pads, so the
pooled output, read at the first ``<|endoftext|>``, does not depend on the padding) and ``models.build_tokenizer``
(T5 conventions, shared with the video model).

The shipped model (``diffusers_attn_ext/shipped/world-image``, trained by ``world.train_image``) loads with
``FluxPipeline.from_pretrained(path)`` and with our ``FluxHeadPAGPipeline`` and ``FluxMultiSubjectPipeline``. Give it
the trained sizes and text length (``WORLD_IMAGE_CALL``): ``FluxPipeline`` otherwise draws 256x256 images and pads
the T5 prompt to 512 tokens (FLUX attends every text token, padding included; training pads to ``text_tokens`` and
to 512 on a fraction of its steps only, so the default still works, but less well).
"""

from __future__ import annotations

import dataclasses

import torch

from ..families.base import RECORDED_IMAGE_TOKENS
from ..validation import integer
from .models import build_tokenizer, shipped_model_path
from .vocabulary import all_words

CLIP_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>", "<unk>")
SHIPPED_IMAGE_MODEL = "world-image"


@dataclasses.dataclass(frozen=True)
class ImageModelConfig:
    """Sizes of the world image model (the shipped one uses these defaults)."""

    size: int = 32
    # VAE: 32x32 RGB -> 4 x 16x16 latents
    latent_channels: int = 4
    vae_channels: tuple[int, ...] = (32, 64)
    vae_layers_per_block: int = 1
    vae_norm_groups: int = 16
    # text encoders (CLIP: pooled output; T5: token embeddings) and the prompt lengths
    clip_dim: int = 64
    clip_layers: int = 2
    clip_heads: int = 2
    clip_ff: int = 128
    clip_tokens: int = 32
    t5_dim: int = 64
    t5_layers: int = 2
    t5_heads: int = 4
    t5_ff: int = 128
    text_tokens: int = 32
    # transformer: inner dim heads * head_dim; RoPE axes (index, row, column) sum to head_dim
    heads: int = 5
    head_dim: int = 32
    axes_dims_rope: tuple[int, ...] = (8, 12, 12)
    double_layers: int = 2
    single_layers: int = 4
    # FLUX's resolution-dependent shift: mu = base_shift at base_tokens image tokens (the trained 64), linear in
    # the token count up to max_shift at max_tokens; sigma' = e^mu / (e^mu + 1 / sigma - 1)
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_tokens: int = 64
    max_tokens: int = 1024

    @property
    def image_tokens(self) -> int:
        """Image tokens at the trained size: (size / 2 / 2)^2 (VAE 2x, then FLUX's 2x2 packing)."""
        factor = 2 ** (len(self.vae_channels) - 1) * 2
        return (self.size // factor) ** 2


def build_clip_tokenizer(max_length: int = 32):
    """A word-level tokenizer over the world's vocabulary with CLIP's conventions: lower-cases, splits on spaces and
    punctuation, wraps every prompt in ``<|startoftext|> ... <|endoftext|>`` and pads with ``<|endoftext|>``;
    unknown words become ``<unk>``. ``model_max_length`` is ``max_length`` (FluxPipeline pads CLIP prompts to it)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*CLIP_SPECIAL_TOKENS, *all_words()])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    bos, eos = CLIP_SPECIAL_TOKENS[:2]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=eos, unk_token="<unk>",
        model_max_length=max_length,
    )


def image_scheduler_config(config: ImageModelConfig = ImageModelConfig()) -> dict:
    """``FlowMatchEulerDiscreteScheduler`` settings: FLUX's dynamic (resolution-dependent) exponential shift."""
    return dict(use_dynamic_shifting=True, base_shift=config.base_shift, max_shift=config.max_shift,
                base_image_seq_len=config.base_tokens, max_image_seq_len=config.max_tokens, shift=1.0,
                time_shift_type="exponential")


def build_image_pipeline(config: ImageModelConfig = ImageModelConfig(), pipeline_class=None):
    """A ``FluxPipeline`` (or ``pipeline_class``, a FluxPipeline subclass) of the world image model with random
    weights (seed the torch RNG before calling)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if sum(config.axes_dims_rope) != config.head_dim:
        raise ValueError(f"ImageModelConfig axes_dims_rope={config.axes_dims_rope} must sum to head_dim="
                         f"{config.head_dim}")
    pipeline_class = pipeline_class or FluxPipeline
    clip_tokenizer = build_clip_tokenizer(config.clip_tokens)
    t5_tokenizer = build_tokenizer()
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=config.clip_dim, intermediate_size=config.clip_ff,
        num_hidden_layers=config.clip_layers, num_attention_heads=config.clip_heads,
        max_position_embeddings=config.clip_tokens, hidden_act="quick_gelu", projection_dim=config.clip_dim,
        bos_token_id=clip_tokenizer.bos_token_id, eos_token_id=clip_tokenizer.eos_token_id,
        pad_token_id=clip_tokenizer.pad_token_id,
    ))
    t5 = T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=config.t5_dim, d_kv=config.t5_dim // config.t5_heads,
        d_ff=config.t5_ff, num_layers=config.t5_layers, num_heads=config.t5_heads,
        relative_attention_num_buckets=16, relative_attention_max_distance=64, dropout_rate=0.0,
        feed_forward_proj="gated-gelu", pad_token_id=t5_tokenizer.pad_token_id,
        eos_token_id=t5_tokenizer.eos_token_id, decoder_start_token_id=0,
    ))
    levels = len(config.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=tuple(config.vae_channels),
        layers_per_block=config.vae_layers_per_block, latent_channels=config.latent_channels,
        norm_num_groups=config.vae_norm_groups, sample_size=config.size, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=False, shift_factor=0.0, scaling_factor=1.0,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * config.latent_channels, num_layers=config.double_layers,
        num_single_layers=config.single_layers, attention_head_dim=config.head_dim,
        num_attention_heads=config.heads, joint_attention_dim=config.t5_dim, pooled_projection_dim=config.clip_dim,
        guidance_embeds=False, axes_dims_rope=tuple(config.axes_dims_rope),
    )
    # The trained size, for the methods that need it (entropy scaling): FLUX's default is 4096 tokens (1024 px).
    transformer.register_to_config(**{RECORDED_IMAGE_TOKENS: config.image_tokens})
    scheduler = FlowMatchEulerDiscreteScheduler(**image_scheduler_config(config))
    return pipeline_class(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tokenizer,
                          text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)


def check_image_pipeline(pipe) -> None:
    """ValueError, naming both sides, where the parts of a world image pipeline do not fit each other: each
    tokenizer's ids must lie in its encoder's embedding table (``len(tokenizer) <= vocab_size``; the pad id too),
    CLIP's padded length ``tokenizer.model_max_length`` (what ``FluxPipeline`` pads to) must be at most CLIP's
    ``max_position_embeddings`` (one learned embedding per position), the transformer's ``context_embedder`` must take
    T5's ``d_model``, its pooled projection CLIP's ``hidden_size`` (``pooler_output``), its ``x_embedder`` the packed
    latent channels ``4 * latent_channels`` (2x2 patches), and its RoPE axes must sum to ``attention_head_dim`` with
    one axis per coordinate of FLUX's (index, row, column) ids. On the GPU an index outside a table is an
    asynchronous device assert that a later kernel reports (often as ``CUBLAS_STATUS_EXECUTION_FAILED``)."""
    clip, t5, transformer = pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.transformer
    integer(f"len(tokenizer) (CLIP vocab_size {clip.vocab_size})", len(pipe.tokenizer), 1, clip.vocab_size)
    integer(f"tokenizer.model_max_length (CLIP max_position_embeddings {clip.max_position_embeddings})",
            pipe.tokenizer.model_max_length, 1, clip.max_position_embeddings)
    integer(f"len(tokenizer_2) (T5 vocab_size {t5.vocab_size})", len(pipe.tokenizer_2), 1, t5.vocab_size)
    integer(f"tokenizer_2.pad_token_id (T5 vocab_size {t5.vocab_size})", pipe.tokenizer_2.pad_token_id, 0,
            t5.vocab_size - 1)
    widths = (
        ("transformer context_embedder in_features", transformer.context_embedder.in_features, "T5 d_model", t5.d_model),
        ("transformer pooled projection in_features", transformer.time_text_embed.text_embedder.linear_1.in_features,
         "CLIP hidden_size", clip.hidden_size),
        ("transformer x_embedder in_features", transformer.x_embedder.in_features, "4 * VAE latent_channels",
         4 * pipe.vae.config.latent_channels),
        ("sum(transformer axes_dims_rope)", sum(transformer.config.axes_dims_rope), "attention_head_dim",
         transformer.config.attention_head_dim),
        ("len(transformer axes_dims_rope)", len(transformer.config.axes_dims_rope), "FLUX id coordinates", 3),
    )
    for name, value, other, expected in widths:
        integer(f"{name} (= {other})", value, expected, expected)


def check_text_ids(pipe, clip_ids: torch.Tensor, t5_ids: torch.Tensor, length: int) -> None:
    """ValueError, naming the tensor and the table, for prompt ids that would index outside the text encoders'
    tables: ``clip_ids`` (B, L) need ``L <= max_position_embeddings`` and ids in ``[0, vocab_size)``, with CLIP's
    ``eos_token_id`` in every row (``pooler_output`` is read at the first one; without it at position 0, in range but
    wrong); ``t5_ids`` (B, L') ids in ``[0, vocab_size)``, padded to ``length >= L'`` T5 tokens with the pad id."""
    clip, t5 = pipe.text_encoder.config, pipe.text_encoder_2.config
    for name, ids in (("clip_ids", clip_ids), ("t5_ids", t5_ids)):
        integer(f"{name}.dim()", ids.dim(), 2, 2)
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} dtype={ids.dtype} is not allowed: allowed are torch.int32 and torch.int64")
    integer(f"clip_ids.shape[1] (CLIP max_position_embeddings {clip.max_position_embeddings})", clip_ids.shape[1], 1,
            clip.max_position_embeddings)
    integer(f"min(clip_ids) (CLIP vocab_size {clip.vocab_size})", int(clip_ids.min()), 0, clip.vocab_size - 1)
    integer(f"max(clip_ids) (CLIP vocab_size {clip.vocab_size})", int(clip_ids.max()), 0, clip.vocab_size - 1)
    integer(f"rows of clip_ids without CLIP's eos_token_id {clip.eos_token_id}",
            int((~(clip_ids == clip.eos_token_id).any(1)).sum()), 0, 0)
    integer(f"min(t5_ids) (T5 vocab_size {t5.vocab_size})", int(t5_ids.min()), 0, t5.vocab_size - 1)
    integer(f"max(t5_ids) (T5 vocab_size {t5.vocab_size})", int(t5_ids.max()), 0, t5.vocab_size - 1)
    integer(f"T5 length (t5_ids.shape[1] {t5_ids.shape[1]})", length, t5_ids.shape[1])


# the call arguments of the trained model: its size, its T5 length, CFG through FluxPipeline's true CFG
WORLD_IMAGE_CALL = dict(height=32, width=32, max_sequence_length=32, num_inference_steps=20, true_cfg_scale=4.0,
                        negative_prompt="")


def world_image_call(config: ImageModelConfig = ImageModelConfig(), **overrides) -> dict:
    """``WORLD_IMAGE_CALL`` for ``config`` (its size and text length), updated with ``overrides``."""
    return {**WORLD_IMAGE_CALL, "height": config.size, "width": config.size,
            "max_sequence_length": config.text_tokens, **overrides}


def load_world_image_pipeline(path: str | None = None, *, dtype=torch.float32, pipeline_class=None):
    """The shipped world image model (or the ``save_pretrained`` folder ``path``) as ``pipeline_class`` (default
    ``FluxPipeline``; ``FluxHeadPAGPipeline`` and ``FluxMultiSubjectPipeline`` load it too), in ``dtype``, progress
    bars off. Call it with ``world_image_call()``'s arguments."""
    if pipeline_class is None:
        from diffusers import FluxPipeline as pipeline_class
    pipe = pipeline_class.from_pretrained(path or shipped_model_path(SHIPPED_IMAGE_MODEL), dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def parameter_counts(pipe) -> dict[str, int]:
    """Parameters of each model of a pipeline."""
    return {name: sum(p.numel() for p in getattr(pipe, name).parameters())
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}


__all__ = [
    "ImageModelConfig",
    "SHIPPED_IMAGE_MODEL",
    "WORLD_IMAGE_CALL",
    "build_clip_tokenizer",
    "build_image_pipeline",
    "check_image_pipeline",
    "check_text_ids",
    "image_scheduler_config",
    "load_world_image_pipeline",
    "parameter_counts",
    "world_image_call",
]
