"""The video tasks each method is measured on, shared by the demo and ``benchmarks/quality.py``.

A task is a family of held-out prompts (scenes from evaluation seeds, never trained on) with what a method is
asked to do and how it is scored against the world's ground truth:

- sparse attention: any scene; the sparse video should equal the dense one at the same seed (PSNR, SSIM);
- UltraViCo: one bouncing object (it stays in the frame at every length), generated at 1x-4x the trained
  length; the object should be found in every frame, move continuously at the prompt's speed, stay sharp, and
  not repeat the content of ``TRAIN_FRAMES`` frames earlier more than the ground truth does;
- DiTraj: one large object on a straight path; the requested boxes are that scene's ground-truth boxes
  snapped outwards to the 8-pixel latent-token grid (STD-RoPE needs boxes of at least 2x2 tokens, which a
  small object's 10-pixel box is not always), scored by the per-frame IoU of the object found in the video
  against them.

Sampling defaults (``STEPS``, ``GUIDANCE``) are the model's, chosen on stock generation alone, never on a method:
``GUIDANCE`` by ``evaluate_video`` on its 64 held-out prompts (other evaluation seeds than these tasks'), CPU, 20
steps, 2026-12-02: object of the prompt's colour in every frame / frames with it / moves the prompt's way, at
guidance 1: 32.8 / 67.0 / 57.8%, 2: 48.4 / 71.7 / 62.5%, 3: 43.8 / 69.8 / 60.9%, 5 (the default before): 37.5 /
65.1 / 57.8%.
"""

from __future__ import annotations

import math

import torch

from .metrics import (
    continuity,
    edge_sharpness,
    frames_from_pipeline,
    mean_speed,
    presence,
    repetition,
    track_colour,
    trajectory_iou,
)
from .models import wan_num_frames
from .render import render_scenes
from .scenes import TRAIN_FRAMES, TRAIN_SIZE, Scene, caption, sample_scene
from .train_video import EVAL_SEED_BASE
from .vocabulary import SPEEDS

STEPS = 20
GUIDANCE = 2.0
# evaluation seed offsets per task, so that tasks never share scenes
_SPARSE, _ULTRAVICO, _TRAJECTORY = 10_000, 20_000, 30_000
# DiTraj's step schedules are the authors' fractions of their 50 steps: STD-RoPE on 5, fg/bg guidance on 30
ROPE_STEP_FRACTION = 5 / 50
MASK_STEP_FRACTION = 30 / 50
# the sparse block size on this model: a latent frame is 8x8 = 64 tokens, two blocks
SPARSE_BLOCK = 32


def sparse_scene(index: int) -> Scene:
    """Any scene (one to three objects)."""
    return sample_scene(EVAL_SEED_BASE + _SPARSE + index)


def _single(seed: int, path: str, size: str | None = None) -> Scene:
    """One object whose start is drawn for ``path`` (and ``size``), so a straight mover stays in the frame."""
    return sample_scene(seed, num_objects=1, path=path, size=size)


def ultravico_scene(index: int) -> Scene:
    """One bouncing object."""
    return _single(EVAL_SEED_BASE + _ULTRAVICO + index, "bounce")


def trajectory_scene(index: int) -> Scene:
    """One large object on a straight path (its start keeps it in the frame for ``TRAIN_FRAMES`` frames)."""
    return _single(EVAL_SEED_BASE + _TRAJECTORY + index, "straight", size="large")


@torch.no_grad()
def generate_many(pipe, prompts: list[str], seeds: list[int], *, frames: int = TRAIN_FRAMES, steps: int = STEPS,
                  guidance: float = GUIDANCE, **kwargs) -> list[torch.Tensor]:
    """Videos of ``frames`` frames from ``pipe`` (any Wan pipeline of ours; ``kwargs`` go to its call), one per
    prompt, each drawn from its own seed (a CPU generator per video, so a video does not depend on its batch):
    a list of (T, 3, H, W) in [0, 1]."""
    if len(prompts) != len(seeds):
        raise ValueError(f"generate_many: {len(prompts)} prompts but {len(seeds)} seeds")
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    out = pipe(prompts, num_frames=wan_num_frames(frames, pipe.vae), height=TRAIN_SIZE, width=TRAIN_SIZE,
               num_inference_steps=steps, guidance_scale=guidance, generator=generators, output_type="np", **kwargs)
    videos = [frames_from_pipeline(video) for video in out.frames]
    if videos[0].shape[0] != frames:
        raise ValueError(f"the pipeline made {videos[0].shape[0]} frames, {frames} were asked for")
    return videos


def generate(pipe, prompt: str, *, seed: int = 0, **kwargs) -> torch.Tensor:
    """One video (see ``generate_many``)."""
    return generate_many(pipe, [prompt], [seed], **kwargs)[0]


def ground_truth(scene: Scene, frames: int) -> torch.Tensor:
    """The rendered scene, (T, 3, H, W) in [0, 1]."""
    return render_scenes([scene], frames).frames[0]


def object_scores(video: torch.Tensor, scene: Scene) -> dict[str, float]:
    """UltraViCo's object-level scores of ``video`` for the single object of ``scene``.

    presence: fraction of frames with the object; continuity: fraction of consecutive frame pairs whose centre
    moves at most 6 px; speed_ratio: mean speed over the prompt's speed; repetition: mean PSNR between frames
    ``TRAIN_FRAMES`` apart (``nan`` for videos of at most that length); sharpness: mean Sobel magnitude on the
    object's outline.
    """
    obj = scene.objects[0]
    centres, _ = track_colour(video, obj.colour)
    speed = mean_speed(centres)
    return {
        "presence": presence(video, obj.colour),
        "continuity": continuity(centres),
        "speed_ratio": speed / SPEEDS[obj.speed] if not math.isnan(speed) else math.nan,
        "repetition": repetition(video, TRAIN_FRAMES) if video.shape[0] > TRAIN_FRAMES else math.nan,
        "sharpness": edge_sharpness(video, obj.colour),
    }


TOKEN_PIXELS = 8  # a latent token is 8x8 pixels (4x VAE, 2x2 patches)


def ground_truth_boxes(scene: Scene, frames: int = TRAIN_FRAMES) -> torch.Tensor:
    """(T, 4) pixel boxes (left, top, right, bottom) of the scene's first object, snapped outwards to the
    latent-token grid and clipped to the frame: the boxes DiTraj is asked to follow."""
    boxes = render_scenes([scene], frames).boxes[0, 0]
    snapped = torch.cat([torch.floor(boxes[:, :2] / TOKEN_PIXELS), torch.ceil(boxes[:, 2:] / TOKEN_PIXELS)], 1)
    return (snapped * TOKEN_PIXELS).clamp(0, TRAIN_SIZE)


def trajectory_for(scene: Scene, frames: int = TRAIN_FRAMES):
    """The scene's ground-truth boxes as a DiTraj ``Trajectory`` (every frame a key box)."""
    from ..trajectory import Trajectory

    boxes = ground_truth_boxes(scene, frames)
    keys = {t: tuple(float(v) for v in boxes[t]) for t in range(frames)}
    return Trajectory.from_key_boxes(keys, num_frames=frames, height=TRAIN_SIZE, width=TRAIN_SIZE)


def trajectory_prompts(scene: Scene) -> dict[str, str]:
    """The caption, and DiTraj's foreground and background prompts in the world's words."""
    text = caption(scene)
    foreground, _, background = text.partition(" on a ")
    return {"prompt": text, "foreground_prompt": foreground, "background_prompt": f"on a {background}"}


def trajectory_score(video: torch.Tensor, scene: Scene) -> float:
    """Mean per-frame IoU between the object of the scene's colour found in ``video`` and the requested
    (ground-truth) boxes."""
    boxes = ground_truth_boxes(scene, video.shape[0])
    return float(trajectory_iou(video, scene.objects[0].colour, boxes).mean())


def rope_steps(steps: int) -> int:
    return max(1, round(ROPE_STEP_FRACTION * steps))


def mask_steps(steps: int) -> int:
    return max(1, round(MASK_STEP_FRACTION * steps))


def mean_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% interval (normal approximation, 1.96 standard errors); NaNs
    dropped."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    mean = sum(kept) / len(kept)
    if len(kept) < 2:
        return mean, math.nan
    variance = sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)
    return mean, 1.96 * math.sqrt(variance / len(kept))
