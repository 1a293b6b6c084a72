"""Attention processors: one file per method. Each says only what its method changes."""

from .adaptive_sparse import AdaptiveSparseProcessor
from .base import AttnExtProcessor, ComposedProcessor
from .entropy_scaling import EntropyScalingProcessor
from .fg_bg_guidance import ForegroundBackgroundCrossAttnProcessor
from .isolation_reposition import IsolationRepositionProcessor
from .radial_sparse import RadialSparseProcessor, SparseVideoProcessor
from .rettention import RettentionProcessor
from .softpag import SoftPAGProcessor
from .std_rope import STDRoPEProcessor
from .stock import StockAttnProcessor
from .ultravico import UltraViCoProcessor

__all__ = [
    "AdaptiveSparseProcessor",
    "AttnExtProcessor",
    "ComposedProcessor",
    "EntropyScalingProcessor",
    "ForegroundBackgroundCrossAttnProcessor",
    "IsolationRepositionProcessor",
    "RadialSparseProcessor",
    "RettentionProcessor",
    "STDRoPEProcessor",
    "SoftPAGProcessor",
    "SparseVideoProcessor",
    "StockAttnProcessor",
    "UltraViCoProcessor",
]
