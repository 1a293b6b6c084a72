"""Kernels: FlexAttention paths against float64 dense references."""

import pytest
import torch

from diffusers_attn_ext.kernels import dense_attention, flex_attention_bnhd, flex_block_mask
from diffusers_attn_ext.kernels.flex import compiled_tile_options, compose_score_mods


def reference_attention(q, k, v, bias=None, scale=None):
    """softmax(q k^T * scale + bias) v in float64 on [B, N, H, D]."""
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias.double()
    return (scores.softmax(-1) @ v).transpose(1, 2)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 200, 3, 16, generator=g, dtype=torch.float64) for _ in range(3)]


def test_dense_matches_reference(qkv):
    for via in ("dispatch", "sdpa"):
        assert rel_err(dense_attention(*qkv, via=via), reference_attention(*qkv)) < 1e-12


def test_flex_identity_score_mod_equals_dense(qkv):
    out = flex_attention_bnhd(*qkv, score_mod=lambda score, b, h, q, kv: score)
    assert rel_err(out, reference_attention(*qkv)) < 1e-6


def test_flex_all_ones_block_mask_equals_dense(qkv):
    n = qkv[0].shape[1]
    blocks = torch.ones(1, 1, 4, 4, dtype=torch.bool)  # 200 tokens in blocks of 64: last one partial
    out = flex_attention_bnhd(*qkv, block_mask=flex_block_mask(blocks, 64, n, n))
    assert rel_err(out, reference_attention(*qkv)) < 1e-6


def test_flex_block_mask_matches_explicit_bias(qkv):
    n, block = qkv[0].shape[1], 64
    g = torch.Generator().manual_seed(1)
    blocks = torch.rand(1, 3, 4, 4, generator=g) < 0.5
    blocks[..., torch.arange(4), torch.arange(4)] = True  # every query row keeps a block
    token_keep = blocks.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :n, :n]
    bias = torch.zeros(token_keep.shape, dtype=torch.float64).masked_fill(~token_keep, float("-inf"))
    out = flex_attention_bnhd(*qkv, block_mask=flex_block_mask(blocks, block, n, n))
    assert rel_err(out, reference_attention(*qkv, bias=bias)) < 1e-6


def test_score_mods_compose_in_order(qkv):
    add_one = lambda s, b, h, q, kv: s + 1.0  # noqa: E731
    double = lambda s, b, h, q, kv: s * 2.0  # noqa: E731
    composed = compose_score_mods([add_one, double])
    assert composed(torch.tensor(1.0), 0, 0, 0, 0).item() == 4.0
    assert compose_score_mods([]) is None


def test_block_table_shape_errors():
    with pytest.raises(ValueError, match="does not cover q_len=200"):
        flex_block_mask(torch.ones(1, 1, 3, 4, dtype=torch.bool), 64, 200, 200)
    with pytest.raises(ValueError, match="4-d bool tensor"):
        flex_block_mask(torch.ones(4, 4, dtype=torch.bool), 64, 200, 200)


@pytest.mark.parametrize(("block_size", "tiles"), [(128, None), (256, None), (64, 64), (32, 32), (48, 16), (16, 16), (80, 16)])
def test_compiled_flex_tiles_divide_the_block_mask_blocks(block_size, tiles):
    """Inductor's FlexAttention needs mask blocks that are multiples of its tiles: it refused the world model's
    32-token blocks on the H200 ("Q and KV block size must be divisible by BLOCK_M and BLOCK_N"). Blocks of a
    multiple of 128 keep the default tiles; smaller ones get tiles that divide them."""
    tokens = 4 * block_size
    mask = flex_block_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), block_size, tokens, tokens)
    options = compiled_tile_options(mask)
    if tiles is None:
        assert options is None
    else:
        assert options == {"BLOCK_M": tiles, "BLOCK_N": tiles}
        assert block_size % options["BLOCK_M"] == 0 and block_size % options["BLOCK_N"] == 0
    assert compiled_tile_options(None) is None


def test_compiled_flex_tiles_refuse_blocks_no_tile_divides():
    mask = flex_block_mask(torch.ones(1, 1, 4, 4, dtype=torch.bool), 24, 96, 96)
    with pytest.raises(ValueError, match=r"block_size=24: compiled FlexAttention on CUDA needs blocks of a multiple of 16"):
        compiled_tile_options(mask)
