"""Calls that were silent no-ops or confusing errors (new-user walkthrough): IR-Diffusion with one prompt, ``ir_*``
settings without ``subject_boxes``, DiTraj settings without ``trajectory``, and the world model's num_frames
rounding. Each is a ValueError before the first transformer forward, naming the argument and what is allowed."""

import re

import pytest
import torch

from diffusers_attn_ext.pipelines.multi_subject import FluxMultiSubjectPipeline, StableDiffusion3MultiSubjectPipeline
from diffusers_attn_ext.pipelines.trajectory_video import WanTrajectoryPipeline
from diffusers_attn_ext.testing import TEXT_DIM, TEXT_SEQ_LEN, tiny_call_kwargs
from diffusers_attn_ext.trajectory import Trajectory

BOXES = [{"dog": (0.0, 0.25, 0.5, 1.0), "cat": (0.5, 0.25, 1.0, 1.0)},
         {"dog": (0.5, 0.0, 1.0, 0.5), "cat": (0.0, 0.5, 0.25, 1.0)}]
MOVING = Trajectory.from_key_boxes({0: (0, 0, 32, 48), 8: (32, 0, 64, 48)}, num_frames=9, height=64, width=64)
SIZE = {"height": 64, "width": 64}


class Reached(Exception):
    """Raised by a forward pre-hook: the call got past every argument check to the first transformer forward."""


@pytest.fixture
def stopped(tiny_pipes):
    """cls, family -> that pipeline on the tiny components, raising Reached at its first transformer forward."""
    handles = []

    def get(cls, family):
        pipe = cls.from_pipe(tiny_pipes(family))
        pipe.set_progress_bar_config(disable=True)
        handles.append(pipe.transformer.register_forward_pre_hook(lambda *a, **k: (_ for _ in ()).throw(Reached),
                                                                  with_kwargs=True))
        return pipe

    yield get
    for handle in handles:
        handle.remove()


# ---- 1. IR-Diffusion needs the reference and at least one target ------------------------------------------------

@pytest.mark.parametrize("cls, family", [(FluxMultiSubjectPipeline, "flux"), (StableDiffusion3MultiSubjectPipeline, "sd3")])
def test_one_prompt_with_subjects_is_a_value_error(stopped, cls, family):
    pipe = stopped(cls, family)
    with pytest.raises(ValueError, match=r"prompt_embeds has 1 row, but IR-Diffusion \(subject_boxes\) needs at least "
                                         r"2 prompts: the reference first, then one or more targets"):
        pipe(subject_boxes=BOXES[:1], **tiny_call_kwargs(family))
    kwargs = tiny_call_kwargs(family)
    for key in [k for k in kwargs if k.endswith("prompt_embeds")]:
        kwargs.pop(key)
    for prompt in ("a dog and a cat", ["a dog and a cat"]):  # a plain string and a list of one
        with pytest.raises(ValueError, match=re.escape(f"prompt={prompt!r} is 1 prompt, but IR-Diffusion "
                                                       "(subject_boxes) needs at least 2 prompts")):
            pipe(prompt, subject_boxes=BOXES[:1], **kwargs)
    with pytest.raises(Reached):  # two prompts (reference + target) get to the model
        pipe(subject_boxes=BOXES, **tiny_call_kwargs(family, batch_size=2))


def test_one_prompt_is_refused_by_the_processor_builder_too(stopped):
    pipe = stopped(FluxMultiSubjectPipeline, "flux")
    with pytest.raises(ValueError, match="needs at least 2 prompts"):
        pipe.multi_subject_processor(BOXES[:1], prompt_embeds=torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match="needs at least 2 prompts"):  # before the per-prompt count of the boxes
        pipe.multi_subject_processor(BOXES, prompt="a dog and a cat")


# ---- 2. ir_* settings: ranges always, and they need subject_boxes -------------------------------------------------

@pytest.mark.parametrize("name, bad, message", [
    ("ir_reference_dropout", 1.5, r"ir_reference_dropout=1.5 is outside the allowed range \[0, 1\)"),
    ("ir_interpolation", "bicubic", r"ir_interpolation='bicubic' is not one of \('nearest', 'bilinear'\)"),
    ("ir_dropout_mode", "tokens", r"ir_dropout_mode='tokens' is not one of \('queries', 'keys'\)"),
    ("ir_start_step", -1, r"ir_start_step=-1 is outside the allowed range: an integer >= 0"),
    ("ir_start_step", 2, r"ir_start_step=2 is outside the allowed range: an integer in 0..1"),  # 2-step schedule
    ("ir_end_step", 0, r"ir_end_step=0 is outside the allowed range: an integer >= 1"),
    ("ir_dropout_seed", 2.0, r"ir_dropout_seed=2.0 is outside the allowed range: an integer >= 0"),
    ("ir_layers", "(", r"ir_layers has pattern '\(', not a regular expression"),
])
@pytest.mark.parametrize("with_boxes", [False, True])
def test_ir_ranges_are_checked_with_or_without_subject_boxes(stopped, name, bad, message, with_boxes):
    pipe = stopped(FluxMultiSubjectPipeline, "flux")
    boxes = {"subject_boxes": BOXES} if with_boxes else {}
    with pytest.raises(ValueError, match=message):
        pipe(**tiny_call_kwargs("flux", batch_size=2), **boxes, **{name: bad})


@pytest.mark.parametrize("name, value", [("ir_reference_dropout", 0.0), ("ir_interpolation", "bilinear"),
                                         ("ir_dropout_mode", "keys"), ("ir_start_step", 1), ("ir_end_step", 2),
                                         ("ir_dropout_seed", 3), ("ir_layers", "transformer_blocks.0")])
def test_ir_settings_without_subject_boxes_are_a_value_error(stopped, name, value):
    pipe = stopped(FluxMultiSubjectPipeline, "flux")
    with pytest.raises(ValueError, match=rf"^{name}={value!r} needs subject_boxes: without subject_boxes the pipeline "
                                         "runs stock and IR-Diffusion is off"):
        pipe(**tiny_call_kwargs("flux", batch_size=2), **{name: value})
    with pytest.raises(Reached):  # the same setting with subject_boxes gets to the model
        pipe(**tiny_call_kwargs("flux", batch_size=2), subject_boxes=BOXES, **{name: value})


def test_several_ir_settings_are_all_named_and_defaults_stay_stock(stopped):
    pipe = stopped(FluxMultiSubjectPipeline, "flux")
    with pytest.raises(ValueError, match=r"^ir_interpolation='bilinear', ir_reference_dropout=0.25 need subject_boxes"):
        pipe(**tiny_call_kwargs("flux"), ir_reference_dropout=0.25, ir_interpolation="bilinear")
    with pytest.raises(Reached):  # the defaults, given explicitly, are a stock call
        pipe(**tiny_call_kwargs("flux"), ir_reference_dropout=0.5, ir_interpolation="nearest", ir_start_step=0)


# ---- 3. DiTraj settings need a trajectory -------------------------------------------------------------------------

def split_embeds():
    generator = torch.Generator().manual_seed(1)
    return {"background_prompt_embeds": torch.randn(1, TEXT_SEQ_LEN, TEXT_DIM, generator=generator),
            "foreground_prompt_embeds": torch.randn(1, TEXT_SEQ_LEN // 2, TEXT_DIM, generator=generator)}


@pytest.mark.parametrize("name, bad, message", [
    ("trajectory_rope_steps", -1, r"trajectory_rope_steps=-1 is outside the allowed range: an integer >= 0 or None"),
    ("trajectory_mask_steps", 2.5, r"trajectory_mask_steps=2.5 is outside the allowed range: an integer >= 0"),
    ("trajectory_isolate_duplicates", 1, r"trajectory_isolate_duplicates=1 is not allowed"),
    ("trajectory_layers", [], r"trajectory_layers=\[\] is empty"),
])
def test_trajectory_ranges_are_checked_without_a_trajectory(stopped, name, bad, message):
    pipe = stopped(WanTrajectoryPipeline, "wan")
    with pytest.raises(ValueError, match=message):
        pipe(**tiny_call_kwargs("wan", **SIZE), **{name: bad})


@pytest.mark.parametrize("settings, named", [
    ({"foreground_prompt": "a red ball", "background_prompt": "a meadow"},
     r"^foreground_prompt='a red ball', background_prompt='a meadow' need trajectory"),
    ({"trajectory_rope_steps": None}, r"^trajectory_rope_steps=None needs trajectory"),
    ({"trajectory_mask_steps": 3}, r"^trajectory_mask_steps=3 needs trajectory"),
    ({"trajectory_isolate_duplicates": False}, r"^trajectory_isolate_duplicates=False needs trajectory"),
    ({"trajectory_layers": "blocks.0"}, r"^trajectory_layers='blocks.0' needs trajectory"),
    ("embeds", "^" + re.escape(f"foreground_prompt_embeds=<tensor of shape (1, {TEXT_SEQ_LEN // 2}, {TEXT_DIM})>, "
                               f"background_prompt_embeds=<tensor of shape (1, {TEXT_SEQ_LEN}, {TEXT_DIM})> need "
                               "trajectory")),
])
def test_trajectory_settings_without_a_trajectory_are_a_value_error(stopped, settings, named):
    pipe = stopped(WanTrajectoryPipeline, "wan")
    if settings == "embeds":
        settings = split_embeds()
    with pytest.raises(ValueError, match=named + r": without trajectory the pipeline runs stock and DiTraj is off"):
        pipe(**tiny_call_kwargs("wan", **SIZE), **settings)


def test_trajectory_defaults_and_the_deprecated_alias_without_a_trajectory_stay_stock(stopped):
    pipe = stopped(WanTrajectoryPipeline, "wan")
    with pytest.raises(Reached):
        pipe(**tiny_call_kwargs("wan", **SIZE), trajectory_rope_steps=5, trajectory_mask_steps=30)
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"^trajectory_mask_steps=3 needs trajectory"):
        pipe(**tiny_call_kwargs("wan", **SIZE), mask_steps=3)


# ---- 4. num_frames rounding names what the user passed --------------------------------------------------------------

def test_wan21_rounding_message_says_what_to_pass(stopped):
    pipe = stopped(WanTrajectoryPipeline, "wan")  # temporal factor 4
    with pytest.raises(ValueError, match=r"num_frames=10 with a trajectory must be 4k \+ 1 \(WanPipeline would round "
                                         r"it to 9 frames: .*vae_scale_factor_temporal=4.*9 boxes\): pass num_frames=9"):
        pipe(**tiny_call_kwargs("wan", **SIZE, num_frames=10), trajectory=MOVING)


@pytest.fixture(scope="module")
def world_video():
    from diffusers_attn_ext.world import load_world_video_pipeline

    pipe = load_world_video_pipeline(pipeline_class=WanTrajectoryPipeline)
    assert pipe.vae_scale_factor_temporal == 1  # no temporal compression: WanPipeline adds a frame to each request
    return pipe


def test_world_model_rounding_names_the_users_num_frames_and_the_fix(world_video):
    from diffusers_attn_ext.world import wan_num_frames

    call = {"prompt_embeds": torch.zeros(1, 4, world_video.transformer.config.text_dim),
            "negative_prompt_embeds": torch.zeros(1, 4, world_video.transformer.config.text_dim),
            "num_inference_steps": 1, "output_type": "pt", **SIZE}
    with pytest.raises(ValueError) as error:
        world_video(**call, num_frames=9, trajectory=MOVING)
    message = str(error.value)
    assert message.startswith("num_frames=9 makes 10 frames, not 9: WanPipeline makes num_frames // 1 * 1 + 1 frames")
    assert "vae_scale_factor_temporal=1" in message and "The trajectory has 9 boxes" in message
    assert "pass num_frames=8 for a 9-frame trajectory (diffusers_attn_ext.world.wan_num_frames(9, pipe.vae)" in message
    assert "num_frames=10 but" not in message
    assert wan_num_frames(MOVING.num_frames, world_video.vae) == 8
    handle = world_video.transformer.register_forward_pre_hook(lambda *a, **k: (_ for _ in ()).throw(Reached),
                                                               with_kwargs=True)
    try:
        with pytest.raises(Reached):  # the count it names gets to the model
            world_video(**call, num_frames=8, trajectory=MOVING)
    finally:
        handle.remove()
