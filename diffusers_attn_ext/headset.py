"""Head sets: which attention heads of which layers a head-level method acts on, saved as JSON.

A head set is the set S = {(l_1, h_1), ..., (l_m, h_m)} of "Fine-Grained Perturbation Guidance via Attention
Head Selection" (Ahn et al., arXiv 2506.10978, Sec. 3.1, Eq. 6), written per layer::

    HeadSet({"transformer_blocks.12": [3, 7], "transformer_blocks.1": [10]})

A layer name selects the attention modules whose name equals it or continues it after a dot:
"transformer_blocks.12" selects "transformer_blocks.12.attn" (and SD3.5's "transformer_blocks.12.attn2"),
never "transformer_blocks.120.attn". JSON form: ``{"heads": {...}, "description": ..., "source": ...,
"model": ...}``; :meth:`HeadSet.preset` loads the sets shipped in the package (``diffusers_attn_ext/headsets/``,
package data, so any install has them); :func:`as_headset`, which reads every ``heads`` / ``pag_heads`` argument,
takes a preset's name wherever it takes a JSON path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from .validation import indices as sorted_indices

PRESETS = files("diffusers_attn_ext") / "headsets"  # package data (pyproject.toml's package-data)


@dataclass(frozen=True)
class HeadSet:
    """Attention heads per layer, with where the set comes from.

    Attributes:
        heads: layer name -> sorted, distinct head indices (given as any iterable of ints).
        description: what the set does (e.g. the effect the paper reports).
        source: where it comes from (paper figure, search run).
        model: the checkpoint it was found on.
    """

    heads: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    description: str = ""
    source: str = ""
    model: str = ""

    def __post_init__(self):
        if not isinstance(self.heads, Mapping):
            raise ValueError(f"heads={self.heads!r} is not allowed: allowed is a mapping from layer name to head indices")
        normalized = {}
        for layer, indices in self.heads.items():
            if not isinstance(layer, str) or not layer:
                raise ValueError(f"heads has layer name {layer!r}; layer names are non-empty strings")
            normalized[layer] = sorted_indices(indices, f"heads[{layer!r}]", noun="head index")
        for layer in normalized:
            for other in normalized:
                if other != layer and other.startswith(layer + "."):
                    raise ValueError(f"heads has layer {layer!r} and {other!r} inside it; name each module once")
        object.__setattr__(self, "heads", dict(sorted(normalized.items())))

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, int]], **meta: str) -> HeadSet:
        """A head set from (layer, head) pairs."""
        grouped: dict[str, list[int]] = {}
        for layer, head in pairs:
            grouped.setdefault(layer, []).append(head)
        return cls(grouped, **meta)

    @property
    def pairs(self) -> tuple[tuple[str, int], ...]:
        """The (layer, head) pairs of the set, sorted."""
        return tuple((layer, head) for layer, heads in self.heads.items() for head in heads)

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.heads)

    def __len__(self) -> int:
        return sum(len(heads) for heads in self.heads.values())

    def union(self, pairs: Iterable[tuple[str, int]]) -> HeadSet:
        """This set with ``pairs`` added (same description, source and model)."""
        return HeadSet.from_pairs([*self.pairs, *pairs], description=self.description, source=self.source,
                                  model=self.model)

    def modules(self, transformer: torch.nn.Module) -> dict[str, tuple[int, ...]]:
        """Attention module name -> head indices in ``transformer``; ValueError for an unknown layer or a head
        index outside ``[0, heads)`` of its module."""
        from .install import attention_modules  # here: install imports the processors, which import head sets

        available = attention_modules(transformer)
        resolved: dict[str, tuple[int, ...]] = {}
        for layer, heads in self.heads.items():
            matched = {name: m for name, m in available.items() if name == layer or name.startswith(layer + ".")}
            if not matched:
                examples = ", ".join(list(available)[:3])
                raise ValueError(
                    f"heads has unknown layer {layer!r}: no attention module of {type(transformer).__name__} is named "
                    f"so or lies inside it (module names look like: {examples})"
                )
            for name, module in matched.items():
                if heads[-1] >= module.heads:
                    raise ValueError(
                        f"heads[{layer!r}] has head index {heads[-1]}; allowed range for {name}: 0..{module.heads - 1}"
                    )
                resolved[name] = heads
        return resolved

    def to_dict(self) -> dict[str, Any]:
        return {"heads": {layer: list(heads) for layer, heads in self.heads.items()}, "description": self.description,
                "source": self.source, "model": self.model}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HeadSet:
        unknown = set(data) - {"heads", "description", "source", "model"}
        if "heads" not in data or unknown:
            raise ValueError(f"a head set JSON has keys heads, description, source, model; got {sorted(data)}")
        return cls(**data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> HeadSet:
        return cls.from_dict(json.loads(Path(path).read_text()))

    @classmethod
    def preset(cls, name: str) -> HeadSet:
        """A head set shipped in the package's ``headsets/`` (see :func:`preset_names`)."""
        resource = PRESETS / f"{name}.json"
        if not resource.is_file():
            raise ValueError(f"preset={name!r} is not one of {preset_names()}")
        return cls.from_dict(json.loads(resource.read_text()))


def preset_names() -> list[str]:
    """Names of the head sets shipped in the package's ``headsets/``."""
    return sorted(item.name.removesuffix(".json") for item in PRESETS.iterdir() if item.name.endswith(".json"))


_ALLOWED = "allowed are a {layer: [heads]} mapping, a HeadSet, a JSON file path or a preset name"


def as_headset(heads: HeadSet | Mapping[str, Iterable[int]] | str | Path, name: str = "heads") -> HeadSet:
    """A :class:`HeadSet` from a head set, a ``{layer: [heads]}`` mapping, the path of a head set JSON, or the name
    of a preset (:func:`preset_names`): a string that is not an existing file but names a preset loads the preset.
    ValueError naming ``name`` (the caller's parameter, e.g. ``pag_heads``) for anything else, before any file
    error: a missing file that is no preset, a folder, a misspelled preset name, a value of another type."""
    if isinstance(heads, HeadSet):
        return heads
    if isinstance(heads, (str, Path)):
        try:
            is_file = Path(heads).is_file()
        except OSError:  # e.g. a name too long for the file system: not a file
            is_file = False
        if is_file:
            return HeadSet.load(heads)
        if isinstance(heads, str) and heads in preset_names():
            return HeadSet.preset(heads)
        raise ValueError(f"{name}={heads!r} is neither an existing file nor a preset name: {_ALLOWED}, one of "
                         f"{preset_names()}")
    if not isinstance(heads, Mapping):
        raise ValueError(f"{name}={heads!r} is not allowed: {_ALLOWED}, one of {preset_names()}")
    return HeadSet(heads)

