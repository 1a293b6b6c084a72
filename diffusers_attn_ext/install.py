"""Putting processors on the right attention modules, composing methods, and restoring stock processors.

``layers`` uses the pattern language of diffusers' ``pag_applied_layers``: each pattern is a regular
expression searched in the module name (``re.search``), and a pattern ending in a number does not match a
longer number ("blocks.1" selects blocks.1 but not blocks.10).

Several processors given to one :func:`install` compose into one :class:`ComposedProcessor`; their stages
run in the order given (positions, then scores, then outputs; see :mod:`diffusers_attn_ext.processors.base`).
"""

from __future__ import annotations

import re
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .context import (
    CONTEXT_HOOK_NAME,
    _split_target,
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


def _prepare(target: Any, processors: tuple, layers) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
    """Every check of an install, before any change: the processors, the layer patterns, the methods on the
    model. Returns (transformer, selected modules)."""
    _check_processors(processors)
    transformer, _ = _split_target(target)
    modules = select_modules(transformer, layers)
    _check_no_ip_adapter(modules)
    check_methods(transformer, modules, processors)
    return transformer, modules


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
    """Install processors on a pipeline's transformer (or a transformer) and attach the context hook.

    Args:
        target: a diffusers pipeline with a ``transformer``, or the transformer itself.
        processors: one or more processors of this package; several compose in the order given.
        layers: name patterns selecting attention modules (see module docstring); None for all.

    Returns the installed processor (the composed one when several are given). :func:`uninstall`
    restores the processors that were there before the first install. Every check (processors, layers, each
    method's family, layers and heads) runs before anything changes: after a ValueError the target is as before.
    """
    transformer, modules = _prepare(target, processors, layers)
    processor = processors[0] if len(processors) == 1 else ComposedProcessor(*processors)
    attach_context(target)
    saved = transformer.__dict__.setdefault(SAVED_PROCESSORS_ATTR, {})
    for name, module in modules.items():
        saved.setdefault(name, module.processor)
        _inherit_runtime(processor, module.processor)
        module.set_processor(processor)
    _guard_rebuilds(transformer)
    return processor


def uninstall(target: Any) -> None:
    """Restore the processors that were there before :func:`install` and remove the context hook."""
    transformer, _ = _split_target(target)
    saved = transformer.__dict__.pop(SAVED_PROCESSORS_ATTR, {})
    modules = attention_modules(transformer)
    for name, processor in saved.items():
        modules[name].set_processor(processor)
    _unguard_rebuilds(transformer)
    detach_context(target)


@contextmanager
def installed(target: Any, *processors: AttnExtProcessor, layers: str | list[str] | None = None) -> Iterator[None]:
    """Install ``processors`` for the duration of a ``with`` block, composed after any processor of this
    package already on each module, and put back exactly what was there before on exit.

    The ready-made pipelines use it, so that a method given to a pipeline call composes with methods the
    user installed (e.g. ``install(pipe, RadialSparseProcessor())`` then ``WanUltraViCoPipeline(...)``).
    Checks as :func:`install`, before anything changes.
    """
    transformer, modules = _prepare(target, processors, layers)
    before = {name: module.processor for name, module in modules.items()}
    had_context = _has_context_hook(transformer)
    saved_before = dict(transformer.__dict__.get(SAVED_PROCESSORS_ATTR, {}))
    had_saved = SAVED_PROCESSORS_ATTR in transformer.__dict__
    had_guards = "set_attn_processor" in transformer.__dict__
    attach_context(target)
    _guard_rebuilds(transformer)
    composed: dict[int, AttnExtProcessor] = {}
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
    try:
        yield
    finally:
        for name, processor in before.items():
            modules[name].set_processor(processor)
        if had_saved:
            transformer.__dict__[SAVED_PROCESSORS_ATTR] = saved_before
        if not had_guards:
            _unguard_rebuilds(transformer)
        if not had_context:
            detach_context(target)


def _has_context_hook(transformer: torch.nn.Module) -> bool:
    registry = getattr(transformer, "_diffusers_hook", None)
    return registry is not None and registry.get_hook(CONTEXT_HOOK_NAME) is not None
