"""The one box type of the package: trajectories (pixels of a video frame) and subject layouts (fractions of the
image) both describe regions as a :class:`Box`."""

from __future__ import annotations

from typing import NamedTuple


class Box(NamedTuple):
    """An axis-aligned box ``(x0, y0, x1, y1)``: left, top, right, bottom, with x to the right and y down, in the
    unit its user states: pixels of a video frame (:class:`~diffusers_attn_ext.trajectory.Trajectory`) or fractions
    of the image width and height (:class:`~diffusers_attn_ext.subjects.SubjectLayout`). A tuple, so it unpacks and
    compares as ``(left, top, right, bottom)``."""

    x0: float
    y0: float
    x1: float
    y1: float

    def fractions_of(self, width: float, height: float) -> Box:
        """A box in pixels as fractions of a ``width x height`` frame: each coordinate divided by its size."""
        return Box(self.x0 / width, self.y0 / height, self.x1 / width, self.y1 / height)

    def area_overlap(self, other: Box) -> float:
        """Area shared with ``other`` (in the boxes' unit squared); 0 for boxes that only touch."""
        width = min(self.x1, other.x1) - max(self.x0, other.x0)
        height = min(self.y1, other.y1) - max(self.y0, other.y0)
        return max(width, 0.0) * max(height, 0.0)


__all__ = ["Box"]
