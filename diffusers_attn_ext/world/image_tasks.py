"""The image tasks the image methods are measured on, and their metrics (``benchmarks/quality_image.py``).

Prompts come from evaluation seeds (``train_video.EVAL_SEED_BASE + evaluate_image.IMAGE_EVAL_OFFSET + offset``;
never trained on), each task at its own offset so tasks never share scenes.

**Stories (IR-Diffusion).** ``story_scenes(i)`` is a reference scene of two subjects (seed ``i``) and
``STORY_IMAGES - 1`` targets: each target takes the layout (centres, radii) and background of another
two-subject scene and puts the reference's two subjects (class and colour, so the same two names in every
prompt) into its two slots, in a random order. With ``same_identity=True`` every target subject keeps the
reference subject's identity (rotation, pattern, its angle, period, phase and shade; its size is the slot's):
the ground truth of a consistent story. With ``same_identity=False`` each keeps the identity its slot was drawn
with: the same named subjects, independent identities (what a model that ignores the other images of the batch
should make).

**Regions.** A subject is found by its colour (``metrics.segment_colour``: hue, saturation and value
thresholds); it is *found* when at least ``metrics.MIN_PIXELS`` pixels scaled to the image area (5 at 32x32)
have its colour.

**Subject consistency** of a subject between an image and the reference: the similarity of their
*descriptors*. The descriptor ``d`` of a found subject is a two-channel crop, ``CROP`` x ``CROP`` bilinear
samples around the mask's centroid, ``CROP_SPREAD`` root-mean-square radii of the mask to either side (the
judge's crop, ``WorldJudge.crops``; so position and size are factored out): channel 1 the mask, channel 2
``CONTRAST_WEIGHT * mask * (log(Y + 0.02) - mean of it over the mask)`` with ``Y`` the Rec. 601 luminance (the
pattern, which darkens the colour by a factor, at one contrast whatever the colour). The similarity is::

    sim(a, b) = 2 <d_a, d_b> / (|d_a|^2 + |d_b|^2)        in [-1, 1], 1 iff d_a = d_b

(outline and rotation through the mask channel, pattern through the contrast channel). A story's consistency
is the mean of ``sim`` over its targets and the two subjects, where both are found (NaN if none). Beside it,
**pattern agreement**: the fraction of (target, subject) pairs where the judge's predicted pattern of that
subject's colour equals its prediction on the reference (chance: the sum of the squared pattern frequencies,
1/4 for uniform patterns).

**Fusion** of two subjects ``a``, ``b`` in an image: *missing* when either is not found; *merged* when both are
found and their masks touch or interleave: ``contact`` = (pixels of ``a`` 8-adjacent to a pixel of ``b``, plus
the same for ``b``) / (pixels of ``a`` + pixels of ``b``) is above ``CONTACT``, or the intersection of their
robust boxes (``BOX_QUANTILE`` to ``1 - BOX_QUANTILE`` quantiles of the mask's pixel coordinates) covers more
than ``BOX_OVERLAP`` of the smaller box. *Fused* = missing or merged; the fusion rate of a story is the fraction
of its targets fused. World scenes never fuse: their subjects' bounding squares are disjoint, a pixel apart.

**IR-Diffusion's regions** (``detected_token_masks``): as the authors' masks come from detections on rehearsal
images, the regions are found on the stock generation of the same prompt and seed: a token (``grid`` x ``grid``
over the image) belongs to a subject when at least ``TOKEN_FRACTION`` of its pixels have the subject's colour
(the larger share when two qualify); an image where a subject gets no token falls back to the scene's nominal
boxes (``image_scenes.subject_boxes``), shared tokens going to the nearer centre.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from ..validation import boolean, integer
from .evaluate_image import IMAGE_EVAL_OFFSET
from .image_scenes import ImageScene, ImageSubject, sample_image_scene, subject_boxes
from .judge import COLOURS, WorldJudge
from .metrics import MIN_PIXELS, segment_colour
from .train_video import EVAL_SEED_BASE

# evaluation seed offsets per task (evaluate_image.evaluation_scenes uses offset 0 and up to 64 scenes)
STORY_OFFSET, SEARCH_OFFSET = 50_000, 60_000
STORY_IMAGES = 4
CROP = 16
CROP_SPREAD = 2.5
CONTRAST_WEIGHT = 2.0
CONTACT = 0.1
BOX_QUANTILE = 0.05
BOX_OVERLAP = 0.25
TOKEN_FRACTION = 0.25


def task_scene(offset: int, index: int, num_subjects: int | None = None) -> ImageScene:
    """The evaluation scene ``index`` of the task at ``offset``."""
    return sample_image_scene(EVAL_SEED_BASE + IMAGE_EVAL_OFFSET + integer("offset", offset, 0)
                              + integer("index", index, 0), num_subjects=num_subjects)


def story_scenes(index: int, images: int = STORY_IMAGES, *, same_identity: bool = True) -> list[ImageScene]:
    """Story ``index``: the reference scene, then ``images - 1`` targets with its two subjects (module
    docstring)."""
    index = integer("story_scenes index", index, 0)
    images = integer("story_scenes images", images, 2)
    same_identity = boolean("story_scenes same_identity", same_identity)
    reference = task_scene(STORY_OFFSET, index * images, num_subjects=2)
    scenes = [reference]
    for j in range(1, images):
        layout = task_scene(STORY_OFFSET, index * images + j, num_subjects=2)
        order = list(reference.subjects)
        random.Random(EVAL_SEED_BASE + STORY_OFFSET + index * images + j).shuffle(order)
        subjects = []
        for story, slot in zip(order, layout.subjects, strict=True):
            identity = story if same_identity else slot
            subjects.append(ImageSubject(
                shape=story.shape, colour=story.colour, centre=slot.centre, radius=slot.radius,
                rotation=identity.rotation, pattern=identity.pattern, pattern_angle=identity.pattern_angle,
                pattern_period=identity.pattern_period, pattern_phase=identity.pattern_phase, shade=identity.shade))
        subjects.sort(key=lambda s: s.centre[0])
        scenes.append(ImageScene(tuple(subjects), background=layout.background))
    return scenes


def _check_image(image: torch.Tensor) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image must be a (3, H, W) tensor in [0, 1], got {shape}")
    return image.float()


def subject_mask(image: torch.Tensor, colour: str) -> torch.Tensor:
    """(H, W) bool: the pixels of ``colour`` in a (3, H, W) image."""
    return segment_colour(_check_image(image)[None], colour)[0]


def min_pixels(height: int, width: int) -> float:
    """Pixels a found subject needs at this size: ``metrics.MIN_PIXELS`` scaled from 64x64."""
    return MIN_PIXELS * height * width / 4096.0


def is_found(mask: torch.Tensor) -> bool:
    return float(mask.sum()) >= min_pixels(*mask.shape[-2:])


def descriptor(image: torch.Tensor, colour: str) -> torch.Tensor | None:
    """The subject descriptor (module docstring) of ``colour`` in ``image``: (2 CROP^2,) float64, or None when
    the subject is not found."""
    image = _check_image(image)
    mask = subject_mask(image, colour)
    if not is_found(mask):
        return None
    weight = mask.float()
    luma = 0.299 * image[0] + 0.587 * image[1] + 0.114 * image[2]
    log_luma = torch.log(luma.clamp_min(0.0) + 0.02)
    mean = (log_luma * weight).sum() / weight.sum()
    maps = torch.stack([weight, CONTRAST_WEIGHT * weight * (log_luma - mean)])[None]
    crop = WorldJudge.crops(maps, weight[None])
    return crop.flatten().double()


def similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """2 <a, b> / (|a|^2 + |b|^2) in float64."""
    a, b = a.double(), b.double()
    return float(2.0 * (a * b).sum() / ((a * a).sum() + (b * b).sum()).clamp_min(1e-12))


def consistency(image: torch.Tensor, reference: torch.Tensor, colour: str) -> float:
    """``similarity`` of the subject of ``colour`` in ``image`` and in ``reference``; NaN unless both are found."""
    a, b = descriptor(image, colour), descriptor(reference, colour)
    return math.nan if a is None or b is None else similarity(a, b)


def _robust_box(mask: torch.Tensor) -> torch.Tensor:
    ys, xs = mask.nonzero(as_tuple=True)
    q = torch.tensor([BOX_QUANTILE, 1.0 - BOX_QUANTILE], dtype=torch.float64)
    x0, x1 = torch.quantile(xs.double(), q)
    y0, y1 = torch.quantile(ys.double(), q)
    return torch.stack([x0, y0, x1 + 1, y1 + 1])


def fusion(image: torch.Tensor, colour_a: str, colour_b: str) -> dict[str, float]:
    """``missing``, ``merged`` and ``fused`` (1.0 or 0.0) of the subjects of two colours, with their ``contact``
    and ``box_overlap`` (NaN when missing); module docstring."""
    image = _check_image(image)
    ma, mb = subject_mask(image, colour_a), subject_mask(image, colour_b)
    if not (is_found(ma) and is_found(mb)):
        return {"missing": 1.0, "merged": 0.0, "fused": 1.0, "contact": math.nan, "box_overlap": math.nan}

    def near(mask):
        return F.max_pool2d(mask.float()[None, None], 3, stride=1, padding=1)[0, 0] > 0

    touching = float((near(ma) & mb).sum() + (near(mb) & ma).sum())
    contact = touching / float(ma.sum() + mb.sum())
    a, b = _robust_box(ma), _robust_box(mb)
    inter = ((torch.minimum(a[2:], b[2:]) - torch.maximum(a[:2], b[:2])).clamp_min(0)).prod()
    smaller = torch.minimum((a[2:] - a[:2]).prod(), (b[2:] - b[:2]).prod())
    overlap = float(inter / smaller.clamp_min(1e-12))
    merged = float(contact > CONTACT or overlap > BOX_OVERLAP)
    return {"missing": 0.0, "merged": merged, "fused": merged, "contact": contact, "box_overlap": overlap}


@torch.no_grad()
def predicted_patterns(judge: WorldJudge, images: torch.Tensor) -> torch.Tensor:
    """(B, 6) int64: the judge's predicted pattern of each colour (``judge.COLOURS`` order) in each image."""
    judge.eval()
    return judge(images)["pattern"].argmax(-1).cpu()


def story_scores(images: torch.Tensor, scene: ImageScene, judge: WorldJudge | None = None) -> dict[str, float]:
    """Scores of one story's images (N, 3, H, W), reference first, for the subjects of the reference ``scene``:
    ``consistency`` (mean ``sim`` over targets and subjects found in both), ``fusion``, ``missing``, ``merged``
    (fractions of the targets), ``found`` (fraction of target subjects found) and, with a ``judge``,
    ``pattern_agreement``."""
    if images.dim() != 4 or images.shape[0] < 2:
        raise ValueError(f"story_scores needs (N >= 2, 3, H, W) images, reference first, got {tuple(images.shape)}")
    if len(scene.subjects) != 2:
        raise ValueError(f"story_scores needs a reference scene of two subjects, got {len(scene.subjects)}")
    colours = [s.colour for s in scene.subjects]
    sims, found, rows = [], [], []
    for target in images[1:]:
        for c in colours:
            sims.append(consistency(target, images[0], c))
            found.append(float(is_found(subject_mask(target, c))))
        rows.append(fusion(target, *colours))
    kept = [s for s in sims if not math.isnan(s)]
    out = {"consistency": sum(kept) / len(kept) if kept else math.nan,
           "found": sum(found) / len(found),
           **{name: sum(r[key] for r in rows) / len(rows)
              for name, key in (("fusion", "fused"), ("missing", "missing"), ("merged", "merged"))}}
    if judge is not None:
        patterns = predicted_patterns(judge, images)
        agree = [float(patterns[i, COLOURS.index(c)] == patterns[0, COLOURS.index(c)])
                 for i in range(1, images.shape[0]) for c in colours]
        out["pattern_agreement"] = sum(agree) / len(agree)
    return out


def detected_token_masks(image: torch.Tensor, scene: ImageScene, grid: int) -> tuple[dict[str, torch.Tensor], bool]:
    """``({subject name: (grid, grid) bool}, detected)``: IR-Diffusion's token regions of ``scene``'s subjects
    found in ``image`` (a stock generation), or the scene's nominal boxes when a subject gets no token
    (``detected`` False); module docstring."""
    image = _check_image(image)
    grid = integer("grid", grid, 1)
    height, width = image.shape[-2:]
    if height % grid or width % grid:
        raise ValueError(f"grid={grid} does not divide the image size {height}x{width}")
    shares = torch.stack([F.avg_pool2d(subject_mask(image, s.colour).float()[None, None],
                                       (height // grid, width // grid))[0, 0] for s in scene.subjects])
    best, owner = shares.max(0)
    masks = {s.name: (owner == k) & (best >= TOKEN_FRACTION) for k, s in enumerate(scene.subjects)}
    if all(bool(m.any()) for m in masks.values()):
        return masks, True
    ys = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    xs = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    boxes = subject_boxes(scene)
    inside, distance = [], []
    for s in scene.subjects:
        x0, y0, x1, y1 = boxes[s.name]
        rows = torch.arange(grid)
        r0, r1 = min(round(y0 * grid), grid - 1), max(round(y1 * grid), min(round(y0 * grid), grid - 1) + 1)
        c0, c1 = min(round(x0 * grid), grid - 1), max(round(x1 * grid), min(round(x0 * grid), grid - 1) + 1)
        inside.append(((rows >= r0) & (rows < r1))[:, None] & ((rows >= c0) & (rows < c1))[None, :])
        distance.append((ys[:, None] - s.centre[1]) ** 2 + (xs[None, :] - s.centre[0]) ** 2)
    inside, distance = torch.stack(inside), torch.stack(distance)
    nearest = torch.where(inside, distance, torch.full_like(distance, math.inf)).argmin(0)
    return {s.name: inside[k] & (nearest == k) for k, s in enumerate(scene.subjects)}, False


__all__ = [
    "SEARCH_OFFSET",
    "STORY_IMAGES",
    "STORY_OFFSET",
    "consistency",
    "descriptor",
    "detected_token_masks",
    "fusion",
    "predicted_patterns",
    "similarity",
    "story_scenes",
    "story_scores",
    "subject_mask",
    "task_scene",
]
