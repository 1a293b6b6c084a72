"""The naming rule of the ready-made pipelines' ``__call__`` arguments, and the helpers that keep it.

Rule: a ready-made pipeline takes its diffusers parent's arguments plus

- the *inputs* of its method, which say what to make and are named as diffusers names inputs
  (``trajectory``, ``foreground_prompt`` / ``background_prompt`` and their ``*_prompt_embeds``,
  ``subject_boxes``, ``extrapolation_ratio``), listed in the class's ``method_inputs``;
- the *settings* of its method, each ``<prefix>_<name>`` with the class's ``method_prefix``: ``pag`` (head-PAG,
  as diffusers' ``pag_scale``), ``ultravico``, ``sparse``, ``trajectory`` (DiTraj) and ``ir`` (IR-Diffusion).

ValueErrors name the pipeline's argument (``ultravico_alpha=0 is outside ...``), not the processor's
(:func:`pipeline_argument_errors`). Names from before the rule are deprecated aliases (:func:`deprecated_aliases`):
they still work, with a ``FutureWarning`` that names the new argument. A setting given without the input it acts
on would be silently ignored (the pipeline runs stock): :func:`settings_need_input` makes that a ValueError.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def deprecated_aliases(**renamed: str) -> Callable:
    """Decorator of a ready-made pipeline's ``__call__``: each ``old="new"`` makes the keyword ``old`` a deprecated
    alias of the argument ``new``, with the same meaning. A call with ``old=value`` warns (``FutureWarning``, at the
    caller's line) and runs as with ``new=value``; a call with both raises a ValueError before any work.

    The aliases are kept on the wrapper as ``deprecated_arguments`` (old name -> new name)."""

    def decorate(call: Callable) -> Callable:
        @functools.wraps(call)
        def with_aliases(self, *args: Any, **kwargs: Any):
            for old, new in renamed.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise ValueError(
                        f"{old}={kwargs[old]!r} and {new}={kwargs[new]!r} are both given: {old} is the deprecated "
                        f"name of {new}; give {new} only"
                    )
                warnings.warn(
                    f"{old}=... is deprecated: use {new}=... (same meaning); {type(self).__name__} and the other "
                    "ready-made pipelines name their method's settings <method>_<name>",
                    FutureWarning, stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return call(self, *args, **kwargs)

        with_aliases.deprecated_arguments = dict(renamed)
        return with_aliases

    return decorate


@contextmanager
def pipeline_argument_errors(prefix: str, names: Iterable[str] | None = None) -> Iterator[None]:
    """Inside the block, a ValueError whose message starts with the name of a processor's argument (one of
    ``names``; any message when ``names`` is None: the processors' ValueErrors start with the argument they
    refuse) is raised again as ``<prefix>_<message>``, so that it names the pipeline's argument:
    ``alpha=0 is outside ...`` becomes ``ultravico_alpha=0 is outside ...``."""
    try:
        yield
    except ValueError as error:
        message = str(error)
        if names is None or message.startswith(tuple(names)):
            raise ValueError(f"{prefix}_{message}") from None
        raise


def _shown(value: Any) -> str:
    """``repr`` of an argument for a message; a tensor as its shape (its values would flood the message)."""
    if isinstance(value, torch.Tensor):
        return f"<tensor of shape {tuple(value.shape)}>"
    return repr(value)


def settings_need_input(call: Callable, needed: str, values: dict[str, Any], what: str) -> None:
    """ValueError naming every argument of ``values`` (name -> value as given, after its range check) that
    differs from its default in ``call``'s signature, when the call lacks the input ``needed`` that they act on:
    without it the pipeline runs stock and would silently ignore them. ``what`` names the method in the message
    (``"IR-Diffusion"``). A default of None counts as given for any other value, with no comparison (tensors)."""
    parameters = inspect.signature(call).parameters
    changed = []
    for name, value in values.items():
        default = parameters[name].default
        differs = value is not None if default is None else (value is None or bool(value != default))
        if differs:
            changed.append(f"{name}={_shown(value)}")
    if changed:
        verb = "needs" if len(changed) == 1 else "need"
        raise ValueError(
            f"{', '.join(changed)} {verb} {needed}: without {needed} the pipeline runs stock and {what} is off, "
            f"so {'this setting would be' if len(changed) == 1 else 'these settings would be'} ignored; "
            f"give {needed}, or leave {'it' if len(changed) == 1 else 'them'} out"
        )
