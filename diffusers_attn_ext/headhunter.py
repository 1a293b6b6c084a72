"""HeadHunter: greedy, objective-driven search for the attention heads to perturb.

Algorithm 1 of "Fine-Grained Perturbation Guidance via Attention Head Selection" (Ahn et al., arXiv
2506.10978, Sec. 4.1): start from a head set S (empty by default); each round, for every remaining candidate
(l, h), generate the prompt-seed pairs with head-level guidance on S + {(l, h)}, score the images with the
objective O and average; add the ``per_round`` best candidates to S. Rounds stop at ``rounds`` or, with
``require_gain`` (default), when no candidate scores above S itself; ``require_gain=False`` is the paper's
algorithm exactly (always add the top k). The authors' runs: R = 1, k = 24 for general quality; R = 5,
k = 3 for styles (guidance scale 3, alpha 1).

Usage::

    result = search(pipe, "colorfulness", ["a red fox", "a city at night"], rounds=2, per_round=3)
    result.headset.save("heads.json"); print(result.ranking_table()); result.plot()
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .headset import HeadSet
from .install import attention_modules
from .objectives import BUILTIN_OBJECTIVES, Objective
from .pipelines.head_pag import FluxHeadPAGPipeline, HeadPAGMixin, StableDiffusion3HeadPAGPipeline
from .validation import boolean, integer, real

Head = tuple[str, int]
HEAD_PAG_PIPELINES = {"SD3Transformer2DModel": StableDiffusion3HeadPAGPipeline,
                      "FluxTransformer2DModel": FluxHeadPAGPipeline}


@dataclass
class RoundResult:
    """One round: the score of the set it started from, every candidate's score, the heads it added."""

    base_score: float
    scores: dict[Head, float]
    selected: tuple[Head, ...]

    @property
    def gains(self) -> dict[Head, float]:
        return {head: score - self.base_score for head, score in self.scores.items()}


@dataclass
class HeadHuntResult:
    """The selected head set and the record of every round (for the ranking table and the heat map)."""

    headset: HeadSet
    rounds: list[RoundResult]
    layers: tuple[str, ...]
    num_heads: int
    settings: dict[str, Any] = field(default_factory=dict)

    def ranking(self, round_index: int = 0) -> list[tuple[str, int, float, float]]:
        """(layer, head, score, gain) of one round's candidates, best first."""
        record = self.rounds[round_index]
        rows = [(layer, head, score, score - record.base_score) for (layer, head), score in record.scores.items()]
        return sorted(rows, key=lambda row: -row[2])

    def ranking_table(self, round_index: int = 0, top: int | None = 10) -> str:
        """Markdown table of one round's best candidates."""
        lines = [f"| rank | layer | head | score | gain vs. base {self.rounds[round_index].base_score:.4g} |",
                 "|---|---|---|---|---|"]
        selected = set(self.rounds[round_index].selected)
        for rank, (layer, head, score, gain) in enumerate(self.ranking(round_index)[:top], start=1):
            mark = " (selected)" if (layer, head) in selected else ""
            lines.append(f"| {rank} | {layer} | {head}{mark} | {score:.4g} | {gain:+.4g} |")
        return "\n".join(lines)

    def gain_matrix(self, round_index: int = 0) -> torch.Tensor:
        """``[layers, heads]`` objective gains of one round (NaN where a head was not a candidate)."""
        matrix = torch.full((len(self.layers), self.num_heads), float("nan"))
        for (layer, head), gain in self.rounds[round_index].gains.items():
            matrix[self.layers.index(layer), head] = gain
        return matrix

    def plot(self, round_index: int = 0, ax=None):
        """Heat map (layers x heads) of the objective gain of each head in one round; returns the figure."""
        import matplotlib.pyplot as plt

        if ax is None:
            _, ax = plt.subplots(figsize=(1.5 + 0.35 * self.num_heads, 1.5 + 0.3 * len(self.layers)))
        gains = self.gain_matrix(round_index)
        limit = float(gains.nan_to_num(0).abs().max()) or 1.0
        image = ax.imshow(gains.numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(self.num_heads))
        ax.set_yticks(range(len(self.layers)), labels=self.layers)
        ax.set_xlabel("head")
        ax.set_title(f"HeadHunter round {round_index + 1}: objective gain")
        for layer, head in self.rounds[round_index].selected:
            ax.scatter(head, self.layers.index(layer), marker="s", facecolors="none", edgecolors="k", s=80)
        ax.figure.colorbar(image, ax=ax)
        return ax.figure

    def save(self, directory: str | Path) -> Path:
        """Write ``headset.json``, ``ranking.md`` (every round), ``rounds.json`` and ``gains.png``."""
        directory = Path(directory)
        self.headset.save(directory / "headset.json")
        tables = [f"## Round {i + 1}\n\n{self.ranking_table(i, top=None)}\n" for i in range(len(self.rounds))]
        (directory / "ranking.md").write_text("\n".join(tables))
        record = [{"base_score": r.base_score, "selected": r.selected,
                   "scores": [[layer, head, score] for (layer, head), score in r.scores.items()]} for r in self.rounds]
        (directory / "rounds.json").write_text(json.dumps({"settings": self.settings, "rounds": record}, indent=2))
        if self.rounds:
            figure = self.plot(0)
            figure.savefig(directory / "gains.png", bbox_inches="tight")
            figure.clf()
        return directory


def candidate_heads(transformer: torch.nn.Module, candidates: Sequence[str] | Sequence[Head] | None) -> list[Head]:
    """(attention module name, head) pairs in module order: every head of every self-attention module (None),
    every head of the given layers, or the given (layer, head) pairs; ValueError for an unknown layer or a
    head out of range."""
    modules = {
        name: m for name, m in attention_modules(transformer).items() if not getattr(m, "is_cross_attention", False)
    }
    if candidates is None:
        return [(name, head) for name, module in modules.items() for head in range(module.heads)]
    if isinstance(candidates, (str, bytes)) or not isinstance(candidates, Sequence) or not candidates:
        raise ValueError(f"candidates={candidates!r} is not allowed: allowed are None, a non-empty list of layer "
                         "names, or a non-empty list of (layer, head) pairs")
    if all(isinstance(item, str) for item in candidates):
        layers = HeadSet(dict.fromkeys(candidates, 0)).modules(transformer)
        chosen = {name: tuple(range(modules[name].heads)) for name in layers}
    else:
        chosen = HeadSet.from_pairs(tuple(item) for item in candidates).modules(transformer)
    return [(name, head) for name in modules if name in chosen for head in chosen[name]]


def head_pag_pipeline(pipe) -> HeadPAGMixin:
    """``pipe`` itself when it is a head-PAG pipeline, else the head-PAG pipeline of its transformer's class
    built with ``from_pipe`` (shared components)."""
    if isinstance(pipe, HeadPAGMixin):
        return pipe
    name = type(getattr(pipe, "transformer", None)).__name__
    if name not in HEAD_PAG_PIPELINES:
        raise ValueError(f"pipe with transformer {name!r} is not supported; supported: {sorted(HEAD_PAG_PIPELINES)}")
    return HEAD_PAG_PIPELINES[name].from_pipe(pipe)


def fresh_generator(generator: torch.Generator | None, seed: int) -> torch.Generator:
    """A new generator in the state ``generator`` was created in (its initial seed), or seeded by ``seed``."""
    if generator is None:
        return torch.Generator().manual_seed(seed)
    return torch.Generator(device=generator.device).manual_seed(generator.initial_seed())


@dataclass
class _Evaluator:
    """Generates every prompt-seed pair with a head set and scores the images with the objective."""

    pipe: Any
    objective: Objective
    prompts: Sequence[str | Mapping[str, Any]]
    seeds: Sequence[int]
    call_kwargs: Mapping[str, Any]

    def __call__(self, headset: HeadSet) -> float:
        images, texts = [], []
        for prompt, seed in zip(self.prompts, self.seeds, strict=True):
            kwargs = {**self.call_kwargs, **(prompt if isinstance(prompt, Mapping) else {"prompt": prompt})}
            kwargs.update(generator=fresh_generator(kwargs.get("generator"), seed), pag_heads=headset,
                          output_type="pt", return_dict=False)
            output = self.pipe(**kwargs)[0]
            images.append(torch.as_tensor(output).float())
            texts.extend([kwargs.get("prompt")] * images[-1].shape[0])
        scores = torch.as_tensor(self.objective(torch.cat(images), texts), dtype=torch.float64)
        return float(scores.mean())


def search(
    pipe,
    objective: Objective | str,
    prompts: Sequence[str | Mapping[str, Any]],
    *,
    candidates: Sequence[str] | Sequence[Head] | None = None,
    rounds: int = 5,
    per_round: int = 3,
    require_gain: bool = True,
    initial: HeadSet | None = None,
    seeds: Sequence[int] | None = None,
    pag_scale: float = 3.0,
    pag_alpha: float = 1.0,
    progress: bool = True,
    **call_kwargs: Any,
) -> HeadHuntResult:
    """Greedy HeadHunter search (module docstring).

    Args:
        pipe: an SD3 or FLUX pipeline (a head-PAG pipeline is made from it with ``from_pipe``).
        objective: ``objective(images [B,3,H,W] in [0,1], prompts) -> [B]`` scores, higher is better, or the name
            of a built-in in :data:`~diffusers_attn_ext.objectives.BUILTIN_OBJECTIVES`.
        prompts: prompt strings, or dicts of call kwargs (e.g. ``tiny_call_kwargs(...)`` with embeddings); a
            dict's generator is re-created from its initial seed for every generation.
        candidates: None (every head of every attention module), layer names, or (layer, head) pairs.
        rounds, per_round: R and k of Algorithm 1.
        require_gain: add only candidates scoring above the current set, stop when none does.
        initial: the head set to start from.
        seeds: one seed per prompt (default 0, 1, ...) where a prompt brings no generator.
        pag_scale, pag_alpha: the guidance scale and SoftPAG alpha used while searching.
        call_kwargs: further pipeline arguments for every generation (e.g. ``num_inference_steps``).
    """
    if isinstance(objective, str):
        if objective not in BUILTIN_OBJECTIVES:
            raise ValueError(f"objective={objective!r} is not one of {sorted(BUILTIN_OBJECTIVES)}")
        objective = BUILTIN_OBJECTIVES[objective]
    rounds, per_round = integer("rounds", rounds, 1), integer("per_round", per_round, 1)
    require_gain, progress = boolean("require_gain", require_gain), boolean("progress", progress)
    pag_scale = real("pag_scale", pag_scale, 0.0)
    pag_alpha = real("pag_alpha", pag_alpha, 0.0, 1.0)
    if isinstance(prompts, str) or not prompts:
        raise ValueError(f"prompts={prompts!r} is not allowed: give a non-empty list of prompt strings or call-kwargs "
                         "dicts")
    seeds = list(range(len(prompts))) if seeds is None else [integer("seeds", seed, 0) for seed in seeds]
    if len(seeds) != len(prompts):
        raise ValueError(f"seeds has {len(seeds)} values for {len(prompts)} prompts; give one seed per prompt")
    pipe = head_pag_pipeline(pipe)
    all_candidates = candidate_heads(pipe.transformer, candidates)
    current = HeadSet(initial.modules(pipe.transformer)) if initial is not None else HeadSet()
    pool = [head for head in all_candidates if head not in set(current.pairs)]
    evaluate = _Evaluator(pipe, objective, prompts, seeds,
                          {**call_kwargs, "pag_scale": pag_scale, "pag_alpha": pag_alpha})
    progress_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(disable=True)
    records: list[RoundResult] = []
    try:
        base_score = evaluate(current)
        for round_index in range(rounds):
            scores = {}
            for head in tqdm(pool, desc=f"HeadHunter round {round_index + 1}/{rounds}", disable=not progress):
                scores[head] = evaluate(current.union([head]))
            ranked = sorted(scores, key=lambda head: -scores[head])
            chosen = [head for head in ranked if not require_gain or scores[head] > base_score][:per_round]
            records.append(RoundResult(base_score, scores, tuple(chosen)))
            if not chosen:
                break
            current = current.union(chosen)
            pool = [head for head in pool if head not in chosen]
            if not pool:
                break
            base_score = scores[chosen[0]] if len(chosen) == 1 else evaluate(current)
    finally:
        pipe._progress_bar_config = progress_config
    layers = tuple(dict.fromkeys(layer for layer, _ in all_candidates))
    num_heads = max(attention_modules(pipe.transformer)[layer].heads for layer in layers)
    settings = {"rounds": rounds, "per_round": per_round, "require_gain": require_gain, "seeds": seeds,
                "pag_scale": pag_scale, "pag_alpha": pag_alpha, "objective": getattr(objective, "__name__", "")}
    headset = HeadSet(current.heads, description=f"HeadHunter search, objective {settings['objective']}",
                      source="diffusers_attn_ext.headhunter.search", model=getattr(pipe, "name_or_path", "") or "")
    return HeadHuntResult(headset, records, layers, num_heads, settings)
