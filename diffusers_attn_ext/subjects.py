"""Subjects of a multi-subject batch: boxes per image, validation, token-grid mapping and repositioning.

IR-Diffusion (He et al., arXiv 2411.19261; authors' code ``hehuiguo/DreamStory``,
``DreamStoryScaledAttnProcessor``) needs, for every image of a batch and every shared subject, the region the
subject occupies. Image 0 is the reference; images 1.. are targets. Regions are boxes ``(x0, y0, x1, y1)``
in fractions of the image width and height (:class:`~diffusers_attn_ext.boxes.Box`; resolution-free, so one
layout serves every latent size), or boolean masks of any resolution (resized to the token grid by nearest
neighbour).

On a token grid of ``H x W`` a box covers rows ``round(y0 H) .. round(y1 H) - 1`` and columns
``round(x0 W) .. round(x1 W) - 1`` (at least one token each way). Reposition Attention (Sec. 3.3) moves the
reference subject into the target subject's box: the reference region cropped to its bounding rectangle is
resized onto the target's bounding rectangle, as ``F.interpolate`` does it (the authors use ``nearest``):

- nearest: target token ``(y, x)`` takes reference token ``(r0 + floor((y - t0) s), ...)`` with the scale
  ``s = h_r / h_t`` in float32, as PyTorch computes it (the indices are taken from ``F.interpolate`` itself);
- bilinear (align_corners=False): source coordinate ``r0 + (y - t0 + 0.5) h_r / h_t - 0.5``, clamped to the
  reference rectangle, blended from its 2 x 2 neighbours.

Source coordinates never leave the reference rectangle, so boxes at the image border need no special case.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .boxes import Box
from .validation import as_number

INTERPOLATIONS = ("nearest", "bilinear")


@dataclass(frozen=True)
class TokenRect:
    """Rows ``row0 .. row1 - 1`` and columns ``col0 .. col1 - 1`` of a token grid."""

    row0: int
    row1: int
    col0: int
    col1: int

    @property
    def height(self) -> int:
        return self.row1 - self.row0

    @property
    def width(self) -> int:
        return self.col1 - self.col0


Region = Box | torch.Tensor


def _as_box(value, subject: str, image: int) -> Box:
    """A :class:`~diffusers_attn_ext.boxes.Box` in fractions of the image (``0 <= x0 < x1 <= 1``, ``0 <= y0 < y1 <=
    1``) from a Box or 4 numbers; ValueError naming the subject when it is outside the image."""
    if not isinstance(value, Box) and (isinstance(value, (str, bytes)) or not isinstance(value, Sequence)
                                       or len(value) != 4):
        shown = tuple(value) if isinstance(value, Sequence) and not isinstance(value, (str, bytes)) else value
        raise ValueError(
            f"box of subject {subject!r} in image {image} is {shown!r}: give 4 numbers (x0, y0, x1, y1), "
            "fractions of width and height"
        )
    if not isinstance(value, Box):
        numbers = [as_number(v) for v in value]
        if any(v is None for v in numbers):
            raise ValueError(
                f"box of subject {subject!r} in image {image} is {tuple(value)!r}: give 4 numbers (x0, y0, x1, y1), "
                "fractions of width and height"
            )
    box = value if isinstance(value, Box) else Box(*(float(v) for v in numbers))
    inside = 0.0 <= box.x0 < box.x1 <= 1.0 and 0.0 <= box.y0 < box.y1 <= 1.0
    if not inside:
        raise ValueError(
            f"box of subject {subject!r} in image {image} is {tuple(box)}: it must lie inside the "
            "image, (x0, y0, x1, y1) with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 (fractions of width and height)"
        )
    return box


def _as_region(value, subject: str, image: int) -> Region:
    if isinstance(value, torch.Tensor):
        if value.dim() != 2 or value.dtype != torch.bool or not bool(value.any()):
            raise ValueError(
                f"mask of subject {subject!r} in image {image} must be a non-empty 2-d bool tensor, got "
                f"{tuple(value.shape)} {value.dtype}"
            )
        return value
    return _as_box(value, subject, image)


def box_rect(box: Box, height: int, width: int) -> TokenRect:
    """Token rectangle of ``box`` on a ``height x width`` grid (rounded edges, at least one token)."""
    row0, col0 = min(round(box.y0 * height), height - 1), min(round(box.x0 * width), width - 1)
    row1, col1 = max(round(box.y1 * height), row0 + 1), max(round(box.x1 * width), col0 + 1)
    return TokenRect(row0, row1, col0, col1)


def region_grid(region: Region, height: int, width: int) -> torch.Tensor:
    """Boolean ``[height, width]`` token mask of a box or a mask."""
    if isinstance(region, Box):
        rect = box_rect(region, height, width)
        grid = torch.zeros(height, width, dtype=torch.bool)
        grid[rect.row0:rect.row1, rect.col0:rect.col1] = True
        return grid
    resized = F.interpolate(region[None, None].float(), size=(height, width), mode="nearest")[0, 0] > 0
    if not bool(resized.any()):
        raise ValueError(f"a subject mask of shape {tuple(region.shape)} vanishes on the {height}x{width} token grid")
    return resized


def bounding_rect(grid: torch.Tensor) -> TokenRect:
    """Bounding rectangle of the true tokens of a boolean grid."""
    rows, cols = grid.any(1).nonzero().flatten(), grid.any(0).nonzero().flatten()
    return TokenRect(int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)


def _source_axis(start: int, size: int, target_size: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per target index 0..target_size-1: source indices ``[n, k]`` in ``start .. start + size - 1`` and weights."""
    if mode == "nearest":
        positions = torch.arange(size, dtype=torch.float32)[None, None, :, None]
        src = F.interpolate(positions, size=(target_size, 1), mode="nearest")[0, 0, :, 0].long()
        return (start + src)[:, None], torch.ones(target_size, 1, dtype=torch.float64)
    dst = torch.arange(target_size, dtype=torch.float64)
    ratio = size / target_size
    pos = torch.clamp((dst + 0.5) * ratio - 0.5, min=0.0, max=size - 1)
    low = torch.floor(pos).long()
    high = torch.clamp(low + 1, max=size - 1)
    frac = pos - low
    return torch.stack([start + low, start + high], 1), torch.stack([1 - frac, frac], 1)


def reposition_map(reference: TokenRect, target: TokenRect, mode: str = "nearest"):
    """Where each token of the ``target`` rectangle reads the reference subject from.

    Returns ``(rows, cols, weights)``, each ``[target.height, target.width, k]`` (k = 1 nearest, 4 bilinear):
    target token ``(target.row0 + i, target.col0 + j)`` is ``sum_k weights[i, j, k] * ref[rows[i, j, k],
    cols[i, j, k]]``. Coordinates are absolute grid coordinates inside the reference rectangle.
    """
    if mode not in INTERPOLATIONS:
        raise ValueError(f"interpolation={mode!r} is not one of {INTERPOLATIONS}")
    rows, row_w = _source_axis(reference.row0, reference.height, target.height, mode)
    cols, col_w = _source_axis(reference.col0, reference.width, target.width, mode)
    kr, kc = rows.shape[1], cols.shape[1]
    grid_rows = rows[:, None, :, None].expand(-1, target.width, kr, kc).reshape(target.height, target.width, -1)
    grid_cols = cols[None, :, None, :].expand(target.height, -1, kr, kc).reshape(target.height, target.width, -1)
    weights = (row_w[:, None, :, None] * col_w[None, :, None, :]).reshape(target.height, target.width, -1)
    return grid_rows, grid_cols, weights


@dataclass(frozen=True)
class SubjectLayout:
    """Subjects shared by a batch of images and their regions, image 0 being the reference.

    ``regions[i][s]`` is the region of subject ``names[s]`` in image ``i``. Build it with
    :meth:`from_boxes`, which validates the input (see there).
    """

    names: tuple[str, ...]
    regions: tuple[tuple[Region, ...], ...]

    @property
    def num_images(self) -> int:
        return len(self.regions)

    @classmethod
    def from_boxes(cls, boxes: Sequence[Mapping[str, object]], prompts: Sequence[str] | None = None) -> SubjectLayout:
        """A layout from one ``{subject name: box or bool mask}`` per image (reference first).

        ValueError, naming the subject, when: a subject has a region in some images only (every image must
        show every subject); a box lies outside the image; two subjects of one image overlap (the authors
        make subject masks disjoint, ``is_no_mask_overlap=True``, since Isolation Attention assigns every
        token to one subject); a prompt string does not name a subject as a whole word (case-insensitive).
        """
        if len(boxes) == 0:
            raise ValueError("subject_boxes is empty: give one {subject: box} mapping per image, reference first")
        names = tuple(dict.fromkeys(name for image in boxes for name in image))
        for name in names:
            missing = [i for i, image in enumerate(boxes) if name not in image]
            if missing:
                present = [i for i, image in enumerate(boxes) if name in image]
                raise ValueError(
                    f"subject {name!r} has a region in image(s) {present} but not in image(s) {missing}: every image "
                    "of the batch must show every shared subject"
                )
        regions = tuple(
            tuple(_as_region(image[name], name, i) for name in names) for i, image in enumerate(boxes)
        )
        for i, image_regions in enumerate(regions):
            for a in range(len(names)):
                for b in range(a + 1, len(names)):
                    ra, rb = image_regions[a], image_regions[b]
                    if isinstance(ra, Box) and isinstance(rb, Box) and ra.area_overlap(rb) > 0:
                        raise ValueError(
                            f"boxes of subjects {names[a]!r} and {names[b]!r} overlap in image {i}: IR-Diffusion's "
                            "isolation needs disjoint subject regions"
                        )
        if prompts is not None:
            if len(prompts) != len(boxes):
                raise ValueError(f"{len(prompts)} prompts for {len(boxes)} images of subject_boxes: give one per image")
            for name in names:
                word = re.compile(rf"\b{re.escape(name)}\b", re.IGNORECASE)
                absent = [i for i, prompt in enumerate(prompts) if not word.search(prompt)]
                if absent:
                    raise ValueError(f"subject {name!r} is not named in prompt(s) {absent}: every prompt must name it")
        return cls(names, regions)

    def grids(self, image: int, height: int, width: int) -> list[torch.Tensor]:
        """Boolean ``[height, width]`` token masks of every subject in ``image``; ValueError when two subjects
        share a token on this grid."""
        grids = [region_grid(region, height, width) for region in self.regions[image]]
        for a in range(len(grids)):
            for b in range(a + 1, len(grids)):
                if bool((grids[a] & grids[b]).any()):
                    raise ValueError(
                        f"subjects {self.names[a]!r} and {self.names[b]!r} share tokens in image {image} on the "
                        f"{height}x{width} token grid: make their regions disjoint"
                    )
        return grids


@dataclass(frozen=True)
class SubjectTokens:
    """Sequence indices for one subject of one target image, on one token layout.

    Attributes:
        queries: sequence indices of the target subject's tokens (the queries IR-Diffusion changes).
        own_allowed: ``[seq_len]`` bool, the target's own keys those queries may attend: everything but the
            tokens of the other subjects (Isolation Attention).
        own_keys: sequence indices of those allowed keys (``own_allowed.nonzero()``, kept so that the kernel
            gathers them without a device synchronisation).
        ref_sources: ``[M, k]`` sequence indices of reference tokens blended into each repositioned key.
        ref_weights: ``[M, k]`` blend weights (one 1 for nearest).
        ref_positions: ``[M]`` sequence indices of the target positions the repositioned keys take (their
            RoPE position).
    """

    queries: torch.Tensor
    own_allowed: torch.Tensor
    own_keys: torch.Tensor
    ref_sources: torch.Tensor
    ref_weights: torch.Tensor
    ref_positions: torch.Tensor


def subject_tokens(
    layout: SubjectLayout, image: int, height: int, width: int, visual_start: int, seq_len: int, mode: str = "nearest"
) -> list[SubjectTokens]:
    """:class:`SubjectTokens` of every subject of target ``image`` (>= 1) for a sequence of ``seq_len`` tokens
    whose image tokens (row-major ``height x width``) start at ``visual_start``.

    The reference region, cropped to its bounding rectangle, is resized onto the target region's bounding
    rectangle (authors' ``relocate_mask`` and ``rescale_hidden_states_sa``); repositioned keys exist where
    the relocated reference region is set.
    """
    if not 1 <= image < layout.num_images:
        raise ValueError(f"image={image} is not a target image: allowed 1..{layout.num_images - 1}")
    targets = layout.grids(image, height, width)
    references = layout.grids(0, height, width)
    plans = []
    for s, target in enumerate(targets):
        others = torch.zeros(height, width, dtype=torch.bool)
        for t, grid in enumerate(targets):
            if t != s:
                others |= grid
        own_allowed = torch.ones(seq_len, dtype=torch.bool)
        own_allowed[visual_start:visual_start + height * width] = ~others.flatten()
        target_rect, reference_rect = bounding_rect(target), bounding_rect(references[s])
        rows, cols, weights = reposition_map(reference_rect, target_rect, mode)
        nearest_rows, nearest_cols = (rows, cols) if mode == "nearest" else reposition_map(
            reference_rect, target_rect, "nearest")[:2]
        kept = references[s][nearest_rows[..., 0], nearest_cols[..., 0]]
        ty, tx = torch.meshgrid(
            torch.arange(target_rect.row0, target_rect.row1), torch.arange(target_rect.col0, target_rect.col1),
            indexing="ij",
        )
        plans.append(SubjectTokens(
            queries=visual_start + target.flatten().nonzero().flatten(),
            own_allowed=own_allowed,
            own_keys=own_allowed.nonzero().flatten(),
            ref_sources=visual_start + (rows * width + cols)[kept],
            ref_weights=weights[kept],
            ref_positions=visual_start + (ty * width + tx)[kept],
        ))
    return plans


_LAYOUT_KEYS: dict[tuple, str] = {}  # a layout's value -> its key
_LAYOUTS: dict[str, SubjectLayout] = {}


def layout_key(layout: SubjectLayout) -> str:
    """A string naming ``layout`` by value (equal layouts share it; a mask region counts by its shape and bits),
    under which IR-Diffusion caches its token plans (:func:`layout_of_key` gives the layout back). A string, so that
    torch.compile guards on its value: an object would be guarded by identity, an int could turn dynamic."""
    value = (layout.names, tuple(
        tuple(region if isinstance(region, Box) else ("mask", tuple(region.shape), region.cpu().numpy().tobytes())
              for region in image)
        for image in layout.regions))
    if value not in _LAYOUT_KEYS:
        key = f"layout-{len(_LAYOUT_KEYS)}"
        _LAYOUT_KEYS[value], _LAYOUTS[key] = key, layout
    return _LAYOUT_KEYS[value]


def layout_of_key(key: str) -> SubjectLayout:
    """The layout of a :func:`layout_key`."""
    return _LAYOUTS[key]


__all__ = [
    "INTERPOLATIONS", "Box", "SubjectLayout", "SubjectTokens", "TokenRect", "bounding_rect", "box_rect",
    "layout_key", "layout_of_key", "region_grid", "reposition_map", "subject_tokens",
]
