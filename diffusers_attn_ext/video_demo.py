"""The video demo: each video method next to the stock model at the same seed, on the shipped world model.

For UltraViCo (2x and 4x the trained length), radial and adaptive sparse attention and DiTraj, the demo writes
the stock video and the method's video (``<name>_stock.gif``, ``<name>_method.gif``), a PNG strip of frames with
stock above the method (``<name>.png``), and a ``summary.md`` row with the method's task metric for both
(``world.tasks``: PSNR/SSIM against dense for sparse attention, object presence, continuity and repetition for
UltraViCo, IoU against the requested boxes for DiTraj).

With no model it runs the shipped world model (``diffusers_attn_ext/shipped/world-video``, 64x64, 9 frames) on
CPU in about a minute. With ``model`` (a Wan checkpoint id or path) it loads that checkpoint once, keeps its own
sizes and step count, and uses one seed for stock and method; task metrics that need the world's ground truth
are then left out.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from PIL import Image

from .pipelines.sparse_video import WanSparsePipeline
from .pipelines.trajectory_video import WanTrajectoryPipeline
from .pipelines.ultravico_video import WanUltraViCoPipeline
from .trajectory import Trajectory
from .world import tasks
from .world.metrics import psnr, ssim
from .world.scenes import TRAIN_FRAMES, caption

VIDEO_METHODS = ("ultravico-2x", "ultravico-4x", "radial", "adaptive", "ditraj")
DEMO_STEPS = 10
SEED = 0


# What one seed cannot show: the measurement over 16 (docs/quality.md, "What each method did on this model").
WORLD_FINDINGS = ("One seed illustrates; it does not measure. Over 16 seeds on this model (docs/quality.md): sparse "
                  "attention costs quality (radial about 18 dB PSNR to the dense video, adaptive 22-18 dB at "
                  "density 0.5-0.1; dense first steps help), DiTraj's STD-RoPE alone does not move the object while "
                  "its foreground/background guidance lands it in the requested boxes about four times as often, "
                  "and UltraViCo has no measurable effect at 1x-4x the trained length, where this model does not "
                  "fail.")


@dataclasses.dataclass
class VideoSetup:
    """What the demo needs to know of a video pipeline: its trained length and size, and a prompt."""

    frames: int
    height: int
    width: int
    steps: int
    train_latent_frames: int
    block_size: int
    world: bool  # the shipped world model: prompts from the world, metrics from its ground truth

    @classmethod
    def for_world(cls, steps: int) -> VideoSetup:
        return cls(TRAIN_FRAMES, 64, 64, steps, TRAIN_FRAMES, tasks.SPARSE_BLOCK, True)

    @classmethod
    def for_checkpoint(cls, pipe, steps: int | None) -> VideoSetup:
        """Wan 2.1/2.2 checkpoints: 81 frames at 480x832, 21 latent frames, blocks of 128 tokens."""
        return cls(81, 480, 832, 50 if steps is None else steps, 21, 128, False)


def _generate(pipe, setup: VideoSetup, prompt: str, frames: int, **kwargs) -> torch.Tensor:
    if setup.world:
        return tasks.generate(pipe, prompt, frames=frames, seed=SEED, steps=setup.steps, **kwargs)
    from .world.metrics import frames_from_pipeline

    generator = torch.Generator("cpu").manual_seed(SEED)
    out = pipe(prompt, num_frames=frames, height=setup.height, width=setup.width, num_inference_steps=setup.steps,
               generator=generator, output_type="np", **kwargs)
    return frames_from_pipeline(out.frames[0])


def run_video_demo(output_dir: str | Path, model=None, *, steps: int | None = None,
                   only: list[str] | None = None) -> Path:
    """Write every video method's stock/method pair and ``summary.md`` into ``output_dir``.

    ``model``: None (the shipped world model), a Wan checkpoint id or path, or a loaded Wan pipeline.
    """
    methods = list(VIDEO_METHODS if only is None else only)
    unknown = [m for m in methods if m not in VIDEO_METHODS]
    if unknown:
        raise ValueError(f"only={unknown} names no video demo; choose from {list(VIDEO_METHODS)}")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if model is None:
        from .world import load_world_video_pipeline

        pipe = load_world_video_pipeline(pipeline_class=WanSparsePipeline)
        setup = VideoSetup.for_world(DEMO_STEPS if steps is None else steps)
    else:
        if isinstance(model, str):
            pipe = WanSparsePipeline.from_pretrained(model, dtype=torch.bfloat16)
            pipe.to("cuda" if torch.cuda.is_available() else "cpu")
        else:
            pipe = WanSparsePipeline.from_pipe(model)
        pipe.set_progress_bar_config(disable=True)
        setup = VideoSetup.for_checkpoint(pipe, steps)
    rows = ["| method | prompt | metric | stock | method | seconds (method) | files |", "|---|---|---|---|---|---|---|"]
    stock_cache: dict[tuple[str, int], torch.Tensor] = {}

    def stock(prompt: str, frames: int) -> torch.Tensor:
        if (prompt, frames) not in stock_cache:
            stock_cache[prompt, frames] = _generate(pipe, setup, prompt, frames, sparse_method=None)
        return stock_cache[prompt, frames]

    for name in methods:
        start = time.perf_counter()
        if name.startswith("ultravico"):
            ratio = int(name.split("-")[1][:-1])
            scene = tasks.ultravico_scene(0)
            prompt = caption(scene) if setup.world else "a corgi running on a beach, tracking shot"
            frames = setup.frames * ratio if setup.world else (setup.train_latent_frames * ratio - 1) * 4 + 1
            runner = WanUltraViCoPipeline.from_pipe(pipe)
            runner.set_progress_bar_config(disable=True)
            method_video = _generate(runner, setup, prompt, frames, ultravico_train_frames=setup.train_latent_frames)
            seconds = time.perf_counter() - start
            base = stock(prompt, frames)
            if setup.world:
                s, m = tasks.object_scores(base, scene), tasks.object_scores(method_video, scene)
                metric = "presence / continuity / repetition at lag 9 (dB)"
                cells = [f"{r['presence']:.2f} / {r['continuity']:.2f} / {r['repetition']:.1f}" for r in (s, m)]
            else:
                metric, cells = "-", ["-", "-"]
        elif name in ("radial", "adaptive"):
            scene = tasks.trajectory_scene(0)
            prompt = caption(scene) if setup.world else "a red fox running through snow"
            kwargs = {"sparse_method": name, "sparse_options": {"block_size": setup.block_size}}
            if name == "adaptive":
                kwargs["sparse_density"] = 0.25
            method_video = _generate(pipe, setup, prompt, setup.frames, **kwargs)
            seconds = time.perf_counter() - start
            base = stock(prompt, setup.frames)
            metric = "PSNR (dB) / SSIM vs stock"
            cells = ["inf / 1.000", f"{psnr(method_video, base):.1f} / {ssim(method_video, base):.3f}"]
        else:  # ditraj
            scene = tasks.trajectory_scene(0)
            if setup.world:
                prompts = tasks.trajectory_prompts(scene)
                trajectory = tasks.trajectory_for(scene)
            else:
                prompts = {"prompt": "a red balloon floating in a blue sky", "foreground_prompt": "a red balloon",
                           "background_prompt": "a blue sky"}
                h, w = setup.height, setup.width
                trajectory = Trajectory.from_key_boxes({0: (0, h // 3, w // 3, 2 * h // 3),
                                                        setup.frames - 1: (2 * w // 3, h // 3, w, 2 * h // 3)},
                                                       num_frames=setup.frames, height=h, width=w)
            runner = WanTrajectoryPipeline.from_pipe(pipe)
            runner.set_progress_bar_config(disable=True)
            method_video = _generate(runner, setup, prompts["prompt"], setup.frames, trajectory=trajectory,
                                     trajectory_rope_steps=tasks.rope_steps(setup.steps),
                                     foreground_prompt=prompts["foreground_prompt"],
                                     background_prompt=prompts["background_prompt"],
                                     trajectory_mask_steps=tasks.mask_steps(setup.steps))
            seconds = time.perf_counter() - start
            prompt = prompts["prompt"]
            base = stock(prompt, setup.frames)
            if setup.world:
                metric = "IoU with the requested boxes"
                cells = [f"{tasks.trajectory_score(v, scene):.3f}" for v in (base, method_video)]
            else:
                metric, cells = "-", ["-", "-"]
        files = save_pair(base, method_video, out / name, trajectory.boxes if name == "ditraj" else None)
        rows.append(f"| {name} | {prompt} | {metric} | {cells[0]} | {cells[1]} | {seconds:.1f} | {files} |")
    summary = out / "summary.md"
    where = "the shipped world model (CPU)" if model is None else (model if isinstance(model, str) else
                                                                     type(model).__name__)
    findings = "\n" + WORLD_FINDINGS + "\n" if model is None else ""
    summary.write_text(f"Video methods on {where}, seed {SEED}, {setup.steps} steps; stock and method share the "
                       "seed.\n\n" + "\n".join(rows) + "\n" + findings)
    return summary


def _uint8(video: torch.Tensor) -> list:
    return list(video.clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def save_pair(stock: torch.Tensor, method: torch.Tensor, stem: Path, boxes=None, strip_frames: int = 9) -> str:
    """``stem_stock.gif``, ``stem_method.gif`` and ``stem.png`` (stock frames above method frames; requested
    boxes drawn on the method's frames when given). Returns the file names for the summary."""
    for label, video in (("stock", stock), ("method", method)):
        images = [Image.fromarray(f) for f in _uint8(video)]
        images[0].save(stem.with_name(f"{stem.name}_{label}.gif"), save_all=True, append_images=images[1:],
                       duration=150, loop=0)
    count = min(strip_frames, stock.shape[0], method.shape[0])
    picks = torch.linspace(0, min(stock.shape[0], method.shape[0]) - 1, count).round().long().tolist()
    rows = []
    for video, draw in ((stock, False), (method, boxes is not None)):
        tiles = []
        for t in picks:
            frame = video[t].clone()
            if draw:
                left, top, right, bottom = (int(v) for v in boxes[t])
                colour = torch.tensor([1.0, 1.0, 1.0]).view(3, 1)
                frame[:, top, left:right] = colour
                frame[:, bottom - 1, left:right] = colour
                frame[:, top:bottom, left] = colour
                frame[:, top:bottom, right - 1] = colour
            tiles.append(torch.nn.functional.pad(frame, (1, 1, 1, 1), value=1.0))
        rows.append(torch.cat(tiles, 2))
    strip = torch.cat(rows, 1)
    scale = max(1, 256 // stock.shape[-2])
    image = Image.fromarray(_uint8(strip.unsqueeze(0))[0])
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(stem.with_suffix(".png"))
    return f"{stem.name}.png, {stem.name}_stock.gif, {stem.name}_method.gif"
