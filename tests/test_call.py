"""The attention call's contract (issue 17): the explicit kernel request methods make, the needs methods declare
and the base checks against the family adapters' facts, and a family added without touching a method."""

import pytest
import torch

import diffusers_attn_ext.processors as processors
from diffusers_attn_ext.call import BLOCK_SPARSE, DENSE, FUSED_RULE, SCORE_MOD, AttentionCall
from diffusers_attn_ext.context import AttnContext, TokenGrid
from diffusers_attn_ext.families import ADAPTERS, adapter_named
from diffusers_attn_ext.families.base import MEDIA, FamilyAdapter
from diffusers_attn_ext.families.wan import WanAdapter
from diffusers_attn_ext.masks import ExtrapolationWindow, ultravico_rule, ultravico_score_mod
from diffusers_attn_ext.processors import (
    AttnExtProcessor,
    EntropyScalingProcessor,
    ForegroundBackgroundCrossAttnProcessor,
    RadialSparseProcessor,
    STDRoPEProcessor,
    UltraViCoProcessor,
    base,
)
from diffusers_attn_ext.processors.ultravico import default_train_frames

GRID = TokenGrid(4, 4, 4)


def video_call(tokens=64):
    q, k, v = (torch.randn(1, tokens, 2, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    return AttentionCall(module=torch.nn.Identity(), family="wan", kind="self", query=q, key=k, value=v, text=None,
                         visual=slice(0, tokens), context=AttnContext(family="wan", grid=GRID, step_index=0))


def test_kernel_requests_are_explicit():
    call = video_call()
    assert call.kernel_request().kind == DENSE
    UltraViCoProcessor(alpha=0.5, train_frames=2).edit_attention(call)
    request = call.kernel_request()
    window = ExtrapolationWindow(16, 2, 0, 64)
    assert request.kind == FUSED_RULE and request.rule == ultravico_rule(window, 0.5, True)
    assert request.score_mods == (ultravico_score_mod(window, 0.5, True),)  # the same function for FlexAttention
    RadialSparseProcessor(block_size=16).edit_attention(call)
    assert call.kernel_request().kind == FUSED_RULE and call.kernel_request().block_mask is not None
    call.add_score_mod(lambda score, b, h, q, kv: score)  # a second score change: no fused kernel computes both
    assert call.kernel_request().kind == SCORE_MOD and call.kernel_request().rule is None
    sparse = video_call()
    RadialSparseProcessor(block_size=16).edit_attention(sparse)
    assert sparse.kernel_request().kind == BLOCK_SPARSE
    rows = video_call()
    rows.attend_rows(torch.tensor([3, 1]))
    rows.attend_keys(slice(0, 10))
    request = rows.kernel_request()
    assert request.kind == DENSE and torch.equal(request.query, rows.query[:, [3, 1]])
    assert torch.equal(request.key, rows.key[:, :10]) and rows.query.shape[1] == 64  # the call keeps every row
    with pytest.raises(ValueError, match="two methods restrict the query rows"):
        rows.attend_rows(torch.tensor([0]))


class Undeclared(AttnExtProcessor):
    kernel = ("block_sparse",)

    def edit_attention(self, call):
        call.add_score_mod(lambda score, b, h, q, kv: score)


class RowsOnly(AttnExtProcessor):
    kernel = ("rows",)


def test_the_base_checks_the_declared_kernel_requests():
    call = video_call()
    with pytest.raises(ValueError, match=r"Undeclared made the kernel request \['score_mod'\]"):
        base._edit_attention(Undeclared(), call)
    base._check_rows([RowsOnly()], video_call())  # alone: fine
    with pytest.raises(ValueError, match="RowsOnly computes query rows with plain softmax"):
        base._check_rows([RowsOnly()], call)  # another method changed the scores of the call


def test_declarations_are_in_range():
    for name in processors.__all__:
        cls = getattr(processors, name)
        assert set(cls.media) <= set(MEDIA) and set(cls.kernel) <= set(base.KERNEL_REQUESTS), name
        assert cls.context_parallel in ("local", "global", None), name


def test_capabilities_not_names_choose_the_families():
    # DiTraj's fg/bg guidance needs cross-attention from the video to the text, which CogVideoX has not
    assert ForegroundBackgroundCrossAttnProcessor.runs_on(ADAPTERS["wan"])
    assert not ForegroundBackgroundCrossAttnProcessor.runs_on(ADAPTERS["cogvideox"])
    with pytest.raises(ValueError, match=r"STDRoPEProcessor needs rotary positions, but this CogVideoX transformer "
                                         r"has use_rotary_positional_embeddings=False"):
        STDRoPEProcessor.__new__(STDRoPEProcessor).check_family("cogvideox", {"use_rotary_positional_embeddings": False})


def test_checkpoint_facts_live_in_the_adapters():
    wan = WanAdapter()
    assert wan.trained_latent_frames({"in_channels": 16}) == 21  # Wan2.1, Wan2.2-A14B: 81 frames
    assert wan.trained_latent_frames({"in_channels": 36}) == 21  # image-to-video
    assert wan.trained_latent_frames({"in_channels": 48}) == 31  # Wan2.2-TI2V-5B: 121 frames, 4x temporal VAE
    assert default_train_frames("cogvideox", {"sample_frames": 49, "temporal_compression_ratio": 4}) == 13
    assert default_train_frames("cogvideox", {"sample_frames": 81, "temporal_compression_ratio": 4,
                                              "patch_size_t": 2}) == 11
    assert adapter_named("flux").trained_image_tokens(None) == adapter_named("sd3").trained_image_tokens(None) == 4096
    with pytest.raises(ValueError, match=r"family='ltx' is not one of"):
        adapter_named("ltx")


def test_a_checkpoint_records_what_its_config_cannot_say():
    """A private config key (kept by diffusers' loaders) overrides the family's checkpoint lines; the shipped world
    models record theirs: 9 latent frames, not Wan2.1's 21, and 64 image tokens at 32x32, not FLUX's 4096."""
    from diffusers_attn_ext.families.base import RECORDED_IMAGE_TOKENS, RECORDED_LATENT_FRAMES
    from diffusers_attn_ext.pipelines.ultravico_video import WanUltraViCoPipeline
    from diffusers_attn_ext.world import load_world_image_pipeline, load_world_video_pipeline
    from diffusers_attn_ext.world.image_models import ImageModelConfig, build_image_pipeline
    from diffusers_attn_ext.world.models import build_video_pipeline

    wan, flux = WanAdapter(), adapter_named("flux")
    assert wan.trained_latent_frames({"in_channels": 16, RECORDED_LATENT_FRAMES: 9}) == 9
    assert flux.trained_image_tokens({RECORDED_IMAGE_TOKENS: 64}) == 64
    for bad in (0, -3, "9", 9.0, True):
        with pytest.raises(ValueError, match=rf"config's _trained_latent_frames={bad!r} must be a positive integer"):
            wan.trained_latent_frames({RECORDED_LATENT_FRAMES: bad})
    video = load_world_video_pipeline(pipeline_class=WanUltraViCoPipeline)
    assert default_train_frames("wan", video.transformer.config) == 9
    assert video.extrapolated_num_frames(2) == 18  # twice the trained 9 frames (the world VAE keeps every frame)
    image = load_world_image_pipeline()
    assert flux.trained_image_tokens(image.transformer.config) == ImageModelConfig().image_tokens == 64
    # The builders record them, so a model trained and saved anew carries them too.
    assert build_video_pipeline().transformer.config[RECORDED_LATENT_FRAMES] == 9
    assert build_image_pipeline().transformer.config[RECORDED_IMAGE_TOKENS] == 64


class TinyVideoAdapter(FamilyAdapter):
    """A family that no method knows: video, rotary positions, no cross-attention."""

    family, media, rotary = "tinyvideo", "video", True

    def checkpoint_latent_frames(self, config):
        return 7


def test_a_new_family_needs_no_method_change(monkeypatch):
    monkeypatch.setitem(ADAPTERS, "tinyvideo", TinyVideoAdapter())
    for method in (UltraViCoProcessor(), RadialSparseProcessor(), STDRoPEProcessor.__new__(STDRoPEProcessor)):
        method.check_family("tinyvideo")
    for method in (EntropyScalingProcessor(), ForegroundBackgroundCrossAttnProcessor.__new__(
            ForegroundBackgroundCrossAttnProcessor)):
        with pytest.raises(ValueError, match=r"'tinyvideo'"):
            method.check_family("tinyvideo")
    assert default_train_frames("tinyvideo", {}) == 7
    with pytest.raises(ValueError, match=r"applies to image families \('sd3', 'flux'\), not family='tinyvideo'"):
        EntropyScalingProcessor().check_family("tinyvideo")
    with pytest.raises(ValueError, match=r"video families \('wan', 'cogvideox', 'tinyvideo'\)"):
        UltraViCoProcessor().check_family("sd3")
