"""diffusers-attn-ext: training-free attention methods as diffusers attention processors.

Three ways in::

    pipe.transformer.set_attn_processor(StockAttnProcessor())    # the diffusers way
    install(pipe, StockAttnProcessor(), layers="blocks.(0|1)")    # composed, with layer selection
    uninstall(pipe)                                               # back to the stock processors
"""

from .context import AttnContext, TokenGrid, attach_context, detach_context, get_context, reset_context
from .headset import HeadSet
from .install import attention_modules, install, select_modules, uninstall
from .processors import (
    AttnExtProcessor,
    ComposedProcessor,
    EntropyScalingProcessor,
    SoftPAGProcessor,
    StockAttnProcessor,
    UltraViCoProcessor,
)

__version__ = "0.1.0"

__all__ = [
    "AttnContext",
    "AttnExtProcessor",
    "ComposedProcessor",
    "EntropyScalingProcessor",
    "HeadSet",
    "SoftPAGProcessor",
    "StockAttnProcessor",
    "TokenGrid",
    "attach_context",
    "attention_modules",
    "detach_context",
    "get_context",
    "install",
    "reset_context",
    "select_modules",
    "uninstall",
    "UltraViCoProcessor",
]
