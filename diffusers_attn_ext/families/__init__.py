"""Family adapters: how SD3, FLUX, CogVideoX and Wan run attention. :func:`adapter_for` picks one."""

from __future__ import annotations

import torch

from ..context import AttnContext
from .base import SELF_ATTENTION_KINDS, AttentionCall, FamilyAdapter
from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .sd3 import SD3Adapter
from .wan import WanAdapter

ADAPTERS: dict[str, FamilyAdapter] = {
    adapter.family: adapter for adapter in (SD3Adapter(), FluxAdapter(), CogVideoXAdapter(), WanAdapter())
}
# Attention module class -> family, where the class alone tells it.
MODULE_FAMILIES = {"FluxAttention": "flux", "WanAttention": "wan"}
# diffusers' generic ``Attention`` serves SD3 and CogVideoX alike: the transformer (through the context)
# tells them apart; without a context its structure does (SD3 joint blocks have added projections).
GENERIC_ATTENTION = "Attention"


def adapter_for(attn: torch.nn.Module, context: AttnContext | None, has_encoder_states: bool) -> FamilyAdapter:
    """The adapter for an attention module, chosen from its class (and the context for ``Attention``)."""
    name = type(attn).__name__
    if name in MODULE_FAMILIES:
        return ADAPTERS[MODULE_FAMILIES[name]]
    if name == GENERIC_ATTENTION:
        if context is not None and context.family in ("sd3", "cogvideox"):
            return ADAPTERS[context.family]
        if getattr(attn, "add_q_proj", None) is not None or not has_encoder_states:
            return ADAPTERS["sd3"]
        return ADAPTERS["cogvideox"]
    raise ValueError(
        f"attention module of type {name!r} is not supported; supported: {sorted(MODULE_FAMILIES)} and "
        f"{GENERIC_ATTENTION!r} (SD3, CogVideoX)"
    )


__all__ = ["ADAPTERS", "SELF_ATTENTION_KINDS", "AttentionCall", "FamilyAdapter", "adapter_for"]
