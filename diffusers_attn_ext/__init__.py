"""diffusers-attn-ext: training-free attention methods as diffusers attention processors.

Three ways in::

    pipe.transformer.set_attn_processor(StockAttnProcessor())    # the diffusers way
    install(pipe, StockAttnProcessor(), layers="blocks.(0|1)")    # composed, with layer selection
    uninstall(pipe)                                               # back to the stock processors
"""

from .context import AttnContext, TokenGrid, attach_context, detach_context, get_context, reset_context
from .headset import HeadSet
from .inspect import AttentionInspector, head_importance, inspect_pipeline
from .install import attention_modules, install, installed, select_modules, uninstall
from .masks import radial_block_mask
from .parallel import ParallelLayout, sequence_range, ulysses_head_owner, ulysses_head_range
from .processors import (
    AdaptiveSparseProcessor,
    AttnExtProcessor,
    ComposedProcessor,
    EntropyScalingProcessor,
    ForegroundBackgroundCrossAttnProcessor,
    IsolationRepositionProcessor,
    RadialSparseProcessor,
    RettentionProcessor,
    SoftPAGProcessor,
    STDRoPEProcessor,
    StockAttnProcessor,
    UltraViCoProcessor,
)
from .sparse import enable_sparse_attention
from .subjects import Box, SubjectLayout
from .trajectory import Trajectory

__version__ = "0.1.0"

__all__ = [
    "AdaptiveSparseProcessor",
    "AttentionInspector",
    "AttnContext",
    "AttnExtProcessor",
    "Box",
    "ComposedProcessor",
    "EntropyScalingProcessor",
    "ForegroundBackgroundCrossAttnProcessor",
    "HeadSet",
    "IsolationRepositionProcessor",
    "ParallelLayout",
    "RadialSparseProcessor",
    "RettentionProcessor",
    "STDRoPEProcessor",
    "SoftPAGProcessor",
    "StockAttnProcessor",
    "SubjectLayout",
    "TokenGrid",
    "Trajectory",
    "attach_context",
    "attention_modules",
    "detach_context",
    "enable_sparse_attention",
    "get_context",
    "head_importance",
    "inspect_pipeline",
    "install",
    "installed",
    "radial_block_mask",
    "reset_context",
    "select_modules",
    "sequence_range",
    "ulysses_head_owner",
    "ulysses_head_range",
    "uninstall",
    "UltraViCoProcessor",
]
