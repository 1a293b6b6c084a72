"""The one check of public arguments: every processor, helper and pipeline of this package validates its
arguments here, before any model work.

Each check returns the value in its canonical form (Python ``int``/``float``/``bool``/``str``) or raises a
``ValueError`` that names the parameter, the value and the allowed range::

    alpha=nan is outside the allowed range (0, 1]
    cache_steps=2.5 is outside the allowed range: an integer >= 1 (got a float)
    identity='text' is not one of ('image', 'all')
    layers has pattern '(', not a regular expression (missing ), unterminated subpattern at position 0)

Numbers: ``int``, ``float``, NumPy scalars and 0-d tensors are numbers; ``bool`` (also NumPy's and boolean
tensors) is not. Real ranges are finite: NaN and +-inf are outside every range. Integers are counts, steps
and indices: a float, even 2.0, is not one. What depends on the model (layers, heads, family) is checked
by the processors' :meth:`~diffusers_attn_ext.processors.base.AttnExtProcessor.check_model` at ``install``.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

try:  # NumPy is a dependency of torch's tensor interop, but not of this package
    import numpy as np
except ImportError:  # pragma: no cover
    np = None


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if np is not None and isinstance(value, np.bool_):
        return True
    return isinstance(value, torch.Tensor) and value.dtype == torch.bool


def as_number(value: Any) -> int | float | None:
    """``value`` as a Python ``int`` or ``float`` when it is a number (int, float, NumPy scalar, 0-d tensor or
    0-d array; not a bool), else None."""
    if _is_bool(value):
        return None
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or value.is_complex():
            return None
        return value.item()
    if np is not None and isinstance(value, (np.generic, np.ndarray)):
        if getattr(value, "ndim", 0) != 0 or not isinstance(value.item(), (int, float)) or _is_bool(value.item()):
            return None
        return value.item()
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _bound(value: float) -> str:
    return "inf" if value == math.inf else "-inf" if value == -math.inf else f"{value:g}"


def interval(low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False) -> str:
    """The interval in the notation of the messages: ``(0, 1]``, ``[0, inf)``."""
    left = "(" if low_open or low == -math.inf else "["
    right = ")" if high_open or high == math.inf else "]"
    return f"{left}{_bound(low)}, {_bound(high)}{right}"


def real(name: str, value: Any, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
         high_open: bool = False, allow_none: bool = False, note: str = "") -> float | None:
    """``value`` as a finite ``float`` in the interval ``low .. high`` (open ends as flagged), or None when
    ``allow_none``; ValueError otherwise (``note`` follows the value in it, e.g. `` (layer 'blocks.0')``)."""
    if value is None and allow_none:
        return None
    allowed = interval(low, high, low_open, high_open) + (" or None" if allow_none else "")
    number = as_number(value)
    if number is None:
        raise ValueError(
            f"{name}={value!r}{note} is outside the allowed range {allowed}: a {_type_name(value)}, not a number"
        )
    number = float(number)
    inside = (
        math.isfinite(number)
        and (number > low if low_open else number >= low)
        and (number < high if high_open else number <= high)
    )
    if not inside:
        raise ValueError(f"{name}={value!r}{note} is outside the allowed range {allowed}")
    return number


def integer_range(low: int | None = None, high: int | None = None) -> str:
    """``an integer >= 1``, ``an integer in 0..9``."""
    if low is not None and high is not None:
        return f"an integer in {low}..{high}"
    if low is not None:
        return f"an integer >= {low}"
    if high is not None:
        return f"an integer <= {high}"
    return "an integer"


def integer(name: str, value: Any, low: int | None = None, high: int | None = None, *,
            allow_none: bool = False) -> int | None:
    """``value`` as an ``int`` in ``low .. high`` (inclusive; None: unbounded), or None when ``allow_none``.
    Floats are refused, also whole ones: counts, steps and indices are integers."""
    if value is None and allow_none:
        return None
    allowed = integer_range(low, high) + (" or None" if allow_none else "")
    number = as_number(value)
    if not isinstance(number, int):
        raise ValueError(f"{name}={value!r} is outside the allowed range: {allowed} (got a {_type_name(value)})")
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name}={value!r} is outside the allowed range: {allowed}")
    return number


def boolean(name: str, value: Any) -> bool:
    """``value`` when it is ``True`` or ``False`` (NumPy's too); ValueError for anything else (1, "yes")."""
    if isinstance(value, bool) or (np is not None and isinstance(value, np.bool_)):
        return bool(value)
    raise ValueError(f"{name}={value!r} is not allowed: allowed values are True and False")


def choice(name: str, value: Any, choices: Sequence[str], *, allow_none: bool = False) -> str | None:
    """``value`` when it is one of the strings ``choices`` (or None with ``allow_none``)."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or value not in choices:
        allowed = f"{tuple(choices)}" + (" or None" if allow_none else "")
        raise ValueError(f"{name}={value!r} is not one of {allowed}")
    return value


def layer_patterns(name: str, layers: Any) -> tuple[str, ...] | None:
    """Layer name patterns (regular expressions, as ``install``'s ``layers``) as a tuple, or None for every
    layer; ValueError for an empty list, a pattern that is not a string or does not compile."""
    if layers is None:
        return None
    if isinstance(layers, str):
        patterns = (layers,)
    elif isinstance(layers, Iterable) and not isinstance(layers, (bytes, Mapping)):
        patterns = tuple(layers)
        if not patterns:
            raise ValueError(
                f"{name}={layers!r} is empty: give at least one layer name pattern, or None for every layer"
            )
    else:
        raise ValueError(
            f"{name}={layers!r} is not allowed: allowed are a layer name pattern (str), a list of them, or None"
        )
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError(f"{name} has pattern {pattern!r}: allowed are non-empty strings (regular expressions)")
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{name} has pattern {pattern!r}, not a regular expression ({error})") from None
    return patterns


def indices(values: Any, name: str, noun: str = "index") -> tuple[int, ...]:
    """The unique indices of ``values`` (one integer or several), sorted; ValueError naming ``name`` for an
    index that is not an integer >= 0, or for none at all."""
    scalar = (as_number(values) is not None or _is_bool(values) or isinstance(values, (str, bytes, Mapping))
              or not isinstance(values, Iterable) or getattr(values, "ndim", 1) == 0)
    if scalar:
        values = [values]
    values = list(values)
    checked = []
    for value in values:
        number = as_number(value)
        if not isinstance(number, int) or number < 0:
            raise ValueError(f"{name} has {noun} {value!r}; allowed: integers >= 0")
        checked.append(number)
    if not checked:
        raise ValueError(f"{name} is empty; give at least one {noun}")
    return tuple(sorted(set(checked)))


def options(name: str, value: Any, allowed: Iterable[str]) -> dict[str, Any]:
    """``value`` (a mapping of keyword arguments, or None for none) as a dict whose keys are among ``allowed``."""
    allowed = tuple(allowed)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{name}={value!r} is not allowed: allowed is a dict of keyword arguments from {allowed}")
    unknown = [key for key in value if key not in allowed]
    if unknown:
        raise ValueError(f"{name} has unknown keys {unknown}; allowed keys: {allowed}")
    return dict(value)


def family(method: str, found: str, families: Sequence[str] | None, what: str = "families") -> None:
    """ValueError unless ``found`` (a transformer's family) is among the ``families`` ``method`` runs in
    (None: every family); ``what`` names them in the message ("video families")."""
    if families is not None and found not in families:
        raise ValueError(f"{method} applies to {what} {tuple(families)}, not family={found!r}")


def schedule_length(parent_call, kwargs: Mapping[str, Any]) -> int | None:
    """Denoising steps of a pipeline call: ``len(sigmas)`` or ``len(timesteps)`` when given, else the
    call's ``num_inference_steps`` (the parent ``__call__``'s default when absent); None when unknown."""
    import inspect

    for key in ("sigmas", "timesteps"):
        if kwargs.get(key) is not None:
            return len(kwargs[key])
    if kwargs.get("num_inference_steps") is not None:
        steps = as_number(kwargs["num_inference_steps"])
        return steps if isinstance(steps, int) else None
    parameter = inspect.signature(parent_call).parameters.get("num_inference_steps")
    default = None if parameter is None else parameter.default
    return default if isinstance(default, int) else None


__all__ = [
    "as_number", "boolean", "choice", "family", "indices", "integer", "integer_range", "interval", "layer_patterns",
    "options", "real", "schedule_length",
]
