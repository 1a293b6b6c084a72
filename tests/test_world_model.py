"""Behaviour of the shipped world video model: what it does with a prompt, scored on the world's ground truth.

One batch of four prompts (one per background level, each naming a colour and a direction), generated once at
the demo's 10 steps with fixed seeds and the model's guidance (``world.tasks.GUIDANCE``, 2). Measured facts of this
model (docs/quality.md, CPU, 64 held-out prompts, 20 steps): it draws the prompt's background reliably, an object
of the prompt's colour in every frame for 48% of held-out prompts (in 72% of their frames), and moves it the
prompt's way for 62% of them (chance about 25%; the model of transformer step 12400 did for 12.5%, and drew the
same video for "left" and "right"). The acceptance test (colour in every frame and the named direction) runs per
prompt: three pass; red on black is a strict xfail (its circle turns blue-striped in some frames, the model's
weakest colour and background), so it fails loudly once a retrained model draws it.
"""

from __future__ import annotations

import pytest
import torch

from diffusers_attn_ext.world import load_world_video_pipeline, parse_caption
from diffusers_attn_ext.world.metrics import displacement, moves_towards, track_colour
from diffusers_attn_ext.world.tasks import generate_many
from diffusers_attn_ext.world.vocabulary import BACKGROUND_COLOURS

PROMPTS = [
    "a large red circle moves right slowly on a black background",
    "a large yellow square moves left slowly on a white background",
    "a large green circle moves down slowly on a gray background",
    "a large blue square moves up slowly on a gray background",
]


@pytest.fixture(scope="module")
def videos():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small convolutions: one thread is faster on a loaded 2-core machine
    try:
        pipe = load_world_video_pipeline()
        return generate_many(pipe, PROMPTS, list(range(len(PROMPTS))), steps=10)
    finally:
        torch.set_num_threads(threads)


def _border_level(video: torch.Tensor) -> torch.Tensor:
    """Median grey level of the 4-pixel frame border, per frame: the background where objects are not."""
    border = torch.cat([video[..., :4, :].flatten(-2), video[..., -4:, :].flatten(-2)], -1)
    return border.median(-1).values.mean(1)


def test_the_video_has_the_prompts_length_and_size(videos):
    assert [tuple(v.shape) for v in videos] == [(9, 3, 64, 64)] * len(PROMPTS)
    assert all(0.0 <= float(v.min()) and float(v.max()) <= 1.0 for v in videos)


def test_the_background_is_the_prompts(videos):
    for prompt, video in zip(PROMPTS, videos, strict=True):
        level = BACKGROUND_COLOURS[parse_caption(prompt).background]
        assert (_border_level(video) - level).abs().max() < 0.1, prompt


def test_an_object_of_the_prompts_colour_is_drawn_for_at_least_half_the_prompts(videos):
    """A regression check of the shipped weights, below today's measured ability (3 of these 4: red on black is
    found in 6 of its 9 frames)."""
    found = []
    for prompt, video in zip(PROMPTS, videos, strict=True):
        _, present = track_colour(video, parse_caption(prompt).objects[0].colour)
        found.append(bool(present.float().mean() >= 8 / 9))
    assert sum(found) >= 2, found


# The same seed and caption but for the direction word: the object must go the named way in each (a model that
# ignores the word, as the step-12400 one did, draws the same motion for both and fails one of the two).
DIRECTION_PAIRS = [
    ("a large yellow square moves {} slowly on a white background", "yellow", ("left", "right"), 0),
    ("a large blue square moves {} slowly on a gray background", "blue", ("up", "down"), 1),
]


def test_the_direction_word_alone_sends_the_object_the_named_way():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = load_world_video_pipeline()
        for template, colour, (negative, positive), axis in DIRECTION_PAIRS:
            prompts = [template.format(negative), template.format(positive)]
            back, forth = generate_many(pipe, prompts, [0, 0], steps=10)
            along = [float(displacement(track_colour(v, colour)[0])[axis]) for v in (back, forth)]
            assert along[0] <= -3.0 and along[1] >= 3.0, (template, along)
    finally:
        torch.set_num_threads(threads)


RED_ON_BLACK = "the shipped model's red circle on black turns blue-striped in some frames (docs/quality.md)"


@pytest.mark.parametrize("index", [
    pytest.param(0, marks=pytest.mark.xfail(strict=True, reason=RED_ON_BLACK), id="red-right-on-black"),
    pytest.param(1, id="yellow-left-on-white"),
    pytest.param(2, id="green-down-on-gray"),
    pytest.param(3, id="blue-up-on-gray"),
])
def test_the_object_of_the_prompts_colour_is_in_every_frame_and_moves_the_prompts_way(videos, index):
    prompt, video = PROMPTS[index], videos[index]
    obj = parse_caption(prompt).objects[0]
    centres, present = track_colour(video, obj.colour)
    assert bool(present.all()), (prompt, present.int().tolist())
    assert moves_towards(centres, obj.direction), prompt
