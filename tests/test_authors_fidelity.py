"""Fidelity to the authors' code (issue 14): float64 restatements of the authors' arithmetic, written here from
reading their code, against our processors at their default settings (relative error < 1e-10), and the
options that keep our earlier behaviour against those restatements.

1. UltraViCo: thu-ml/DiT-Extrapolation, branch ultra-wan, ``sageattn/attn_qk_int8_per_block.py`` (+ ``core.py``,
   ``modify_wan.py``).
2. SoftPAG on SD3 / SD3.5: cvlab-kaist/HeadHunter, the patched ``attention.py`` (``JointTransformerBlock``) and
   ``attention_processor.py`` (``JointAttnProcessor2_0``, ``skip_attention``).
3. DiTraj boxes: HaofeiDing/DiTraj, ``utils.plan_path`` and the box loop of ``run.py``.
4. IR-Diffusion dropout: hehuiguo/DreamStory, ``DreamStoryAttnProcessor._dropout_mask`` and
   ``DreamStoryScaledAttnProcessor.self_attention`` / ``mask_attention_multi_subj``.
"""

import math

import pytest
import torch

from diffusers_attn_ext.context import CONTEXT_ATTR, AttnContext, TokenGrid
from diffusers_attn_ext.processors.ultravico import UltraViCoProcessor


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------------------------
# 1. UltraViCo


def authors_wan_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``modify_wan.py``'s rotary: consecutive channel pairs as complex numbers times the complex frequencies
    (diffusers' Wan passes them as cos/sin repeated per pair). ``x`` is ``[B, H, N, D]``, cos/sin ``[1, N, 1, D]``."""
    freqs = torch.complex(cos[..., 0::2], sin[..., 1::2]).transpose(1, 2)  # [1, 1, N, D/2]
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * freqs).flatten(-2)


def authors_ultravico_attention(q, k, v, frame_tokens: int, train_frames: int, alpha: float,
                                first_frame_rule: bool = True) -> torch.Tensor:
    """The authors' kernel on ``[B, H, N, D]`` in float64 without the int8 quantisation:

    - ``core.sage_attention``: ``smooth_k`` subtracts the mean of K over the sequence;
    - ``per_block_int8`` folds ``sm_scale * log2(e)`` into the logits, which the kernel exponentiates with exp2;
    - ``_attn_fwd_inner``: ``dist_mask = |m - n| <= frame_tokens * 21 / 2`` (21 = trained latent frames); a logit
      that is neither near nor negative is multiplied by ``multi_factor``; then ``(m <= frame_tokens) & (n > 21 *
      frame_tokens)`` is set to -1e4 (``first_frame_rule``). No condition on the sequence length.
    """
    k = k - k.mean(dim=2, keepdim=True)
    logits = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 * math.log2(math.e))
    n = logits.shape[-1]
    m_idx, n_idx = torch.arange(n)[:, None], torch.arange(n)[None, :]
    near = (m_idx - n_idx).abs() <= frame_tokens * train_frames / 2
    logits = torch.where(near | (logits < 0), logits, logits * alpha)
    if first_frame_rule:
        logits = torch.where((m_idx <= frame_tokens) & (n_idx > train_frames * frame_tokens), -1e4, logits)
    p = torch.exp2(logits - logits.amax(-1, keepdim=True))
    return (p / p.sum(-1, keepdim=True)) @ v


def wan_self_attention(frames: int, seed: int = 0):
    """A float64 Wan self-attention on a ``frames x 2 x 3`` token grid, its inputs and the authors' processor
    (``modify_wan.WanAttnProcessor2_0`` around the kernel) as a function of the kernel."""
    from diffusers.models.transformers.transformer_wan import WanAttention

    torch.manual_seed(seed)
    attn = WanAttention(dim=32, heads=2, dim_head=16).double()
    grid = TokenGrid(frames=frames, height=2, width=3)
    setattr(attn, CONTEXT_ATTR, AttnContext(family="wan", grid=grid))
    hidden = torch.randn(1, grid.num_tokens, 32, dtype=torch.float64)
    angles = torch.randn(1, grid.num_tokens, 1, 8, dtype=torch.float64).repeat_interleave(2, -1)
    rotary = (angles.cos(), angles.sin())

    def authors(kernel):
        q, k, v = attn.to_q(hidden), attn.to_k(hidden), attn.to_v(hidden)
        q, k = attn.norm_q(q), attn.norm_k(k)
        q, k, v = (x.unflatten(2, (attn.heads, -1)).transpose(1, 2) for x in (q, k, v))
        q, k = authors_wan_rope(q, *rotary), authors_wan_rope(k, *rotary)
        out = kernel(q, k, v).transpose(1, 2).flatten(2, 3)
        return attn.to_out[0](out)

    return attn, hidden, rotary, grid, authors


@pytest.mark.parametrize("frames", [2, 3])
@torch.no_grad()
def test_ultravico_at_and_below_the_training_length_damps_as_the_authors_kernel(frames):
    """Trained on 3 latent frames, videos of 2 and 3: the authors' kernel still damps pairs over W/2 apart."""
    attn, hidden, rotary, grid, authors = wan_self_attention(frames)
    alpha = 0.5
    expected = authors(lambda q, k, v: authors_ultravico_attention(q, k, v, grid.tokens_per_frame, 3, alpha))
    attn.set_processor(UltraViCoProcessor(alpha=alpha, train_frames=3))
    assert rel_err(attn(hidden, None, None, rotary), expected) < 1e-10
    # The option that keeps the earlier behaviour: stock attention within the training length.
    attn.set_processor(UltraViCoProcessor(alpha=alpha, train_frames=3, stock_within_training=True))
    stock = authors(lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2) / 4, -1) @ v)
    option = attn(hidden, None, None, rotary)
    assert rel_err(option, stock) < 1e-10
    assert rel_err(option, expected) > 0.02  # measured 0.044 (2 frames) and 0.15 (3 frames), alpha 0.5


@torch.no_grad()
def test_ultravico_beyond_the_training_length_equals_the_authors_far_pair_rule():
    """6 latent frames, trained on 3, first-frame rule off (its token indices differ by one from the kernel's,
    a documented deviation): the far-pair rule equals the authors' arithmetic."""
    attn, hidden, rotary, grid, authors = wan_self_attention(6)
    expected = authors(lambda q, k, v: authors_ultravico_attention(q, k, v, grid.tokens_per_frame, 3, 0.9,
                                                                   first_frame_rule=False))
    attn.set_processor(UltraViCoProcessor(alpha=0.9, train_frames=3, restrict_first_frame=False))
    assert rel_err(attn(hidden, None, None, rotary), expected) < 1e-10
