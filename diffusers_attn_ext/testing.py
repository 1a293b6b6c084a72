"""Tiny, offline, randomly initialised diffusers pipelines for fast CPU tests.

Every pipeline is assembled from configs only (no hub ids, no downloads), the way diffusers' own
``get_dummy_components`` helpers do it, but with at least two transformer blocks, two attention heads of
width 16, and latent grids larger than one patch so that positional embeddings (RoPE, sin-cos) matter.

Tokenizers cannot be built offline, so every text encoder and tokenizer is ``None``; the call kwargs pass
random prompt embeddings instead. A ``torch.Generator`` is consumed by a pipeline call, so never reuse
call kwargs: build fresh ones with :func:`tiny_call_kwargs` for every call.

A call does 15-90 ms of single-threaded work. On a small CPU shared with other processes, torch's default
intra-op threads can make it 10-30x slower; ``torch.set_num_threads(1)`` in the test session avoids that.

Typical use::

    pipe, kwargs = tiny_pipeline("wan")
    out = pipe(**kwargs).frames                     # (1, 9, 3, 32, 32), values in [0, 1]
    again = pipe(**tiny_call_kwargs("wan")).frames  # identical to ``out``

    pipe.save_pretrained(tmpdir)
    reloaded = load_tiny_pipeline("wan", tmpdir)    # from_pretrained with text_encoder=None, tokenizer=None

Wan 2.2 layouts are variants of the "wan" family (:data:`WAN_VARIANTS`)::

    pipe, kwargs = tiny_pipeline("wan", variant="2.2-a14b")     # two experts, boundary_ratio 0.875
    pipe, kwargs = tiny_pipeline("wan", variant="2.2-ti2v-5b")  # 48-channel latents, 16x VAE, expanded timesteps
"""

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
)

FAMILIES = ("sd3", "flux", "cogvideox", "wan")
"""Model families that :func:`tiny_pipeline` can build."""

WAN_VARIANTS = ("2.1", "2.2-a14b", "2.2-ti2v-5b")
"""Layouts of the "wan" family that :func:`tiny_pipeline` can build (``variant=``):

- ``"2.1"`` (default): Wan2.1 text-to-video, one transformer, the 16-channel VAE with 8x spatial compression.
- ``"2.2-a14b"``: Wan2.2-T2V-A14B, two experts of the same architecture with different weights, ``transformer``
  for the high-noise steps (``t >= boundary_ratio * 1000``) and ``transformer_2`` for the low-noise steps,
  ``boundary_ratio=0.875`` as the A14B text-to-video checkpoint, the Wan2.1 VAE. With the tiny scheduler (flow
  shift 7) the two default steps are t = 1000 (``transformer``) and t = 47 (``transformer_2``); four steps are
  1000, 934 (``transformer``), 781, 47 (``transformer_2``).
- ``"2.2-ti2v-5b"``: Wan2.2-TI2V-5B, one transformer on 48 latent channels, ``expand_timesteps=True`` (a
  timestep per token), and the Wan2.2 VAE as diffusers' config has it: ``z_dim=48``, a residual encoder and
  decoder (``is_residual=True``) on 2x2-patchified pixels (``patch_size=2``, 12 channels), so
  ``scale_factor_spatial=16`` (2 from the patches, 8 from three downsampling stages) and
  ``scale_factor_temporal=4``. Its call kwargs are 64x64 (4x4 latents, 2x2 tokens a frame).
"""

WAN22_BOUNDARY_RATIO = 0.875
"""``boundary_ratio`` of the tiny Wan2.2-A14B pipeline (Wan2.2-T2V-A14B's value)."""

PIPELINE_CLASSES: dict[str, type[DiffusionPipeline]] = {
    "sd3": StableDiffusion3Pipeline,
    "flux": FluxPipeline,
    "cogvideox": CogVideoXPipeline,
    "wan": WanPipeline,
}
"""Pipeline class of each family."""

TEXT_COMPONENTS: dict[str, tuple[str, ...]] = {
    "sd3": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"),
    "flux": ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"),
    "cogvideox": ("text_encoder", "tokenizer"),
    "wan": ("text_encoder", "tokenizer"),
}
"""Pipeline components that are ``None`` in every tiny pipeline (the prompt embeddings replace them)."""

TEXT_SEQ_LEN = 16
"""Number of text tokens in the prompt embeddings (CogVideoX's ``max_text_seq_length``)."""

TEXT_DIM = 32
"""Width of the prompt embeddings: ``joint_attention_dim`` / ``text_embed_dim`` / ``text_dim``."""

POOLED_DIM = 64
"""Width of the pooled prompt embeddings (SD3 and FLUX ``pooled_projection_dim``)."""


def _check_family(family: str, variant: str | None = None) -> None:
    """Raise ``ValueError`` unless ``family`` is one of :data:`FAMILIES` and ``variant`` is None or, for Wan, one
    of :data:`WAN_VARIANTS`."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if variant is None:
        return
    if family != "wan":
        raise ValueError(f"variant={variant!r} is not allowed for family {family!r}: only 'wan' has variants")
    if variant not in WAN_VARIANTS:
        raise ValueError(f"variant={variant!r} is not one of {WAN_VARIANTS}")


def _tiny_autoencoder_kl() -> AutoencoderKL:
    """Image VAE for SD3 and FLUX: 4 latent channels, spatial compression 2."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(4, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        sample_size=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _sd3_components(transformer_config: dict[str, Any]) -> dict[str, Any]:
    """Components of a tiny ``StableDiffusion3Pipeline``: 2 joint blocks, patch size 2."""
    transformer = SD3Transformer2DModel(
        **{
            "sample_size": 16,
            "patch_size": 2,
            "in_channels": 4,
            "out_channels": 4,
            "num_layers": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "caption_projection_dim": 32,
            "joint_attention_dim": TEXT_DIM,
            "pooled_projection_dim": POOLED_DIM,
            "pos_embed_max_size": 32,
            **transformer_config,
        }
    )
    return {
        "transformer": transformer,
        "vae": _tiny_autoencoder_kl(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


def _flux_components(transformer_config: dict[str, Any]) -> dict[str, Any]:
    """Components of a tiny guidance-distilled ``FluxPipeline``: 2 double and 2 single blocks."""
    transformer = FluxTransformer2DModel(
        **{
            "patch_size": 1,
            "in_channels": 16,
            "num_layers": 2,
            "num_single_layers": 2,
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "joint_attention_dim": TEXT_DIM,
            "pooled_projection_dim": POOLED_DIM,
            "guidance_embeds": True,
            "axes_dims_rope": (4, 4, 8),
            **transformer_config,
        }
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "transformer": transformer,
        "vae": _tiny_autoencoder_kl(),
        "scheduler": scheduler,
    }


def _cogvideox_components(transformer_config: dict[str, Any]) -> dict[str, Any]:
    """Components of a tiny ``CogVideoXPipeline`` (1.0 layout) with 3D RoPE: 2 blocks, patch size 2."""
    transformer = CogVideoXTransformer3DModel(
        **{
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "in_channels": 4,
            "out_channels": 4,
            "time_embed_dim": 16,
            "text_embed_dim": TEXT_DIM,
            "num_layers": 2,
            "sample_width": 4,
            "sample_height": 4,
            "sample_frames": 9,
            "patch_size": 2,
            "temporal_compression_ratio": 4,
            "max_text_seq_length": TEXT_SEQ_LEN,
            "use_rotary_positional_embeddings": True,
            **transformer_config,
        }
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    scheduler = CogVideoXDDIMScheduler(
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
    )
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": scheduler,
    }


def _wan_transformer(transformer_config: dict[str, Any], channels: int = 16) -> WanTransformer3DModel:
    """A tiny ``WanTransformer3DModel``: 2 blocks of 2 heads of width 16, patch (1, 2, 2), RoPE."""
    return WanTransformer3DModel(
        **{
            "patch_size": (1, 2, 2),
            "num_attention_heads": 2,
            "attention_head_dim": 16,
            "in_channels": channels,
            "out_channels": channels,
            "text_dim": TEXT_DIM,
            "freq_dim": 32,
            "ffn_dim": 32,
            "num_layers": 2,
            "cross_attn_norm": True,
            "qk_norm": "rms_norm_across_heads",
            "rope_max_seq_len": 32,
            **transformer_config,
        }
    )


def _wan21_vae() -> AutoencoderKLWan:
    """The Wan2.1 VAE layout (also Wan2.2-A14B's): 16 latent channels, 8x spatial and 4x temporal compression."""
    return AutoencoderKLWan(
        base_dim=3,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )


def _wan22_vae() -> AutoencoderKLWan:
    """The Wan2.2 VAE layout (Wan2.2-TI2V-5B), diffusers' config with tiny widths: 48 latent channels, residual
    blocks on 2x2-patchified pixels, 16x spatial and 4x temporal compression. Latent statistics are 0 and 1 (the
    checkpoint's 48 means and deviations only rescale the latents)."""
    return AutoencoderKLWan(
        base_dim=4,
        decoder_base_dim=4,
        z_dim=48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        is_residual=True,
        in_channels=12,
        out_channels=12,
        patch_size=2,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        latents_mean=[0.0] * 48,
        latents_std=[1.0] * 48,
    )


def _wan_components(transformer_config: dict[str, Any], variant: str = "2.1") -> dict[str, Any]:
    """Components of a tiny ``WanPipeline`` of ``variant`` (see :data:`WAN_VARIANTS`); ``transformer_config``
    applies to every transformer."""
    if variant == "2.2-ti2v-5b":
        return {
            "transformer": _wan_transformer(transformer_config, channels=48),
            "transformer_2": None,
            "vae": _wan22_vae(),
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=5.0),
            "expand_timesteps": True,
        }
    components = {
        "transformer": _wan_transformer(transformer_config),
        "transformer_2": None,
        "vae": _wan21_vae(),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),
    }
    if variant == "2.2-a14b":  # the second expert is built after the VAE, from the same seeded stream
        components["transformer_2"] = _wan_transformer(transformer_config)
        components["boundary_ratio"] = WAN22_BOUNDARY_RATIO
    return components


_COMPONENT_BUILDERS = {
    "sd3": _sd3_components,
    "flux": _flux_components,
    "cogvideox": _cogvideox_components,
    "wan": _wan_components,
}


def tiny_pipeline(
    family: str,
    *,
    seed: int = 0,
    transformer_config: dict[str, Any] | None = None,
    variant: str | None = None,
    **overrides: Any,
) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Build a tiny random pipeline of ``family`` on CPU and return ``(pipe, call_kwargs)``.

    ``pipe(**call_kwargs)`` runs two denoising steps in well under a second on CPU. Weights are drawn from
    ``seed`` without touching the global torch RNG; text encoders and tokenizers are ``None``; modules are in
    eval mode, as ``from_pretrained`` leaves them. The progress bar is disabled.

    Args:
        family: one of :data:`FAMILIES`.
        seed: seeds the weights and, through :func:`tiny_call_kwargs`, the embeddings and the generator.
        transformer_config: keyword arguments merged over the tiny transformer's config (every transformer's,
            for two experts), e.g. ``{"use_rotary_positional_embeddings": False}`` for CogVideoX sin-cos
            positions. Keep the text widths (:data:`TEXT_DIM`, :data:`POOLED_DIM`, :data:`TEXT_SEQ_LEN`)
            unchanged, or pass matching embeddings in ``overrides``.
        variant: for ``"wan"``, one of :data:`WAN_VARIANTS` (None: ``"2.1"``); None for other families.
        **overrides: passed to :func:`tiny_call_kwargs` (e.g. ``height``, ``num_frames``, ``batch_size``).

    Returns:
        The pipeline and ``tiny_call_kwargs(family, seed=seed, variant=variant, **overrides)``; the kwargs hold
        a generator and are good for one call only.
    """
    _check_family(family, variant)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        builder = _COMPONENT_BUILDERS[family]
        components = builder(transformer_config or {}, variant) if variant else builder(transformer_config or {})
    for component in components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # as from_pretrained leaves them: a loaded pipeline must compute the same
    pipe = PIPELINE_CLASSES[family](**components, **dict.fromkeys(TEXT_COMPONENTS[family]))
    pipe.set_progress_bar_config(disable=True)
    return pipe, tiny_call_kwargs(family, seed=seed, variant=variant, **overrides)


def tiny_call_kwargs(family: str, *, seed: int = 0, batch_size: int = 1, variant: str | None = None,
                     **overrides: Any) -> dict[str, Any]:
    """Return fresh call kwargs for a :func:`tiny_pipeline` of ``family``; rebuild them for every call.

    The kwargs hold random prompt embeddings (``batch_size`` prompts of :data:`TEXT_SEQ_LEN` tokens of width
    :data:`TEXT_DIM`, pooled width :data:`POOLED_DIM`) drawn from ``torch.Generator().manual_seed(seed)``,
    negative embeddings wherever the pipeline accepts them, a fresh CPU generator seeded with ``seed``, two
    inference steps, ``output_type="pt"`` and these sizes:

    - ``sd3``: 32x32 image, ``guidance_scale=5.0`` (classifier-free guidance, batch 2 in the transformer).
    - ``flux``: 32x32 image, ``guidance_scale=3.5`` fed to the guidance embedder; no CFG by default, pass
      ``true_cfg_scale > 1`` to enable true CFG with the included negative embeddings.
    - ``cogvideox``: 9 frames of 32x32 (3 latent frames of 4x4), ``guidance_scale=6.0`` (CFG).
    - ``wan``: 9 frames of 32x32 (3 latent frames of 4x4), ``guidance_scale=5.0`` (CFG); for the
      ``"2.2-ti2v-5b"`` variant 9 frames of 64x64 (its VAE compresses 16x: 3 latent frames of 4x4).

    Sizes must stay valid: image sides a multiple of 4 pixels, video sides a multiple of 16 (of 32 for
    ``"2.2-ti2v-5b"``). Wan takes ``num_frames = 4k + 1``; CogVideoX returns ``num_frames`` frames only for
    ``num_frames = 8k + 1`` (its VAE decodes latent frames in pairs, so e.g. 13 requested frames come back as 16).

    Args:
        family: one of :data:`FAMILIES`.
        seed: seeds the embeddings and the generator.
        batch_size: number of prompts. Use it rather than ``num_images_per_prompt`` /
            ``num_videos_per_prompt``, which the pipelines do not apply to precomputed embeddings.
        variant: the :func:`tiny_pipeline` variant the kwargs are for (None: the family's default).
        **overrides: replace or add call kwargs (``height``, ``width``, ``num_frames``,
            ``num_inference_steps``, ``guidance_scale``, ``output_type``, ...).
    """
    _check_family(family, variant)
    embed_generator = torch.Generator().manual_seed(seed)

    def embeds(*shape: int) -> torch.Tensor:
        """Draw a standard-normal tensor of ``shape`` from the embedding generator."""
        return torch.randn(shape, generator=embed_generator)

    side = 64 if variant == "2.2-ti2v-5b" else 32
    kwargs: dict[str, Any] = {
        "prompt_embeds": embeds(batch_size, TEXT_SEQ_LEN, TEXT_DIM),
        "negative_prompt_embeds": embeds(batch_size, TEXT_SEQ_LEN, TEXT_DIM),
        "height": side,
        "width": side,
        "num_inference_steps": 2,
        "output_type": "pt",
    }
    if family in ("sd3", "flux"):
        kwargs["pooled_prompt_embeds"] = embeds(batch_size, POOLED_DIM)
        kwargs["negative_pooled_prompt_embeds"] = embeds(batch_size, POOLED_DIM)
    else:
        kwargs["num_frames"] = 9
    kwargs["guidance_scale"] = {"sd3": 5.0, "flux": 3.5, "cogvideox": 6.0, "wan": 5.0}[family]
    kwargs["generator"] = torch.Generator().manual_seed(seed)
    kwargs.update(overrides)
    return kwargs


def load_tiny_pipeline(family: str, path: str) -> DiffusionPipeline:
    """Load a tiny pipeline saved with ``pipe.save_pretrained(path)``, with the progress bar disabled.

    ``save_pretrained`` logs a harmless "cannot be saved" warning per ``None`` component and records it as
    ``[null, null]`` in ``model_index.json``, but ``from_pretrained`` then refuses to load unless every
    component in :data:`TEXT_COMPONENTS` is passed explicitly as ``None``; this helper does that.
    """
    _check_family(family)
    pipe = PIPELINE_CLASSES[family].from_pretrained(path, **dict.fromkeys(TEXT_COMPONENTS[family]))
    pipe.set_progress_bar_config(disable=True)
    return pipe
