"""Scenes of the procedural world: what is in a video, sampled from a seed, and its caption.

A ``Scene`` is one to three ``WorldObject`` on a background. Each object has a shape, colour, size, texture, a path
kind (straight, bouncing off the frame's edges, or curving: a sine across its direction), a direction and a speed,
and a start position given as fractions of the frame, so that one scene renders at any size and length
(``render.render_scenes``). ``caption`` writes the scene in the world's grammar::

    a small red circle moves left slowly on a gray background
    a large striped blue square bounces up quickly and a small green triangle moves right slowly on a checkered
    black background

and ``parse_caption`` reads such a caption back (start positions then are ``None``: a prompt does not say where an
object starts), which is how the demo and the tests know the colour and the direction a prompt asks for.
"""

from __future__ import annotations

import dataclasses
import random

from ..validation import choice, integer
from .vocabulary import (
    BACKGROUND_COLOURS,
    BACKGROUND_TEXTURES,
    CURVE_AMPLITUDE,
    DIRECTIONS,
    OBJECT_COLOURS,
    OBJECT_TEXTURES,
    PATHS,
    SHAPES,
    SIZES,
    SPEEDS,
)

TRAIN_FRAMES = 9
TRAIN_SIZE = 64
MAX_OBJECTS = 3
# probability of 1, 2 and 3 objects in a sampled scene
OBJECT_COUNT_WEIGHTS = (0.6, 0.3, 0.1)


@dataclasses.dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str = "small"
    texture: str = "plain"
    path: str = "straight"
    direction: str = "right"
    speed: str = "slowly"
    # start centre as fractions of the frame's width and height; None when unknown (a parsed prompt)
    start: tuple[float, float] | None = None
    # phase of a curving path, in radians
    phase: float = 0.0

    def __post_init__(self) -> None:
        for field, table in (
            ("shape", SHAPES),
            ("colour", OBJECT_COLOURS),
            ("size", SIZES),
            ("texture", OBJECT_TEXTURES),
            ("path", PATHS),
            ("direction", DIRECTIONS),
            ("speed", SPEEDS),
        ):
            value = getattr(self, field)
            if value not in table:
                raise ValueError(f"WorldObject {field}={value!r} is not one of {sorted(table)}")

    def words(self) -> str:
        texture = "" if self.texture == "plain" else f"{self.texture} "
        return f"a {self.size} {texture}{self.colour} {self.shape} {PATHS[self.path]} {self.direction} {self.speed}"


@dataclasses.dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    background: str = "gray"
    background_texture: str = "plain"

    def __post_init__(self) -> None:
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"Scene objects: {len(self.objects)} given, allowed 1 to {MAX_OBJECTS}")
        choice("Scene background", self.background, sorted(BACKGROUND_COLOURS))
        if self.background_texture not in BACKGROUND_TEXTURES:
            raise ValueError(
                f"Scene background_texture={self.background_texture!r} is not one of {list(BACKGROUND_TEXTURES)}"
            )


def caption(scene: Scene) -> str:
    """The scene in the world's grammar (see the module docstring)."""
    texture = "" if scene.background_texture == "plain" else f"{scene.background_texture} "
    return " and ".join(o.words() for o in scene.objects) + f" on a {texture}{scene.background} background"


def _start_range(radius: float, step: float, frames: int) -> tuple[float, float]:
    """Centre range (pixels at the trained size) that keeps a straight mover inside for ``frames`` frames."""
    travel = step * (frames - 1)
    low = radius + max(0.0, -travel)
    high = TRAIN_SIZE - radius - max(0.0, travel)
    if low > high:  # the object crosses more than the frame: start it at the entering edge
        low = high = radius if travel > 0 else TRAIN_SIZE - radius
    return low, high


def sample_object(rng: random.Random, *, frames: int = TRAIN_FRAMES, path: str | None = None,
                  size: str | None = None) -> WorldObject:
    """One object with every attribute drawn uniformly; its start keeps a straight or curving path in frame.

    ``path`` and ``size`` fix those attributes (the draws are still made, so the other attributes are the ones
    the same seed gives unfixed) and the start is drawn for them.
    """
    drawn_size, drawn_path = rng.choice(list(SIZES)), rng.choice(list(PATHS))
    size = drawn_size if size is None else choice("sample_object size", size, list(SIZES))
    path = drawn_path if path is None else choice("sample_object path", path, list(PATHS))
    direction = rng.choice(list(DIRECTIONS))
    speed = rng.choice(list(SPEEDS))
    radius = SIZES[size]
    dx, dy = DIRECTIONS[direction]
    step = SPEEDS[speed]
    start = []
    for unit in (dx, dy):
        if path == "bounce":
            low, high = radius, TRAIN_SIZE - radius
        elif unit == 0.0:  # across the motion; a curve swings CURVE_AMPLITUDE to either side
            margin = radius + (CURVE_AMPLITUDE if path == "curve" else 0.0)
            low, high = margin, TRAIN_SIZE - margin
        else:
            low, high = _start_range(radius, unit * step, frames)
        start.append(rng.uniform(low, high) / TRAIN_SIZE)
    return WorldObject(
        shape=rng.choice(SHAPES),
        colour=rng.choice(list(OBJECT_COLOURS)),
        size=size,
        texture=rng.choice(OBJECT_TEXTURES),
        path=path,
        direction=direction,
        speed=speed,
        start=(start[0], start[1]),
        phase=rng.uniform(0.0, 6.283185307179586),
    )


def sample_scene(seed: int, *, frames: int = TRAIN_FRAMES, num_objects: int | None = None, path: str | None = None,
                 size: str | None = None) -> Scene:
    """A scene drawn from ``seed`` alone (``random.Random(seed)``): the same seed gives the same scene.

    Objects in one scene have distinct colours, so that each is found by its colour. ``path`` and ``size`` fix
    those attributes of every object (``sample_object``).
    """
    rng = random.Random(seed)
    if num_objects is None:
        num_objects = rng.choices(range(1, MAX_OBJECTS + 1), weights=OBJECT_COUNT_WEIGHTS)[0]
    num_objects = integer("sample_scene num_objects", num_objects, 1, MAX_OBJECTS)
    objects: list[WorldObject] = []
    while len(objects) < num_objects:
        candidate = sample_object(rng, frames=frames, path=path, size=size)
        if all(candidate.colour != o.colour for o in objects):
            objects.append(candidate)
    return Scene(
        objects=tuple(objects),
        background=rng.choice(list(BACKGROUND_COLOURS)),
        background_texture=rng.choice(BACKGROUND_TEXTURES),
    )


def parse_caption(text: str) -> Scene:
    """Read a caption in the world's grammar back into a ``Scene`` (start positions ``None``).

    Raises a ValueError naming the first word that does not fit the grammar.
    """
    words = text.lower().replace(",", " ").replace(".", " ").split()
    verbs = {verb: path for path, verb in PATHS.items()}
    objects: list[WorldObject] = []
    i = 0

    def expect(table, what: str) -> str:
        nonlocal i
        if i >= len(words) or words[i] not in table:
            found = words[i] if i < len(words) else "the end of the caption"
            raise ValueError(f"parse_caption: expected {what} ({sorted(table)}) at word {i}, found {found!r} in {text!r}")
        i += 1
        return words[i - 1]

    while True:
        expect({"a"}, "'a'")
        size = expect(SIZES, "a size")
        texture = words[i] if i < len(words) and words[i] in OBJECT_TEXTURES else "plain"
        i += texture != "plain"
        colour = expect(OBJECT_COLOURS, "an object colour")
        shape = expect(SHAPES, "a shape")
        path = verbs[expect(verbs, "a verb")]
        direction = expect(DIRECTIONS, "a direction")
        speed = expect(SPEEDS, "a speed")
        objects.append(WorldObject(shape, colour, size, texture, path, direction, speed))
        if i < len(words) and words[i] == "and":
            i += 1
            continue
        break
    expect({"on"}, "'on'")
    expect({"a"}, "'a'")
    background_texture = words[i] if i < len(words) and words[i] in BACKGROUND_TEXTURES else "plain"
    i += background_texture != "plain"
    background = expect(BACKGROUND_COLOURS, "a background colour")
    expect({"background"}, "'background'")
    if i != len(words):
        raise ValueError(f"parse_caption: unexpected {words[i]!r} after the end of the caption in {text!r}")
    return Scene(tuple(objects), background, background_texture)
