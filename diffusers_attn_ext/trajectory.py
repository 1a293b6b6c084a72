"""A trajectory: one box per video frame, and what DiTraj derives from it on the latent token grid.

Paper: "DiTraj: training-free trajectory control for video diffusion transformer" (arXiv 2509.21839),
Sec. 3.2 (foreground-background separation) and Sec. 3.3 (STD-RoPE); the authors' code
(HaofeiDing/DiTraj: ``run.py``, ``utils.plan_path``, ``module/transformer_wan.py``, ``module/pipe.py``).

- Boxes are :class:`~diffusers_attn_ext.boxes.Box` ``(left, top, right, bottom)`` in pixels of the generated
  video, one per frame; key boxes are interpolated linearly per frame (``utils.plan_path``).
- Token frame ``t`` shows pixel frame ``t * frame_stride`` (``PATHS[::4]`` in ``run.py``; the stride is the
  VAE's temporal compression times the temporal patch: 4 for Wan and CogVideoX 1.0).
- A box covers the tokens ``[int(top_f * H), int(bottom_f * H))`` x ``[int(left_f * W), int(right_f * W))`` of
  its frame's ``H x W`` token grid, with ``*_f`` the box as fractions of the frame as the authors' code holds
  them (``run.py``; ``box_arithmetic="authors"``, the default): the key box in pixels over the frame size, and
  between keys ``plan_path``'s float64 interpolation of those fractions, which it evaluates at the end key too
  (so an edge exactly on a token boundary can land one float64 step low and lose a token row or column).
  ``box_arithmetic="exact"`` is ``floor(px * tokens / size)`` on pixel boxes interpolated exactly instead.
- STD-RoPE positions (``transformer_wan.py``): the reference box is the first frame's box of smallest area;
  the box of every frame without its last row and column (the authors' corner arithmetic) takes the spatial
  positions of the reference region, resampled nearest-neighbour when the sizes differ
  (``round(linspace(0, R - 1, r))``: the "density" of positions inside a larger box falls to R / r, which is
  how boxes that grow or shrink give 3D-aware control). Temporal positions and every other token stay.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .boxes import Box
from .context import TokenGrid
from .validation import as_number, choice, integer

BOX_ARITHMETIC = ("authors", "exact")


def _check_box(box: Sequence[float], name: str, height: int, width: int) -> Box:
    """The box as a :class:`Box` of 4 floats (pixels); ValueError naming it (e.g. ``boxes[3]``) when it is malformed,
    outside or empty."""
    if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) or len(box) != 4:
        shown = tuple(box) if isinstance(box, Sequence) and not isinstance(box, (str, bytes)) else box
        raise ValueError(f"{name}={shown!r} must be (left, top, right, bottom) in pixels")
    numbers = [as_number(v) for v in box]
    if any(v is None or not math.isfinite(v) for v in numbers):
        raise ValueError(f"{name}={tuple(box)!r} is not allowed: allowed are 4 finite numbers (pixels)")
    left, top, right, bottom = (float(v) for v in numbers)
    if not (0 <= left <= width and 0 <= right <= width and 0 <= top <= height and 0 <= bottom <= height):
        raise ValueError(
            f"{name}={tuple(box)!r} lies outside the {width}x{height} frame: allowed left, right in "
            f"[0, {width}] and top, bottom in [0, {height}] pixels"
        )
    if right <= left or bottom <= top:
        raise ValueError(f"{name}={tuple(box)!r} is empty: need right > left and bottom > top")
    return Box(left, top, right, bottom)


@dataclass(frozen=True)
class TokenBox:
    """A box on the latent token grid: rows ``[top, bottom)`` and columns ``[left, right)``."""

    top: int
    bottom: int
    left: int
    right: int

    @property
    def region(self) -> tuple[int, int]:
        """Rows and columns whose positions STD-RoPE changes: the box without its last row and column."""
        return self.bottom - 1 - self.top, self.right - 1 - self.left


@dataclass(frozen=True)
class Trajectory:
    """Where the foreground object is in each frame of a video.

    Args:
        boxes: one ``(left, top, right, bottom)`` box in pixels per video frame (``num_frames`` of them).
        height, width: the video size in pixels; every box must lie inside it and be non-empty.
        box_arithmetic: how a box becomes latent tokens (:meth:`token_boxes`). ``"authors"`` (default): the
            authors' ``int(fraction * tokens)`` on the box as fractions of the frame; ``"exact"``:
            ``floor(pixels * tokens / size)``, which differs where the authors' float64 fractions fall one step
            below a token boundary (docs/ditraj.md).
        fractions: the boxes as ``(left, top, right, bottom)`` fractions of ``(width, height, width, height)``,
            the numbers the authors' code computes with; None: ``pixels / size``. :meth:`from_key_boxes` gives
            the authors' interpolated fractions. Each must be within 1e-9 of ``boxes[i] / size``.

    Use :meth:`from_key_boxes` to give a few boxes and interpolate the others.
    """

    boxes: tuple[Box, ...]
    height: int
    width: int
    box_arithmetic: str = "authors"
    fractions: tuple[Box, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "height", integer("height", self.height, 1))
        object.__setattr__(self, "width", integer("width", self.width, 1))
        choice("box_arithmetic", self.box_arithmetic, BOX_ARITHMETIC)
        if isinstance(self.boxes, (str, bytes)) or not isinstance(self.boxes, Sequence):
            raise ValueError(f"boxes={self.boxes!r} is not allowed: allowed is a sequence of one box per video frame")
        if len(self.boxes) == 0:
            raise ValueError("boxes is empty: give one box per video frame")
        checked = tuple(_check_box(box, f"boxes[{i}]", self.height, self.width) for i, box in enumerate(self.boxes))
        object.__setattr__(self, "boxes", checked)
        sizes = (self.width, self.height, self.width, self.height)
        if self.fractions is None:
            fractions = tuple(box.fractions_of(self.width, self.height) for box in checked)
        else:
            fractions = tuple(tuple(float(v) for v in f) for f in self.fractions)
            if len(fractions) != len(checked):
                raise ValueError(f"fractions has {len(fractions)} boxes for {len(checked)} boxes: give one per box")
            for i, (fraction, box) in enumerate(zip(fractions, checked, strict=True)):
                if len(fraction) != 4 or any(
                    not abs(f * size - v) <= 1e-9 * size for f, v, size in zip(fraction, box, sizes, strict=True)
                ):
                    raise ValueError(
                        f"fractions[{i}]={fraction!r} is not boxes[{i}]={tuple(box)!r} over the frame size "
                        f"({self.width}x{self.height}): allowed within 1e-9 of pixels / size"
                    )
        object.__setattr__(self, "fractions", tuple(Box(*f) for f in fractions))

    @property
    def num_frames(self) -> int:
        return len(self.boxes)

    @classmethod
    def from_key_boxes(cls, key_boxes: Mapping[int, Sequence[float]], num_frames: int, height: int,
                       width: int, box_arithmetic: str = "authors") -> Trajectory:
        """Boxes at a few frames, linearly interpolated in between (``utils.plan_path``).

        Pixel boxes are interpolated as ``step * (end - start) / frames + start`` (exact for integer pixels),
        the key itself at a key frame. The fractions of the authors' arithmetic are interpolated as
        ``plan_path`` does: ``f = step * ((f_end - f_start) / frames) + f_start`` for every frame after a key up
        to and including the next key, with ``f = pixels / size`` at the keys.

        Deviation: frames before the first key or after the last hold that key's box, where the authors'
        ``plan_path`` extrapolates the line (with a list-nesting bug); their scripts always give keys at the
        first and last frame, where both agree. Holding lets one key give a static box.

        Args:
            key_boxes: ``{frame index: (left, top, right, bottom)}`` in pixels, frame indices in
                ``[0, num_frames)``.
            box_arithmetic: see :class:`Trajectory`.
        """
        num_frames = integer("num_frames", num_frames, 1)
        height, width = integer("height", height, 1), integer("width", width, 1)
        choice("box_arithmetic", box_arithmetic, BOX_ARITHMETIC)
        if not isinstance(key_boxes, Mapping):
            raise ValueError(f"key_boxes={key_boxes!r} is not allowed: allowed is a {{frame: box}} mapping")
        if not key_boxes:
            raise ValueError("key_boxes is empty: give at least one {frame: box}")
        indexed = {}
        for frame, box in key_boxes.items():
            index = as_number(frame)
            if not isinstance(index, int):
                raise ValueError(f"key_boxes frame {frame!r} must be an integer frame index")
            indexed[index] = box
        frames = sorted(indexed)
        outside = [f for f in frames if not 0 <= f < num_frames]
        if outside:
            raise ValueError(f"key_boxes frames {outside} are outside the allowed range [0, {num_frames - 1}]")
        key_boxes = {f: _check_box(indexed[f], f"key_boxes[{f}]", height, width) for f in frames}
        key_fractions = {f: box.fractions_of(width, height) for f, box in key_boxes.items()}
        boxes, fractions = [], []
        for frame in range(num_frames):
            if frame <= frames[0] or frame > frames[-1]:  # the first key, or held outside the keys
                key = frames[0] if frame <= frames[0] else frames[-1]
                boxes.append(key_boxes[key])
                fractions.append(key_fractions[key])
                continue
            end = next(f for f in frames if f >= frame)
            start = max(f for f in frames if f < frame)
            step, span = frame - start, end - start
            a, b = key_boxes[start], key_boxes[end]
            boxes.append(b if frame == end else Box(*(step * (e - s) / span + s for s, e in zip(a, b, strict=True))))
            a, b = key_fractions[start], key_fractions[end]
            fractions.append(Box(*(step * ((e - s) / span) + s for s, e in zip(a, b, strict=True))))
        return cls(tuple(boxes), height, width, box_arithmetic, tuple(fractions))

    @classmethod
    def static(cls, box: Sequence[float], num_frames: int, height: int, width: int,
               box_arithmetic: str = "authors") -> Trajectory:
        """The same box in every frame."""
        return cls.from_key_boxes({0: box}, num_frames, height, width, box_arithmetic)

    def check_video(self, num_frames: int, height: int, width: int) -> None:
        """ValueError unless the trajectory was made for a video of this length and size."""
        if num_frames != self.num_frames:
            raise ValueError(
                f"num_frames={num_frames} but the trajectory has {self.num_frames} boxes: give one box per frame "
                "(Trajectory.from_key_boxes(..., num_frames=num_frames, ...))"
            )
        if (height, width) != (self.height, self.width):
            raise ValueError(
                f"height={height}, width={width} but the trajectory was drawn on a {self.width}x{self.height} video"
            )

    def token_boxes(self, grid: TokenGrid, frame_stride: int) -> tuple[TokenBox, ...]:
        """The box of each token frame on ``grid``: token frame ``t`` shows pixel frame ``t * frame_stride``.

        ``box_arithmetic="authors"``: rows ``[int(top_f H), int(bottom_f H))``, columns ``[int(left_f W),
        int(right_f W))`` from the fractions (``run.py``); ``"exact"``: ``floor(px * H / height)`` and so on.
        ValueError when the grid needs more frames than the trajectory has, or a box covers no token.
        """
        last = (grid.frames - 1) * frame_stride
        if last >= self.num_frames:
            raise ValueError(
                f"trajectory has {self.num_frames} frames but {grid.frames} latent frames with frame_stride="
                f"{frame_stride} need num_frames >= {last + 1}"
            )
        token_boxes = []
        for t in range(grid.frames):
            if self.box_arithmetic == "authors":
                left, top, right, bottom = self.fractions[t * frame_stride]
                box = TokenBox(top=int(top * grid.height), bottom=int(bottom * grid.height),
                               left=int(left * grid.width), right=int(right * grid.width))
            else:
                left, top, right, bottom = self.boxes[t * frame_stride]
                box = TokenBox(
                    top=math.floor(top * grid.height / self.height),
                    bottom=math.floor(bottom * grid.height / self.height),
                    left=math.floor(left * grid.width / self.width), right=math.floor(right * grid.width / self.width),
                )
            if box.bottom <= box.top or box.right <= box.left:
                raise ValueError(
                    f"trajectory box {tuple(self.boxes[t * frame_stride])} of frame {t * frame_stride} covers no latent "
                    f"token of the {grid.width}x{grid.height} grid: a token is {self.width / grid.width:g}x"
                    f"{self.height / grid.height:g} pixels"
                )
            token_boxes.append(box)
        return tuple(token_boxes)


def check_method_arguments(trajectory: Trajectory, frame_stride: int) -> int:
    """ValueError unless ``trajectory`` is a :class:`Trajectory` and ``frame_stride`` (video frames per latent
    frame) an integer >= 1: the arguments every DiTraj processor takes. Returns ``frame_stride`` as an int."""
    if not isinstance(trajectory, Trajectory):
        raise ValueError(f"trajectory must be a Trajectory, got {type(trajectory).__name__!r}")
    return integer("frame_stride", frame_stride, 1)


_TRAJECTORY_KEYS: dict[tuple[Trajectory, int], str] = {}  # (trajectory, frame_stride) -> its key, by value
_TRAJECTORIES: dict[str, tuple[Trajectory, int]] = {}


def trajectory_key(trajectory: Trajectory, frame_stride: int) -> str:
    """A string naming ``(trajectory, frame_stride)`` by value (equal trajectories share it), under which the
    DiTraj processors cache what they derive from it (:func:`trajectory_of_key` gives it back). A string, so that
    torch.compile guards on its value: an object would be guarded by identity, an int could turn dynamic."""
    value = (trajectory, frame_stride)
    if value not in _TRAJECTORY_KEYS:
        key = f"trajectory-{len(_TRAJECTORY_KEYS)}"
        _TRAJECTORY_KEYS[value], _TRAJECTORIES[key] = key, value
    return _TRAJECTORY_KEYS[value]


def trajectory_of_key(key: str) -> tuple[Trajectory, int]:
    """``(trajectory, frame_stride)`` of a :func:`trajectory_key`."""
    return _TRAJECTORIES[key]


def foreground_mask(token_boxes: Sequence[TokenBox], grid: TokenGrid) -> torch.Tensor:
    """Boolean ``[frames, height, width]``: the tokens inside each frame's box (the authors' ``bbox_mask``)."""
    mask = torch.zeros(grid.frames, grid.height, grid.width, dtype=torch.bool)
    for t, box in enumerate(token_boxes):
        mask[t, box.top:box.bottom, box.left:box.right] = True
    return mask


def reference_frame(token_boxes: Sequence[TokenBox]) -> int:
    """The frame whose STD-RoPE region is smallest (the first one on ties), as the authors choose it."""
    areas = [box.region[0] * box.region[1] for box in token_boxes]
    return areas.index(min(areas))


def std_rope_positions(token_boxes: Sequence[TokenBox], grid: TokenGrid) -> torch.Tensor:
    """The (t, h, w) position of every token under STD-RoPE, ``[frames, height, width, 3]`` int64.

    Token ``(t, top_t + i, left_t + j)`` of frame ``t``'s region (box without last row and column, ``r_h x
    r_w``) takes ``(t, top_ref + y_i, left_ref + x_j)`` with ``y = round(linspace(0, R_h - 1, r_h))`` and
    ``x = round(linspace(0, R_w - 1, r_w))`` over the reference region ``R_h x R_w`` (float32 linspace,
    round half to even, as the authors' ``scale_complex_tensor``). Every other token keeps its own position.
    """
    t, h, w = torch.meshgrid(
        torch.arange(grid.frames), torch.arange(grid.height), torch.arange(grid.width), indexing="ij"
    )
    positions = torch.stack([t, h, w], dim=-1)
    ref = token_boxes[reference_frame(token_boxes)]
    ref_rows, ref_cols = ref.region
    for frame, box in enumerate(token_boxes):
        rows, cols = box.region
        if rows <= 0 or cols <= 0:
            continue
        if ref_rows <= 0 or ref_cols <= 0:
            raise ValueError(
                f"trajectory: the smallest box ({ref.bottom - ref.top}x{ref.right - ref.left} latent tokens) leaves "
                "no STD-RoPE region while others do; boxes must span at least 2 latent tokens in each direction"
            )
        y = torch.linspace(0, ref_rows - 1, rows, dtype=torch.float32).round().long() + ref.top
        x = torch.linspace(0, ref_cols - 1, cols, dtype=torch.float32).round().long() + ref.left
        positions[frame, box.top:box.top + rows, box.left:box.left + cols, 1] = y[:, None]
        positions[frame, box.top:box.top + rows, box.left:box.left + cols, 2] = x[None, :]
    return positions


def position_source_index(positions: torch.Tensor) -> torch.Tensor:
    """Flat index (frame-major) of the stock token whose RoPE each token takes, ``[frames * height * width]``:
    RoPE rows gathered by it are the stock RoPE evaluated at ``positions``."""
    frames, height, width, _ = positions.shape
    return ((positions[..., 0] * height + positions[..., 1]) * width + positions[..., 2]).flatten()


def duplicate_position_tokens(positions: torch.Tensor, foreground: torch.Tensor) -> torch.Tensor:
    """Background tokens whose position some foreground token took (the authors' ``redundant_token``),
    boolean ``[frames, height, width]``. Positions keep their frame, so duplicates are within a frame."""
    frames, height, width, _ = positions.shape
    taken = torch.zeros(frames, height * width, dtype=torch.bool)
    moved = (positions[..., 1:] != torch.stack(torch.meshgrid(
        torch.arange(height), torch.arange(width), indexing="ij"), dim=-1)).any(-1)
    frame_index = torch.arange(frames)[:, None, None].expand(frames, height, width)
    flat = positions[..., 1] * width + positions[..., 2]
    taken[frame_index[moved], flat[moved]] = True
    return taken.view(frames, height, width) & ~foreground
