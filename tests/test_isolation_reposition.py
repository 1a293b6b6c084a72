"""IsolationRepositionProcessor: the mask table by hand, the kernel against a float64 reference with an
explicit -inf bias (with and without RoPE and dropout), RoPE of repositioned keys, the head-chunk memory
budget (by hand and by tracking live tensors), and stock parity at the identity setting."""

import weakref
from dataclasses import replace

import pytest
import torch
from conftest import run
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from diffusers_attn_ext import install, uninstall
from diffusers_attn_ext.families.flux import FluxAdapter
from diffusers_attn_ext.processors.isolation_reposition import (
    IsolationRepositionProcessor,
    allowed_pairs,
    heads_per_chunk,
    isolation_reposition_attention,
    repositioned_reference,
)
from diffusers_attn_ext.subjects import SubjectLayout, subject_tokens
from diffusers_attn_ext.testing import tiny_call_kwargs

# A 2x3 token grid after one text token (FLUX order). Reference: cat in column 2, dog in column 0.
# Target: cat in column 0 (tokens 1, 4), dog in row 0, columns 1-2 (tokens 2, 3); tokens 5, 6 background.
LAYOUT = SubjectLayout.from_boxes([
    {"cat": (2 / 3, 0, 1, 1), "dog": (0, 0, 1 / 3, 1)},
    {"cat": (0, 0, 1 / 3, 1), "dog": (1 / 3, 0, 1, 0.5)},
])
T, F_ = True, False
# Keys: own sequence 0..6, then the cat's 2 repositioned keys, then the dog's 2.
EXPECTED = torch.tensor([
    #  0  1  2  3  4  5  6 | cat | dog
    [T, T, T, T, T, T, T, F_, F_, F_, F_],  # text
    [T, T, F_, F_, T, T, T, T, T, F_, F_],  # cat
    [T, F_, T, T, F_, T, T, F_, F_, T, T],  # dog
    [T, F_, T, T, F_, T, T, F_, F_, T, T],  # dog
    [T, T, F_, F_, T, T, T, T, T, F_, F_],  # cat
    [T, T, T, T, T, T, T, F_, F_, F_, F_],  # background
    [T, T, T, T, T, T, T, F_, F_, F_, F_],  # background
])


def test_allowed_pairs_of_a_two_subject_layout_equal_the_hand_table():
    plans = subject_tokens(LAYOUT, 1, 2, 3, visual_start=1, seq_len=7)
    assert torch.equal(allowed_pairs(plans, 7), EXPECTED)


def rope64(x, cos, sin):
    """FLUX's real RoPE (``use_real_unbind_dim=-1``) in float64 on ``[..., S, H, D]`` with ``cos, sin [S, D]``;
    diffusers' ``apply_rotary_emb`` rounds ``x`` to float32 first."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    return x * cos[:, None] + torch.stack([-imag, real], -1).flatten(-2) * sin[:, None]


def reference_float64(query, key, value, plans, table, rotary=None):
    """Explicit float64 attention of each target row over [own keys, repositioned keys] with a -inf bias.
    With ``rotary`` (cos, sin), ``key`` is raw: own keys are rotated at their positions and repositioned keys,
    resampled from the raw reference keys, at their new positions."""
    def rotate(x, positions):
        return x if rotary is None else rope64(x, *(r[positions] for r in rotary))

    everywhere = torch.arange(key.shape[1])
    rotated = torch.stack([rotate(row, everywhere) for row in key])
    out = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", query, rotated) * query.shape[-1] ** -0.5, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", out, value)
    appended_k = torch.cat([rotate((key[0][p.ref_sources] * p.ref_weights[..., None, None]).sum(1), p.ref_positions)
                            for p in plans])
    appended_v = torch.cat([(value[0][p.ref_sources] * p.ref_weights[..., None, None]).sum(1) for p in plans])
    keys, values = torch.cat([rotated[1], appended_k]), torch.cat([value[1], appended_v])
    bias = torch.zeros(table.shape, dtype=torch.float64).masked_fill(~table, float("-inf"))
    scores = torch.einsum("qhd,khd->hqk", query[1], keys) * query.shape[-1] ** -0.5 + bias
    out[1] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
    return out


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("chunk_bytes", [1, 2**20])
def test_kernel_equals_float64_reference_with_explicit_minus_inf_bias(mode, chunk_bytes):
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 7, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    plans = subject_tokens(LAYOUT, 1, 2, 3, visual_start=1, seq_len=7, mode=mode)
    stock = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(torch.einsum("bqhd,bkhd->bhqk", query, key) / 2, -1), value)
    ours = isolation_reposition_attention(query, key, value, stock.clone(), [plans], max_chunk_bytes=chunk_bytes)
    expected = reference_float64(query, key, value, plans, allowed_pairs(plans, 7))
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(ours[0], stock[0])  # the reference row is stock


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_repositioned_rope_keys_carry_the_rope_of_their_new_position(mode):
    # FLUX-style RoPE over a 1-text + 2x3-image sequence: rotate raw keys, reposition the rotated ones, and
    # compare with resampling the raw keys and rotating them at their new positions.
    g = torch.Generator().manual_seed(1)
    raw_key = torch.randn(7, 2, 8, generator=g, dtype=torch.float64)
    angles = torch.randn(7, 4, generator=g, dtype=torch.float64).repeat_interleave(2, -1)
    rotary = (angles.cos(), angles.sin())
    rotated = rope64(raw_key, *rotary)
    for tokens in subject_tokens(LAYOUT, 1, 2, 3, visual_start=1, seq_len=7, mode=mode):
        ours, _ = repositioned_reference(rotated, raw_key, tokens, FluxAdapter().key_rotation(rotary))
        resampled = (raw_key[tokens.ref_sources] * tokens.ref_weights[..., None, None]).sum(1)
        at_new = tuple(r[tokens.ref_positions] for r in rotary)
        torch.testing.assert_close(ours, rope64(resampled, *at_new), rtol=1e-12, atol=1e-12)
        # diffusers' rotation of the resampled raw keys, to float32 rounding
        expected = apply_rotary_emb(resampled[None], at_new, sequence_dim=1)[0]
        torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_rope_and_dropped_keys_through_the_kernel_equal_the_float64_reference(mode):
    # The dropped repositioned keys leave the gather; the kept ones carry the RoPE of their new positions.
    g = torch.Generator().manual_seed(2)
    query, raw_key, value = (torch.randn(2, 7, 2, 8, generator=g, dtype=torch.float64) for _ in range(3))
    angles = torch.randn(7, 4, generator=g, dtype=torch.float64).repeat_interleave(2, -1)
    rotary = (angles.cos(), angles.sin())
    rotated = rope64(raw_key, *rotary)
    plans = subject_tokens(LAYOUT, 1, 2, 3, visual_start=1, seq_len=7, mode=mode)
    keep = {(1, 0): torch.tensor([True, False]), (1, 1): torch.tensor([1])}
    kept = [replace(p, ref_sources=p.ref_sources[k], ref_weights=p.ref_weights[k], ref_positions=p.ref_positions[k])
            for p, k in zip(plans, keep.values(), strict=True)]
    scores = torch.einsum("bqhd,bkhd->bhqk", query, rotated) * 8 ** -0.5
    stock = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), value)
    ours = isolation_reposition_attention(query, rotated, value, stock.clone(), [plans],
                                          FluxAdapter().key_rotation(rotary), keep=keep, max_chunk_bytes=1)
    expected = reference_float64(query, raw_key, value, kept, allowed_pairs(kept, 7), rotary)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)


def test_heads_per_chunk_by_hand():
    # FLUX benchmark shape, the largest subject with dropout 0.5: 4836 keys, 1444 queries, 722 nearest RoPE keys.
    fixed = 722 * 128 * 8  # cos and sin of m - n, float32
    per_head = 128 * (2 * 2 * 4836 + max(2 * 2 * 1444, 3 * 4 * 722))  # K, V + max(Q, O | resampling temporaries)
    assert heads_per_chunk(24, 128, 4836, 1444, 722, 2, 4, 16 * 2**20, fixed) == 4  # 4.47 fit: 6 chunks of 4
    assert heads_per_chunk(24, 128, 4836, 1444, 722, 2, 4, 7 * per_head + fixed, fixed) == 6  # 7 fit: 4 chunks
    assert heads_per_chunk(24, 128, 4836, 1444, 722, 2, 4, per_head - 1, fixed) == 1  # at least one head
    assert heads_per_chunk(24, 128, 4836, 1444, 0, 2, 4, 2**40) == 24


class LiveTensors(TorchDispatchMode):
    """Peak bytes of the storages created inside the mode and still referenced, and the shapes created."""

    def __init__(self):
        super().__init__()
        self.live, self.bytes, self.peak, self.shapes = {}, 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in (t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)):
            self.shapes.add(tuple(tensor.shape))
            ptr = tensor.untyped_storage().data_ptr()
            if ptr not in self.live:
                if ptr in inputs:  # a view of, or a write into, a tensor made outside
                    continue
                self.live[ptr] = [tensor.untyped_storage().nbytes(), 0]
                self.bytes += self.live[ptr][0]
                self.peak = max(self.peak, self.bytes)
            self.live[ptr][1] += 1
            weakref.finalize(tensor, self._release, ptr)
        return out

    def _release(self, ptr):
        entry = self.live[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.bytes -= entry[0]
            del self.live[ptr]


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_working_memory_stays_under_the_budget_and_no_query_by_key_tensor_exists(mode):
    # 3 images on an 8x8 grid after 4 text tokens, 8 heads of 16, FLUX RoPE, dropout 0.5.
    layout = SubjectLayout.from_boxes([
        {"dog": (0.05, 0.30, 0.45, 0.95), "cat": (0.55, 0.30, 0.95, 0.95)},
        {"dog": (0.55, 0.10, 0.95, 0.60), "cat": (0.00, 0.50, 0.35, 1.00)},
        {"dog": (0.00, 0.00, 0.30, 0.40), "cat": (0.40, 0.40, 1.00, 1.00)},
    ])
    g = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(3, 68, 8, 16, generator=g) for _ in range(3))
    ids = torch.cat([torch.zeros(4, 3), torch.stack(torch.meshgrid(
        torch.zeros(1), torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).flatten(0, 2)])
    rotation = FluxAdapter().key_rotation(FluxPosEmbed(theta=10000, axes_dim=[4, 6, 6])(ids))
    peaks = {}
    for dropout_mode in ("queries", "keys"):
        processor = IsolationRepositionProcessor(layout, interpolation=mode, reference_dropout=0.5,
                                                 dropout_mode=dropout_mode)
        plans = processor.step_plans(processor.plans(8, 8, 4, 68, "cpu"), step=0)
        for budget in (40_000, 80_000, 2**30):
            tracker, out = LiveTensors(), query.clone()
            with tracker:
                isolation_reposition_attention(query, key, value, out, plans, rotation, max_chunk_bytes=budget)
            peaks[dropout_mode, budget] = tracker.peak
            # Index vectors and SDPA's log-sum-exp are outside the budget: O(tokens), not O(tokens x heads x dim).
            assert tracker.peak <= budget + 2048
            for tokens in (t for image_plans in plans for t in image_plans):
                scores = (tokens.queries.numel(), tokens.own_keys.numel() + tokens.ref_positions.numel())
                assert not any(shape[-2:] == scores for shape in tracker.shapes)
        # the budget is what bounds the working memory
        assert peaks[dropout_mode, 40_000] < peaks[dropout_mode, 80_000] < peaks[dropout_mode, 2**30]


@pytest.mark.parametrize("dropout_mode", ["queries", "keys"])
def test_reference_dropout_of_everything_keeps_it_all_and_is_reproducible(dropout_mode):
    # The authors' _dropout_mask restores the undropped mask when a subject would lose every token.
    processor = IsolationRepositionProcessor(LAYOUT, reference_dropout=0.99, dropout_seed=3, dropout_mode=dropout_mode)
    plans = processor.plans(2, 3, 1, 7, "cpu")
    first, again = processor.keep_masks(plans, 5), processor.keep_masks(plans, 5)
    generator = torch.Generator().manual_seed(3 + 5)
    for s, tokens in enumerate(plans[0]):
        count = (tokens.queries if dropout_mode == "queries" else tokens.ref_positions).numel()
        drawn = torch.rand(count, generator=generator) >= 0.99
        assert torch.equal(first[(1, s)], drawn if bool(drawn.any()) else torch.ones_like(drawn))
    assert all(bool(mask.all()) for mask in first.values())  # 2 tokens per subject at p = 0.99: all dropped
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_query_dropout_isolates_the_dropped_target_tokens_from_the_reference():
    """dropout_mode="queries" (authors): a dropped target token of a subject attends no reference key; the
    others attend all of the subject's repositioned keys. The step plans split each subject accordingly."""
    processor = IsolationRepositionProcessor(LAYOUT, reference_dropout=0.5, dropout_seed=0)
    plans = processor.plans(2, 3, 1, 7, "cpu")
    masks = processor.keep_masks(plans, 0)
    state = processor.new_state()  # the per-generation state the processor keeps its step plans in
    split = processor.step_plans(plans, 0, state)
    for s, tokens in enumerate(plans[0]):
        kept = masks[(1, s)]
        groups = [g for g in split[0] if set(g.queries.tolist()) <= set(tokens.queries.tolist())]
        assert torch.equal(groups[0].queries, tokens.queries[kept])
        assert torch.equal(groups[0].ref_positions, tokens.ref_positions)  # every repositioned key
        if not kept.all():
            assert torch.equal(groups[1].queries, tokens.queries[~kept]) and groups[1].ref_positions.numel() == 0
    assert processor.step_plans(plans, 0, state) is split  # one split per step, shared by the layers


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_one_image_without_subjects_is_stock(family, pipe_for, stock_outputs):
    pipe = pipe_for(family)
    install(pipe, IsolationRepositionProcessor(SubjectLayout.from_boxes([{}])))
    try:
        out = pipe(**tiny_call_kwargs(family)).images
    finally:
        uninstall(pipe)
    assert torch.equal(out, stock_outputs(family))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_two_images_outside_the_steps_are_stock_and_inside_are_not(family, pipe_for):
    pipe = pipe_for(family)
    stock = run(pipe, family, batch_size=2)
    layout = SubjectLayout.from_boxes([{"dog": (0, 0, 0.5, 1)}, {"dog": (0.5, 0, 1, 1)}])
    outputs = {}
    for start_step in (1, 2):  # the tiny call runs steps 0 and 1
        install(pipe, IsolationRepositionProcessor(layout, start_step=start_step))
        try:
            outputs[start_step] = run(pipe, family, batch_size=2)
        finally:
            uninstall(pipe)
    assert torch.equal(outputs[2], stock)
    assert torch.equal(outputs[1][0], stock[0]) and not torch.equal(outputs[1][1], stock[1])


def test_bad_settings_are_value_errors():
    with pytest.raises(ValueError, match="interpolation='bicubic'"):
        IsolationRepositionProcessor(LAYOUT, interpolation="bicubic")
    with pytest.raises(ValueError, match="reference_dropout=1.0"):
        IsolationRepositionProcessor(LAYOUT, reference_dropout=1.0)
    with pytest.raises(ValueError, match=r"dropout_mode='target' is not one of \('queries', 'keys'\)"):
        IsolationRepositionProcessor(LAYOUT, dropout_mode="target")
    with pytest.raises(ValueError, match=r"end_step=2 is outside the allowed range: an integer >= 5 or None"):
        IsolationRepositionProcessor(LAYOUT, start_step=4, end_step=2)
    q = torch.zeros(3, 7, 1, 2)
    with pytest.raises(ValueError, match="batch of 3 rows does not split into groups of 2"):
        isolation_reposition_attention(q, q, q, q.clone(), [subject_tokens(LAYOUT, 1, 2, 3, 1, 7)])
