"""Attention entropy scaling: identity at the trained size, reference parity, bad input."""

import math

import pytest
import torch
from conftest import run

from diffusers_attn_ext import install
from diffusers_attn_ext.processors.entropy_scaling import EntropyScalingProcessor, entropy_scale

# Tiny SD3/FLUX pipelines at 32x32 have 8x8 = 64 image tokens.
TINY_IMAGE_TOKENS = 64


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_trained_size_equals_stock(family, pipe_for, stock_outputs):
    pipe = pipe_for(family)
    install(pipe, EntropyScalingProcessor(train_tokens=TINY_IMAGE_TOKENS))
    assert torch.equal(run(pipe, family), stock_outputs(family))


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_other_size_changes_output(family, pipe_for, stock_outputs):
    pipe = pipe_for(family)
    install(pipe, EntropyScalingProcessor(train_tokens=16))
    out = run(pipe, family)
    assert torch.isfinite(out).all() and not torch.equal(out, stock_outputs(family))


@torch.no_grad()
def test_matches_float64_reference_in_sd3_joint_attention():
    from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

    from diffusers_attn_ext.context import CONTEXT_ATTR, AttnContext

    torch.manual_seed(0)
    attn = Attention(query_dim=32, heads=2, dim_head=16, added_kv_proj_dim=32, context_pre_only=False,
                     out_dim=32, bias=True, processor=JointAttnProcessor2_0()).double()
    setattr(attn, CONTEXT_ATTR, AttnContext(family="sd3"))
    image, text = torch.randn(1, 36, 32, dtype=torch.float64), torch.randn(1, 5, 32, dtype=torch.float64)
    attn.set_processor(EntropyScalingProcessor(train_tokens=16))
    out, _ = attn(image, text)

    q = torch.cat([attn.to_q(image), attn.add_q_proj(text)], 1).unflatten(2, (2, 16)).transpose(1, 2)
    k = torch.cat([attn.to_k(image), attn.add_k_proj(text)], 1).unflatten(2, (2, 16)).transpose(1, 2)
    v = torch.cat([attn.to_v(image), attn.add_v_proj(text)], 1).unflatten(2, (2, 16)).transpose(1, 2)
    lam = math.sqrt(math.log(36 + 5) / math.log(16 + 5))
    ref = ((lam * q @ k.transpose(-1, -2) / 4.0).softmax(-1) @ v).transpose(1, 2).flatten(2)
    ref = attn.to_out[0](ref[:, :36])
    assert ((out - ref).norm() / ref.norm()).item() < 1e-10


def test_scale_formula_and_bad_input():
    assert entropy_scale(4096, 4096) == 1.0
    assert entropy_scale(16384, 4096) == pytest.approx(math.sqrt(math.log(16384) / math.log(4096)))
    with pytest.raises(ValueError, match="train_tokens=1 is outside the allowed range: an integer >= 2"):
        EntropyScalingProcessor(train_tokens=1)
