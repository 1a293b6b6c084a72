"""IsolationRepositionProcessor: the mask table by hand, the kernel against a float64 reference with an
explicit -inf bias, RoPE of repositioned keys, and stock parity at the identity setting."""

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from diffusers_attn_ext import install, uninstall
from diffusers_attn_ext.processors.isolation_reposition import (
    IsolationRepositionProcessor,
    allowed_pairs,
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


def reference_float64(query, key, value, plans, table):
    """Explicit float64 attention of each target row over [own keys, repositioned keys] with a -inf bias."""
    out = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", query, key) * query.shape[-1] ** -0.5, -1)
    out = torch.einsum("bhqk,bkhd->bqhd", out, value)
    appended_k = torch.cat([(key[0][p.ref_sources] * p.ref_weights[..., None, None]).sum(1) for p in plans])
    appended_v = torch.cat([(value[0][p.ref_sources] * p.ref_weights[..., None, None]).sum(1) for p in plans])
    keys, values = torch.cat([key[1], appended_k]), torch.cat([value[1], appended_v])
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
    rotated = apply_rotary_emb(raw_key[None], rotary, sequence_dim=1)[0]
    for tokens in subject_tokens(LAYOUT, 1, 2, 3, visual_start=1, seq_len=7, mode=mode):
        ours, _ = repositioned_reference(rotated, raw_key, tokens, rotary)
        resampled = (raw_key[tokens.ref_sources] * tokens.ref_weights[..., None, None]).sum(1)
        at_new = tuple(r[tokens.ref_positions] for r in rotary)
        expected = apply_rotary_emb(resampled[None], at_new, sequence_dim=1)[0]
        torch.testing.assert_close(ours, expected.float().to(ours.dtype), rtol=1e-5, atol=1e-5)


def test_reference_dropout_keeps_at_least_one_key_and_is_reproducible():
    processor = IsolationRepositionProcessor(LAYOUT, reference_dropout=0.99, dropout_seed=3)
    plans = processor.plans(2, 3, 1, 7, "cpu")
    first, again = processor.keep_masks(plans, 5), processor.keep_masks(plans, 5)
    assert all(bool(mask.any()) for mask in first.values())
    assert all(torch.equal(first[k], again[k]) for k in first)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_one_image_without_subjects_is_stock(family, pipe_for, stock_outputs):
    pipe = pipe_for(family)
    install(pipe, IsolationRepositionProcessor(SubjectLayout.from_boxes([{}])))
    try:
        out = pipe(**tiny_call_kwargs(family)).images
    finally:
        uninstall(pipe)
    assert torch.equal(out, stock_outputs(family))


def test_bad_settings_are_value_errors():
    with pytest.raises(ValueError, match="interpolation='bicubic'"):
        IsolationRepositionProcessor(LAYOUT, interpolation="bicubic")
    with pytest.raises(ValueError, match="reference_dropout=1.0"):
        IsolationRepositionProcessor(LAYOUT, reference_dropout=1.0)
    with pytest.raises(ValueError, match="steps"):
        IsolationRepositionProcessor(LAYOUT, start_step=4, end_step=2)
    q = torch.zeros(3, 7, 1, 2)
    with pytest.raises(ValueError, match="batch of 3 rows does not split into groups of 2"):
        isolation_reposition_attention(q, q, q, q.clone(), [subject_tokens(LAYOUT, 1, 2, 3, 1, 7)])
