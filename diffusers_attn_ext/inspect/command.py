"""``python -m diffusers_attn_ext inspect``: one pipeline call with the inspector, plots and a JSON summary."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..context import family_of_transformer
from ..testing import FAMILIES, tiny_pipeline
from .capture import AttentionInspector, inspect_pipeline

REAL_MODEL_PROMPT = "a red fox running through fresh snow, golden hour"


def _real_pipeline(model: str, family: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch.bfloat16)
    found = family_of_transformer(pipe.transformer)
    if found != family:
        raise ValueError(f"family={family!r} does not match model {model!r}, whose transformer is of family {found!r}")
    return pipe.to("cuda" if torch.cuda.is_available() else "cpu")


def run_inspection(
    family: str, output: str | Path, *, model: str | None = None, layers: Sequence[str] | None = None,
    heads: Sequence[int] | None = None, steps: Sequence[int] | None = None, num_inference_steps: int | None = None,
) -> Path:
    """Run one generation of ``family`` (a tiny random pipeline, or ``model``) with an
    :class:`AttentionInspector` on ``layers``/``heads``/``steps`` and write its plots and ``summary.json``
    (with the family, model and files) to ``output``. Returns the summary's path."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not one of {FAMILIES}")
    if num_inference_steps is not None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps={num_inference_steps!r} must be an integer >= 1")
    if steps is not None and num_inference_steps is not None and any(step >= num_inference_steps for step in steps):
        raise ValueError(f"steps={list(steps)} must be below num_inference_steps={num_inference_steps}")
    inspector = AttentionInspector(layers=layers, heads=heads, steps=steps)
    if model is None:
        pipe, call_kwargs = tiny_pipeline(family)
    else:
        pipe, call_kwargs = _real_pipeline(model, family), {"prompt": REAL_MODEL_PROMPT}
    if num_inference_steps is not None:
        call_kwargs["num_inference_steps"] = num_inference_steps
    inspect_pipeline(pipe, inspector=inspector, **call_kwargs)
    files = inspector.save(output)
    summary_path = Path(output) / "summary.json"
    summary = {"family": family, "model": model or f"tiny random {family} pipeline",
               "files": sorted(path.name for path in files), **inspector.summary()}
    summary_path.write_text(json.dumps(summary, indent=2) + "\n")
    return summary_path
