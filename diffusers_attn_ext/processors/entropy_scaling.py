"""Attention entropy scaling for images at sizes other than the trained one.

Paper: "Training-free Diffusion Model Adaptation for Variable-Sized Text-to-Image Synthesis" (Jin et al.,
NeurIPS 2023), Sec. 3: attention entropy grows with the number of tokens N, so at a resolution other than
the trained one the logits are rescaled to keep it level:

    softmax(lambda * q k^T / sqrt(d)),   lambda = sqrt(log N / log n)

with N the keys of this self-attention and n those at the trained size. In joint attention N counts image
and text tokens, and n the trained image tokens plus the same text tokens, so lambda is 1 exactly at the
trained size. A pure logit scale: it runs on the dense kernel through SDPA's ``scale``.
"""

from __future__ import annotations

import math

from ..call import AttentionCall
from ..validation import integer
from .base import AttnExtProcessor


def entropy_scale(num_keys: int, trained_keys: int) -> float:
    """lambda = sqrt(log N / log n); 1 when N == n."""
    return math.sqrt(math.log(num_keys) / math.log(trained_keys))


class EntropyScalingProcessor(AttnExtProcessor):
    """Scale self-attention logits by sqrt(log N / log n) (Jin et al. 2023) in image models.

    Args:
        train_tokens: image tokens at the trained resolution; None takes the checkpoint's: what its config records
            (``_trained_image_tokens``, as the shipped world image model's 64), else its family's released
            checkpoints' (:meth:`~diffusers_attn_ext.families.base.FamilyAdapter.trained_image_tokens`).

    Not under diffusers' context parallelism: the scale needs the global key count, which a rank's shard does not
    show (refused rather than scaled by a rank's share).
    """

    media = ("image",)
    context_parallel = None
    kernel = ()

    def __init__(self, train_tokens: int | None = None):
        self.train_tokens = integer("train_tokens", train_tokens, 2, allow_none=True)

    def applies_to(self, call: AttentionCall) -> bool:
        return call.is_self_attention

    def trained_tokens(self, call: AttentionCall) -> int:
        """n of the formula's image part: ``train_tokens``, else the checkpoint's."""
        trained = self.train_tokens
        if trained is None:
            trained = call.adapter.trained_image_tokens(None if call.context is None else call.context.config)
        if trained is None:
            raise ValueError("train_tokens=None and the trained image tokens of this checkpoint are unknown: pass "
                             "EntropyScalingProcessor(train_tokens=...) (an integer >= 2)")
        return trained

    def edit_attention(self, call: AttentionCall) -> None:
        image_tokens = call.visual.stop - call.visual.start
        text_tokens = call.key.shape[1] - image_tokens
        scale = entropy_scale(call.key.shape[1], self.trained_tokens(call) + text_tokens)
        if scale != 1.0:
            call.scale_logits(scale)

    def __repr__(self) -> str:
        return f"EntropyScalingProcessor(train_tokens={self.train_tokens})"
