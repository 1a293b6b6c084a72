"""Re-ttention: the statistical reshape against a float64 restatement of the paper's Eqs. 4-10, its schedule, the
identity settings, bad input, the tiny Wan and CogVideoX pipelines, per-generation state and torch.compile."""

import math

import pytest
import torch
import torch._dynamo as dynamo
from conftest import run
from torch._dynamo.testing import CompileCounter

from diffusers_attn_ext import install
from diffusers_attn_ext.context import CONTEXT_ATTR, MODULE_NAME_ATTR, AttnContext, TokenGrid, get_context
from diffusers_attn_ext.families.base import AttentionCall
from diffusers_attn_ext.processors import base
from diffusers_attn_ext.processors.adaptive_sparse import draft_block_pattern
from diffusers_attn_ext.processors.base import ComposedProcessor
from diffusers_attn_ext.processors.radial_sparse import RadialSparseProcessor
from diffusers_attn_ext.processors.rettention import (
    RettentionProcessor,
    reshape_sparse_output,
    rettention_statistics,
    window_block_pattern,
)
from diffusers_attn_ext.processors.stock import StockAttnProcessor
from diffusers_attn_ext.testing import tiny_call_kwargs

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

WAN_SIZE = dict(height=64, width=64, num_frames=17)  # 5 latent frames of 4x4 tokens: 80 tokens, 5 blocks of 16
COG_SIZE = dict(height=64, width=64, num_frames=17)  # 16 text + 80 video tokens: 12 blocks of 8


# ---- float64 restatement of the paper ------------------------------------------------------------------------
def token_mask(blocks, block_size, n):
    """Token-level mask [B|1, H|1, N, N] of a block table."""
    return blocks.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)[..., :n, :n]


def paper_statistics(q, k, v, kept, block_size, reference=None):
    """Eqs. 4, 5, 8, 10 written out in float64 on [B, N, H, D]: (rho [B,N,H], R [B,N,H,D], O^full, O^s, A o M V).
    ``reference`` (a block table) restricts the "full" attention; the kept set is kept & reference."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    n = q.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    allowed = torch.ones_like(s, dtype=torch.bool) if reference is None else token_mask(reference, block_size, n)
    m = token_mask(kept, block_size, n) & allowed
    e = torch.where(allowed, torch.exp(s - s.amax(-1, keepdim=True)), 0.0)
    full_probs = e / e.sum(-1, keepdim=True)                       # Eq. 4 (A)
    sparse_probs = torch.where(m, e, 0.0) / (e * m).sum(-1, keepdim=True)  # Eq. 5 (A^s)
    rho = (e * m).sum(-1) / e.sum(-1)                               # Eq. 8
    o_full, o_sparse = full_probs @ v, sparse_probs @ v
    residual = o_full - rho[..., None] * o_sparse                   # Eq. 10
    post_softmax = (full_probs * m) @ v                             # Eq. 7: A o M, then V
    bnhd = lambda x: x.transpose(1, 2)  # noqa: E731
    return bnhd(rho), bnhd(residual), bnhd(o_full), bnhd(o_sparse), bnhd(post_softmax)


def paper_window(blocks, density):
    """The window pattern restated row by row: ceil(density * n) consecutive blocks centred, clamped inside."""
    keep = min(blocks, math.ceil(density * blocks))
    table = torch.zeros(blocks, blocks, dtype=torch.bool)
    for row in range(blocks):
        start = min(max(row - (keep - 1) // 2, 0), blocks - keep)
        table[row, start:start + keep] = True
    return table


def random_qkv(seed, b=2, n=80, h=2, d=16):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, h, d, generator=g, dtype=torch.float64) * scale for scale in (1.5, 1.5, 1.0))


def call_of(q, k, v, block_size):
    return AttentionCall(module=None, family="wan", kind="self", query=q, key=k, value=v, text=None,
                         visual=slice(0, q.shape[1]), context=None, block_size=block_size)


def random_table(seed, b, h, blocks):
    g = torch.Generator().manual_seed(seed)
    table = torch.rand(b, h, blocks, blocks, generator=g) < 0.3
    return table | torch.eye(blocks, dtype=torch.bool)


# ---- the formula ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("use_reference", [False, True], ids=["full", "radial-reference"])
def test_statistics_equal_the_paper_formula_float64(use_reference):
    q, k, v = random_qkv(0)
    kept = random_table(1, 2, 2, 5)
    reference = random_table(2, 1, 1, 5) | kept if use_reference else None
    applied = kept if reference is None else kept & reference
    sparse_out = paper_statistics(q, k, v, applied, 16, reference)[3]
    ratio, residual, full = rettention_statistics(call_of(q, k, v, 16), applied, reference, sparse_out)
    rho, r, o_full, _, _ = paper_statistics(q, k, v, kept, 16, reference)
    assert (rho < 1 - 1e-3).any() and (rho > 0).all() and (rho <= 1 + 1e-12).all()
    torch.testing.assert_close(ratio, rho, rtol=0, atol=1e-12)
    torch.testing.assert_close(residual, r, rtol=0, atol=1e-12)
    torch.testing.assert_close(full, o_full, rtol=0, atol=1e-12)


def test_same_step_statistics_give_full_attention_and_the_post_softmax_mask():
    """Eq. 9 with rho from the same step is Eq. 7 (A o M V), and adding R (Eq. 10) gives full attention."""
    q, k, v = random_qkv(3)
    kept = random_table(4, 2, 2, 5)
    rho, r, o_full, o_sparse, post_softmax = paper_statistics(q, k, v, kept, 16)
    ratio, residual, _ = rettention_statistics(call_of(q, k, v, 16), kept, None, o_sparse)
    torch.testing.assert_close(reshape_sparse_output(o_sparse, ratio, torch.zeros_like(o_sparse)), post_softmax,
                               rtol=0, atol=1e-12)
    torch.testing.assert_close(reshape_sparse_output(o_sparse, ratio, residual), o_full, rtol=0, atol=1e-12)
    assert (o_sparse - o_full).abs().max() > 1e-2  # the sparse output alone is not full attention


def test_reshape_at_a_later_step_is_the_formula_with_the_ramp():
    q, k, v = random_qkv(5)
    later = random_qkv(6)
    kept = random_table(7, 2, 2, 5)
    rho, r, *_ = paper_statistics(q, k, v, kept, 16)
    o_sparse_later = paper_statistics(*later, kept, 16)[3]
    expected = (rho[..., None] + 0.04 * 2) * o_sparse_later + r
    torch.testing.assert_close(reshape_sparse_output(o_sparse_later, rho, r, 0.04 * 2), expected, rtol=0, atol=1e-12)
    assert reshape_sparse_output(o_sparse_later.float(), rho.float(), r.float()).dtype == torch.float32


@pytest.mark.parametrize("blocks, density", [(5, 0.25), (12, 0.03125), (256, 0.03125), (7, 0.5), (9, 1.0)])
def test_window_pattern(blocks, density):
    table = window_block_pattern(blocks, density)
    assert torch.equal(table, paper_window(blocks, density))
    assert (table.sum(-1) == min(blocks, math.ceil(density * blocks))).all() and table.diagonal().all()
    if density == 1.0:
        assert table.all()


# ---- the processor on one attention module --------------------------------------------------------------------
def wan_attention(grid):
    """A float64 WanAttention (2 heads of 16) with a context of ``grid``, and a function step inputs."""
    from diffusers.models.transformers.transformer_wan import WanAttention

    from diffusers_attn_ext.families.wan import wan_apply_rotary

    torch.manual_seed(0)
    attn = WanAttention(dim=32, heads=2, dim_head=16).double().eval()
    setattr(attn, CONTEXT_ATTR, AttnContext(family="wan", grid=grid, step_index=0))
    setattr(attn, MODULE_NAME_ATTR, "blocks.1.attn1")

    def inputs(seed):
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(2, grid.num_tokens, 32, generator=g, dtype=torch.float64)
        cos, sin = torch.randn(2, 1, grid.num_tokens, 1, 16, generator=g, dtype=torch.float64)
        q = wan_apply_rotary(attn.norm_q(attn.to_q(hidden)).unflatten(2, (2, -1)), cos, sin)
        k = wan_apply_rotary(attn.norm_k(attn.to_k(hidden)).unflatten(2, (2, -1)), cos, sin)
        v = attn.to_v(hidden).unflatten(2, (2, -1))
        return (hidden, None, None, (cos, sin)), (q, k, v)

    return attn, inputs


def project(attn, out_bnhd):
    return attn.to_out[0](out_bnhd.flatten(2, 3))


@torch.no_grad()
@pytest.mark.parametrize("pattern", ["window", "adaptive"])
def test_schedule_follows_the_authors(pattern):
    """dense_steps=1, refresh_steps=3: step 0 stock, 1 full (statistics stored), 2 and 3 reshaped with the ramp
    0 and lambda, 4 full again; each against the float64 formula."""
    attn, inputs = wan_attention(TokenGrid(5, 4, 4))
    context = getattr(attn, CONTEXT_ATTR)
    ramp = 0.05
    attn.set_processor(RettentionProcessor(density=0.25, pattern=pattern, dense_steps=1, refresh_steps=3,
                                           ratio_ramp=ramp, block_size=16))
    outputs, qkvs = {}, {}
    for step in range(5):
        context.step_index = step
        args, qkvs[step] = inputs(step)
        outputs[step] = attn(*args)
    full = {t: project(attn, paper_statistics(*qkvs[t], torch.ones(1, 1, 5, 5, dtype=torch.bool), 16)[2])
            for t in range(5)}
    for t in (0, 1, 4):
        torch.testing.assert_close(outputs[t], full[t], rtol=0, atol=1e-10)
    if pattern == "window":
        kept = paper_window(5, 0.25)[None, None]
    else:
        kept = draft_block_pattern(*qkvs[1][:2], 16, density=0.25)
        assert not torch.equal(kept, draft_block_pattern(*qkvs[2][:2], 16, density=0.25))  # not searched again
    rho, r, *_ = paper_statistics(*qkvs[1], kept, 16)
    for t, extra in ((2, 0.0), (3, ramp)):
        o_sparse = paper_statistics(*qkvs[t], kept, 16)[3]
        expected = project(attn, (rho[..., None] + extra) * o_sparse + r)
        torch.testing.assert_close(outputs[t], expected, rtol=0, atol=1e-10)
        assert (outputs[t] - full[t]).abs().max() > 1e-3  # other inputs: the reshape is not full attention


@torch.no_grad()
@pytest.mark.parametrize("use_ratio", [True, False])
def test_reused_step_with_unchanged_inputs_equals_full_attention(use_ratio):
    attn, inputs = wan_attention(TokenGrid(5, 4, 4))
    context = getattr(attn, CONTEXT_ATTR)
    attn.set_processor(RettentionProcessor(density=0.25, dense_steps=0, refresh_steps=2, ratio_ramp=0.0,
                                           use_ratio=use_ratio, block_size=16))
    args, qkv = inputs(0)
    context.step_index = 0
    refreshed = attn(*args)
    context.step_index = 1
    reused = attn(*args)
    full = project(attn, paper_statistics(*qkv, torch.ones(1, 1, 5, 5, dtype=torch.bool), 16)[2])
    torch.testing.assert_close(refreshed, full, rtol=0, atol=1e-10)
    torch.testing.assert_close(reused, full, rtol=0, atol=1e-10)


@torch.no_grad()
@pytest.mark.parametrize("settings", [dict(ratio_ramp=0.0), dict(use_ratio=False)], ids=["ramp-0", "no-ratio"])
def test_density_one_equals_stock_at_every_step(settings):
    attn, inputs = wan_attention(TokenGrid(5, 4, 4))
    context = getattr(attn, CONTEXT_ATTR)
    processor = RettentionProcessor(density=1.0, dense_steps=1, refresh_steps=3, block_size=16, **settings)
    for step in range(5):
        context.step_index = step
        args, _ = inputs(step)
        attn.set_processor(StockAttnProcessor())
        stock = attn(*args)
        attn.set_processor(processor)
        torch.testing.assert_close(attn(*args), stock, rtol=0, atol=1e-10)


@torch.no_grad()
def test_a_later_method_changing_the_mask_is_refused():
    attn, inputs = wan_attention(TokenGrid(6, 4, 4))
    attn.set_processor(ComposedProcessor(RettentionProcessor(density=0.5, dense_steps=0, block_size=16),
                                         RadialSparseProcessor(block_size=16)))
    with pytest.raises(ValueError, match="compose Re-ttention after the other block-sparse methods"):
        attn(*inputs(0)[0])


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(density=0.0), r"density=0.0 is outside the allowed range \(0, 1\]"),
        (dict(density=1.5), r"density=1.5 is outside the allowed range \(0, 1\]"),
        (dict(density=float("nan")), r"density=nan is outside the allowed range \(0, 1\]"),
        (dict(density=True), r"density=True is outside the allowed range \(0, 1\]: a bool, not a number"),
        (dict(pattern="radial"), r"pattern='radial' is not one of \('window', 'adaptive'\)"),
        (dict(refresh_steps=0), r"refresh_steps=0 is outside the allowed range: an integer >= 1"),
        (dict(refresh_steps=2.0), r"refresh_steps=2.0 is outside the allowed range: an integer >= 1 \(got a float\)"),
        (dict(ratio_ramp=-0.01), r"ratio_ramp=-0.01 is outside the allowed range \[0, 1\]"),
        (dict(ratio_ramp=2), r"ratio_ramp=2 is outside the allowed range \[0, 1\]"),
        (dict(use_ratio=1), r"use_ratio=1 is not allowed: allowed values are True and False"),
        (dict(dense_steps=-1), r"dense_steps=-1 is outside the allowed range: an integer >= 0"),
        (dict(block_size=0), r"block_size=0 is outside the allowed range: an integer >= 1"),
    ],
)
def test_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        RettentionProcessor(**arguments)


# ---- pipelines ------------------------------------------------------------------------------------------------
@pytest.fixture
def captured(monkeypatch):
    """(module name, kind, step, branch, block mask) of every attention call the kernel layer runs."""
    calls = []
    original = base.attend

    def recording(call):
        mask = None if call.block_mask is None else call.block_mask.clone()
        calls.append((call.module_name, call.kind, call.context.step_index, call.context.branch, mask))
        return original(call)

    monkeypatch.setattr(base, "attend", recording)
    return calls


@pytest.mark.parametrize("pattern", ["window", "adaptive"])
def test_wan_pipeline_runs_with_the_schedule(pipe_for, captured, stock_outputs, pattern):
    pipe = pipe_for("wan")
    processor = RettentionProcessor(density=0.25, pattern=pattern, dense_steps=1, refresh_steps=2, block_size=16)
    install(pipe, processor)
    stored = {}

    def on_step_end(pipe, step, timestep, tensors):
        cache = get_context(pipe.transformer.blocks[0].attn1).state_of(processor).statistics
        stored[step] = sorted((key[1], entry.step) for key, entry in cache.items())
        return tensors

    out = run(pipe, "wan", num_inference_steps=5, callback_on_step_end=on_step_end, **WAN_SIZE)
    assert torch.isfinite(out).all()
    for step, refreshed in ((0, None), (1, 1), (2, 1), (3, 3), (4, 3)):  # one entry per module and branch
        assert stored[step] == ([] if refreshed is None else [("cond", refreshed)] * 2 + [("uncond", refreshed)] * 2)
    self_calls = [c for c in captured if c[1] == "self"]
    assert len(self_calls) == 5 * 2 * 2  # steps x cond/uncond x blocks
    assert {c[2] for c in self_calls if c[4] is None} == {0}  # step 0 dense, every later step block-sparse
    masks = {(c[0], c[2], c[3]): c[4] for c in self_calls if c[4] is not None}
    assert all(m.float().mean() < 1 for m in masks.values())
    for name in ("blocks.0.attn1", "blocks.1.attn1"):
        for branch in ("cond", "uncond"):
            assert torch.equal(masks[(name, 1, branch)], masks[(name, 2, branch)])  # reused until the refresh
            assert torch.equal(masks[(name, 3, branch)], masks[(name, 4, branch)])
    if pattern == "window":
        assert torch.equal(masks[("blocks.0.attn1", 1, "cond")], paper_window(5, 0.25)[None, None])
    assert all(c[4] is None for c in captured if c[1] == "cross")


def test_cogvideox_pipeline_runs_with_text_dense(pipe_for, captured):
    pipe = pipe_for("cogvideox")
    install(pipe, RettentionProcessor(density=0.1, dense_steps=1, refresh_steps=2, block_size=8))
    out = run(pipe, "cogvideox", num_inference_steps=4, **COG_SIZE)
    assert torch.isfinite(out).all()
    masks = [c[4] for c in captured if c[4] is not None]
    assert len(masks) == 3 * 2  # sparse steps x blocks (CFG batched in one forward)
    mask = masks[0][0, 0]
    assert mask.shape == (12, 12) and mask[:2].all() and mask[:, :2].all()  # the 16 text tokens: blocks 0, 1
    assert torch.equal(mask[2:, 2:], window_block_pattern(12, 0.1)[2:, 2:])


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_density_one_pipeline_equals_stock(pipe_for, stock_outputs, family):
    pipe = pipe_for(family)
    stock = stock_outputs(family)  # before the install: the session's stock output is computed on first use
    install(pipe, RettentionProcessor(density=1.0, ratio_ramp=0.0, dense_steps=0, refresh_steps=2, block_size=8))
    torch.testing.assert_close(run(pipe, family), stock, rtol=0, atol=1e-5)


def test_second_call_equals_a_fresh_process(pipe_for, tiny_pipes):
    """Per-generation state: a call at another size after a first call gives what a fresh pipeline gives, and
    nothing of Re-ttention is left in the context after a call."""
    from diffusers_attn_ext.testing import tiny_pipeline

    processor = lambda: RettentionProcessor(density=0.25, dense_steps=1, refresh_steps=3, block_size=16)  # noqa: E731
    second = dict(height=64, width=48, num_frames=13)
    pipe = pipe_for("wan")
    install(pipe, processor())
    run(pipe, "wan", num_inference_steps=5, **WAN_SIZE)
    assert not get_context(pipe.transformer.blocks[0].attn1).state
    again = run(pipe, "wan", num_inference_steps=5, **second)
    fresh_pipe = tiny_pipeline("wan")[0]
    install(fresh_pipe, processor())
    fresh = run(fresh_pipe, "wan", num_inference_steps=5, **second)
    assert torch.equal(again, fresh)


# ---- torch.compile ---------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_dynamo():
    torch.set_num_threads(1)
    dynamo.reset()
    yield
    dynamo.reset()


@pytest.mark.parametrize("pattern", ["window", "adaptive"])
def test_compiled_cfg_loop_equals_eager_with_one_graph(pipe_for, fresh_dynamo, pattern):
    """As tests/test_compile.py: the whole Wan transformer compiled with fullgraph, two 4-step CFG generations;
    refresh_steps=1 (nothing carried across steps): one graph, none in the second generation, equal to eager."""
    pipe = pipe_for("wan")
    install(pipe, RettentionProcessor(density=0.5, pattern=pattern, dense_steps=0, refresh_steps=1, block_size=16))

    def generate():
        return torch.as_tensor(pipe(**tiny_call_kwargs("wan", num_inference_steps=4))[0])

    eager = generate()
    counter = CompileCounter()
    transformer = pipe.transformer
    pipe.transformer = torch.compile(transformer, backend=counter, fullgraph=True)
    try:
        first = generate()
        graphs = counter.frame_count
        second = generate()
    finally:
        pipe.transformer = transformer
    assert graphs == 1 and counter.frame_count == 1
    torch.testing.assert_close(first, eager, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, eager, rtol=0, atol=1e-6)


def test_carried_statistics_under_compile_are_refused(pipe_for, fresh_dynamo):
    pipe = pipe_for("wan")
    install(pipe, RettentionProcessor(density=0.5, dense_steps=0, refresh_steps=2, block_size=16))
    transformer = pipe.transformer
    pipe.transformer = torch.compile(transformer, backend="eager", fullgraph=True)
    try:
        with pytest.raises(Exception, match=r"refresh_steps=2\) carries attention statistics across steps"):
            pipe(**tiny_call_kwargs("wan", num_inference_steps=2))
    finally:
        pipe.transformer = transformer


# ---- CUDA (the lead's GPU run): the Triton block-sparse kernel and compiled FlexAttention with log-sum-exp ------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton block-sparse kernel and compiled flex need CUDA")
@torch.no_grad()
def test_cuda_bf16_statistics_match_float64():
    from diffusers_attn_ext.kernels import attend

    q, k, v = random_qkv(8, b=1, n=2048, h=4, d=64)
    kept = window_block_pattern(16, 0.125)[None, None]
    call = call_of(*(x.cuda().bfloat16() for x in (q, k, v)), 128)
    call.block_mask = kept.cuda()
    sparse_out = attend(call)
    ratio, residual, full = rettention_statistics(call, call.block_mask, None, sparse_out)
    rho, r, o_full, o_sparse, _ = paper_statistics(q, k, v, kept, 128)

    def rel(a, b):
        return ((a.cpu().double() - b).norm() / b.norm()).item()

    assert rho.mean() < 0.5  # the dropped blocks carry most of the mass: the statistics matter
    assert rel(sparse_out, o_sparse) < 2e-2 and rel(ratio, rho) < 1e-2
    assert rel(residual, r) < 2e-2 and rel(full, o_full) < 2e-2
