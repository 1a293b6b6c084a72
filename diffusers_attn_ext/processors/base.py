"""The processor base: runs one attention call through a family adapter and the methods' stages.

Stages, in order, for each method of the processor (a single method, or several composed by
:class:`ComposedProcessor` / :func:`diffusers_attn_ext.install`):

1. ``edit_positions(call)``: change positions before RoPE is applied (e.g. DiTraj's STD-RoPE);
2. the adapter applies RoPE;
3. ``edit_attention(call)``: add score modifications, a block mask, a logit scale, or restrict the rows the kernel
   attends (the method then computes the others in ``edit_output``);
4. the kernel runs the call's request (dense when no method changed the scores);
5. ``edit_output(call, out)``: change the attention output (e.g. SoftPAG's blend toward identity).

A method applies only where ``applies_to(call)`` is true (by default: every call). What a method needs is declared
in class attributes, and checked here once, at install (:meth:`AttnExtProcessor.check_model`) and at every call
(:meth:`AttnExtProcessor.check_call`), against the facts of the family adapter; a method never names a family:

- ``media``: what the model generates, ``("image",)``, ``("video",)`` or both;
- ``needs_rotary``: rotary positions the adapter can re-index (the checkpoint must have them);
- ``needs_text_cross_attention``: separate cross-attention calls from visual queries to the text;
- ``context_parallel``: under diffusers' context parallelism the method acts on a rank's tokens as they are
  (``"local"``), computes on global token indices and may ask for the whole grid (``"global"``), or is refused (None);
- ``kernel``: the kernel requests it may make in ``edit_attention``: ``"score_mod"`` (score mods, with or without a
  fused rule), ``"block_sparse"`` (block masks), ``"rows"`` (it restricts or recomputes query rows with plain
  softmax attention, so no other method may change the scores of a call it acts on); a scale is always allowed.

Per-generation state: a method that keeps anything across the calls of a generation (masks, plans, statistics)
defines :meth:`AttnExtProcessor.new_state` and reads its one state object with ``call.context.state_of(self)``,
which the context clears at every new generation.
"""

from __future__ import annotations

from typing import Any

import torch

from ..call import BLOCK_SPARSE, ROWS, SCORE_MOD, AttentionCall
from ..context import get_context
from ..families import ADAPTERS, adapter_for, adapter_named
from ..families.base import MEDIA, FamilyAdapter
from ..kernels import attend

KERNEL_REQUESTS = (SCORE_MOD, BLOCK_SPARSE, ROWS)


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
    attention_mask, image_rotary_emb)``; the rotary embedding may come in the fifth position too.
    """

    # Set by diffusers' ``set_attention_backend`` / context parallelism, as on stock processors.
    _attention_backend = None
    _parallel_config = None
    # What the method needs (see the module docstring); the defaults need nothing and allow every request.
    media: tuple[str, ...] = MEDIA
    needs_rotary: bool = False
    needs_text_cross_attention: bool = False
    context_parallel: str | None = "local"
    kernel: tuple[str, ...] = KERNEL_REQUESTS

    # ----- what the method needs, against the family's facts

    @classmethod
    def runs_on(cls, adapter: FamilyAdapter) -> bool:
        """Whether the family of ``adapter`` has what this method needs (whatever the checkpoint)."""
        return (
            adapter.media in cls.media
            and (adapter.rotary or not cls.needs_rotary)
            and (adapter.text_cross_attention or not cls.needs_text_cross_attention)
        )

    @classmethod
    def needs_description(cls) -> str:
        """The families this method runs in, in words: "video families", "image families with rotary positions"."""
        what = " and ".join(f"{m}" for m in cls.media) if tuple(cls.media) != MEDIA else ""
        needs = [n for n, on in (("rotary positions", cls.needs_rotary),
                                 ("cross-attention to the text", cls.needs_text_cross_attention)) if on]
        return f"{what} families".strip() + (f" with {' and '.join(needs)}" if needs else "")

    def check_model(self, transformer: torch.nn.Module, family: str, modules: dict[str, torch.nn.Module]) -> None:
        """ValueError when this method cannot run on ``modules`` (name -> attention module) of ``transformer``
        of ``family``: :func:`~diffusers_attn_ext.install` calls it before it changes anything, so that a wrong
        family, layer or head is refused before any model work. Default: the family and the checkpoint have what
        the method needs (:meth:`check_family`). Methods with layers or heads extend it."""
        self.check_family(family, transformer.config)

    def check_family(self, family: str, config: Any = None) -> None:
        """ValueError unless ``family`` (and the checkpoint of ``config``, when given) has what this method needs."""
        adapter = adapter_named(family)
        name = type(self).__name__
        if not self.runs_on(adapter):
            supported = tuple(f for f, a in ADAPTERS.items() if self.runs_on(a))
            raise ValueError(f"{name} applies to {self.needs_description()} {supported}, not family={family!r}")
        missing = adapter.rotary_missing(config) if self.needs_rotary else None
        if missing is not None:
            raise ValueError(f"{name} needs rotary positions, but {missing}")

    def check_call(self, call: AttentionCall) -> None:
        """At every call, for a method that acts on it: rotary positions where needed, and context parallelism."""
        name = type(self).__name__
        if self.needs_rotary and call.rotary is None:
            why = call.adapter.rotary_missing(None if call.context is None else call.context.config)
            raise ValueError(
                f"{name} needs rotary positions, but module {call.module_name or type(call.module).__name__} gets no "
                f"rotary embedding{': ' + why if why else ''}"
            )
        if self.context_parallel is None and call.parallel is not None:
            layout = call.parallel
            raise ValueError(
                f"{name} does not support diffusers' context parallelism on {call.family} {call.kind} attention "
                f"(ring_degree={layout.ring_degree}, ulysses_degree={layout.ulysses_degree}, world size "
                f"{layout.world_size}); run it on one GPU"
            )

    # ----- the stages

    @property
    def methods(self) -> tuple[AttnExtProcessor, ...]:
        """The methods whose stages run, in order (a plain processor is its own single method)."""
        return (self,)

    def new_state(self) -> Any:
        """A fresh per-generation state object of this method (see the module docstring). Default: none."""
        raise NotImplementedError(f"{type(self).__name__} keeps no per-generation state")

    def applies_to(self, call: AttentionCall) -> bool:
        """Whether this method changes ``call`` (modules, kinds, steps it acts on). Default: always."""
        return True

    def edit_positions(self, call: AttentionCall) -> None:
        """Change ``call.rotary`` (positions) before RoPE is applied. Default: nothing."""

    def edit_attention(self, call: AttentionCall) -> None:
        """Make the call's kernel request: ``call.add_score_mod``, ``add_block_mask``, ``scale_logits``,
        ``attend_rows``, ``attend_keys``. Default: nothing."""

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
        config = None if context is None else context.config
        for method in self.methods:
            method.check_family(adapter.family, config)
        call = adapter.project(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, context)
        call.backend = self._attention_backend
        call.parallel_config = adapter.parallel_config(call, self._parallel_config)
        active = [method for method in self.methods if method.applies_to(call)]
        call.active_methods = tuple(active)
        for method in active:
            method.check_call(call)
        for method in active:
            method.edit_positions(call)
        adapter.apply_rotary(call)
        for method in active:
            _edit_attention(method, call)
        _check_rows(active, call)
        out = attend(call)
        for method in active:
            out = method.edit_output(call, out)
        return adapter.finish(attn, call, out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _edit_attention(method: AttnExtProcessor, call: AttentionCall) -> None:
    """``method.edit_attention(call)``, refused when it makes a kernel request its ``kernel`` does not declare."""
    before = (len(call.score_mods), call.block_mask, call.query_rows, call.key_span)
    method.edit_attention(call)
    made = set()
    if len(call.score_mods) != before[0]:
        made.add(SCORE_MOD)
    if call.block_mask is not before[1]:
        made.add(BLOCK_SPARSE)
    if call.query_rows is not before[2] or call.key_span is not before[3]:
        made.add(ROWS)
    undeclared = sorted(made.difference(method.kernel))
    if undeclared:
        raise ValueError(f"{type(method).__name__} made the kernel request {undeclared}, which its kernel="
                         f"{method.kernel} does not declare")


def _check_rows(active: list[AttnExtProcessor], call: AttentionCall) -> None:
    """A method whose only request is ``"rows"`` computes rows with plain softmax attention: refused when another
    method changed the scores of the call, or the model passed an attention mask."""
    for method in active:
        if tuple(method.kernel) == (ROWS,) and (call.score_mods or call.block_mask is not None
                                                 or call.attn_mask is not None):
            raise ValueError(
                f"{type(method).__name__} computes query rows with plain softmax attention; it does not compose with "
                "score modifications, block masks or an attention_mask on the same attention call"
            )


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


__all__ = ["KERNEL_REQUESTS", "AttnExtProcessor", "ComposedProcessor", "require"]
