"""Methods compose: UltraViCo's score modification survives the sparse path."""

import torch

from diffusers_attn_ext import ComposedProcessor, RadialSparseProcessor, UltraViCoProcessor
from diffusers_attn_ext.context import CONTEXT_ATTR, AttnContext, TokenGrid
from diffusers_attn_ext.families.wan import wan_apply_rotary
from diffusers_attn_ext.masks import ExtrapolationWindow, radial_block_mask, ultravico_score_mod


@torch.no_grad()
def test_ultravico_with_radial_sparse_matches_float64_reference():
    from diffusers.models.transformers.transformer_wan import WanAttention

    torch.manual_seed(0)
    attn = WanAttention(dim=32, heads=2, dim_head=16).double()
    grid = TokenGrid(frames=8, height=4, width=4)
    context = AttnContext(family="wan", grid=grid, step_index=0)
    setattr(attn, CONTEXT_ATTR, context)
    n = grid.num_tokens
    hidden = torch.randn(1, n, 32, dtype=torch.float64)
    cos, sin = torch.randn(2, 1, n, 1, 16, dtype=torch.float64)
    ultravico = UltraViCoProcessor(alpha=0.8, train_frames=2, center_keys=False)
    radial = RadialSparseProcessor(block_size=16)
    attn.set_processor(ComposedProcessor(ultravico, radial))
    out = attn(hidden, None, None, (cos, sin))

    q = wan_apply_rotary(attn.norm_q(attn.to_q(hidden)).unflatten(2, (2, -1)), cos, sin).transpose(1, 2)
    k = wan_apply_rotary(attn.norm_k(attn.to_k(hidden)).unflatten(2, (2, -1)), cos, sin).transpose(1, 2)
    v = attn.to_v(hidden).unflatten(2, (2, -1)).transpose(1, 2)
    idx = torch.arange(n)
    window = ExtrapolationWindow(frame_tokens=16, train_frames=2, video_start=0, video_tokens=n)
    scores = ultravico_score_mod(window, 0.8)(q @ k.transpose(-1, -2) / 4.0, 0, 0, idx[:, None], idx[None, :])
    blocks = radial_block_mask(8, 16, block_size=16)
    keep = blocks.repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :n]
    assert not keep.all()  # the radial mask does drop blocks here
    probs = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    ref = attn.to_out[0]((probs @ v).transpose(1, 2).flatten(2))
    assert ((out - ref).norm() / ref.norm()).item() < 1e-6
