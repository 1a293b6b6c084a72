"""UltraViCo: float64 reference parity, identity settings, pipeline behaviour and bad input."""

import pytest
import torch
from conftest import run

from diffusers_attn_ext import install
from diffusers_attn_ext.kernels import flex_attention_bnhd
from diffusers_attn_ext.masks import (
    ULTRAVICO_BLOCKED_LOGIT,
    ExtrapolationWindow,
    ultravico_block_classes,
    ultravico_reference,
    ultravico_score_mod,
)
from diffusers_attn_ext.processors.ultravico import UltraViCoProcessor, default_train_frames


def explicit_rule(n, window, alpha, scores):
    """The rule written out pair by pair (loops), as the spec states it."""
    out = scores.clone()
    for i in range(n):
        for j in range(n):
            vi, vj = i - window.video_start, j - window.video_start
            if not (0 <= vi < window.video_tokens and 0 <= vj < window.video_tokens):
                continue
            if abs(vi - vj) > window.half_window and out[i, j] > 0:
                out[i, j] = alpha * out[i, j]
            if vi < window.frame_tokens and vj >= window.train_tokens:
                out[i, j] = ULTRAVICO_BLOCKED_LOGIT
    return out


def test_score_mod_equals_pairwise_rule():
    window = ExtrapolationWindow(frame_tokens=4, train_frames=2, video_start=3, video_tokens=20)
    n = 23
    scores = torch.randn(n, n, dtype=torch.float64)
    idx = torch.arange(n)
    modded = ultravico_score_mod(window, 0.7)(scores, 0, 0, idx[:, None], idx[None, :])
    assert torch.equal(modded, explicit_rule(n, window, 0.7, scores))


@pytest.mark.parametrize("video_start", [0, 5])
def test_flex_path_matches_float64_reference(video_start):
    window = ExtrapolationWindow(frame_tokens=16, train_frames=3, video_start=video_start, video_tokens=16 * 8)
    n = video_start + window.video_tokens
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 2, 16, generator=g, dtype=torch.float64) for _ in range(3))
    out = flex_attention_bnhd(q, k, v, score_mod=ultravico_score_mod(window, 0.9))
    ref = ultravico_reference(q, k, v, window, 0.9)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-6
    dense = torch.nn.functional.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)
    assert ((dense - ref).norm() / ref.norm()).item() > 1e-3  # the method does change the output


def test_block_classes_cover_every_modified_pair():
    window = ExtrapolationWindow(frame_tokens=24, train_frames=3, video_start=0, video_tokens=24 * 9)
    n, block = window.video_tokens, 8
    classes = ultravico_block_classes(window, n, block)
    scores = torch.ones(n, n, dtype=torch.float64)  # positive: every far pair is modified
    changed = explicit_rule(n, window, 0.5, scores) != scores
    per_block = changed.reshape(n // block, block, n // block, block).any(3).any(1)
    assert torch.equal(per_block, classes.bool())  # exact: a block is class 1 iff it has a modified pair


@pytest.mark.parametrize("center_keys", [True, False])
@torch.no_grad()
def test_processor_matches_reference_inside_wan_attention(center_keys):
    """The processor inside a Wan self-attention module equals adapter q/k/v + float64 reference."""
    from diffusers.models.transformers.transformer_wan import WanAttention

    from diffusers_attn_ext.context import CONTEXT_ATTR, AttnContext, TokenGrid
    from diffusers_attn_ext.families.wan import wan_apply_rotary

    torch.manual_seed(0)
    attn = WanAttention(dim=32, heads=2, dim_head=16).double()
    grid = TokenGrid(frames=6, height=2, width=3)
    setattr(attn, CONTEXT_ATTR, AttnContext(family="wan", grid=grid))
    hidden = torch.randn(1, grid.num_tokens, 32, dtype=torch.float64)
    cos, sin = torch.randn(2, 1, grid.num_tokens, 1, 16, dtype=torch.float64)
    attn.set_processor(UltraViCoProcessor(alpha=0.8, train_frames=2, center_keys=center_keys))
    out = attn(hidden, None, None, (cos, sin))

    q = wan_apply_rotary(attn.norm_q(attn.to_q(hidden)).unflatten(2, (2, -1)), cos, sin)
    k = wan_apply_rotary(attn.norm_k(attn.to_k(hidden)).unflatten(2, (2, -1)), cos, sin)
    v = attn.to_v(hidden).unflatten(2, (2, -1))
    if center_keys:  # the authors' kernel tests signs of logits against mean-centred keys
        k = k - k.mean(dim=1, keepdim=True)
    window = ExtrapolationWindow(frame_tokens=6, train_frames=2, video_start=0, video_tokens=36)
    ref = attn.to_out[0](ultravico_reference(q, k, v, window, 0.8).flatten(2, 3))
    assert ((out - ref).norm() / ref.norm()).item() < 1e-6


def test_key_centring_matters_only_with_the_rule():
    """Centring keys leaves plain attention unchanged but changes which logits count as positive."""
    window = ExtrapolationWindow(frame_tokens=8, train_frames=2, video_start=0, video_tokens=48)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 48, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k = k + 2.0  # keys with a large common component
    centred = k - k.mean(dim=1, keepdim=True)
    plain = ultravico_reference(q, k, v, window, 1.0, restrict_first_frame=False)
    assert torch.allclose(plain, ultravico_reference(q, centred, v, window, 1.0, restrict_first_frame=False))
    assert not torch.allclose(ultravico_reference(q, k, v, window, 0.5), ultravico_reference(q, centred, v, window, 0.5))


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_identity_settings_equal_stock(family, pipe_for, stock_outputs):
    pipe = pipe_for(family)
    install(pipe, UltraViCoProcessor(alpha=1.0, train_frames=1, restrict_first_frame=False))
    assert torch.equal(run(pipe, family), stock_outputs(family))
    # The tiny video has 3 latent frames: with train_frames=6 no pair is farther apart than W/2 = 3 frames.
    install(pipe, UltraViCoProcessor(alpha=0.5, train_frames=6))
    assert torch.equal(run(pipe, family), stock_outputs(family))


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_within_the_training_length_the_rule_acts_unless_stock_within_training(family, pipe_for, stock_outputs):
    """3 latent frames, trained on 3: the authors' kernel still damps pairs over W/2 apart (default); the
    option restores stock attention there."""
    pipe = pipe_for(family)
    install(pipe, UltraViCoProcessor(alpha=0.5, train_frames=3))
    assert not torch.equal(run(pipe, family), stock_outputs(family))
    install(pipe, UltraViCoProcessor(alpha=0.5, train_frames=3, stock_within_training=True))
    assert torch.equal(run(pipe, family), stock_outputs(family))


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_extrapolation_changes_output(family, pipe_for, stock_outputs):
    pipe = pipe_for(family)
    install(pipe, UltraViCoProcessor(alpha=0.5, train_frames=1))
    out = run(pipe, family)
    assert torch.isfinite(out).all() and not torch.equal(out, stock_outputs(family))


def test_default_train_frames_from_config():
    assert default_train_frames("wan", {"in_channels": 16}) == 21
    assert default_train_frames("wan", {"in_channels": 48}) == 31
    assert default_train_frames("cogvideox", {"sample_frames": 49, "temporal_compression_ratio": 4}) == 13
    cogvideox_15 = {"sample_frames": 81, "temporal_compression_ratio": 4, "patch_size_t": 2}
    assert default_train_frames("cogvideox", cogvideox_15) == 11
    assert default_train_frames("cogvideox", {}) is None


def test_bad_input():
    with pytest.raises(ValueError, match=r"alpha=0.0 is outside the allowed range \(0, 1\]"):
        UltraViCoProcessor(alpha=0.0)
    with pytest.raises(ValueError, match=r"alpha=1.5 is outside"):
        UltraViCoProcessor(alpha=1.5)
    with pytest.raises(ValueError, match="train_frames=0 is outside the allowed range: an integer >= 1"):
        UltraViCoProcessor(train_frames=0)
    with pytest.raises(ValueError, match=r"stock_within_training=1 is not allowed: allowed values are True and False"):
        UltraViCoProcessor(stock_within_training=1)


def test_image_family_is_rejected(pipe_for):
    pipe = pipe_for("flux")
    with pytest.raises(ValueError, match="applies to video families"):
        install(pipe, UltraViCoProcessor())  # at install, before any model work
    stock = pipe.transformer.attn_processors
    pipe.transformer.set_attn_processor(UltraViCoProcessor())  # the diffusers way: refused at the call
    try:
        with pytest.raises(ValueError, match="applies to video families"):
            run(pipe, "flux")
    finally:
        pipe.transformer.set_attn_processor(stock)


def test_score_mod_is_one_closure_per_parameter_set():
    """Compiled FlexAttention guards on the closure: a new one per call would recompile every call."""
    window = ExtrapolationWindow(frame_tokens=4, train_frames=2, video_start=0, video_tokens=24)
    assert ultravico_score_mod(window, 0.9) is ultravico_score_mod(ExtrapolationWindow(4, 2, 0, 24), 0.9)
    assert ultravico_score_mod(window, 0.9) is not ultravico_score_mod(window, 0.8)
