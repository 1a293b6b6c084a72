"""Attention processors: one file per method. Each says only what its method changes."""

from .base import AttnExtProcessor, ComposedProcessor
from .entropy_scaling import EntropyScalingProcessor
from .softpag import SoftPAGProcessor
from .stock import StockAttnProcessor
from .ultravico import UltraViCoProcessor

__all__ = ["AttnExtProcessor", "ComposedProcessor", "EntropyScalingProcessor", "SoftPAGProcessor", "StockAttnProcessor", "UltraViCoProcessor"]
