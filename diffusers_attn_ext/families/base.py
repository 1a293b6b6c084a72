"""What a family adapter is: every fact of one model family, and how its stock processor runs attention.

A family adapter turns the arguments diffusers hands an attention processor into an
:class:`~diffusers_attn_ext.call.AttentionCall` (q, k, v projected and normalized, the RoPE still to apply, where
text and visual tokens sit), applies RoPE when asked, and turns the attention output back into what the family's
transformer block expects. It also holds the family's facts that methods need without naming the family: what it
generates (image or video), how one forward lays out its tokens, its rotary table layout and how a moved key is
rotated, the lengths its checkpoints were trained on, and what context parallelism passes to its kernel. Methods
edit the call between those steps; they never see family code, and adapters never see a method.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from ..call import SELF_ATTENTION_KINDS, AttentionCall
from ..context import AttnContext, TokenGrid

MEDIA = ("image", "video")

# What a checkpoint's config cannot say but the checkpoint may record: diffusers keeps private config keys (those
# starting with "_") through from_pretrained and save_pretrained without passing them to the model's __init__. Our
# shipped world models record the length and size they were trained at (their configs look like any Wan or FLUX
# checkpoint's, whose family defaults would be wrong for them).
RECORDED_LATENT_FRAMES = "_trained_latent_frames"
RECORDED_IMAGE_TOKENS = "_trained_image_tokens"


def recorded_training_fact(config: Any, key: str) -> int | None:
    """The positive integer ``config[key]`` a checkpoint records, None where it records none; ValueError naming
    the key and the value for anything else."""
    value = None if config is None else config.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"the transformer config's {key}={value!r} must be a positive integer (the checkpoint's "
                         "training length or size)")
    return value


class KeyRotation(Protocol):
    """How a family's RoPE moves an already rotated key from its source position ``n`` to a target ``m``:
    ``R(m) k = R(m - n) R(n) k`` (a rotation per frequency pair)."""

    def deltas(self, targets: torch.Tensor, sources: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The rotations ``R(m - n)`` for target sequence positions ``targets [M]`` and source taps ``sources [M, k]``,
        ``[M, k, ...]`` each, in the accumulation dtype of ``key`` (float32; float64 for float64 keys)."""

    def rotate_(self, x: torch.Tensor, deltas: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Rotate ``x [P, H, D]`` (accumulation dtype, owned by the caller) in place by ``deltas`` flattened to ``[P, ...]``."""


class FamilyAdapter:
    """How one model family runs attention, and its facts. Subclasses replicate their stock processor step for step.

    Class attributes (the family's facts that do not depend on a checkpoint):
        family: the name in the registry and in messages.
        media: ``"image"`` or ``"video"``.
        transformer_classes: class names of the family's transformers (a transformer's class tells its family).
        attention_classes: class names of attention modules that belong to this family alone.
        rotary: whether the family's self-attention takes rotary positions (a checkpoint may still have none:
            :meth:`rotary_missing`).
        text_cross_attention: whether visual queries attend the text in separate cross-attention calls.
    """

    family: str = ""
    media: str = "image"
    transformer_classes: tuple[str, ...] = ()
    attention_classes: tuple[str, ...] = ()
    rotary: bool = False
    text_cross_attention: bool = False

    # ----- facts of a checkpoint (``config``: the transformer's config, or None when unknown)

    def rotary_missing(self, config: Any) -> str | None:
        """Why a checkpoint of this family has no rotary positions (None: it has them)."""
        return None if self.rotary else f"{self.family} models have no rotary positions"

    def trained_latent_frames(self, config: Any) -> int | None:
        """Latent frames (after temporal patching) the checkpoint was trained on; None if unknown or an image model:
        what the config records (:data:`RECORDED_LATENT_FRAMES`), else the family's checkpoint lines
        (:meth:`checkpoint_latent_frames`)."""
        recorded = recorded_training_fact(config, RECORDED_LATENT_FRAMES)
        return recorded if recorded is not None else self.checkpoint_latent_frames(config)

    def trained_image_tokens(self, config: Any) -> int | None:
        """Image tokens at the checkpoint's trained resolution; None if unknown or a video model: what the config
        records (:data:`RECORDED_IMAGE_TOKENS`), else the family's checkpoints' (:meth:`checkpoint_image_tokens`)."""
        recorded = recorded_training_fact(config, RECORDED_IMAGE_TOKENS)
        return recorded if recorded is not None else self.checkpoint_image_tokens(config)

    def checkpoint_latent_frames(self, config: Any) -> int | None:
        """The family's released checkpoints' latent frames for ``config``; None if unknown or an image family."""
        return None

    def checkpoint_image_tokens(self, config: Any) -> int | None:
        """The family's released checkpoints' image tokens at their trained resolution; None if unknown or video."""
        return None

    def forward_layout(self, module: torch.nn.Module, inputs: dict[str, Any],
                       context: AttnContext) -> tuple[TokenGrid | None, int]:
        """The visual token grid (None if the inputs do not tell it) and the text length of one transformer forward,
        from the forward's arguments by name. Reads shapes only (it runs inside a compiled region too)."""
        raise NotImplementedError

    # ----- the rotary table

    def gather_rotary(self, rotary: Any, index: torch.Tensor) -> Any:
        """The rotary embedding in which visual token ``n`` takes the table row of visual token ``index[n]``: the stock
        RoPE evaluated at moved positions (``index`` int64 on the table's device)."""
        raise ValueError(f"{self.family} attention has no rotary table to re-index")

    def key_rotation(self, rotary: Any) -> KeyRotation | None:
        """How to move already rotated keys of this call to other positions (None when the call has no RoPE)."""
        if rotary is None:
            return None
        raise ValueError(f"{self.family} attention does not say how its rotary positions move a key")

    # ----- one attention call

    def project(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        rotary: Any,
        context: AttnContext | None,
    ) -> AttentionCall:
        """Project and normalize q, k, v; describe the token layout. RoPE is not applied yet."""
        raise NotImplementedError

    def apply_rotary(self, call: AttentionCall) -> None:
        """Apply ``call.rotary`` to ``call.query`` and ``call.key`` in the family's way (no-op without)."""

    def parallel_config(self, call: AttentionCall, processor_config: Any) -> Any:
        """The context-parallel config the stock processor passes to its kernel for this call."""
        return processor_config

    def finish(self, attn: torch.nn.Module, call: AttentionCall, out: torch.Tensor):
        """Turn the attention output ``[B, N, H, D]`` into what the family's block expects."""
        raise NotImplementedError


__all__ = ["MEDIA", "SELF_ATTENTION_KINDS", "AttentionCall", "FamilyAdapter", "KeyRotation"]
