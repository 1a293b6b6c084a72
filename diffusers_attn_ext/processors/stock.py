"""The processor with no method: output equal to diffusers' stock processors."""

from __future__ import annotations

from .base import AttnExtProcessor


class StockAttnProcessor(AttnExtProcessor):
    """No method: projects, applies RoPE and attends exactly as the stock processor of each family does.

    Installed everywhere, a pipeline's output equals the stock run bit for bit on the same kernel. It is
    the base to compare methods against, and what a method processor is at its identity setting.
    """

    kernel = ()  # no request: the stock processor's dense kernel
