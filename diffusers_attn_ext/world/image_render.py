"""Rendering image scenes with exact ground truth: the image, and each subject's mask and box.

``scene_parameters`` turns scenes into tensors (one row per scene, one column per subject slot) and
``render_parameters`` draws a whole batch at once from them on any device, vectorised over the batch (the training
loop samples scenes in its data workers and renders on the GPU). ``render_image_scenes`` does both.

Geometry, for a subject of centre ``c`` (pixels; pixel centres at ``i + 1/2``), radius ``r`` and rotation ``phi``:
``(dx, dy)`` = the pixel minus ``c``, rotated by ``-phi``; its signed distance ``d`` to the outline (negative inside)
is that of the video world (``render._signed_distance``)::

    circle    |(dx, dy)| - r
    square    max(|dx|, |dy|) - 0.85 r
    triangle  max((sqrt(3) |dx| - dy - R) / 2, dy - R / 2),  R = 1.15 r   (pointing up before rotation)

coverage ``= clamp(1/2 - d, 0, 1)`` (one pixel of anti-aliasing), the ground-truth mask is coverage >= 1/2 and the
box the mask's extent (``render.boxes_from_masks``). The pattern darkens the subject's colour by its ``shade`` where,
with ``(u, v)`` = ``(dx, dy)`` rotated by the pattern angle and ``P`` the period in pixels, ``f(x) = x - floor(x)``::

    striped  f(u / P + p0) < 1/2
    dotted   (f(u / P + p0) - 1/2)^2 + (f(v / P + p1) - 1/2)^2 < DOT_RADIUS^2
    halved   u >= 0

Subjects are painted in slot order, ``image = image (1 - coverage) + colour coverage``; sampled scenes never overlap
(``image_scenes``), so each mask is the visible subject.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..validation import integer
from .image_scenes import DOT_RADIUS, IMAGE_SIZE, MAX_SUBJECTS, PATTERNS, ImageScene, sample_image_scene
from .render import boxes_from_masks
from .vocabulary import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES

SQUARE_HALF_SIDE = 0.85
TRIANGLE_CIRCUMRADIUS = 1.15


@dataclasses.dataclass
class WorldImages:
    """A batch of rendered image scenes.

    images: (B, 3, H, W) in [0, 1]; masks: (B, K, H, W) bool, K = MAX_SUBJECTS (absent slots all False);
    boxes: (B, K, 4) float pixels (x0, y0, x1, y1), exclusive ends, NaN for absent slots; present: (B, K) bool.
    """

    images: torch.Tensor
    masks: torch.Tensor
    boxes: torch.Tensor
    present: torch.Tensor
    scenes: list[ImageScene]


_FIELDS = ("cx", "cy", "radius", "rotation", "pattern_angle", "pattern_period", "phase0", "phase1", "shade")


def scene_parameters(scenes: list[ImageScene]) -> dict[str, torch.Tensor]:
    """Scenes as tensors: ``present`` (B, K) bool, ``shape``, ``pattern``, ``colour_index`` (B, K) int64 (indices
    into SHAPES, PATTERNS, OBJECT_COLOURS; 0 for absent slots), ``colour`` (B, K, 3), ``background`` (B,) and
    the float fields (B, K) ``cx, cy`` (fractions), ``radius``, ``pattern_period`` (fractions of the shorter side),
    ``rotation``, ``pattern_angle`` (radians), ``phase0, phase1``, ``shade``. Every subject needs a position."""
    batch = len(scenes)
    floats = {name: torch.zeros(batch, MAX_SUBJECTS, dtype=torch.float64) for name in _FIELDS}
    present = torch.zeros(batch, MAX_SUBJECTS, dtype=torch.bool)
    shape = torch.zeros(batch, MAX_SUBJECTS, dtype=torch.int64)
    pattern = torch.zeros(batch, MAX_SUBJECTS, dtype=torch.int64)
    colour_index = torch.zeros(batch, MAX_SUBJECTS, dtype=torch.int64)
    colour = torch.zeros(batch, MAX_SUBJECTS, 3, dtype=torch.float64)
    background = torch.zeros(batch, dtype=torch.float64)
    colour_names = list(OBJECT_COLOURS)
    for b, scene in enumerate(scenes):
        background[b] = BACKGROUND_COLOURS[scene.background]
        for k, s in enumerate(scene.subjects):
            if s.centre is None or s.radius is None:
                raise ValueError(f"scene_parameters: subject {s.name!r} of scene {b} has no position (a parsed caption)")
            present[b, k] = True
            shape[b, k] = SHAPES.index(s.shape)
            pattern[b, k] = PATTERNS.index(s.pattern)
            colour_index[b, k] = colour_names.index(s.colour)
            colour[b, k] = torch.tensor(OBJECT_COLOURS[s.colour], dtype=torch.float64)
            values = (s.centre[0], s.centre[1], s.radius, s.rotation, s.pattern_angle, s.pattern_period,
                      s.pattern_phase[0], s.pattern_phase[1], s.shade)
            for name, value in zip(_FIELDS, values, strict=True):
                floats[name][b, k] = value
    out = {name: value.float() for name, value in floats.items()}
    out.update(present=present, shape=shape, pattern=pattern, colour_index=colour_index, colour=colour.float(),
               background=background.float())
    return out


def signed_distance(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Signed distance in pixels (negative inside) to the outline of the shapes ``shape`` (indices into SHAPES,
    broadcast against ``dx, dy``) of ``radius`` pixels, at offsets ``dx, dy`` from their centres (module docstring)."""
    circle = torch.sqrt(dx * dx + dy * dy) - radius
    square = torch.maximum(dx.abs(), dy.abs()) - SQUARE_HALF_SIDE * radius
    big = TRIANGLE_CIRCUMRADIUS * radius
    triangle = torch.maximum((math.sqrt(3.0) * dx.abs() - dy - big) / 2.0, dy - big / 2.0)
    return torch.where(shape == SHAPES.index("circle"), circle,
                       torch.where(shape == SHAPES.index("square"), square, triangle))


def pattern_dark(pattern: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, angle: torch.Tensor,
                 period: torch.Tensor, phase0: torch.Tensor, phase1: torch.Tensor) -> torch.Tensor:
    """Where the pattern ``pattern`` (indices into PATTERNS) darkens the subject (module docstring); offsets and
    the period in pixels."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy
    a = torch.remainder(u / period + phase0, 1.0) - 0.5  # x - floor(x)
    b = torch.remainder(v / period + phase1, 1.0) - 0.5
    striped = a < 0.0
    dotted = a * a + b * b < DOT_RADIUS**2
    halved = u >= 0.0
    return torch.where(pattern == PATTERNS.index("striped"), striped,
                       torch.where(pattern == PATTERNS.index("dotted"), dotted,
                                   torch.where(pattern == PATTERNS.index("halved"), halved,
                                               torch.zeros_like(striped))))


def render_parameters(params: dict[str, torch.Tensor], height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, *,
                      device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, H, W) in [0, 1] and masks (B, K, H, W) bool of the scenes ``params`` (``scene_parameters``),
    every scene of the batch at once."""
    height = integer("render_parameters height", height, 1)
    width = integer("render_parameters width", width, 1)
    p = {name: value.to(device) for name, value in params.items()}
    batch = p["present"].shape[0]
    scale = float(min(height, width))
    ys = (torch.arange(height, device=device, dtype=torch.float32) + 0.5).view(1, height, 1)
    xs = (torch.arange(width, device=device, dtype=torch.float32) + 0.5).view(1, 1, width)
    image = p["background"].view(batch, 1, 1, 1).expand(batch, 3, height, width).clone()
    masks = []
    for k in range(MAX_SUBJECTS):
        def col(name: str, k: int = k) -> torch.Tensor:
            return p[name][:, k].view(batch, 1, 1)

        ox, oy = xs - col("cx") * width, ys - col("cy") * height
        rot_cos, rot_sin = torch.cos(col("rotation")), torch.sin(col("rotation"))
        dx = rot_cos * ox + rot_sin * oy
        dy = -rot_sin * ox + rot_cos * oy
        distance = signed_distance(col("shape"), dx, dy, col("radius") * scale)
        coverage = (0.5 - distance).clamp(0.0, 1.0) * col("present")
        dark = pattern_dark(col("pattern"), dx, dy, col("pattern_angle"), col("pattern_period") * scale,
                            col("phase0"), col("phase1"))
        factor = torch.where(dark, col("shade"), torch.ones_like(coverage))
        colour = p["colour"][:, k].view(batch, 3, 1, 1) * factor.unsqueeze(1)
        image = image * (1.0 - coverage.unsqueeze(1)) + colour * coverage.unsqueeze(1)
        masks.append(coverage >= 0.5)
    return image, torch.stack(masks, 1)


def render_image_scenes(scenes: list[ImageScene], height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, *,
                        device: torch.device | str | None = None) -> WorldImages:
    """Render ``scenes`` (every subject with a position) to a ``WorldImages`` of ``height`` x ``width``."""
    params = scene_parameters(scenes)
    images, masks = render_parameters(params, height, width, device=device)
    present = params["present"].to(masks.device)
    return WorldImages(images, masks, boxes_from_masks(masks), present, list(scenes))


def render_image_seeds(seeds: list[int], height: int = IMAGE_SIZE, width: int = IMAGE_SIZE, *,
                       num_subjects: int | None = None, device: torch.device | str | None = None) -> WorldImages:
    """Render the scenes that ``sample_image_scene`` draws from ``seeds``."""
    scenes = [sample_image_scene(int(s), num_subjects=num_subjects) for s in seeds]
    return render_image_scenes(scenes, height, width, device=device)


__all__ = [
    "WorldImages",
    "pattern_dark",
    "render_image_scenes",
    "render_image_seeds",
    "render_parameters",
    "scene_parameters",
    "signed_distance",
]
