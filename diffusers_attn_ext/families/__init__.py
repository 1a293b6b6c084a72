"""Family adapters, one file per family, and the registry that picks one: from a transformer's class
(:func:`adapter_for_transformer`), an attention module's class (:func:`adapter_for`) or a family name
(:func:`adapter_named`). Adding a family is one adapter file and one line in :data:`ADAPTERS`."""

from __future__ import annotations

import torch

from ..context import AttnContext
from .base import SELF_ATTENTION_KINDS, AttentionCall, FamilyAdapter, KeyRotation
from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .sd3 import SD3Adapter
from .wan import WanAdapter

# Registration order is the order messages list families in (video families, then image families).
ADAPTERS: dict[str, FamilyAdapter] = {
    adapter.family: adapter for adapter in (WanAdapter(), CogVideoXAdapter(), SD3Adapter(), FluxAdapter())
}
# Attention module class -> family, where the class alone tells it.
MODULE_FAMILIES = {name: family for family, adapter in ADAPTERS.items() for name in adapter.attention_classes}
# Transformer class -> family.
TRANSFORMER_FAMILIES = {name: family for family, adapter in ADAPTERS.items() for name in adapter.transformer_classes}
# diffusers' generic ``Attention`` serves SD3 and CogVideoX alike: the transformer (through the context)
# tells them apart; without a context its structure does (SD3 joint blocks have added projections).
GENERIC_ATTENTION = "Attention"
GENERIC_FAMILIES = ("sd3", "cogvideox")


def adapter_named(family: str) -> FamilyAdapter:
    """The adapter of ``family``; ValueError for an unknown name."""
    if family not in ADAPTERS:
        raise ValueError(f"family={family!r} is not one of {tuple(ADAPTERS)}")
    return ADAPTERS[family]


def adapter_for_transformer(transformer: torch.nn.Module) -> FamilyAdapter:
    """The adapter of a transformer, from its class; ValueError for an unsupported class."""
    name = type(transformer).__name__
    if name not in TRANSFORMER_FAMILIES:
        raise ValueError(
            f"transformer class {name!r} is not supported; supported classes: {sorted(TRANSFORMER_FAMILIES)}"
        )
    return ADAPTERS[TRANSFORMER_FAMILIES[name]]


def adapter_for(attn: torch.nn.Module, context: AttnContext | None, has_encoder_states: bool) -> FamilyAdapter:
    """The adapter for an attention module, chosen from its class (and the context for ``Attention``)."""
    name = type(attn).__name__
    if name in MODULE_FAMILIES:
        return ADAPTERS[MODULE_FAMILIES[name]]
    if name == GENERIC_ATTENTION:
        if context is not None and context.family in GENERIC_FAMILIES:
            return ADAPTERS[context.family]
        if getattr(attn, "add_q_proj", None) is not None or not has_encoder_states:
            return ADAPTERS["sd3"]
        return ADAPTERS["cogvideox"]
    raise ValueError(
        f"attention module of type {name!r} is not supported; supported: {sorted(MODULE_FAMILIES)} and "
        f"{GENERIC_ATTENTION!r} (SD3, CogVideoX)"
    )


__all__ = [
    "ADAPTERS", "SELF_ATTENTION_KINDS", "AttentionCall", "FamilyAdapter", "KeyRotation", "adapter_for",
    "adapter_for_transformer", "adapter_named",
]
