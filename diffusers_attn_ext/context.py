"""Per-forward facts that attention methods read: token layout, denoising step, batch branches.

A :class:`ContextHook` (a ``diffusers.hooks`` ``ModelHook``) sits on the transformer. Before each forward it
reads the transformer's inputs and fills one :class:`AttnContext` object; every attention module of that
transformer holds a reference to the same object, so a processor reaches it from the ``attn`` module it is
called with. Nothing lives in globals.

Per-generation state: each method keeps one state object per generation (:meth:`AttnContext.state_of`), all of
them in ``AttnContext.state``, which one function clears: :meth:`AttnContext.new_generation`. It runs when a
generation ends or the next begins, whichever the hook sees first: diffusers pipelines call
``maybe_free_model_hooks()`` at the end of ``__call__``, which resets every stateful hook, ours included (for
transformers with diffusers' ``CacheMixin``); and the per-forward bookkeeping (:meth:`ContextHook.begin_forward`)
sees a new ``scheduler.timesteps`` tensor when the hook knows the pipeline (``set_timesteps`` runs once at the start
of every pipeline call), so transformers without ``CacheMixin`` reset at the start of each call; by hand,
:func:`reset_context`.

What the context knows of a model comes from its family adapter (``diffusers_attn_ext.families``): the family name
and how a forward lays out its tokens (:meth:`~diffusers_attn_ext.families.base.FamilyAdapter.forward_layout`).

Compile-clean (see DESIGN.md): the Python bookkeeping (new generation, branch, step index, reading the timestep)
runs outside any compiled region. Step schedules ask :meth:`AttnContext.in_steps`, which reads one boolean per
schedule boundary that this bookkeeping keeps, so a compiled region guards on the schedule's phase, not the step;
``dense_layers`` asks :meth:`~diffusers_attn_ext.call.AttentionCall.in_first_blocks`, one boolean per threshold kept
on each attention module. Pipelines enter ``transformer.cache_context(name)`` around each forward, outside
``torch.compile`` (also of a whole ``OptimizedModule``): the hook's listener does the bookkeeping there. Inside the
forward, which a whole-transformer ``torch.compile`` traces, the hook reads shapes only (token grid, text length,
batch size), so one graph serves every step and branch. Transformers whose pipeline gives no cache context (SD3)
do the bookkeeping in the hook when it runs eagerly (regional compile, or no compile); inside a compiled whole
transformer without a cache context the step index is unknown and :attr:`AttnContext.step_index` raises for the
methods that ask for it.
"""

from __future__ import annotations

import inspect
import re
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager

CONTEXT_HOOK_NAME = "diffusers_attn_ext.context"
CONTEXT_ATTR = "_attn_ext_context"
MODULE_NAME_ATTR = "_attn_ext_module_name"
# k -> (the module's transformer block index < k) for k < BLOCK_FLAGS, set on each named attention module
BLOCK_FLAGS_ATTR = "_attn_ext_before_block"
BLOCK_FLAGS = 256
_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)\.")

BRANCHES = ("uncond", "cond", "perturbed")
# Step thresholds whose answer (step < k) the context keeps as a bool for compiled regions (:meth:`AttnContext.in_steps`);
# a schedule boundary at or past it is compared with the step itself.
STEP_FLAGS = 1024


@dataclass(frozen=True)
class TokenGrid:
    """Latent token grid after patching: ``frames x height x width`` visual tokens, frame-major order."""

    frames: int
    height: int
    width: int

    @property
    def tokens_per_frame(self) -> int:
        return self.height * self.width

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width


@dataclass
class AttnContext:
    """What one transformer forward looks like, as attention methods need to know it.

    Attributes:
        family: the name of the transformer's family adapter.
        grid: visual token grid after patching (images have ``frames == 1``).
        text_len: number of text tokens in the joint sequence (0 for a family whose text enters through
            cross-attention only).
        text_first: whether text tokens precede visual tokens in the joint sequence.
        batch_size: rows in this forward.
        branch: the diffusers cache-context name of this forward ("cond", "uncond", "cond_uncond"...)
            when the pipeline gives one.
        step_index: denoising step of this forward, counted from 0 within a generation.
        timestep: the timestep tensor given to the transformer.
        num_steps: steps of this generation when the pipeline tells it, else None.
        generation: counts generations.
        state: the per-generation state of every method (:meth:`state_of`), cleared at each generation.
        branch_labels: how the batch splits into guidance branches, when a pipeline declares it.
        config: the transformer's config (model facts such as its training length derive from it).
        grid_of_tokens: token count -> grid seen eagerly, for families whose grid a compiled forward cannot read.
    """

    family: str
    grid: TokenGrid | None = None
    text_len: int = 0
    text_first: bool = False
    batch_size: int = 0
    branch: str | None = None
    step_index: int | None = -1  # a property over ``_step_index`` (set below the class), an init argument here
    timestep: torch.Tensor | None = None
    num_steps: int | None = None
    generation: int = 0
    state: dict[Any, Any] = field(default_factory=dict)
    branch_labels: tuple[str, ...] | None = None
    config: Any = None
    _last_timestep: float | None = None
    _fresh: bool = True
    _stepped: bool = False  # the cache-context listener already advanced the step for the coming forward
    grid_of_tokens: dict = field(default_factory=dict)
    # k -> (step < k) for k < STEP_FLAGS, kept in step with ``_step_index`` (eagerly, by the step's setter)
    _before: dict = field(default_factory=lambda: dict.fromkeys(range(STEP_FLAGS), True), repr=False, compare=False)
    _flagged_step: int = field(default=-1, repr=False, compare=False)
    _step_unknown: bool = field(default=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._flagged_step = -1
        self.step_index = self._step_index  # the flags of the step given at construction

    def in_steps(self, start: int, stop: int | None) -> bool:
        """Whether this forward's step is in ``start <= step < stop`` (``stop`` None: no end): the question every
        step schedule asks. Compile-clean: it reads booleans that the eager bookkeeping keeps per threshold, never the
        step index itself, so a compiled region guards on the schedule's phase (one graph per phase, none per step)
        rather than on the step. ValueError where the step is unknown (see :attr:`step_index`)."""
        if start == 0 and stop is None:  # every step: nothing to know
            return True
        if self._step_unknown:
            return self.step_index is None  # raises
        if start >= STEP_FLAGS or (stop is not None and stop >= STEP_FLAGS):
            step = self.step_index
            return start <= step and (stop is None or step < stop)
        return not self._before[start] and (stop is None or self._before[stop])

    def set_branch_labels(self, labels: tuple[str, ...] | None) -> None:
        """Declare how the batch splits into guidance branches, in equal chunks: e.g.
        ``("uncond", "cond", "perturbed")`` for a PAG batch. ``None`` returns to inference from the
        cache context (a whole forward is "cond" or "uncond") or, failing that, all rows "cond"."""
        if labels is not None:
            unknown = [label for label in labels if label not in BRANCHES]
            if unknown:
                raise ValueError(f"branch labels {unknown} are not among the allowed {BRANCHES}")
        self.branch_labels = tuple(labels) if labels is not None else None

    def rows(self, branch: str) -> list[int]:
        """Batch rows of this forward that belong to ``branch`` ("uncond", "cond" or "perturbed")."""
        if branch not in BRANCHES:
            raise ValueError(f"branch={branch!r} is not one of {BRANCHES}")
        labels = self.branch_labels
        if labels is None:
            if branch == "perturbed":  # without labels there is no perturbed row (and no read of the branch name)
                return []
            whole = "uncond" if self.branch == "uncond" else "cond"
            return list(range(self.batch_size)) if branch == whole else []
        if self.batch_size % len(labels):
            raise ValueError(
                f"batch_size={self.batch_size} does not split into the {len(labels)} branches {labels}"
            )
        chunk = self.batch_size // len(labels)
        return [i * chunk + r for i, label in enumerate(labels) if label == branch for r in range(chunk)]

    def state_of(self, method: Any) -> Any:
        """``method``'s state object of this generation: ``method.new_state()`` at the first ask of a generation,
        the same object until :meth:`new_generation` clears them all. Eager bookkeeping: a method fills it outside
        a compiled region (or only with what a compiled region may keep)."""
        state = self.state.get(method)
        if state is None:
            state = self.state[method] = method.new_state()
        return state

    def new_generation(self) -> None:
        """Forget everything that belongs to the generation that just ended (once: a second call before
        the next forward changes nothing)."""
        if self._fresh:
            return
        self._fresh = True
        self.generation += 1
        self.state.clear()
        self.step_index = -1
        self.num_steps = None
        self.branch = None
        self._last_timestep = None
        self._stepped = False

    def advance(self, timestep: Any, step_index: int | None, num_steps: int | None) -> None:
        """Record the timestep of a new forward (eagerly: never inside a compiled region). The step index comes
        from the pipeline's cache context when it gives one, else it advances whenever the timestep changes (so
        separate cond and uncond forwards of one step share a step index)."""
        self._fresh = False
        if num_steps is not None:
            self.num_steps = num_steps
        if step_index is not None:
            self.step_index = step_index
            return
        value = None if timestep is None else float(torch.as_tensor(timestep).flatten()[0])
        if self._step_index is None or self._step_index < 0 or value != self._last_timestep:
            self.step_index = 0 if self._step_index is None else self._step_index + 1
        self._last_timestep = value


def _get_step_index(self) -> int:
    """Denoising step of this forward, from 0 within a generation (-1 before the first forward)."""
    if self._step_index is None:
        raise ValueError(
            f"the denoising step is unknown inside a torch.compile'd whole {self.family} transformer: its "
            "pipeline gives no cache context, and the step cannot be read from the timestep inside the compiled "
            "region; compile the transformer blocks instead (e.g. `for block in transformer.transformer_blocks: "
            "block.compile(fullgraph=True)`), or use a method that does not depend on the step"
        )
    return self._step_index


def _set_step_index(self, value: int | None) -> None:
    self._step_index = value
    self._step_unknown = value is None
    # eagerly (the hook's bookkeeping): flip the flags between the old and the new step
    if "_before" in self.__dict__ and value is not None and value != self._flagged_step:
        low, high = sorted((self._flagged_step, value))
        for k in range(max(low + 1, 0), min(high + 1, STEP_FLAGS)):
            self._before[k] = value < k
        self._flagged_step = value


# The dataclass takes ``step_index`` as an init argument; reading it raises where the step is unknown.
AttnContext.step_index = property(_get_step_index, _set_step_index)


class _CacheContextListener(StateManager):
    """Receives the ``CacheContext`` that pipelines set with ``transformer.cache_context(name, ...)``, outside any
    compiled region, and has the hook do its per-forward bookkeeping there."""

    def __init__(self, on_context=None):
        super().__init__(state_cls=None)
        self._on_context = on_context

    def set_context(self, context) -> None:
        super().set_context(context)
        if context is not None and self._on_context is not None:
            self._on_context(context)


def _forward_kwargs(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The forward's arguments by name (pipelines pass keywords; positional ones are named here)."""
    if not args:
        return kwargs
    bound = inspect.signature(type(module).forward).bind_partial(module, *args, **kwargs)
    return dict(bound.arguments)


class ContextHook(ModelHook):
    """Fills the transformer's :class:`AttnContext` before each forward; resets it after each generation."""

    _is_stateful = True

    def __init__(self, context: AttnContext, forward_layout, pipeline: Any = None):
        super().__init__()
        self.context = context
        self.forward_layout = forward_layout  # the family adapter's: (module, inputs, context) -> (grid, text length)
        self.cache_context = _CacheContextListener(self._on_cache_context)
        self._pipeline = weakref.ref(pipeline) if pipeline is not None else None
        self._seen_timesteps = None

    def begin_forward(self, branch: str | None, timestep: Any, step_index: int | None, num_steps: int | None,
                      count: bool = True) -> None:
        """The per-forward bookkeeping, eagerly (never inside a compiled region), in one place for both callers (the
        cache-context listener, else the hook before the forward): a new generation when the pipeline started a new
        call, the forward's branch, and with ``count`` its step (:meth:`AttnContext.advance`)."""
        ctx = self.context
        if self._pipeline_started_new_call():
            ctx.new_generation()
        ctx.branch = branch
        if not count:
            return
        pipeline = self._pipeline() if self._pipeline is not None else None
        if num_steps is None and pipeline is not None:
            num_steps = getattr(pipeline, "_num_timesteps", None)
        ctx.advance(timestep, step_index, num_steps)

    def _on_cache_context(self, cache) -> None:
        """The pipeline is about to run a forward in cache context ``cache``, outside any compiled region (the
        timestep comes from the pipeline's ``_current_timestep`` when it sets one). With nothing to count steps by
        here, the hook counts them from the forward's timestep."""
        pipeline = self._pipeline() if self._pipeline is not None else None
        timestep = cache.timestep if cache.timestep is not None else getattr(pipeline, "_current_timestep", None)
        counted = cache.step_index is not None or timestep is not None
        self.begin_forward(cache.name, timestep, cache.step_index, cache.num_inference_steps, count=counted)
        self.context._stepped = counted

    def _pipeline_started_new_call(self) -> bool:
        """Whether the pipeline's scheduler got new timesteps since the last forward."""
        pipeline = self._pipeline() if self._pipeline is not None else None
        timesteps = getattr(getattr(pipeline, "scheduler", None), "timesteps", None)
        if timesteps is None or timesteps is self._seen_timesteps:
            return False
        started = self._seen_timesteps is not None
        self._seen_timesteps = timesteps
        return started

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        ctx = self.context
        named = _forward_kwargs(module, args, kwargs)
        grid, text_len = self.forward_layout(module, named, ctx)
        batch_size = named["hidden_states"].shape[0]
        # plain assignments: comparing with the last forward's values would guard on them inside a compiled region
        ctx.grid, ctx.text_len, ctx.batch_size = grid, text_len, batch_size
        if torch.compiler.is_compiling():
            if not ctx._stepped:  # no cache context gave the step (SD3): unknown inside the compiled region
                ctx._fresh = False
                ctx._step_index, ctx._step_unknown = None, True
            ctx._stepped = False
            return args, kwargs
        ctx.timestep = named.get("timestep")
        if ctx._stepped:
            ctx._stepped = False
            return args, kwargs
        branch = ctx.branch if self.cache_context._context is not None else None
        self.begin_forward(branch, named.get("timestep"), None, None)
        return args, kwargs

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.context.new_generation()
        return module


def _adapter_of(transformer: torch.nn.Module):
    """The family adapter of a transformer (the families sit above the context: imported when asked)."""
    from .families import adapter_for_transformer

    return adapter_for_transformer(_uncompiled(transformer))


def family_of_transformer(transformer: torch.nn.Module) -> str:
    """Family name of a transformer, from its class; ValueError for an unsupported class."""
    return _adapter_of(transformer).family


def attach_context(target: Any) -> AttnContext:
    """Attach the context hook to a pipeline's transformer (or a transformer) and return its context.

    Idempotent: a second call returns the context already attached. Needed by methods that read the token
    layout or the step when they are installed with plain ``set_attn_processor``; :func:`install` and the
    ready-made pipelines call it for you.
    """
    transformer, pipeline = _split_target(target)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    hook = registry.get_hook(CONTEXT_HOOK_NAME)
    if hook is None:
        adapter = _adapter_of(transformer)
        context = AttnContext(family=adapter.family, config=transformer.config)
        hook = ContextHook(context, adapter.forward_layout, pipeline)
        registry.register_hook(hook, CONTEXT_HOOK_NAME)
    for name, module in transformer.named_modules():
        if hasattr(module, "processor") and hasattr(module, "set_processor"):
            setattr(module, CONTEXT_ATTR, hook.context)
            setattr(module, MODULE_NAME_ATTR, name)
            index = block_index(name)
            if index is not None:
                setattr(module, BLOCK_FLAGS_ATTR, {k: index < k for k in range(BLOCK_FLAGS)})
            else:  # re-attached under a name without a block number: no flags left from the old name
                module.__dict__.pop(BLOCK_FLAGS_ATTR, None)
    return hook.context


def block_index(module_name: str | None) -> int | None:
    """Transformer block index of an attention module ("blocks.3.attn1" -> 3; None when unnamed or unnumbered)."""
    match = _BLOCK_INDEX.search(module_name or "")
    return int(match.group(1)) if match else None


def detach_context(target: Any) -> None:
    """Remove the context hook and the references that attention modules hold to the context."""
    transformer, _ = _split_target(target)
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(CONTEXT_HOOK_NAME) is not None:
        registry.remove_hook(CONTEXT_HOOK_NAME, recurse=False)
    for module in transformer.modules():
        for attr in (CONTEXT_ATTR, MODULE_NAME_ATTR, BLOCK_FLAGS_ATTR):
            if attr in module.__dict__:
                delattr(module, attr)


def get_context(attn: torch.nn.Module) -> AttnContext | None:
    """The context of the transformer that ``attn`` belongs to, or None when none is attached."""
    return getattr(attn, CONTEXT_ATTR, None)


def reset_context(target: Any) -> None:
    """Start a new generation by hand (for loops that call the transformer without a pipeline)."""
    attach_context(target).new_generation()


def _split_target(target: Any) -> tuple[torch.nn.Module, Any]:
    """(transformer, pipeline or None) from a pipeline or a transformer."""
    transformer = getattr(target, "transformer", None)
    if isinstance(transformer, torch.nn.Module):
        return _uncompiled(transformer), target
    if isinstance(target, torch.nn.Module):
        return _uncompiled(target), None
    raise ValueError(
        f"target of type {type(target).__name__!r} is neither a diffusers pipeline with a transformer "
        "nor a transformer module"
    )


def _uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module that ``torch.compile`` wrapped (an ``OptimizedModule`` keeps it as ``_orig_mod``), else the module:
    processors, hooks and saved state live on the wrapped module, so compiling before or after install is the same."""
    while isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        module = module._orig_mod
    return module
