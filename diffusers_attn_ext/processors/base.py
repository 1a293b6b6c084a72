"""The processor base: runs one attention call through a family adapter and the methods' stages.

Stages, in order, for each method of the processor (a single method, or several composed by
:class:`ComposedProcessor` / :func:`diffusers_attn_ext.install`):

1. ``edit_positions(call)``: change positions before RoPE is applied (e.g. DiTraj's STD-RoPE);
2. the adapter applies RoPE;
3. ``edit_attention(call)``: add score modifications, a block mask, or a logit scale;
4. the kernel runs (dense when no method changed the scores);
5. ``edit_output(call, out)``: change the attention output (e.g. SoftPAG's blend toward identity).

A method applies only where ``applies_to(call)`` is true (by default: every call).
"""

from __future__ import annotations

from typing import Any

import torch

from ..context import get_context
from ..families import adapter_for
from ..families.base import AttentionCall
from ..kernels import attend
from ..validation import family as check_family


def require(method: str, **arguments: Any) -> None:
    """ValueError naming ``method`` for each required argument that is missing (None). Required arguments default
    to None so that diffusers' rebuild of a processor as ``type(processor)()`` (its IP-Adapter loaders) fails
    with this message rather than a bare TypeError."""
    missing = [name for name, value in arguments.items() if value is None]
    if missing:
        raise ValueError(
            f"{method} needs {', '.join(missing)}: it was built without (diffusers' IP-Adapter loaders rebuild "
            "processors as type(processor)(), dropping their settings; call diffusers_attn_ext.uninstall(pipe) "
            "before loading or unloading an IP-Adapter, then install again)"
        )


class AttnExtProcessor:
    """Base class of every processor of this package; with no method stages it is the stock processor.

    Call signature is that of diffusers' processors: ``(attn, hidden_states, encoder_hidden_states,
    attention_mask, image_rotary_emb)``; Wan passes its rotary embedding in the fifth position too.
    """

    # Set by diffusers' ``set_attention_backend`` / context parallelism, as on stock processors.
    _attention_backend = None
    _parallel_config = None
    # Families the method runs in (None: every family), named so in messages ("video families").
    families: tuple[str, ...] | None = None
    families_description = "families"

    def check_model(self, transformer: torch.nn.Module, family: str, modules: dict[str, torch.nn.Module]) -> None:
        """ValueError when this method cannot run on ``modules`` (name -> attention module) of ``transformer``
        of ``family``: :func:`~diffusers_attn_ext.install` calls it before it changes anything, so that a wrong
        family, layer or head is refused before any model work. Default: the family is among :attr:`families`.
        Methods with layers or heads extend it."""
        self.check_family(family)

    def check_family(self, family: str) -> None:
        """ValueError unless ``family`` is among :attr:`families` (also checked at call time, for processors set
        with plain ``set_attn_processor``)."""
        check_family(type(self).__name__, family, self.families, self.families_description)

    @property
    def methods(self) -> tuple[AttnExtProcessor, ...]:
        """The methods whose stages run, in order (a plain processor is its own single method)."""
        return (self,)

    def applies_to(self, call: AttentionCall) -> bool:
        """Whether this method changes ``call`` (modules, kinds, steps it acts on). Default: always."""
        return True

    def edit_positions(self, call: AttentionCall) -> None:
        """Change ``call.rotary`` (positions) before RoPE is applied. Default: nothing."""

    def edit_attention(self, call: AttentionCall) -> None:
        """Add to ``call.score_mods`` / ``call.block_mask`` / ``call.scale``. Default: nothing."""

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        """Change the attention output ``[B, N, H, D]``. Default: unchanged."""
        return out

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
        **kwargs,
    ):
        context = get_context(attn)
        adapter = adapter_for(attn, context, encoder_hidden_states is not None)
        call = adapter.project(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, context)
        call.backend = self._attention_backend
        call.parallel_config = adapter.parallel_config(call, self._parallel_config)
        active = [method for method in self.methods if method.applies_to(call)]
        call.active_methods = tuple(active)
        for method in active:
            method.edit_positions(call)
        adapter.apply_rotary(call)
        for method in active:
            method.edit_attention(call)
        out = attend(call)
        for method in active:
            out = method.edit_output(call, out)
        return adapter.finish(attn, call, out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ComposedProcessor(AttnExtProcessor):
    """Several methods in one processor. Stages run method by method in the order given: positions of
    all, then scores of all (score mods apply in that order), then outputs of all."""

    def __init__(self, *methods: AttnExtProcessor):
        for method in methods:
            if not isinstance(method, AttnExtProcessor):
                raise ValueError(
                    f"ComposedProcessor takes diffusers_attn_ext processors, got {type(method).__name__!r}"
                )
        if not methods:
            require("ComposedProcessor", processors=None)
        flat = [m for method in methods for m in method.methods]
        self._methods = tuple(flat)

    @property
    def methods(self) -> tuple[AttnExtProcessor, ...]:
        return self._methods

    def __repr__(self) -> str:
        return f"ComposedProcessor({', '.join(map(repr, self._methods))})"
