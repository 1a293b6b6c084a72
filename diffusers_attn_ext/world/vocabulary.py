"""The words of the procedural world: every attribute a caption can name, with its rendering value.

One table per attribute; the caption grammar (``scenes.caption``), the tokenizer (``models.world_tokenizer``)
and the colour segmentation of the metrics (``metrics.segment_colour``) all read these tables, so a word cannot
mean one thing to the renderer and another to the judge.

Object colours are saturated and far apart in hue; backgrounds are achromatic (black, gray, white), so an object
is found by hue and saturation alone, whatever the background and whatever the texture (stripes darken an
object's colour without changing its hue).
"""

from __future__ import annotations

# name -> RGB in [0, 1]; hue in degrees is what the segmentation tests (metrics.HUE_TOLERANCE around it).
OBJECT_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.12, 0.12),
    "yellow": (0.93, 0.84, 0.10),
    "green": (0.12, 0.76, 0.18),
    "cyan": (0.10, 0.76, 0.82),
    "blue": (0.16, 0.26, 0.94),
    "magenta": (0.82, 0.14, 0.78),
}
BACKGROUND_COLOURS: dict[str, float] = {"black": 0.08, "gray": 0.50, "white": 0.92}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# object radius in pixels at the trained 64x64 size (scaled with the frame's shorter side)
SIZES: dict[str, float] = {"small": 5.0, "large": 8.0}
OBJECT_TEXTURES: tuple[str, ...] = ("plain", "striped")
BACKGROUND_TEXTURES: tuple[str, ...] = ("plain", "checkered")
# caption verb per path kind
PATHS: dict[str, str] = {"straight": "moves", "bounce": "bounces", "curve": "curves"}
# unit vector in image coordinates (x right, y down)
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
# pixels per frame at the trained 64x64 size
SPEEDS: dict[str, float] = {"slowly": 1.0, "quickly": 2.0}
# the stripe darkening and the checker contrast
STRIPE_SHADE = 0.55
CHECKER_CONTRAST = 0.10
STRIPE_PERIOD = 4.0
CHECKER_PERIOD = 8.0
# curved paths: a sine offset across the direction of motion
CURVE_AMPLITUDE = 6.0
CURVE_PERIOD_FRAMES = 16.0

FUNCTION_WORDS: tuple[str, ...] = ("a", "and", "on", "background")


def all_words() -> list[str]:
    """Every word a caption can contain, in a fixed order (the tokenizer's vocabulary after its specials)."""
    words: list[str] = list(FUNCTION_WORDS)
    for table in (SIZES, OBJECT_COLOURS, SHAPES, PATHS.values(), DIRECTIONS, SPEEDS, BACKGROUND_COLOURS):
        words.extend(table)
    words.extend(t for t in (*OBJECT_TEXTURES, *BACKGROUND_TEXTURES) if t != "plain")
    seen: set[str] = set()
    return [w for w in words if not (w in seen or seen.add(w))]
