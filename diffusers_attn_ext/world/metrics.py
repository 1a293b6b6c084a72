"""Task metrics scored against the world's exact ground truth.

Objects are found by colour: the world's object colours are saturated and far apart in hue and its backgrounds
achromatic (``vocabulary``), so a pixel belongs to the colour ``c`` when its hue is within ``HUE_TOLERANCE``
degrees of ``c``'s, its saturation (max - min) / max is at least ``MIN_SATURATION`` and its value (max) at least
``MIN_VALUE`` (``segment_colour``). Every function takes frames as (T, 3, H, W) floats in [0, 1] (the layout of
``WorldVideo.frames[b]``); ``frames_from_pipeline`` converts a pipeline's numpy output.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .vocabulary import DIRECTIONS, OBJECT_COLOURS

HUE_TOLERANCE = 25.0
MIN_SATURATION = 0.4
MIN_VALUE = 0.3
# an object counts as found in a frame when it covers at least this many pixels at the trained 64x64 size
# (a small circle covers about 78)
MIN_PIXELS = 20


def frames_from_pipeline(video) -> torch.Tensor:
    """A pipeline's video (numpy (T, H, W, 3) or a list of PIL images) -> (T, 3, H, W) float in [0, 1]."""
    if isinstance(video, (list, tuple)):
        video = np.stack([np.asarray(frame, dtype=np.float32) / 255.0 for frame in video])
    array = torch.as_tensor(np.asarray(video, dtype=np.float32))
    if array.max() > 1.5:
        array = array / 255.0
    return array.permute(0, 3, 1, 2).contiguous()


def _hue_saturation_value(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = frames.unbind(-3)
    value, _ = frames.max(-3)
    low, _ = frames.min(-3)
    chroma = value - low
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    hue = torch.where(
        value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4)
    ) * 60.0
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), value)
    return hue, saturation, value


def colour_hue(name: str) -> float:
    """Hue in degrees of the world colour ``name``."""
    if name not in OBJECT_COLOURS:
        raise ValueError(f"colour={name!r} is not one of the world's object colours {sorted(OBJECT_COLOURS)}")
    hue, _, _ = _hue_saturation_value(torch.tensor(OBJECT_COLOURS[name]).view(3, 1, 1))
    return float(hue)


def segment_colour(frames: torch.Tensor, colour: str) -> torch.Tensor:
    """(T, 3, H, W) in [0, 1] -> (T, H, W) bool: the pixels of the world colour ``colour``."""
    hue, saturation, value = _hue_saturation_value(frames.float())
    distance = (hue - colour_hue(colour)).abs()
    distance = torch.minimum(distance, 360.0 - distance)
    return (distance <= HUE_TOLERANCE) & (saturation >= MIN_SATURATION) & (value >= MIN_VALUE)


def centroids(masks: torch.Tensor, min_pixels: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, H, W) bool -> centres (T, 2) as (x, y) pixels (NaN where not found) and found (T,) bool.

    ``min_pixels`` defaults to ``MIN_PIXELS`` scaled by the frame's area relative to 64x64.
    """
    height, width = masks.shape[-2:]
    if min_pixels is None:
        min_pixels = MIN_PIXELS * height * width / 4096.0
    weights = masks.float()
    count = weights.sum((-2, -1))
    ys = torch.arange(height, dtype=torch.float32) + 0.5
    xs = torch.arange(width, dtype=torch.float32) + 0.5
    safe = count.clamp_min(1.0)
    cx = (weights.sum(-2) * xs).sum(-1) / safe
    cy = (weights.sum(-1) * ys).sum(-1) / safe
    found = count >= min_pixels
    centres = torch.stack([cx, cy], -1)
    return torch.where(found.unsqueeze(-1), centres, torch.full_like(centres, float("nan"))), found


def track_colour(frames: torch.Tensor, colour: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Centres and found-flags of the object of ``colour`` in each frame."""
    return centroids(segment_colour(frames, colour))


def displacement(centres: torch.Tensor, ends: int = 3) -> torch.Tensor:
    """Mean position of the last ``ends`` found frames minus that of the first ``ends`` (x, y pixels); NaN when
    fewer than 2 * ``ends`` frames have the object."""
    valid = centres[~torch.isnan(centres[:, 0])]
    if valid.shape[0] < 2 * ends:
        return torch.full((2,), float("nan"))
    return valid[-ends:].mean(0) - valid[:ends].mean(0)


def moves_towards(centres: torch.Tensor, direction: str, min_travel: float = 3.0) -> bool:
    """True when the object travels at least ``min_travel`` pixels along ``direction`` (left/right/up/down),
    more than it travels across it, between the first and the last three frames it is found in."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction={direction!r} is not one of {sorted(DIRECTIONS)}")
    d = displacement(centres)
    if torch.isnan(d).any():
        return False
    ux, uy = DIRECTIONS[direction]
    along = float(d[0] * ux + d[1] * uy)
    across = abs(float(d[0] * -uy + d[1] * ux))
    return along >= min_travel and along > across


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of boxes (..., 4) as (x0, y0, x1, y1), exclusive ends; 0 where either box is NaN or empty."""
    x0 = torch.maximum(a[..., 0], b[..., 0])
    y0 = torch.maximum(a[..., 1], b[..., 1])
    x1 = torch.minimum(a[..., 2], b[..., 2])
    y1 = torch.minimum(a[..., 3], b[..., 3])
    inter = (x1 - x0).clamp_min(0) * (y1 - y0).clamp_min(0)
    area_a = (a[..., 2] - a[..., 0]).clamp_min(0) * (a[..., 3] - a[..., 1]).clamp_min(0)
    area_b = (b[..., 2] - b[..., 0]).clamp_min(0) * (b[..., 3] - b[..., 1]).clamp_min(0)
    union = area_a + area_b - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1e-12), torch.zeros_like(union))
    return torch.nan_to_num(iou, nan=0.0)


def psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of ``video`` against ``reference`` (both in [0, 1]); inf when equal."""
    mse = float(((video.double() - reference.double()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)
