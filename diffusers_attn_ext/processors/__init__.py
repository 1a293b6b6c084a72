"""Attention processors: one file per method. Each says only what its method changes."""

from .base import AttnExtProcessor, ComposedProcessor
from .stock import StockAttnProcessor

__all__ = ["AttnExtProcessor", "ComposedProcessor", "StockAttnProcessor"]
