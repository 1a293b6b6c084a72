"""Attention processors: one file per method. Each says only what its method changes."""

from .adaptive_sparse import AdaptiveSparseProcessor
from .base import AttnExtProcessor, ComposedProcessor
from .entropy_scaling import EntropyScalingProcessor
from .radial_sparse import RadialSparseProcessor, SparseVideoProcessor
from .softpag import SoftPAGProcessor
from .stock import StockAttnProcessor
from .ultravico import UltraViCoProcessor

__all__ = [
    "AdaptiveSparseProcessor",
    "AttnExtProcessor",
    "ComposedProcessor",
    "EntropyScalingProcessor",
    "RadialSparseProcessor",
    "SoftPAGProcessor",
    "SparseVideoProcessor",
    "StockAttnProcessor",
    "UltraViCoProcessor",
]
