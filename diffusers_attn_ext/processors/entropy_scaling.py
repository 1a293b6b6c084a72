"""Attention entropy scaling for images at sizes other than the trained one.

Paper: "Training-free Diffusion Model Adaptation for Variable-Sized Text-to-Image Synthesis" (Jin et al.,
NeurIPS 2023), Sec. 3: attention entropy grows with the number of tokens N, so at a resolution other than
the trained one the logits are rescaled to keep it level:

    softmax(lambda * q k^T / sqrt(d)),   lambda = sqrt(log N / log n)

with N the keys of this self-attention and n those at the trained size. In joint attention (SD3, FLUX)
N counts image and text tokens, and n the trained image tokens plus the same text tokens, so lambda is 1
exactly at the trained size. A pure logit scale: it runs on the dense kernel through SDPA's ``scale``.
"""

from __future__ import annotations

import math

from ..families.base import AttentionCall
from ..validation import integer
from .base import AttnExtProcessor

IMAGE_FAMILIES = ("sd3", "flux")
# Image tokens at the default 1024x1024 resolution of SD3 and FLUX.1 (64x64 latent tokens after patching).
TRAINED_IMAGE_TOKENS = {"sd3": 4096, "flux": 4096}


def entropy_scale(num_keys: int, trained_keys: int) -> float:
    """lambda = sqrt(log N / log n); 1 when N == n."""
    return math.sqrt(math.log(num_keys) / math.log(trained_keys))


class EntropyScalingProcessor(AttnExtProcessor):
    """Scale self-attention logits by sqrt(log N / log n) (Jin et al. 2023) for SD3 and FLUX.

    Args:
        train_tokens: image tokens at the trained resolution; None takes the family default (4096 for
            SD3 and FLUX.1 at 1024x1024).
    """

    families = IMAGE_FAMILIES

    def __init__(self, train_tokens: int | None = None):
        self.train_tokens = integer("train_tokens", train_tokens, 2, allow_none=True)

    def applies_to(self, call: AttentionCall) -> bool:
        self.check_family(call.family)
        return call.is_self_attention

    def edit_attention(self, call: AttentionCall) -> None:
        if call.parallel is not None:
            # The scale needs the global key count, which this rank's shard does not show; refuse rather than
            # silently scale by a rank's share.
            raise ValueError(
                "EntropyScalingProcessor does not support diffusers' context parallelism (parallel_config with "
                f"world size {call.parallel.world_size}); run it on one GPU"
            )
        image_tokens = call.visual.stop - call.visual.start
        text_tokens = call.key.shape[1] - image_tokens
        trained = self.train_tokens or TRAINED_IMAGE_TOKENS[call.family]
        scale = entropy_scale(call.key.shape[1], trained + text_tokens)
        if scale != 1.0:
            call.scale = scale / math.sqrt(call.head_dim) if call.scale is None else call.scale * scale

    def __repr__(self) -> str:
        return f"EntropyScalingProcessor(train_tokens={self.train_tokens})"
