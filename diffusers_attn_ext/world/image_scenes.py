"""Scenes of the procedural image world: one to three subjects on a background, sampled from a seed, and captions.

An ``ImageScene`` holds one to three ``ImageSubject`` on a plain achromatic background. A subject has a *class*
(its shape, from the video world's ``vocabulary.SHAPES``) and a named colour (``vocabulary.OBJECT_COLOURS``), which
the caption says, and an *identity* the caption does not say, drawn anew for every sample: its size, rotation and a
pattern (plain, striped, dotted or halved, at its own angle, period, phase and shade of the subject's colour). So
"a red circle" names a class, and two images of "a red circle" show the same subject only when a method makes
them (IR-Diffusion's subject consistency is measured on exactly that).

Captions name the subjects from left to right (by the x of their centres), then the background::

    a red circle on a gray background
    a blue square and a yellow triangle and a green circle on a white background

so the word order says the layout left to right, and ``parse_image_caption`` reads a caption back into the
subjects' classes and colours (their identity and position then are ``None``). The subjects of a scene have
distinct colours (each is found by its colour, ``metrics.segment_colour``) and disjoint bounding boxes with a
margin (IR-Diffusion's isolation needs disjoint subject regions; no subject hides another, so a subject's mask is
all of it). Geometry is given in fractions of the image's shorter side (radii, periods) and of its width and
height (centres), so a scene renders at any size (``image_render.render_image_scenes``). Deterministic: a scene
is a function of its seed alone (``random.Random(seed)``).
"""

from __future__ import annotations

import dataclasses
import math
import random

from ..validation import choice, integer
from .vocabulary import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES

IMAGE_SIZE = 32
MAX_SUBJECTS = 3
# probability of 1, 2 and 3 subjects in a sampled scene
SUBJECT_COUNT_WEIGHTS = (0.4, 0.35, 0.25)
# radius (fraction of the shorter side) drawn uniformly in this range, by the number of subjects
RADIUS_RANGE = {1: (0.20, 0.28), 2: (0.15, 0.20), 3: (0.12, 0.16)}
# every shape lies inside the square of half side BOUND_FACTOR * radius around its centre whatever its rotation
# (circle: r; square of half side 0.85 r: 0.85 sqrt(2) r = 1.203 r; triangle of circumradius 1.15 r)
BOUND_FACTOR = 1.21
# gap between the bounding squares of two subjects, fraction of the shorter side (one pixel at 32x32)
GAP = 1.0 / 32.0
PATTERNS: tuple[str, ...] = ("plain", "striped", "dotted", "halved")
# pattern period (fraction of the shorter side; 4 to 6 pixels at 32x32) and the shade of its dark parts
PERIOD_RANGE = (0.125, 0.1875)
SHADE_RANGE = (0.45, 0.65)
# a dotted subject's dots: radius as a fraction of the period
DOT_RADIUS = 0.3
PLACEMENT_TRIES = 200


@dataclasses.dataclass(frozen=True)
class ImageSubject:
    """One subject: its class (``shape``) and ``colour``, named by captions, and its identity, which is not.

    ``centre`` is (x, y) in fractions of the width and height, ``radius`` a fraction of the shorter side (None for
    a parsed caption); ``rotation`` in radians (squares and triangles); ``pattern`` one of ``PATTERNS`` with its
    ``pattern_angle`` (radians), ``pattern_period`` (fraction of the shorter side), ``pattern_phase`` (two
    fractions of a period) and ``shade`` (the factor of the colour in the pattern's dark parts).
    """

    shape: str
    colour: str
    centre: tuple[float, float] | None = None
    radius: float | None = None
    rotation: float = 0.0
    pattern: str = "plain"
    pattern_angle: float = 0.0
    pattern_period: float = 0.15
    pattern_phase: tuple[float, float] = (0.0, 0.0)
    shade: float = 0.55

    def __post_init__(self) -> None:
        for field, table in (("shape", SHAPES), ("colour", OBJECT_COLOURS), ("pattern", PATTERNS)):
            value = getattr(self, field)
            if value not in table:
                raise ValueError(f"ImageSubject {field}={value!r} is not one of {sorted(table)}")

    @property
    def name(self) -> str:
        """The subject's name in captions and in IR-Diffusion's ``subject_boxes``: "red circle"."""
        return f"{self.colour} {self.shape}"

    def words(self) -> str:
        return f"a {self.name}"


@dataclasses.dataclass(frozen=True)
class ImageScene:
    subjects: tuple[ImageSubject, ...]
    background: str = "gray"

    def __post_init__(self) -> None:
        if not 1 <= len(self.subjects) <= MAX_SUBJECTS:
            raise ValueError(f"ImageScene subjects: {len(self.subjects)} given, allowed 1 to {MAX_SUBJECTS}")
        choice("ImageScene background", self.background, sorted(BACKGROUND_COLOURS))
        colours = [s.colour for s in self.subjects]
        if len(set(colours)) != len(colours):
            raise ValueError(f"ImageScene subjects must have distinct colours, got {colours}")


def image_caption(scene: ImageScene) -> str:
    """The scene in the world's grammar: its subjects in the order of the scene (left to right for sampled
    scenes), then the background."""
    return " and ".join(s.words() for s in scene.subjects) + f" on a {scene.background} background"


def _disjoint(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Whether two bounding squares (centre x, centre y, half side; fractions of a square image) are GAP apart."""
    return (abs(a[0] - b[0]) >= a[2] + b[2] + GAP) or (abs(a[1] - b[1]) >= a[2] + b[2] + GAP)


def sample_image_scene(seed: int, *, num_subjects: int | None = None) -> ImageScene:
    """A scene drawn from ``seed`` alone: the same seed gives the same scene.

    Draws, in this order: the number of subjects (``SUBJECT_COUNT_WEIGHTS`` unless given), distinct colours, a
    shape each, a radius each (``RADIUS_RANGE``), centres by rejection until the bounding squares are disjoint
    (``GAP`` apart; after ``PLACEMENT_TRIES`` failures the radii shrink by 10% and placement starts again), then
    each subject's identity, and the background. Subjects are ordered left to right.
    """
    seed = integer("sample_image_scene seed", seed)
    rng = random.Random(seed)
    if num_subjects is None:
        num_subjects = rng.choices(range(1, MAX_SUBJECTS + 1), weights=SUBJECT_COUNT_WEIGHTS)[0]
    num_subjects = integer("sample_image_scene num_subjects", num_subjects, 1, MAX_SUBJECTS)
    colours = rng.sample(list(OBJECT_COLOURS), num_subjects)
    shapes = [rng.choice(SHAPES) for _ in range(num_subjects)]
    low, high = RADIUS_RANGE[num_subjects]
    radii = [rng.uniform(low, high) for _ in range(num_subjects)]
    centres: list[tuple[float, float]] = []
    while len(centres) < num_subjects:
        placed: list[tuple[float, float, float]] = []
        for _ in range(PLACEMENT_TRIES):
            r = radii[len(placed)]
            half = BOUND_FACTOR * r
            candidate = (rng.uniform(half, 1.0 - half), rng.uniform(half, 1.0 - half), half)
            if all(_disjoint(candidate, other) for other in placed):
                placed.append(candidate)
                if len(placed) == num_subjects:
                    break
        if len(placed) == num_subjects:
            centres = [(x, y) for x, y, _ in placed]
        else:
            radii = [0.9 * r for r in radii]
    subjects = []
    for colour, shape, radius, centre in zip(colours, shapes, radii, centres, strict=True):
        subjects.append(ImageSubject(
            shape=shape,
            colour=colour,
            centre=centre,
            radius=radius,
            rotation=rng.uniform(0.0, 2.0 * math.pi),
            pattern=rng.choice(PATTERNS),
            pattern_angle=rng.uniform(0.0, math.pi),
            pattern_period=rng.uniform(*PERIOD_RANGE),
            pattern_phase=(rng.random(), rng.random()),
            shade=rng.uniform(*SHADE_RANGE),
        ))
    subjects.sort(key=lambda s: s.centre[0])
    return ImageScene(tuple(subjects), background=rng.choice(list(BACKGROUND_COLOURS)))


def parse_image_caption(text: str) -> ImageScene:
    """Read a caption in the world's grammar back into an ``ImageScene`` (classes, colours and background; no
    identity or position). Raises a ValueError naming the first word that does not fit the grammar."""
    words = text.lower().replace(",", " ").replace(".", " ").split()
    i = 0

    def expect(table, what: str) -> str:
        nonlocal i
        if i >= len(words) or words[i] not in table:
            found = words[i] if i < len(words) else "the end of the caption"
            raise ValueError(
                f"parse_image_caption: expected {what} ({sorted(table)}) at word {i}, found {found!r} in {text!r}"
            )
        i += 1
        return words[i - 1]

    subjects: list[ImageSubject] = []
    while True:
        expect({"a"}, "'a'")
        colour = expect(OBJECT_COLOURS, "a subject colour")
        shape = expect(SHAPES, "a shape")
        subjects.append(ImageSubject(shape, colour))
        if i < len(words) and words[i] == "and":
            i += 1
            continue
        break
    expect({"on"}, "'on'")
    expect({"a"}, "'a'")
    background = expect(BACKGROUND_COLOURS, "a background colour")
    expect({"background"}, "'background'")
    if i != len(words):
        raise ValueError(f"parse_image_caption: unexpected {words[i]!r} after the end of the caption in {text!r}")
    return ImageScene(tuple(subjects), background)


def subject_boxes(scene: ImageScene) -> dict[str, tuple[float, float, float, float]]:
    """``{subject name: (x0, y0, x1, y1)}`` in fractions of the image: each subject's bounding square (half side
    ``BOUND_FACTOR * radius``, clipped to the image), disjoint by construction; the form IR-Diffusion's
    ``subject_boxes`` takes. For square images (the world's); exact pixel boxes come from the rendered masks."""
    boxes = {}
    for s in scene.subjects:
        if s.centre is None or s.radius is None:
            raise ValueError(f"subject_boxes: subject {s.name!r} has no position (a parsed caption)")
        half = BOUND_FACTOR * s.radius
        x, y = s.centre
        boxes[s.name] = (max(0.0, x - half), max(0.0, y - half), min(1.0, x + half), min(1.0, y + half))
    return boxes


__all__ = [
    "IMAGE_SIZE",
    "MAX_SUBJECTS",
    "PATTERNS",
    "ImageScene",
    "ImageSubject",
    "image_caption",
    "parse_image_caption",
    "sample_image_scene",
    "subject_boxes",
]
