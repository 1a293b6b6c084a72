"""Attention processors: one file per method. Each says only what its method changes."""

from .base import AttnExtProcessor, ComposedProcessor
from .entropy_scaling import EntropyScalingProcessor
from .stock import StockAttnProcessor
from .ultravico import UltraViCoProcessor

__all__ = ["AttnExtProcessor", "ComposedProcessor", "EntropyScalingProcessor", "StockAttnProcessor", "UltraViCoProcessor"]
