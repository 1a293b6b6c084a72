"""Task metrics scored against the world's exact ground truth.

Objects are found by colour: the world's object colours are saturated and far apart in hue and its backgrounds
achromatic (``vocabulary``), so a pixel belongs to the colour ``c`` when its hue is within ``HUE_TOLERANCE``
degrees of ``c``'s, its saturation (max - min) / max is at least ``MIN_SATURATION`` and its value (max) at least
``MIN_VALUE`` (``segment_colour``). Every function takes frames as (T, 3, H, W) floats in [0, 1] (the layout of
``WorldVideo.frames[b]``); ``frames_from_pipeline`` converts a pipeline's numpy output.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F

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
    ys = torch.arange(height, dtype=torch.float32, device=masks.device) + 0.5
    xs = torch.arange(width, dtype=torch.float32, device=masks.device) + 0.5
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


# ----------------------------------------------------------------------------------------------- image quality
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03
REPETITION_PSNR_CAP = 60.0


def _check_frames(frames: torch.Tensor, name: str = "frames") -> torch.Tensor:
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"{name} must be a (T, 3, H, W) tensor, got {shape}")
    return frames.detach().cpu()


def ssim(video: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean structural similarity (Wang et al. 2004) of ``video`` against ``reference``, (T, 3, H, W) in [0, 1].

    Per frame and channel, with local statistics under a Gaussian window ``w`` (size 11, sigma 1.5, normalised;
    'valid' positions only, as the authors' ``filter2(..., 'valid')``; frames smaller than 11 pixels use the
    largest odd window that fits)::

        mu_x = w * x,  sigma_x^2 = w * x^2 - mu_x^2,  sigma_xy = w * (x y) - mu_x mu_y
        SSIM = (2 mu_x mu_y + C1) (2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (sigma_x^2 + sigma_y^2 + C2))

    with ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, data range ``L = 1``; the result is the mean of the SSIM map
    over all positions, channels and frames (float64 throughout). Equal videos give 1.0.
    """
    video = _check_frames(video, "video")
    reference = _check_frames(reference, "reference")
    if video.shape != reference.shape:
        raise ValueError(f"ssim: video {tuple(video.shape)} and reference {tuple(reference.shape)} differ in shape")
    x = video.detach().double().cpu()
    y = reference.detach().double().cpu()
    size = min(SSIM_WINDOW, x.shape[-2], x.shape[-1])
    size -= (size + 1) % 2  # odd
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * SSIM_SIGMA**2))
    g = g / g.sum()
    channels = 5 * x.shape[1]  # x, y, x^2, y^2, x y of every channel, filtered in one separable convolution
    rows = g.view(1, 1, 1, size).expand(channels, 1, 1, size)
    cols = g.view(1, 1, size, 1).expand(channels, 1, size, 1)
    stats = torch.cat([x, y, x * x, y * y, x * y], 1)
    stats = F.conv2d(F.conv2d(stats, rows, groups=channels), cols, groups=channels)
    mu_x, mu_y, xx, yy, xy = stats.chunk(5, 1)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    var_x = xx - mu_x**2
    var_y = yy - mu_y**2
    cov = xy - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


# ----------------------------------------------------------------------------------------------- tracking
def presence(frames: torch.Tensor, colour: str) -> float:
    """Fraction of frames in which the object of ``colour`` is found (``track_colour``: at least ``MIN_PIXELS``
    pixels of that colour at 64x64, scaled with the frame's area)."""
    _, found = track_colour(_check_frames(frames), colour)
    return float(found.float().mean())


def _jumps(centres: torch.Tensor) -> torch.Tensor:
    """Centre jumps (pixels) between frames t and t + 1 over the pairs where both centres are found (not NaN)."""
    if centres.dim() != 2 or centres.shape[-1] != 2:
        raise ValueError(f"centres must be (T, 2) pixels (x, y), got {tuple(centres.shape)}")
    c = centres.double()
    step = c[1:] - c[:-1]
    both = ~(torch.isnan(c[1:]).any(-1) | torch.isnan(c[:-1]).any(-1))
    return step[both].norm(dim=-1)


def continuity(centres: torch.Tensor, max_jump: float = 6.0) -> float:
    """Fraction of consecutive frame pairs (t, t + 1), both found, whose centre jump ``|c_{t+1} - c_t|`` is at most
    ``max_jump`` pixels (the world's fastest motion is 2 px/frame at 64x64, a curve's about 2.6).

    ``centres`` is (T, 2) from ``track_colour`` (NaN where not found); pairs with a NaN are left out, so frames
    where the object vanishes are scored by ``presence``, not here. 0.0 when no pair has both frames found
    (in particular when fewer than 2 frames are found); 1.0 for the ground truth's motion.
    """
    jumps = _jumps(centres)
    if jumps.numel() == 0:
        return 0.0
    return float((jumps <= max_jump).double().mean())


def mean_speed(centres: torch.Tensor) -> float:
    """Mean centre jump ``|c_{t+1} - c_t|`` in pixels per frame over consecutive pairs (t, t + 1) both found;
    NaN when there are fewer than 2 such frames (no such pair)."""
    jumps = _jumps(centres)
    if jumps.numel() == 0:
        return math.nan
    return float(jumps.mean())


def repetition(frames: torch.Tensor, lag: int) -> float:
    """Mean over ``t >= lag`` of ``min(PSNR(frame_t, frame_{t - lag}), 60)`` in dB: how alike frames ``lag``
    apart are. A video that loops with period ``lag`` scores 60; compare against the same measure on the
    ground-truth video, whose objects keep moving. NaN when the video has no more than ``lag`` frames."""
    frames = _check_frames(frames)
    if isinstance(lag, bool) or not isinstance(lag, numbers.Integral) or lag < 1:
        raise ValueError(f"repetition lag={lag!r} is outside the allowed range: a positive integer")
    lag = int(lag)
    if frames.shape[0] <= lag:
        return math.nan
    f = frames.detach().double()
    mse = ((f[lag:] - f[:-lag]) ** 2).flatten(1).mean(1)
    values = torch.where(mse > 0, 10.0 * torch.log10(1.0 / mse.clamp_min(1e-300)), torch.full_like(mse, math.inf))
    return float(values.clamp(max=REPETITION_PSNR_CAP).mean())


_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def edge_sharpness(frames: torch.Tensor, colour: str) -> float:
    """Mean Sobel gradient magnitude of the luminance on the boundary of the object of ``colour``.

    Luminance ``Y = 0.299 R + 0.587 G + 0.114 B``; ``G_x``, ``G_y`` the 3x3 Sobel responses divided by 8 (so a
    ramp of slope ``s`` per pixel gives ``s``; replicated borders), magnitude ``sqrt(G_x^2 + G_y^2)``. The boundary
    is the colour's mask (``segment_colour``) minus its erosion by a 3x3 square (one pixel). The mean over the
    boundary pixels of each frame is averaged over the frames where the object is found (``track_colour``); NaN
    when it is found in none. A blurred copy of a video scores lower than the sharp one.
    """
    frames = _check_frames(frames)
    masks = segment_colour(frames, colour)
    _, found = centroids(masks)
    f = frames.detach().float().cpu()
    luma = (0.299 * f[:, 0] + 0.587 * f[:, 1] + 0.114 * f[:, 2]).unsqueeze(1)
    padded = F.pad(luma, (1, 1, 1, 1), mode="replicate")
    kernels = torch.stack([_SOBEL_X, _SOBEL_X.t()]).unsqueeze(1) / 8.0
    grad = F.conv2d(padded, kernels)
    magnitude = grad.pow(2).sum(1).sqrt()
    m = masks.cpu().float().unsqueeze(1)
    eroded = -F.max_pool2d(-m, 3, stride=1, padding=1)
    boundary = (m - eroded).squeeze(1) > 0.5
    values = []
    for t in range(f.shape[0]):
        if found[t] and boundary[t].any():
            values.append(magnitude[t][boundary[t]].mean())
    if not values:
        return math.nan
    return float(torch.stack(values).double().mean())


def trajectory_iou(frames: torch.Tensor, colour: str, boxes: torch.Tensor) -> torch.Tensor:
    """(T,) IoU per frame between the bounding box of the mask of ``colour`` (``segment_colour``, box by
    ``render.boxes_from_masks``) and the requested ``boxes`` (T, 4) pixels (x0, y0, x1, y1), exclusive ends;
    0 in frames where the object is not found (``track_colour``) or the requested box is NaN or empty."""
    from .render import boxes_from_masks

    frames = _check_frames(frames)
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if boxes.shape != (frames.shape[0], 4):
        raise ValueError(f"trajectory_iou boxes must be (T, 4) = ({frames.shape[0]}, 4), got {tuple(boxes.shape)}")
    masks = segment_colour(frames, colour).cpu()
    _, found = centroids(masks)
    iou = box_iou(boxes_from_masks(masks), boxes.cpu())
    return torch.where(found, iou, torch.zeros_like(iou))
