"""The attention inspector: a processor method that records statistics of the attention that actually runs.

It changes nothing. Installed with other methods, e.g. ``install(pipe, UltraViCoProcessor(), inspector)``,
its ``edit_output`` stage runs after the kernel, when every method has set the final q and k (RoPE and
position edits applied, keys changed) and the score mods and masks of the call: the statistics are of
the modified attention (see :mod:`diffusers_attn_ext.inspect.statistics`). Output stages of methods
(SoftPAG's blend toward identity) act on outputs, not on attention rows, and are not seen.

Usage::

    inspector = AttentionInspector(layers=r"blocks\\.(0|5)\\.attn1", heads=[0, 3], steps=[0])
    install(pipe, UltraViCoProcessor(), inspector)
    pipe(...)
    inspector.save("inspect_out")      # plots + summary.json
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..families.base import AttentionCall
from ..install import _ends_in_other_number, attention_modules, installed
from ..processors.base import AttnExtProcessor
from ..validation import indices, integer, layer_patterns
from .statistics import AttentionStatistics, HeadProfiles, attention_statistics, sampled_query_rows


def _check_indices(name: str, values: Sequence[int] | None) -> tuple[int, ...] | None:
    if values is None:
        return None
    return indices(values, name)


class AttentionInspector(AttnExtProcessor):
    """Records per-head attention statistics of chosen self-attention layers, heads and denoising steps.

    Args:
        layers: attention module name patterns, as ``install``'s ``layers`` (regular expressions searched in
            the module name); None for every self-attention module.
        heads: head indices to record; None for all heads of each module.
        steps: denoising step indices (from 0) to record; None for every step.
        chunk_elements: size of the score tile of one head, rows x keys, in elements (default 2^21: 8 MiB
            in float32); the extra memory is a few such tiles plus one head's keys in float32.
        sampled_rows: attention rows stored per head when there are more visual queries than
            ``full_map_tokens`` (evenly spaced queries); at most ``full_map_tokens`` queries, every row is kept.
        full_map_tokens: the largest visual token count for which full maps are kept.

    Records: ``inspector.records[layer]`` is an :class:`~diffusers_attn_ext.inspect.statistics.AttentionStatistics`
    over every recorded call of the layer (steps, cond and uncond forwards); ``inspector.step_records[layer][step]``
    the :class:`~diffusers_attn_ext.inspect.statistics.HeadProfiles` of each step. Per layer the records hold
    ``heads x keys`` received masses (float64) and ``heads x sampled_rows x keys`` map values (float32) on the CPU:
    about 16 MB for a Wan2.1-1.3B layer at 81 frames 480p.
    """

    def __init__(
        self,
        layers: str | Sequence[str] | None = None,
        heads: Sequence[int] | None = None,
        steps: Sequence[int] | None = None,
        *,
        chunk_elements: int = 2**21,
        sampled_rows: int = 8,
        full_map_tokens: int = 256,
    ):
        patterns = layer_patterns("layers", layers)
        self.layers = None if patterns is None else list(patterns)
        self.heads = _check_indices("heads", heads)
        self.steps = _check_indices("steps", steps)
        self.chunk_elements = integer("chunk_elements", chunk_elements, 1)
        self.sampled_rows = integer("sampled_rows", sampled_rows, 0)
        self.full_map_tokens = integer("full_map_tokens", full_map_tokens, 0)
        self.records: dict[str, AttentionStatistics] = {}
        self.step_records: dict[str, dict[int, HeadProfiles]] = {}

    @staticmethod
    def matches_pattern(pattern: str, module_name: str) -> bool:
        """``install``'s rule: ``pattern`` is found in the name, and "blocks.1" does not match "blocks.10"."""
        return re.search(pattern, module_name) is not None and not _ends_in_other_number(pattern, module_name)

    def matches(self, module_name: str) -> bool:
        """Whether the attention module ``module_name`` is among ``layers``."""
        return self.layers is None or any(self.matches_pattern(p, module_name) for p in self.layers)

    def validate(self, transformer: torch.nn.Module) -> dict[str, tuple[int, ...]]:
        """Self-attention module name -> recorded heads in ``transformer``; ValueError for a ``layers`` pattern
        that matches no self-attention module or a head index out of range."""
        modules = {name: m for name, m in attention_modules(transformer).items() if not getattr(m, "is_cross_attention", False)}
        for pattern in self.layers or []:
            if not any(self.matches_pattern(pattern, name) for name in modules):
                raise ValueError(
                    f"layers pattern {pattern!r} matches no self-attention module of {type(transformer).__name__} "
                    f"(names look like: {', '.join(list(modules)[:3])})"
                )
        selected = {name: m for name, m in modules.items() if self.matches(name)}
        for name, module in selected.items():
            if self.heads is not None and self.heads[-1] >= module.heads:
                raise ValueError(f"heads has index {self.heads[-1]}; allowed range for {name}: 0..{module.heads - 1}")
        return {name: self.heads or tuple(range(m.heads)) for name, m in selected.items()}

    def check_model(self, transformer: torch.nn.Module, family: str, modules: dict[str, torch.nn.Module]) -> None:
        """At install: the layers match self-attention modules and the heads exist (:meth:`validate`)."""
        super().check_model(transformer, family, modules)
        self.validate(transformer)

    def applies_to(self, call: AttentionCall) -> bool:
        if call.context is None or call.module_name is None:
            raise ValueError(
                "AttentionInspector needs the module names and steps of the context: install it with "
                "diffusers_attn_ext.install(pipe, ..., inspector) or call attach_context(pipe)"
            )
        if torch.compiler.is_compiling():  # before the name is read: no graph per name on the way to the error
            raise ValueError(
                "AttentionInspector records each call's attention statistics into per-layer, per-step Python "
                "records, which a torch.compile'd region cannot fill: inspect an eager transformer (the inspector "
                "changes nothing, so nothing is lost but speed)"
            )
        if not call.is_self_attention or not self.matches(call.module_name):
            return False
        return self.steps is None or call.context.step_index in self.steps

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        heads = self.heads or tuple(range(call.heads))
        if heads[-1] >= call.heads:
            raise ValueError(f"heads has index {heads[-1]}; allowed range for {call.module_name}: 0..{call.heads - 1}")
        grid = call.require_grid("AttentionInspector")
        rows = sampled_query_rows(call.visual, self.sampled_rows, self.full_map_tokens)
        stats = attention_statistics(call, heads, grid, chunk_elements=self.chunk_elements, map_rows=rows)
        name, step = call.module_name, call.context.step_index
        steps = self.step_records.setdefault(name, {})
        if step in steps:
            steps[step].merge(stats)
        else:
            steps[step] = stats.profiles()
        if name in self.records:
            self.records[name].merge(stats)
        else:
            self.records[name] = stats
        return out

    def __repr__(self) -> str:
        return f"AttentionInspector(layers={self.layers}, heads={self.heads}, steps={self.steps})"

    def reset(self) -> None:
        """Forget every record."""
        self.records.clear()
        self.step_records.clear()

    def layer_statistics(self, layer: str) -> AttentionStatistics:
        """The statistics of ``layer`` over its recorded steps."""
        if layer not in self.records:
            raise ValueError(f"layer={layer!r} has no records; recorded layers: {list(self.records)}")
        return self.records[layer]

    def _require_records(self) -> None:
        if not self.records:
            raise ValueError(
                f"no attention call was recorded (layers={self.layers}, heads={self.heads}, steps={self.steps}): "
                "install the inspector and run the pipeline first; check that the layers and steps exist"
            )

    def layer_head_matrix(self, statistic: str = "entropy") -> tuple[torch.Tensor, list[str], list[int]]:
        """``[layers, heads]`` of a per-head statistic ("entropy", "text_mass", "local_temporal" (mass at
        temporal distance 0), "local_spatial" (mass at spatial distance 0)); NaN where a head was not recorded.
        Returns (matrix, layer names, head indices)."""
        getters = {
            "entropy": lambda s: s.entropy, "text_mass": lambda s: s.text_mass,
            "local_temporal": lambda s: s.temporal[:, 0], "local_spatial": lambda s: s.spatial[:, 0],
        }
        if statistic not in getters:
            raise ValueError(f"statistic={statistic!r} is not one of {sorted(getters)}")
        self._require_records()
        layers = list(self.records)
        per_layer = {layer: self.layer_statistics(layer) for layer in layers}
        heads = sorted({h for stats in per_layer.values() for h in stats.heads})
        matrix = torch.full((len(layers), len(heads)), float("nan"), dtype=torch.float64)
        for row, layer in enumerate(layers):
            stats = per_layer[layer]
            values = getters[statistic](stats)
            for slot, head in enumerate(stats.heads):
                matrix[row, heads.index(head)] = values[slot]
        return matrix, layers, heads

    def summary(self, top_sinks: int = 8) -> dict[str, Any]:
        """JSON-ready summary: per layer, the recorded steps and heads, each head's statistics over all recorded
        steps, and per step the small ones (text mass, entropy, profiles)."""
        self._require_records()
        layers = {}
        for layer in self.records:
            stats = self.layer_statistics(layer)
            layers[layer] = {
                "steps": sorted(self.step_records[layer]),
                "heads": list(stats.heads),
                "grid": [stats.grid.frames, stats.grid.height, stats.grid.width],
                "text_mass": stats.text_mass.tolist(),
                "entropy": stats.entropy.tolist(),
                "temporal_profile": stats.temporal.tolist(),
                "spatial_profile": stats.spatial.tolist(),
                "sinks": stats.sinks(top_sinks),
                "by_step": {
                    str(step): {"text_mass": p.text_mass.tolist(), "entropy": p.entropy.tolist(),
                                "temporal_profile": p.temporal.tolist(), "spatial_profile": p.spatial.tolist()}
                    for step, p in sorted(self.step_records[layer].items())
                },
            }
        return {"layers": layers}

    def save(self, directory: str | Path) -> list[Path]:
        """Write ``summary.json`` and PNG plots: layer x head heat maps of entropy and text mass, the mean
        temporal and spatial decay profile of each layer, and per layer the profiles of its heads and the
        sampled attention maps over the latent grid. Returns the written paths."""
        from .. import plotting

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        summary = self.summary()
        written = [directory / "summary.json"]
        written[0].write_text(json.dumps(summary, indent=2) + "\n")
        for statistic in ("entropy", "text_mass"):
            matrix, layers, heads = self.layer_head_matrix(statistic)
            path = directory / f"heads_{statistic}.png"
            _close(plotting.plot_layer_head(matrix, layers, heads, title=statistic.replace("_", " "), path=path))
            written.append(path)
        for kind in ("temporal", "spatial"):
            profiles = torch.stack([getattr(self.layer_statistics(layer), kind).mean(0) for layer in self.records])
            path = directory / f"decay_{kind}.png"
            _close(plotting.plot_decay_profiles(profiles, list(self.records), kind=kind, path=path))
            written.append(path)
        for layer in self.records:
            stats = self.layer_statistics(layer)
            slug = layer.replace(".", "_")
            for kind in ("temporal", "spatial"):
                path = directory / f"{slug}_{kind}.png"
                _close(plotting.plot_decay_profiles(getattr(stats, kind), [f"head {h}" for h in stats.heads],
                                                    kind=kind, title=layer, path=path))
                written.append(path)
            if len(stats.map_rows):
                path = directory / f"{slug}_maps.png"
                _close(plotting.plot_query_maps(stats, path=path))
                written.append(path)
        return written


def _close(figure) -> None:
    import matplotlib.pyplot as plt

    plt.close(figure)


def inspect_pipeline(pipe, *methods: AttnExtProcessor, inspector: AttentionInspector | None = None,
                     **call_kwargs: Any) -> tuple[Any, AttentionInspector]:
    """Run ``pipe(**call_kwargs)`` once with ``methods`` and an inspector (default: every self-attention head
    at every step) installed after them; the processors that were there are restored afterwards.

    The inspector's layers and heads are checked against the transformer first (ValueError for an unknown
    layer or a head out of range), and its records are cleared: they hold this run only, also after a run that
    raised. Returns (pipeline output, inspector).
    """
    inspector = AttentionInspector() if inspector is None else inspector
    inspector.validate(pipe.transformer)
    inspector.reset()
    with installed(pipe, *methods, inspector):
        output = pipe(**call_kwargs)
    return output, inspector
