"""STDRoPEProcessor: the RoPE it applies is diffusers' RoPE at the STD-RoPE positions (float64 reference),
the duplicate isolation (its pairs; the row-recompute kernel and the score_mod path against the float64 masked
softmax), stock parity, caching, and models without 3D RoPE."""

import pytest
import torch
from conftest import run
from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

from diffusers_attn_ext import ComposedProcessor, install, kernels
from diffusers_attn_ext.context import CONTEXT_ATTR, AttnContext, TokenGrid, attach_context
from diffusers_attn_ext.families.base import AttentionCall
from diffusers_attn_ext.families.wan import WanAdapter, wan_apply_rotary
from diffusers_attn_ext.kernels.dense import dense_attention
from diffusers_attn_ext.processors.base import AttnExtProcessor
from diffusers_attn_ext.processors.std_rope import (
    IsolationRows,
    STDRoPEProcessor,
    draw_duplicate_isolation,
    duplicate_isolation_score_mod,
    isolated_attention,
)
from diffusers_attn_ext.testing import tiny_call_kwargs, tiny_pipeline
from diffusers_attn_ext.trajectory import Trajectory, foreground_mask, position_source_index, std_rope_positions

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
GRID = TokenGrid(3, 4, 4)
HEAD_DIM = 24  # t: 8, h: 8, w: 8 channels, as WanRotaryPosEmbed splits it


def moving_right() -> Trajectory:
    return Trajectory.from_key_boxes({0: (0, 0, 32, 48), 8: (32, 0, 64, 48)}, num_frames=9, height=64, width=64)


def wan_rope_float64(positions: torch.Tensor, head_dim: int, theta: float = 10000.0):
    """cos, sin ``[N, head_dim]`` of Wan's 3D RoPE at (t, h, w) ``positions`` ``[N, 3]``, from the formula:
    head_dim splits as t = D - 4 (D // 6), h = w = 2 (D // 6); a part of d channels rotates pair k by
    pos * theta^(-2k / d), each angle repeated for the two channels of its pair."""
    h_dim = w_dim = 2 * (head_dim // 6)
    parts = []
    for axis, dim in enumerate((head_dim - h_dim - w_dim, h_dim, w_dim)):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        parts.append(positions[:, axis:axis + 1].double() * freqs[None, :])
    angles = torch.cat(parts, dim=1).repeat_interleave(2, dim=1)
    return angles.cos(), angles.sin()


def self_call(context, rotary, generator, tokens=48, dtype=torch.float64):
    q, k, v = (torch.randn(1, tokens, 2, HEAD_DIM, generator=generator, dtype=dtype) for _ in range(3))
    return AttentionCall(module=torch.nn.Identity(), family="wan", kind="self", query=q, key=k, value=v,
                         text=None, visual=slice(0, tokens), context=context, rotary=rotary)


def stock_wan_rope():
    rope = WanRotaryPosEmbed(HEAD_DIM, (1, 2, 2), max_seq_len=32)
    return rope(torch.zeros(1, 1, GRID.frames, GRID.height * 2, GRID.width * 2))


def test_applied_rope_equals_wan_rope_at_std_positions_float64():
    context = AttnContext(family="wan", grid=GRID, step_index=0)
    generator = torch.Generator().manual_seed(0)
    call = self_call(context, stock_wan_rope(), generator)
    query = call.query.clone()
    processor = STDRoPEProcessor(moving_right(), isolate_duplicates=False)
    processor.edit_positions(call)
    positions = std_rope_positions(moving_right().token_boxes(GRID, 4), GRID).reshape(-1, 3)
    cos, sin = wan_rope_float64(positions, HEAD_DIM)
    # diffusers computes the table in float64 and stores it in float32: equal up to float32 rounding.
    assert call.rotary[0].dtype == torch.float32
    torch.testing.assert_close(call.rotary[0][0, :, 0].double(), cos, rtol=0, atol=6e-8)
    torch.testing.assert_close(call.rotary[1][0, :, 0].double(), sin, rtol=0, atol=6e-8)
    WanAdapter().apply_rotary(call)
    # Reference rotation: pairs (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos).
    x0, x1 = query[..., 0::2], query[..., 1::2]
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 0::2]
    expected = torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)
    torch.testing.assert_close(call.query, expected, rtol=0, atol=1e-6)
    # Foreground token (t=1, h=0, w=1) now rotates as (1, 0, 0); background tokens as their own positions.
    stock_cos = stock_wan_rope()[0][0, :, 0]
    assert torch.equal(call.rotary[0][0, 16 + 1, 0], stock_cos[16 + 0])
    background = ~foreground_mask(moving_right().token_boxes(GRID, 4), GRID).flatten()
    assert torch.equal(call.rotary[0][0, background, 0], stock_cos[background])


def test_gathered_table_is_built_once_per_forward():
    context = AttnContext(family="wan", grid=GRID, step_index=0)
    generator = torch.Generator().manual_seed(0)
    rotary = stock_wan_rope()
    processor = STDRoPEProcessor(moving_right())
    first, second = self_call(context, rotary, generator), self_call(context, rotary, generator)
    processor.edit_positions(first)
    processor.edit_positions(second)
    assert first.rotary[0] is second.rotary[0]
    third = self_call(context, stock_wan_rope(), generator)  # a new forward's table
    processor.edit_positions(third)
    assert third.rotary[0] is not first.rotary[0] and torch.equal(third.rotary[0], first.rotary[0])


def test_steps_and_kinds():
    processor = STDRoPEProcessor(moving_right(), steps=2)
    generator = torch.Generator().manual_seed(0)
    for step, expected in ((0, True), (1, True), (2, False)):
        call = self_call(AttnContext(family="wan", grid=GRID, step_index=step), None, generator)
        assert processor.applies_to(call) is expected
    call.kind = "cross"
    call.context.step_index = 0
    assert not processor.applies_to(call)
    call.family = "sd3"
    with pytest.raises(ValueError, match="family='sd3'"):
        processor.check_family(call.family)  # the processor base checks it at every call, before applies_to


def moving_right_groups(length: int = 48, start: int = 0) -> torch.Tensor:
    """Token groups of :func:`moving_right` by hand (0 other, 1 foreground, 2 duplicate), ``length`` tokens with
    the 48 video tokens from ``start``: frame 1's box took the positions of (1, 0..1, 0), frame 2's of (2, 0..1, 0)."""
    groups = torch.zeros(length, dtype=torch.int8)
    groups[start:start + 48][foreground_mask(moving_right().token_boxes(GRID, 4), GRID).flatten()] = 1
    for t, h, w in ((1, 0, 0), (1, 1, 0), (2, 0, 0), (2, 1, 0)):
        groups[start + t * 16 + h * 4 + w] = 2
    return groups


def masked_softmax_float64(q, k, v, allowed, scale):
    """``[B, S, H, D]`` attention with a boolean ``[S, S]`` table of allowed pairs, as the authors' mask."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v.double())


def test_isolation_mask_is_the_authors_pairs():
    groups = moving_right_groups()
    allowed = draw_duplicate_isolation(groups)
    assert not allowed[16 + 1, 16 + 0] and not allowed[16 + 0, 16 + 1]  # foreground <-> the position it took
    assert not allowed[1, 32] and allowed[16 + 0, 16 + 3] and allowed[1, 2] and allowed[16, 32]
    assert int((~allowed).sum()) == 2 * 18 * 4  # F x D both ways, nothing else
    plan = STDRoPEProcessor(moving_right()).plan(self_call(AttnContext(family="wan", grid=GRID, step_index=0), None,
                                                           torch.Generator().manual_seed(0)))
    assert torch.equal(plan.groups, groups)
    assert duplicate_isolation_score_mod(groups).__name__ == "isolate_duplicates"


@pytest.mark.parametrize("start, length", [(0, 48), (5, 56)])  # Wan; CogVideoX-like text first and after
def test_isolated_attention_matches_float64_masked_softmax(start, length):
    groups = moving_right_groups(length, start)
    rows = IsolationRows.from_groups(groups[start:start + 48], start, length)
    assert torch.equal(rows.key_order.sort().values, torch.arange(length))
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, length, 2, HEAD_DIM, generator=generator, dtype=torch.float64) for _ in range(3))
    v[1] += 3.0  # the two batch rows differ in scale and content
    scale = 0.3
    expected = masked_softmax_float64(q, k, v, draw_duplicate_isolation(groups), scale)
    others = dense_attention(q.index_select(1, rows.others), k, v, scale=scale, via="sdpa")
    out = isolated_attention(q, k, v, others, rows, scale=scale)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    unmasked = masked_softmax_float64(q, k, v, torch.ones(length, length, dtype=torch.bool), scale)
    assert not torch.allclose(out[:, rows.foreground], unmasked[:, rows.foreground])
    assert torch.equal(out[:, rows.others], others)


def wan_module(context):
    from diffusers.models.transformers.transformer_wan import WanAttention

    torch.manual_seed(0)
    attn = WanAttention(dim=48, heads=2, dim_head=HEAD_DIM).double()
    setattr(attn, CONTEXT_ATTR, context)
    return attn


@torch.no_grad()
def test_processor_isolation_alone_and_composed_match_float64_reference(monkeypatch):
    context = AttnContext(family="wan", grid=GRID, step_index=0)
    attn = wan_module(context)
    hidden = torch.randn(2, 48, 48, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rotary = tuple(t.double() for t in stock_wan_rope())
    kernel_rows = []

    def counting_dense(query, *args, **kwargs):
        kernel_rows.append(query.shape[1])
        return dense_attention(query, *args, **kwargs)

    monkeypatch.setattr(kernels, "dense_attention", counting_dense)
    processor = STDRoPEProcessor(moving_right())
    attn.set_processor(processor)
    alone = attn(hidden, None, None, rotary)
    assert kernel_rows == [48 - 18 - 4]  # the stock kernel ran on the other queries only
    attn.set_processor(ComposedProcessor(processor, AttnExtProcessor()))  # another method acts: score_mod path
    composed = attn(hidden, None, None, rotary)
    assert kernel_rows == [26]  # FlexAttention ran, not the dense kernel

    source = position_source_index(std_rope_positions(moving_right().token_boxes(GRID, 4), GRID))
    moved = tuple(t.index_select(1, source) for t in rotary)
    q, k = (wan_apply_rotary(norm(proj(hidden)).unflatten(2, (2, -1)), *moved)
            for norm, proj in ((attn.norm_q, attn.to_q), (attn.norm_k, attn.to_k)))
    v = attn.to_v(hidden).unflatten(2, (2, -1))
    reference = masked_softmax_float64(q, k, v, draw_duplicate_isolation(moving_right_groups()), HEAD_DIM**-0.5)
    reference = attn.to_out[0](reference.flatten(2))
    assert not torch.allclose(reference[0], reference[1])
    torch.testing.assert_close(alone, reference, rtol=0, atol=1e-12)
    torch.testing.assert_close(composed, reference, rtol=0, atol=1e-12)


@torch.no_grad()
def test_cogvideox_isolation_alone_equals_score_mod_path():
    from diffusers.models.attention_processor import Attention

    context = AttnContext(family="cogvideox", grid=GRID, step_index=0)
    torch.manual_seed(0)
    attn = Attention(48, heads=2, dim_head=HEAD_DIM, qk_norm="layer_norm", bias=True).double()
    setattr(attn, CONTEXT_ATTR, context)
    generator = torch.Generator().manual_seed(3)
    hidden, text = (torch.randn(2, n, 48, generator=generator, dtype=torch.float64) for n in (48, 5))
    rotary = tuple(torch.randn(48, HEAD_DIM, generator=generator, dtype=torch.float64) for _ in range(2))
    processor = STDRoPEProcessor(moving_right())
    attn.set_processor(processor)
    alone = attn(hidden, encoder_hidden_states=text, image_rotary_emb=rotary)
    attn.set_processor(ComposedProcessor(processor, AttnExtProcessor()))
    composed = attn(hidden, encoder_hidden_states=text, image_rotary_emb=rotary)
    for a, b in zip(alone, composed, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    attn.set_processor(STDRoPEProcessor(moving_right(), isolate_duplicates=False))
    assert not torch.allclose(attn(hidden, encoder_hidden_states=text, image_rotary_emb=rotary)[0], alone[0])


def test_isolation_off_or_with_attention_mask():
    context = AttnContext(family="wan", grid=GRID, step_index=0)
    call = self_call(context, None, torch.Generator().manual_seed(0))
    query = call.query
    STDRoPEProcessor(moving_right(), isolate_duplicates=False).edit_attention(call)
    assert call.query is query and not call.score_mods and call.query_rows is None and call.key_span is None
    call.attn_mask = torch.ones(48, 48, dtype=torch.bool)
    with pytest.raises(ValueError, match="attention_mask.*isolate_duplicates=False"):
        STDRoPEProcessor(moving_right()).edit_attention(call)


def test_full_frame_box_is_stock_exactly(pipe_for):
    pipe = pipe_for("wan")
    full = Trajectory.static((0, 0, 64, 64), 9, 64, 64)
    stock = run(pipe, "wan", height=64, width=64)
    install(pipe, STDRoPEProcessor(full, steps=None))
    assert torch.equal(run(pipe, "wan", height=64, width=64), stock)


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_moving_box_changes_the_video(family, pipe_for):
    pipe = pipe_for(family)
    frames = 9
    trajectory = Trajectory.from_key_boxes({0: (0, 0, 32, 48), 8: (32, 0, 64, 48)}, frames, 64, 64)
    stock = run(pipe, family, height=64, width=64)
    install(pipe, STDRoPEProcessor(trajectory))
    out = run(pipe, family, height=64, width=64)
    assert torch.isfinite(out).all() and not torch.equal(out, stock)


def test_model_without_3d_rope_raises():
    pipe, _ = tiny_pipeline("cogvideox", transformer_config={"use_rotary_positional_embeddings": False})
    processor = STDRoPEProcessor(Trajectory.static((0, 0, 32, 32), 9, 64, 64))
    with pytest.raises(ValueError, match="use_rotary_positional_embeddings=False"):
        install(pipe, processor)  # at install, before any model work
    attach_context(pipe)
    pipe.transformer.set_attn_processor(processor)  # the diffusers way: at the call
    with pytest.raises(ValueError, match="use_rotary_positional_embeddings=False"):
        pipe(**tiny_call_kwargs("cogvideox", height=64, width=64))


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": -1}, "steps=-1"), ({"frame_stride": 0}, "frame_stride=0"), ({"trajectory": [(0, 0, 1, 1)]}, "Trajectory"),
])
def test_bad_parameters_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        STDRoPEProcessor(**{"trajectory": moving_right(), **kwargs})
