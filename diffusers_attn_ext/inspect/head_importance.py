"""Head importance: how much a pipeline's output changes when one attention head is perturbed.

As the pruning view of "How Does Attention Work in Vision Transformers? A Visual Analytics Attempt" (Li et
al., IEEE TVCG 2023, Sec. 4.1) measures a head by the accuracy lost without it, a head (l, h) of a
diffusion transformer is measured by the relative change of the generated output (the final latents by
default) when, at every step and on every batch row, its attention output is replaced:

    importance(l, h) = || y_{(l,h) perturbed} - y || / || y ||,

with ``mode="identity"`` (identity attention, A_h = I, so O_h = V_h: PAG's perturbation, arXiv 2403.17377)
or ``mode="zero"`` (O_h = 0, the head pruned). The ranking feeds HeadHunter: ``result.top(k)`` is a
candidate list for :func:`diffusers_attn_ext.headhunter.search`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from ..families.base import AttentionCall
from ..headhunter import Head, candidate_heads, fresh_generator
from ..headset import HeadSet
from ..install import installed
from ..processors.base import AttnExtProcessor
from ..validation import boolean, choice, integer

PERTURBATION_MODES = ("identity", "zero")


class HeadPerturbation(AttnExtProcessor):
    """Replaces the attention output of one head, on every row and step: ``V_h`` ("identity") or 0 ("zero").
    Install it on one module (``installed(pipe, HeadPerturbation(3), layers="^blocks.0.attn1$")``)."""

    def __init__(self, head: int, mode: str = "identity"):
        self.mode = choice("mode", mode, PERTURBATION_MODES)
        self.head = integer("head", head, 0)

    def check_model(self, transformer: torch.nn.Module, family: str, modules: dict[str, torch.nn.Module]) -> None:
        """At install: the head exists in every selected self-attention module."""
        super().check_model(transformer, family, modules)
        for name, module in modules.items():
            if not getattr(module, "is_cross_attention", False) and self.head >= module.heads:
                raise ValueError(f"head={self.head} is outside the allowed range for {name}: 0..{module.heads - 1}")

    def applies_to(self, call: AttentionCall) -> bool:
        return call.is_self_attention

    def edit_output(self, call: AttentionCall, out: torch.Tensor) -> torch.Tensor:
        if self.head >= call.heads:
            raise ValueError(f"head={self.head} is outside the allowed range for this module: 0..{call.heads - 1}")
        out = out.clone()
        out[:, :, self.head] = call.value[:, :, self.head].to(out.dtype) if self.mode == "identity" else 0
        return out

    def __repr__(self) -> str:
        return f"HeadPerturbation(head={self.head}, mode={self.mode!r})"


@dataclass
class HeadImportance:
    """Importance of each (layer, head): the relative output change when it is perturbed."""

    scores: dict[Head, float]
    mode: str
    settings: dict[str, Any] = field(default_factory=dict)

    def ranking(self) -> list[tuple[str, int, float]]:
        """(layer, head, importance), most important first."""
        return sorted(((layer, head, score) for (layer, head), score in self.scores.items()), key=lambda r: -r[2])

    def top(self, k: int) -> list[Head]:
        """The ``k`` most important (layer, head) pairs: a ``candidates`` list for ``headhunter.search``."""
        k = integer("k", k, 1)
        return [(layer, head) for layer, head, _ in self.ranking()[:k]]

    def headset(self, k: int) -> HeadSet:
        """The ``k`` most important heads as a :class:`~diffusers_attn_ext.headset.HeadSet`."""
        return HeadSet.from_pairs(self.top(k), description=f"top {k} heads by output change ({self.mode})",
                                  source="diffusers_attn_ext.inspect.head_importance")

    def matrix(self) -> tuple[torch.Tensor, list[str], list[int]]:
        """``[layers, heads]`` importances (NaN where not measured), the layer names and the head indices."""
        layers = list(dict.fromkeys(layer for layer, _ in self.scores))
        heads = sorted({head for _, head in self.scores})
        matrix = torch.full((len(layers), len(heads)), float("nan"), dtype=torch.float64)
        for (layer, head), score in self.scores.items():
            matrix[layers.index(layer), heads.index(head)] = score
        return matrix, layers, heads

    def plot(self, path=None, ax=None):
        """Layer x head heat map of the importances; returns the figure (saved to ``path`` when given)."""
        from ..plotting import plot_layer_head

        matrix, layers, heads = self.matrix()
        return plot_layer_head(matrix, layers, heads, title=f"head importance ({self.mode})", path=path, ax=ax)

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "settings": self.settings,
                "ranking": [[layer, head, score] for layer, head, score in self.ranking()]}


def _output(pipe, call_kwargs: dict[str, Any]) -> torch.Tensor:
    kwargs = dict(call_kwargs)
    kwargs.setdefault("output_type", "latent")
    kwargs["generator"] = fresh_generator(kwargs.get("generator"), 0)
    kwargs["return_dict"] = False
    return torch.as_tensor(pipe(**kwargs)[0]).to(torch.float64)


def head_importance(
    pipe,
    *,
    candidates: Sequence[str] | Sequence[Head] | None = None,
    mode: str = "identity",
    progress: bool = True,
    **call_kwargs: Any,
) -> HeadImportance:
    """Measure every candidate head (module docstring): one pipeline call per head plus one unperturbed.

    Args:
        pipe: a pipeline of any supported family (the methods installed on it stay and compose).
        candidates: None (every head of every self-attention module), layer names, or (layer, head) pairs, as
            ``headhunter.search`` takes them; ValueError for an unknown layer or a head out of range.
        mode: "identity" (O_h = V_h) or "zero" (O_h = 0).
        progress: show a tqdm progress bar over the heads.
        call_kwargs: the pipeline's arguments for every call; a ``generator`` is re-created from its initial
            seed for each call (seed 0 without one); ``output_type`` defaults to "latent".
    """
    choice("mode", mode, PERTURBATION_MODES)
    boolean("progress", progress)
    heads = candidate_heads(pipe.transformer, candidates)
    progress_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    try:
        base = _output(pipe, call_kwargs)
        norm = float(base.norm()) or 1.0
        scores = {}
        for layer, head in tqdm(heads, desc=f"head importance ({mode})", disable=not progress):
            with installed(pipe, HeadPerturbation(head, mode), layers=f"^{re.escape(layer)}$"):
                scores[(layer, head)] = float((_output(pipe, call_kwargs) - base).norm()) / norm
    finally:
        pipe._progress_bar_config = progress_config
    return HeadImportance(scores, mode, {"output_type": call_kwargs.get("output_type", "latent")})
