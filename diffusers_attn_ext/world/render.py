"""Rendering scenes to videos with exact ground truth: per-frame masks and boxes of every object.

``object_centres`` gives each object's centre per frame from its path (pixels, x right, y down); ``render_scenes``
draws a batch of scenes at once on any device (the training loop renders on the GPU). Shapes are drawn from
signed distances with one pixel of anti-aliasing (coverage = clamp(1/2 - distance, 0, 1)); the ground-truth mask
of an object is its coverage >= 1/2, its box the mask's extent, before occlusion by later objects (the mask says
where the object is, the video what is visible). Sizes and speeds are given at the trained 64x64 size and scale
with the frame's shorter side; start positions are fractions of the frame.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..validation import integer
from .scenes import MAX_OBJECTS, TRAIN_SIZE, Scene, WorldObject
from .vocabulary import (
    BACKGROUND_COLOURS,
    CHECKER_CONTRAST,
    CHECKER_PERIOD,
    CURVE_AMPLITUDE,
    CURVE_PERIOD_FRAMES,
    DIRECTIONS,
    OBJECT_COLOURS,
    SHAPES,
    SIZES,
    SPEEDS,
    STRIPE_PERIOD,
    STRIPE_SHADE,
)


@dataclasses.dataclass
class WorldVideo:
    """A batch of rendered scenes.

    frames: (B, T, 3, H, W) in [0, 1]; masks: (B, K, T, H, W) bool, K = MAX_OBJECTS (absent objects all False);
    boxes: (B, K, T, 4) float pixels (x0, y0, x1, y1), exclusive ends, NaN where the object is not in the frame;
    present: (B, K) bool, which of the K slots hold an object.
    """

    frames: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    present: torch.Tensor
    scenes: list[Scene]


def _scale(height: int, width: int) -> float:
    return min(height, width) / TRAIN_SIZE


def object_centres(obj: WorldObject, num_frames: int, height: int, width: int) -> list[tuple[float, float]]:
    """Centre (x, y) in pixels of ``obj`` in each of ``num_frames`` frames of a ``height`` x ``width`` video."""
    if obj.start is None:
        raise ValueError("object_centres: the object has no start position (a parsed caption); give one")
    scale = _scale(height, width)
    radius = SIZES[obj.size] * scale
    dx, dy = DIRECTIONS[obj.direction]
    step = SPEEDS[obj.speed] * scale
    x0, y0 = obj.start[0] * width, obj.start[1] * height
    centres = []
    for t in range(num_frames):
        x, y = x0 + dx * step * t, y0 + dy * step * t
        if obj.path == "curve":
            swing = CURVE_AMPLITUDE * scale * math.sin(2.0 * math.pi * t / CURVE_PERIOD_FRAMES + obj.phase)
            x, y = x - dy * swing, y + dx * swing
        elif obj.path == "bounce":
            x, y = _reflect(x, radius, width), _reflect(y, radius, height)
        centres.append((x, y))
    return centres


def _reflect(p: float, radius: float, length: float) -> float:
    """Fold a straight coordinate into [radius, length - radius], as a ball bouncing off both walls."""
    span = length - 2.0 * radius
    if span <= 0:
        return length / 2.0
    u = (p - radius) % (2.0 * span)
    return radius + (2.0 * span - u if u > span else u)


def _signed_distance(shape: str, dx: torch.Tensor, dy: torch.Tensor, radius: float) -> torch.Tensor:
    """Signed distance in pixels to the outline of a shape centred at the origin (negative inside)."""
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - radius
    if shape == "square":  # half side 0.85 r: about the circle's area
        return torch.maximum(dx.abs(), dy.abs()) - 0.85 * radius
    # triangle pointing up, centroid at the origin, circumradius 1.15 r: vertices (0, -R), (+-R sqrt(3)/2, R/2)
    big = 1.15 * radius
    slanted = (math.sqrt(3.0) * dx.abs() - dy - big) / 2.0
    return torch.maximum(slanted, dy - big / 2.0)


def render_scenes(
    scenes: list[Scene],
    num_frames: int,
    height: int = TRAIN_SIZE,
    width: int = TRAIN_SIZE,
    *,
    device: torch.device | str | None = None,
) -> WorldVideo:
    """Render ``scenes`` (every object with a start position) to a ``WorldVideo`` of ``num_frames`` frames."""
    num_frames, height, width = (integer(f"render_scenes {name}", value, 1) for name, value in
                                 (("num_frames", num_frames), ("height", height), ("width", width)))
    batch = len(scenes)
    scale = _scale(height, width)
    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, height, 1) + 0.5
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, width) + 0.5
    frames = torch.empty(batch, num_frames, 3, height, width, device=device)
    masks = torch.zeros(batch, MAX_OBJECTS, num_frames, height, width, dtype=torch.bool, device=device)
    present = torch.zeros(batch, MAX_OBJECTS, dtype=torch.bool, device=device)
    checker = ((torch.floor(xs / (CHECKER_PERIOD * scale)) + torch.floor(ys / (CHECKER_PERIOD * scale))) % 2) * 2 - 1
    for b, scene in enumerate(scenes):
        level = BACKGROUND_COLOURS[scene.background]
        if scene.background_texture == "checkered":
            # darker checks on white, lighter on black and gray
            sign = -1.0 if level > 0.7 else 1.0
            back = level + sign * CHECKER_CONTRAST * (checker + 1) / 2
        else:
            back = torch.full((1, height, width), level, device=device)
        canvas = back.expand(num_frames, height, width).unsqueeze(1).repeat(1, 3, 1, 1)
        for k, obj in enumerate(scene.objects):
            present[b, k] = True
            centres = torch.tensor(object_centres(obj, num_frames, height, width), device=device)
            dx = xs - centres[:, 0].view(-1, 1, 1)
            dy = ys - centres[:, 1].view(-1, 1, 1)
            distance = _signed_distance(obj.shape, dx, dy, SIZES[obj.size] * scale)
            coverage = (0.5 - distance).clamp(0.0, 1.0)
            colour = torch.tensor(OBJECT_COLOURS[obj.colour], device=device).view(1, 3, 1, 1)
            if obj.texture == "striped":
                dark = ((dx + dy) % (STRIPE_PERIOD * scale * 2)) < STRIPE_PERIOD * scale
                colour = colour * torch.where(dark, STRIPE_SHADE, 1.0).unsqueeze(1)
            canvas = canvas * (1 - coverage.unsqueeze(1)) + colour * coverage.unsqueeze(1)
            masks[b, k] = coverage >= 0.5
        frames[b] = canvas
    return WorldVideo(frames, masks, boxes_from_masks(masks), present, list(scenes))


def boxes_from_masks(masks: torch.Tensor) -> torch.Tensor:
    """(..., H, W) bool -> (..., 4) float (x0, y0, x1, y1), exclusive ends; NaN where a mask is empty."""
    height, width = masks.shape[-2:]
    rows = masks.any(-1)
    cols = masks.any(-2)
    h_index = torch.arange(height, device=masks.device, dtype=torch.float32)
    w_index = torch.arange(width, device=masks.device, dtype=torch.float32)
    inf = torch.tensor(float("inf"), device=masks.device)
    y0 = torch.where(rows, h_index, inf).amin(-1)
    y1 = torch.where(rows, h_index + 1, -inf).amax(-1)
    x0 = torch.where(cols, w_index, inf).amin(-1)
    x1 = torch.where(cols, w_index + 1, -inf).amax(-1)
    boxes = torch.stack([x0, y0, x1, y1], -1)
    return torch.where(masks.flatten(-2).any(-1, keepdim=True), boxes, torch.full_like(boxes, float("nan")))


def render_seeds(seeds: list[int], num_frames: int, height: int = TRAIN_SIZE, width: int = TRAIN_SIZE, *,
                 device: torch.device | str | None = None) -> WorldVideo:
    """Render the scenes that ``sample_scene`` draws from ``seeds``."""
    from .scenes import sample_scene

    return render_scenes([sample_scene(s) for s in seeds], num_frames, height, width, device=device)


__all__ = ["WorldVideo", "object_centres", "render_scenes", "render_seeds", "boxes_from_masks", "SHAPES"]
