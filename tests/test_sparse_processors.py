"""Radial and adaptive block-sparse processors: float64 parity, masks actually applied, caching, bad input."""

import pytest
import torch
from conftest import run

from diffusers_attn_ext import install
from diffusers_attn_ext.context import CONTEXT_ATTR, MODULE_NAME_ATTR, AttnContext, TokenGrid
from diffusers_attn_ext.masks import radial_block_mask
from diffusers_attn_ext.processors import adaptive_sparse, base
from diffusers_attn_ext.processors.adaptive_sparse import AdaptiveSparseProcessor, draft_block_pattern
from diffusers_attn_ext.processors.radial_sparse import RadialSparseProcessor, joint_block_mask

WAN_LARGER = dict(height=64, width=64, num_frames=17)  # 5 latent frames of 4x4 tokens: 80 tokens


def reference_attention(q, k, v, blocks=None, block_size=None):
    """softmax(q k^T / sqrt(d)) v in float64 on [B, N, H, D]; tokens outside kept blocks get -inf."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    if blocks is not None:
        n = scores.shape[-1]
        keep = blocks.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :n, :n]
        scores = scores.masked_fill(~keep, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def captured(monkeypatch):
    """Records (module name, kind, step, block mask) of every attention call that the kernel layer runs."""
    calls = []
    original = base.attend

    def recording(call):
        mask = None if call.block_mask is None else call.block_mask.clone()
        calls.append((call.module_name, call.kind, call.context.step_index, mask, call.block_size))
        return original(call)

    monkeypatch.setattr(base, "attend", recording)
    return calls


def wan_attention(grid, seed=0):
    """A float64 WanAttention (2 heads of 16) with a context of ``grid``, inputs and its q, k, v."""
    from diffusers.models.transformers.transformer_wan import WanAttention

    from diffusers_attn_ext.families.wan import wan_apply_rotary

    torch.manual_seed(seed)
    attn = WanAttention(dim=32, heads=2, dim_head=16).double()
    setattr(attn, CONTEXT_ATTR, AttnContext(family="wan", grid=grid, step_index=0))
    setattr(attn, MODULE_NAME_ATTR, "blocks.1.attn1")
    hidden = torch.randn(2, grid.num_tokens, 32, dtype=torch.float64)
    cos, sin = torch.randn(2, 1, grid.num_tokens, 1, 16, dtype=torch.float64)
    q = wan_apply_rotary(attn.norm_q(attn.to_q(hidden)).unflatten(2, (2, -1)), cos, sin)
    k = wan_apply_rotary(attn.norm_k(attn.to_k(hidden)).unflatten(2, (2, -1)), cos, sin)
    v = attn.to_v(hidden).unflatten(2, (2, -1))
    return attn, (hidden, None, None, (cos, sin)), (q, k, v)


@torch.no_grad()
@pytest.mark.parametrize(
    "processor",
    [RadialSparseProcessor(), AdaptiveSparseProcessor(density=1.0, block_size=16)],
    ids=["radial-one-block", "adaptive-density-1"],
)
def test_all_blocks_equal_dense_float64(processor, captured):
    attn, inputs, qkv = wan_attention(TokenGrid(5, 4, 4))
    attn.set_processor(processor)
    out = attn(*inputs)
    assert captured[0][3].all()  # the block-sparse kernel ran with every block kept
    assert rel_err(out, attn.to_out[0](reference_attention(*qkv).flatten(2, 3))) < 1e-6


@torch.no_grad()
def test_radial_matches_block_masked_reference(captured):
    attn, inputs, qkv = wan_attention(TokenGrid(6, 4, 4))
    attn.set_processor(RadialSparseProcessor(block_size=16))
    out = attn(*inputs)
    blocks = radial_block_mask(6, 16, block_size=16)
    assert not blocks.all() and torch.equal(captured[0][3], blocks[None, None])
    ref = attn.to_out[0](reference_attention(*qkv, blocks, 16).flatten(2, 3))
    assert rel_err(out, ref) < 1e-6
    assert rel_err(out, attn.to_out[0](reference_attention(*qkv).flatten(2, 3))) > 1e-3


def test_radial_mask_applied_in_wan_pipeline(pipe_for, captured):
    pipe = pipe_for("wan")
    install(pipe, RadialSparseProcessor(block_size=16))
    out = run(pipe, "wan", **WAN_LARGER)
    assert torch.isfinite(out).all()
    expected = radial_block_mask(5, 16, block_size=16)[None, None]
    self_calls = [c for c in captured if c[1] == "self"]
    assert len(self_calls) == 2 * 2 * 2  # steps x cond/uncond x blocks
    assert all(torch.equal(mask, expected) and size == 16 for _, _, _, mask, size in self_calls)
    assert all(c[3] is None for c in captured if c[1] == "cross")  # cross-attention stays dense


def test_dense_steps_and_layers(pipe_for, captured):
    pipe = pipe_for("wan")
    install(pipe, RadialSparseProcessor(block_size=16, dense_steps=1, dense_layers=1))
    run(pipe, "wan", **WAN_LARGER)
    sparse = {(name, step) for name, kind, step, mask, _ in captured if kind == "self" and mask is not None}
    assert sparse == {("blocks.1.attn1", 1)}


def test_cogvideox_text_dense(pipe_for, captured):
    pipe = pipe_for("cogvideox")
    install(pipe, RadialSparseProcessor(block_size=8))
    out = run(pipe, "cogvideox", height=64, width=64, num_frames=17)  # 5 latent frames of 4x4, 16 text tokens
    assert torch.isfinite(out).all()
    mask = captured[0][3][0, 0]
    text_blocks = 2
    assert mask[:text_blocks].all() and mask[:, :text_blocks].all()
    assert torch.equal(mask[text_blocks:, text_blocks:], radial_block_mask(5, 16, block_size=8))


def test_joint_mask_covers_misaligned_video():
    """Text of 5 tokens first: the joint table keeps each block that overlaps a kept video block."""
    video = radial_block_mask(6, 16, block_size=16)

    class Call:
        query = torch.zeros(1, 5 + 96, 1, 1)
        text, visual = slice(0, 5), slice(5, 101)

    table = joint_block_mask(video, Call, 16)[0, 0]
    token_video = video.repeat_interleave(16, 0).repeat_interleave(16, 1)
    token = torch.ones(101, 101, dtype=torch.bool)
    token[5:, 5:] = token_video[:96, :96]
    padded = torch.zeros(112, 112, dtype=torch.bool)
    padded[:101, :101] = token
    assert torch.equal(table, padded.view(7, 16, 7, 16).any(3).any(1))


def planted_qkv(permutation, blocks=8, block_size=16, heads=2, dim=16, strength=6.0):
    """q of block a and k of block permutation[a] share a strong direction e_a (other pairs near orthogonal)."""
    g = torch.Generator().manual_seed(0)
    n = blocks * block_size
    q = torch.randn(1, n, heads, dim, generator=g) * 0.3
    k = torch.randn(1, n, heads, dim, generator=g) * 0.3
    v = torch.randn(1, n, heads, dim, generator=g)
    for a in range(blocks):
        q[0, a * block_size:(a + 1) * block_size, :, a] += strength
        b = permutation[a]
        k[0, b * block_size:(b + 1) * block_size, :, a] += strength
    return q, k, v


@pytest.mark.parametrize("permutation", [list(range(8)), [3, 0, 6, 1, 7, 2, 5, 4]], ids=["diagonal", "permuted"])
@pytest.mark.parametrize("target", [dict(density=0.25), dict(mass=0.9)])
def test_draft_selects_planted_blocks(permutation, target):
    q, k, _ = planted_qkv(permutation)
    pattern = draft_block_pattern(q, k, 16, **target)
    planted = torch.zeros(8, 8, dtype=torch.bool)
    planted[torch.arange(8), torch.tensor(permutation)] = True
    assert (pattern >= planted).all() and pattern[..., torch.arange(8), torch.arange(8)].all()
    if "density" in target:
        assert (pattern.sum(-1) == 2).all()  # ceil(0.25 * 8) blocks per row
    else:
        assert pattern.float().mean() < 0.5


def test_pattern_searched_once_per_cache_window(pipe_for, captured, monkeypatch):
    searches = []
    original = adaptive_sparse.draft_block_pattern

    def counting(*args, **kwargs):
        searches.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(adaptive_sparse, "draft_block_pattern", counting)
    pipe = pipe_for("wan")
    install(pipe, AdaptiveSparseProcessor(density=0.5, cache_steps=2, dense_steps=1, block_size=16))
    run(pipe, "wan", num_inference_steps=6, **WAN_LARGER)
    sparse_calls = [c for c in captured if c[1] == "self" and c[3] is not None]
    assert len(sparse_calls) == 5 * 2 * 2  # 5 sparse steps x cond/uncond x 2 blocks
    assert len(searches) == 3 * 2 * 2  # windows {1, 2}, {3, 4}, {5} x cond/uncond x 2 blocks
    masks = {(c[0], c[2]): c[3] for c in captured if c[1] == "self" and c[3] is not None}
    assert torch.equal(masks[("blocks.0.attn1", 1)], masks[("blocks.0.attn1", 2)])  # reused within a window
    assert all(m.shape == (1, 2, 5, 5) and m.float().mean() < 1 for m in masks.values())


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: AdaptiveSparseProcessor(density=0.0), r"density=0.0 is outside the allowed range \(0, 1\]"),
        (lambda: AdaptiveSparseProcessor(density=1.5), r"density=1.5 is outside the allowed range \(0, 1\]"),
        (lambda: AdaptiveSparseProcessor(mass=-0.1), r"mass=-0.1 is outside the allowed range \(0, 1\]"),
        (lambda: AdaptiveSparseProcessor(density=0.5, mass=0.5), r"density=0.5 and mass=0.5 are both given"),
        (lambda: AdaptiveSparseProcessor(cache_steps=0), r"cache_steps=0 is outside the allowed range"),
        (lambda: RadialSparseProcessor(dense_steps=-1), r"dense_steps=-1 is outside the allowed range: an integer >= 0"),
        (lambda: RadialSparseProcessor(dense_layers=-2), r"dense_layers=-2 is outside the allowed range"),
        (lambda: RadialSparseProcessor(decay_factor=0), r"decay_factor=0 is outside the allowed range \(0, inf\)"),
        (lambda: RadialSparseProcessor(block_size=0), r"block_size=0 is outside the allowed range"),
        (lambda: RadialSparseProcessor(model="x"), r"model='x' is not one of"),
    ],
)
def test_bad_arguments(factory, message):
    with pytest.raises(ValueError, match=message):
        factory()


@torch.no_grad()
@pytest.mark.parametrize("processor", [RadialSparseProcessor(), AdaptiveSparseProcessor()])
def test_grid_must_match_tokens(processor):
    attn, inputs, _ = wan_attention(TokenGrid(5, 4, 4))
    getattr(attn, CONTEXT_ATTR).grid = TokenGrid(4, 4, 4)
    attn.set_processor(processor)
    with pytest.raises(ValueError, match=r"grid 4x4x4 \(64 tokens\) does not match the 80 visual tokens"):
        attn(*inputs)


def test_image_family_rejected(pipe_for):
    with pytest.raises(ValueError, match=r"applies to video families \('wan', 'cogvideox'\), not family='flux'"):
        install(pipe_for("flux"), RadialSparseProcessor())  # at install, before any model work
    transformer = pipe_for("flux").transformer
    stock = transformer.attn_processors
    transformer.set_attn_processor(RadialSparseProcessor())  # the diffusers way: refused at the call
    try:
        with pytest.raises(ValueError, match=r"applies to video families \('wan', 'cogvideox'\), not family='flux'"):
            run(pipe_for("flux"), "flux")
    finally:
        transformer.set_attn_processor(stock)
