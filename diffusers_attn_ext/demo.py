"""The demo's entry, and its tiny-pipeline part: every method on random tiny pipelines, written to a folder.

``python -m diffusers_attn_ext demo`` runs the video methods on the shipped world video model (``video_demo``)
and the image methods (IR-Diffusion, SoftPAG, entropy scaling) on the shipped world image model (``image_demo``),
stock and method at the same seed, into one ``summary.md`` (video table, then image table); ``--only`` picks
methods of either (``video_demo.VIDEO_METHODS``, ``image_demo.IMAGE_METHODS``).
``--tiny`` runs every method registered here in :data:`DEMOS` on tiny random pipelines (each output a PNG or
GIF, ``summary.md`` with the time and the difference from the stock run at the same seed): random weights, so
the pictures are noise; it shows that every method runs. ``--model ID`` loads a checkpoint once: a Wan
checkpoint gets the video demo at its own sizes, an SD3 or FLUX one the image entries at its own sizes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .install import install, uninstall
from .pipelines.head_pag import FluxHeadPAGPipeline, StableDiffusion3HeadPAGPipeline
from .pipelines.multi_subject import FluxMultiSubjectPipeline, StableDiffusion3MultiSubjectPipeline
from .pipelines.trajectory_video import WanTrajectoryPipeline
from .processors import (
    AdaptiveSparseProcessor,
    EntropyScalingProcessor,
    RadialSparseProcessor,
    StockAttnProcessor,
    UltraViCoProcessor,
)
from .testing import FAMILIES, TEXT_DIM, TEXT_SEQ_LEN, tiny_call_kwargs, tiny_pipeline
from .trajectory import Trajectory
from .validation import choice, integer


@dataclass
class DemoEntry:
    """One demo run: a method's processors on one family, with extra call arguments."""

    method: str
    family: str
    processors: Callable[[], list]
    call_overrides: dict[str, Any] = field(default_factory=dict)
    pipeline: Callable[[Any], Any] | None = None  # builds the method's pipeline from the stock one (from_pipe)
    method_kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments of that pipeline's call


# A tiny Wan video of 9 frames at 64x64 whose foreground box moves left to right; tiny prompts are embeddings.
TRAJECTORY_TINY = {"height": 64, "width": 64, "num_frames": 9}
_fg_bg = torch.Generator().manual_seed(1)
TRAJECTORY_KWARGS = {
    "trajectory": Trajectory.from_key_boxes({0: (0, 16, 32, 48), 8: (32, 16, 64, 48)}, num_frames=9, height=64, width=64),
    "foreground_prompt_embeds": torch.randn(1, TEXT_SEQ_LEN, TEXT_DIM, generator=_fg_bg),
    "background_prompt_embeds": torch.randn(1, TEXT_SEQ_LEN, TEXT_DIM, generator=_fg_bg),
}
# Three tiny images (reference first) sharing two subjects, in fractions of the image.
SUBJECT_BOXES = [
    {"dog": (0.0, 0.25, 0.5, 1.0), "cat": (0.5, 0.25, 1.0, 1.0)},
    {"dog": (0.5, 0.0, 1.0, 0.5), "cat": (0.0, 0.5, 0.25, 1.0)},
    {"dog": (0.25, 0.25, 0.75, 0.75), "cat": (0.75, 0.0, 1.0, 0.25)},
]

# Tiny videos are a few blocks only with small blocks; do not reuse these settings with a real model.
SPARSE_TINY = {"height": 64, "width": 64, "num_frames": 17}

DEMOS: list[DemoEntry] = [
    *(DemoEntry("stock (StockAttnProcessor)", family, lambda: [StockAttnProcessor()]) for family in FAMILIES),
    # Tiny videos of 6 latent frames, as if trained on 2: 3x extrapolation.
    *(
        DemoEntry("UltraViCo 3x (alpha 0.9)", family, lambda: [UltraViCoProcessor(alpha=0.9, train_frames=2)],
                  {"height": 64, "width": 64, "num_frames": 21})
        for family in ("wan", "cogvideox")
    ),
    # Tiny images are 8x8 tokens; as if trained on 4x4 tokens.
    *(DemoEntry("entropy scaling", family, lambda: [EntropyScalingProcessor(train_tokens=16)]) for family in ("sd3", "flux")),
    # Head-level PAG needs its pipeline (the perturbed branch); the processor list composes with it.
    *(
        DemoEntry("SoftPAG (2 heads, alpha 0.5, pag_scale 3)", family, lambda: [StockAttnProcessor()],
                  pipeline=pipeline.from_pipe,
                  method_kwargs={"pag_heads": {"transformer_blocks.0": [1], "transformer_blocks.1": [0]},
                                 "pag_alpha": 0.5, "pag_scale": 3.0})
        for family, pipeline in (("sd3", StableDiffusion3HeadPAGPipeline), ("flux", FluxHeadPAGPipeline))
    ),
    *(
        DemoEntry("radial sparse", family, lambda block=block: [RadialSparseProcessor(block_size=block)], SPARSE_TINY)
        for family, block in (("wan", 16), ("cogvideox", 8))
    ),
    *(
        DemoEntry("adaptive sparse (density 0.25)", family,
                  lambda block=block: [AdaptiveSparseProcessor(density=0.25, block_size=block)], SPARSE_TINY)
        for family, block in (("wan", 16), ("cogvideox", 8))
    ),
    DemoEntry("DiTraj (moving box, fg/bg prompts)", "wan", lambda: [StockAttnProcessor()], TRAJECTORY_TINY,
              pipeline=WanTrajectoryPipeline.from_pipe, method_kwargs=TRAJECTORY_KWARGS),
    *(
        DemoEntry("IR-Diffusion (2 subjects, 3 images)", family, lambda: [StockAttnProcessor()], {"batch_size": 3},
                  pipeline=pipeline.from_pipe, method_kwargs={"subject_boxes": SUBJECT_BOXES})
        for family, pipeline in (("sd3", StableDiffusion3MultiSubjectPipeline), ("flux", FluxMultiSubjectPipeline))
    ),
]


def _frames(output: Any) -> list[np.ndarray]:
    """HWC uint8 frames of a pipeline output (images or one video)."""
    array = output[0] if isinstance(output, (tuple, list)) else output
    array = torch.as_tensor(np.asarray(array)).float()
    if array.dim() == 5:  # [B, F, C, H, W] video
        array = array[0]
    elif array.dim() == 4 and array.shape[1] not in (1, 3):  # [B, H, W, C] numpy images
        array = array.permute(0, 3, 1, 2)
    array = array.clamp(0, 1).permute(0, 2, 3, 1).mul(255).round().to(torch.uint8)
    return list(array.numpy())


def _save(frames: list[np.ndarray], path: Path) -> Path:
    images = [Image.fromarray(frame) for frame in frames]
    if len(images) == 1:
        path = path.with_suffix(".png")
        images[0].save(path)
    else:
        path = path.with_suffix(".gif")
        images[0].save(path, save_all=True, append_images=images[1:], duration=125, loop=0)
    return path


# call arguments of the tiny entries that only size the tiny pipelines: a real checkpoint keeps its own
_TINY_SIZES = ("height", "width", "num_frames", "batch_size")


def _output(pipe, family: str, overrides: dict[str, Any], model: str | None, steps: int | None = None) -> Any:
    if steps is not None:  # None: the tiny pipelines' 2 steps, a checkpoint's own default
        overrides = {**overrides, "num_inference_steps": steps}
    if model is None:
        kwargs = tiny_call_kwargs(family, **overrides)
    else:
        kept = {k: v for k, v in overrides.items() if k not in _TINY_SIZES}
        kwargs = {"prompt": "a red fox in the snow", "generator": torch.Generator("cpu").manual_seed(0), **kept}
    return pipe(**kwargs)[0]


def run_demo(output_dir: str | Path, model: str | None = None, family: str | None = None,
             steps: int | None = None) -> Path:
    """Run every registered demo (of ``family`` when given) and write outputs and ``summary.md``.

    With ``model`` (a checkpoint id or path) the pipeline is loaded with ``DiffusionPipeline.from_pretrained``
    and only the entries of its family run; otherwise tiny random pipelines are built. ``steps``: denoising
    steps (an integer >= 1; None: 2 on the tiny pipelines, the checkpoint's default otherwise).
    """
    steps = integer("steps", steps, 1, allow_none=True)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = ["| method | family | seconds | max abs diff vs stock | file |", "|---|---|---|---|---|"]
    pipes: dict[str, Any] = {}
    if model is not None:  # load the checkpoint once; its family's entries run on it
        loaded = _load_checkpoint(model) if isinstance(model, str) else model
        from .context import family_of_transformer

        pipes = {name: (loaded if name == family_of_transformer(loaded.transformer) else None) for name in FAMILIES}
    for entry in DEMOS:
        if family is not None and entry.family != family:
            continue
        if entry.family not in pipes:
            pipes[entry.family] = _load(entry.family, model)
        pipe = pipes[entry.family]
        if pipe is None:
            continue
        stock = torch.as_tensor(np.asarray(_output(pipe, entry.family, entry.call_overrides, model, steps))).float()
        install(pipe, *entry.processors())
        start = time.perf_counter()
        try:
            runner = pipe if entry.pipeline is None else entry.pipeline(pipe)
            if entry.pipeline is not None:
                runner.set_progress_bar_config(disable=True)
            result = _output(runner, entry.family, {**entry.call_overrides, **entry.method_kwargs}, model,
                             steps)
        finally:
            uninstall(pipe)
        seconds = time.perf_counter() - start
        result_t = torch.as_tensor(np.asarray(result)).float()
        diff = (result_t - stock).abs().max().item() if result_t.shape == stock.shape else float("nan")
        slug = "".join(c if c.isalnum() else "_" for c in f"{entry.method}_{entry.family}").strip("_")
        path = _save(_frames(result), out / slug)
        rows.append(f"| {entry.method} | {entry.family} | {seconds:.2f} | {diff:.3g} | {path.name} |")
    summary = out / "summary.md"
    summary.write_text("\n".join(rows) + "\n")
    return summary


def _load(family: str, model: str | None):
    """A tiny pipeline of ``family`` (a checkpoint is loaded once by ``run_demo``)."""
    return tiny_pipeline(family)[0]


def _load_checkpoint(model: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, dtype=torch.bfloat16)
    return pipe.to("cuda" if torch.cuda.is_available() else "cpu")


def run(output_dir: str | Path, model: str | None = None, *, tiny: bool = False, family: str | None = None,
        steps: int | None = None, only: list[str] | None = None) -> Path:
    """The ``demo`` command: the world models' video and image demos by default (``only``: names of either),
    every method on tiny pipelines with ``tiny``, or a checkpoint (video demo for Wan, the image entries
    otherwise). ``steps``: denoising steps, an integer >= 1 (None: each demo's default); refused, like every
    argument here, before any model work."""
    steps = integer("steps", steps, 1, allow_none=True)  # 0 is refused here, never read as "not given"
    from .image_demo import IMAGE_METHODS, image_section
    from .video_demo import VIDEO_METHODS, run_video_demo

    for name in only or ():
        choice("only", name, (*VIDEO_METHODS, *IMAGE_METHODS))
    try:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"output={str(output_dir)!r} cannot be made a folder: {error}") from None
    if tiny or family is not None:
        if model is not None:
            raise ValueError("demo: --tiny/--family run the tiny random pipelines; they take no --model")
        return run_demo(output_dir, family=family, steps=steps)
    if model is None:
        video = [m for m in only if m in VIDEO_METHODS] if only else None
        image = [m for m in only if m in IMAGE_METHODS] if only else None
        summary = Path(output_dir) / "summary.md"
        sections = []
        if video != []:
            sections.append(run_video_demo(output_dir, steps=steps, only=video).read_text())
        if image != []:
            sections.append(image_section(output_dir, steps=steps, only=image))
        summary.write_text("\n".join(sections))
        return summary
    pipe = _load_checkpoint(model)
    from .context import family_of_transformer

    if family_of_transformer(pipe.transformer) == "wan":
        return run_video_demo(output_dir, pipe, steps=steps, only=only)
    return run_demo(output_dir, model=pipe, steps=steps)
