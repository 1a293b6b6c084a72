"""Putting processors on the right attention modules, composing methods, and restoring stock processors.

``layers`` uses the pattern language of diffusers' ``pag_applied_layers``: each pattern is a regular
expression searched in the module name (``re.search``), and a pattern ending in a number does not match a
longer number ("blocks.1" selects blocks.1 but not blocks.10).

Several processors given to one :func:`install` compose into one :class:`ComposedProcessor`; their stages
run in the order given (positions, then scores, then outputs; see :mod:`diffusers_attn_ext.processors.base`).

A pipeline target means every transformer of the pipeline (:data:`TRANSFORMER_COMPONENTS`): Wan 2.2 A14B
pipelines run ``transformer`` on the high-noise steps and ``transformer_2`` on the low-noise steps (diffusers'
``WanPipeline`` with ``boundary_ratio``), so :func:`install`, :func:`installed` and :func:`uninstall` act on both,
each expert with its own context hook (:func:`attach_contexts`). The same processor object runs in both experts;
per-generation state lives in each expert's context, so nothing is shared between them but the settings.
"""

from __future__ import annotations

import re
import types
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .context import (
    CONTEXT_HOOK_NAME,
    AttnContext,
    _uncompiled,
    attach_context,
    detach_context,
    family_of_transformer,
)
from .processors.base import AttnExtProcessor, ComposedProcessor
from .validation import layer_patterns

SAVED_PROCESSORS_ATTR = "_attn_ext_saved_processors"
# Transformer methods of diffusers that rebuild or replace every attention processor, guarded while methods of
# this package are installed (see :func:`_guard_rebuilds`).
GUARDED_METHODS = ("set_attn_processor", "fuse_qkv_projections", "_load_ip_adapter_weights")
TRANSFORMER_COMPONENTS = ("transformer", "transformer_2")
"""Pipeline components that are transformers: ``transformer_2`` is Wan 2.2 A14B's low-noise expert (None elsewhere)."""
EXPERT_TARGETS_ATTR = "_attn_ext_expert_targets"


class _ExpertTarget:
    """A pipeline as seen from one of its other transformers, in the form the context functions take a target
    (:func:`~diffusers_attn_ext.context.attach_context`): ``transformer`` is that expert, and every other
    attribute (the scheduler and its timesteps, the pipeline's step counters) is read from the pipeline. It holds
    the pipeline through a weak reference, as the context hook does, and lives on the pipeline
    (:data:`EXPERT_TARGETS_ATTR`) as long as the pipeline does."""

    def __init__(self, pipeline: Any, transformer: torch.nn.Module):
        self._pipeline = weakref.ref(pipeline)
        self.transformer = transformer

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "_pipeline":  # copy and pickle probe a bare instance for these
            raise AttributeError(name)
        pipeline = self._pipeline()
        if pipeline is None:
            raise AttributeError(name)
        return getattr(pipeline, name)


def _context_targets(target: Any) -> list[tuple[torch.nn.Module, Any]]:
    """(transformer, the target to give the context functions for it) for every transformer of ``target``: a
    pipeline's :data:`TRANSFORMER_COMPONENTS` that are modules (one entry per distinct module), or a transformer."""
    if not any(isinstance(getattr(target, name, None), torch.nn.Module) for name in TRANSFORMER_COMPONENTS):
        if isinstance(target, torch.nn.Module):
            return [(_uncompiled(target), target)]
        raise ValueError(
            f"target of type {type(target).__name__!r} is neither a diffusers pipeline with a transformer "
            "nor a transformer module"
        )
    pairs: list[tuple[torch.nn.Module, Any]] = []
    for name in TRANSFORMER_COMPONENTS:
        module = getattr(target, name, None)
        if not isinstance(module, torch.nn.Module):
            continue
        transformer = _uncompiled(module)
        if any(transformer is seen for seen, _ in pairs):
            continue
        pairs.append((transformer, target if name == "transformer" else _expert_target(target, name, module)))
    return pairs


def _expert_target(pipeline: Any, name: str, module: torch.nn.Module) -> _ExpertTarget:
    views = pipeline.__dict__.setdefault(EXPERT_TARGETS_ATTR, {})
    view = views.get(name)
    if view is None or view.transformer is not module:
        view = views[name] = _ExpertTarget(pipeline, module)
    return view


def pipeline_transformers(target: Any) -> list[torch.nn.Module]:
    """Every transformer of a pipeline (``transformer``, then ``transformer_2`` when it is not None; each module
    once), or ``[target]`` for a transformer; ``torch.compile``d ones as the modules they wrap."""
    return [transformer for transformer, _ in _context_targets(target)]


def attach_contexts(target: Any) -> list[AttnContext]:
    """:func:`~diffusers_attn_ext.context.attach_context` on every transformer of ``target`` (see
    :func:`pipeline_transformers`): the contexts, in that order. Each expert of a Wan 2.2 pipeline has its own
    context, which knows the pipeline (its scheduler and step counters) as the first one does."""
    return [attach_context(context_target) for _, context_target in _context_targets(target)]


def attention_modules(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every attention module of ``transformer`` (anything with a settable processor), by name; a
    ``torch.compile``d transformer's modules are named as the wrapped transformer's."""
    return {
        name: module
        for name, module in _uncompiled(transformer).named_modules()
        if hasattr(module, "processor") and hasattr(module, "set_processor")
    }


def _ends_in_other_number(pattern: str, name: str) -> bool:
    """diffusers' guard against "blocks.1" matching "blocks.10": both end in different numbers."""
    last_pattern, last_name = pattern.split(".")[-1], name.split(".")[-1]
    return last_pattern.isnumeric() and last_name.isnumeric() and last_pattern != last_name


def select_modules(transformer: torch.nn.Module, layers: str | list[str] | None) -> dict[str, torch.nn.Module]:
    """Attention modules whose names match any of ``layers`` (all of them for None)."""
    patterns = layer_patterns("layers", layers)
    modules = attention_modules(transformer)
    if patterns is None:
        return modules
    selected: dict[str, torch.nn.Module] = {}
    for pattern in patterns:
        matched = {
            name: module
            for name, module in modules.items()
            if re.search(pattern, name) is not None and not _ends_in_other_number(pattern, name)
        }
        if not matched:
            examples = ", ".join(list(modules)[:3])
            raise ValueError(
                f"layers pattern {pattern!r} matches no attention module of {type(transformer).__name__} "
                f"(module names look like: {examples})"
            )
        selected.update(matched)
    return selected


def _check_processors(processors: tuple) -> None:
    if not processors:
        raise ValueError("install needs at least one processor")
    for processor in processors:
        if not isinstance(processor, AttnExtProcessor):
            raise ValueError(
                f"install takes diffusers_attn_ext processors, got an object of type {type(processor).__name__!r}"
            )


def check_methods(transformer: torch.nn.Module, modules: dict[str, torch.nn.Module],
                  processors: tuple[AttnExtProcessor, ...]) -> None:
    """Every method's :meth:`~diffusers_attn_ext.processors.base.AttnExtProcessor.check_model` on the selected
    modules: family, layers and heads are refused here, before anything is installed."""
    family = family_of_transformer(transformer)
    for processor in processors:
        for method in processor.methods:
            method.check_model(transformer, family, modules)


def _prepare(target: Any, processors: tuple, layers) -> list[tuple[torch.nn.Module, Any, dict[str, torch.nn.Module]]]:
    """Every check of an install, before any change, on every transformer of the target: the processors, the
    layer patterns, the methods on the model. Returns (transformer, context target, selected modules) for each."""
    _check_processors(processors)
    plan = []
    for transformer, context_target in _context_targets(target):
        modules = select_modules(transformer, layers)
        _check_no_ip_adapter(modules)
        check_methods(transformer, modules, processors)
        plan.append((transformer, context_target, modules))
    return plan


def _inherit_runtime(new: AttnExtProcessor, old: Any) -> None:
    """Carry over what diffusers' ``set_attention_backend`` / ``enable_parallelism`` set on the processor being
    replaced (they configure processor objects in place), so that installing after them keeps the backend and
    the context-parallel config; and so that a processor reused on another transformer does not keep settings
    from the last one."""
    for attr in ("_attention_backend", "_parallel_config"):
        setattr(new, attr, getattr(old, attr, None))


def _installed_methods(transformer: torch.nn.Module) -> dict[str, AttnExtProcessor]:
    """Attention module name -> processor of this package on it."""
    return {
        name: module.processor
        for name, module in attention_modules(transformer).items()
        if isinstance(module.processor, AttnExtProcessor)
    }


def _refusal(transformer: torch.nn.Module, operation: str, why: str) -> ValueError:
    installed = _installed_methods(transformer)
    name, processor = next(iter(installed.items()))
    return ValueError(
        f"{operation} on {type(transformer).__name__} with {processor!r} installed (on {name} and "
        f"{len(installed) - 1} more modules): {why}; call diffusers_attn_ext.uninstall(pipe) first, then install again"
    )


def _guard_rebuilds(transformer: torch.nn.Module) -> None:
    """Make diffusers' operations that rebuild or swap attention processors refuse, naming the method, instead of
    silently resetting or dropping it:

    - IP-Adapter loading and unloading rebuild each processor as ``type(processor)()`` (a method's settings
      are lost: arguments reset to their defaults, or a TypeError for required ones). Loading is refused before
      any processor changes; ``set_attn_processor`` refuses a processor of a method's class that is not the installed
      object (the rebuild's signature).
    - ``fuse_qkv_projections`` on SD3 and CogVideoX swaps in diffusers' fused processor; it is refused before
      anything changes (FLUX and Wan fuse inside the attention module, which their methods follow, so it is
      left alone there).
    """
    if "set_attn_processor" in transformer.__dict__:
        return
    # bound methods (not closures), so that a deep copy of the transformer guards the copy
    transformer.set_attn_processor = types.MethodType(_guarded_set_attn_processor, transformer)
    transformer._load_ip_adapter_weights = types.MethodType(_refuse_ip_adapter, transformer)
    if family_of_transformer(transformer) in ("sd3", "cogvideox"):
        transformer.fuse_qkv_projections = types.MethodType(_refuse_fused_qkv, transformer)


def _guarded_set_attn_processor(transformer: torch.nn.Module, processor) -> None:
    installed = _installed_methods(transformer)
    if isinstance(processor, dict):  # diffusers' keys: "<module name>.processor"
        new = {key.removesuffix(".processor"): value for key, value in processor.items()}
    else:
        new = dict.fromkeys(installed, processor)
    for name, old in installed.items():
        replacement = new.get(name, old)
        if replacement is not old and type(replacement) is type(old):
            raise _refusal(
                transformer, "set_attn_processor",
                f"it would rebuild {name}'s processor as {replacement!r} (diffusers' IP-Adapter loaders rebuild "
                f"processors as type(processor)()), dropping the installed settings",
            )
    return type(transformer).set_attn_processor(transformer, processor)


def _refuse_ip_adapter(transformer: torch.nn.Module, *args, **kwargs):
    raise _refusal(
        transformer, "load_ip_adapter", "diffusers' IP-Adapter loader replaces the attention processors with its own "
        "(FLUX's double blocks, every SD3 block) and rebuilds the others as type(processor)(), dropping the method",
    )


def _refuse_fused_qkv(transformer: torch.nn.Module, *args, **kwargs):
    raise _refusal(
        transformer, "fuse_qkv_projections", "on this family diffusers swaps in its fused processor, which would drop "
        "the method",
    )


def _unguard_rebuilds(transformer: torch.nn.Module) -> None:
    for name in GUARDED_METHODS:
        transformer.__dict__.pop(name, None)


def _check_no_ip_adapter(modules: dict[str, torch.nn.Module]) -> None:
    """ValueError when a selected module runs a loaded IP-Adapter: installing would silently drop it."""
    for name, module in modules.items():
        if "IPAdapter" in type(module.processor).__name__:
            raise ValueError(
                f"{name} runs an IP-Adapter ({type(module.processor).__name__}); the methods of this package do not "
                "run IP-Adapter attention, so installing would drop it: call pipe.unload_ip_adapter() first, or "
                "select other layers with layers=..."
            )


def install(target: Any, *processors: AttnExtProcessor, layers: str | list[str] | None = None) -> AttnExtProcessor:
    """Install processors on every transformer of a pipeline (or on a transformer) and attach the context hooks.

    Args:
        target: a diffusers pipeline with a ``transformer`` (and, for Wan 2.2 A14B, a ``transformer_2``: both
            experts get the method), or a transformer.
        processors: one or more processors of this package; several compose in the order given.
        layers: name patterns selecting attention modules (see module docstring), in each transformer; None for all.

    Returns the installed processor (the composed one when several are given), the same object in every
    transformer. :func:`uninstall` restores the processors that were there before the first install. Every check
    (processors, layers, each method's family, layers and heads, in every transformer) runs before anything
    changes: after a ValueError the target is as before.
    """
    plan = _prepare(target, processors, layers)
    processor = processors[0] if len(processors) == 1 else ComposedProcessor(*processors)
    for transformer, context_target, modules in plan:
        attach_context(context_target)
        saved = transformer.__dict__.setdefault(SAVED_PROCESSORS_ATTR, {})
        for name, module in modules.items():
            saved.setdefault(name, module.processor)
            _inherit_runtime(processor, module.processor)
            module.set_processor(processor)
        _guard_rebuilds(transformer)
    return processor


def uninstall(target: Any) -> None:
    """Restore the processors that were there before :func:`install` and remove the context hooks, on every
    transformer of the target."""
    for transformer, context_target in _context_targets(target):
        saved = transformer.__dict__.pop(SAVED_PROCESSORS_ATTR, {})
        modules = attention_modules(transformer)
        for name, processor in saved.items():
            modules[name].set_processor(processor)
        _unguard_rebuilds(transformer)
        detach_context(context_target)


@contextmanager
def installed(target: Any, *processors: AttnExtProcessor, layers: str | list[str] | None = None) -> Iterator[None]:
    """Install ``processors`` for the duration of a ``with`` block, composed after any processor of this
    package already on each module, and put back exactly what was there before on exit (on every transformer
    of the target, as :func:`install`).

    The ready-made pipelines use it, so that a method given to a pipeline call composes with methods the
    user installed (e.g. ``install(pipe, RadialSparseProcessor())`` then ``WanUltraViCoPipeline(...)``).
    Checks as :func:`install`, before anything changes.
    """
    plan = _prepare(target, processors, layers)
    composed: dict[int, AttnExtProcessor] = {}
    restores = []
    try:
        for transformer, context_target, modules in plan:
            restores.append(_install_temporarily(transformer, context_target, modules, processors, composed))
        yield
    finally:
        for restore in reversed(restores):
            restore()


def _install_temporarily(transformer: torch.nn.Module, context_target: Any, modules: dict[str, torch.nn.Module],
                       processors: tuple, composed: dict[int, AttnExtProcessor]):
    """:func:`installed`'s change to one transformer; returns the function that undoes it exactly."""
    before = {name: module.processor for name, module in modules.items()}
    had_context = _has_context_hook(transformer)
    saved_before = dict(transformer.__dict__.get(SAVED_PROCESSORS_ATTR, {}))
    had_saved = SAVED_PROCESSORS_ATTR in transformer.__dict__
    had_guards = "set_attn_processor" in transformer.__dict__
    attach_context(context_target)
    _guard_rebuilds(transformer)
    for module in modules.values():
        current = module.processor
        if isinstance(current, AttnExtProcessor):
            if id(current) not in composed:
                composed[id(current)] = ComposedProcessor(current, *processors)
            replacement = composed[id(current)]
        else:
            replacement = processors[0] if len(processors) == 1 else ComposedProcessor(*processors)
        _inherit_runtime(replacement, current)
        module.set_processor(replacement)

    def restore() -> None:
        for name, processor in before.items():
            modules[name].set_processor(processor)
        if had_saved:
            transformer.__dict__[SAVED_PROCESSORS_ATTR] = saved_before
        if not had_guards:
            _unguard_rebuilds(transformer)
        if not had_context:
            detach_context(context_target)

    return restore


def _has_context_hook(transformer: torch.nn.Module) -> bool:
    registry = getattr(transformer, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(CONTEXT_HOOK_NAME) is not None
