"""The naming rule of the ready-made pipelines' arguments (diffusers_attn_ext/pipelines/arguments.py): inputs as
diffusers names inputs, settings ``<method>_<name>``; the old names are deprecated aliases with a FutureWarning."""

import inspect
import warnings

import pytest
import torch
from conftest import run

import diffusers_attn_ext.pipelines as pipelines
from diffusers_attn_ext.pipelines import WanTrajectoryPipeline, WanUltraViCoPipeline
from diffusers_attn_ext.testing import tiny_call_kwargs
from diffusers_attn_ext.trajectory import Trajectory

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
READY_MADE = [getattr(pipelines, name) for name in pipelines.__all__ if name.endswith("Pipeline")]
MOVING = Trajectory.from_key_boxes({0: (0, 0, 32, 48), 8: (32, 0, 64, 48)}, num_frames=9, height=64, width=64)


def diffusers_parent(cls):
    return next(base for base in cls.__mro__ if base.__module__.startswith("diffusers."))


def named_parameters(function):
    return [name for name, parameter in inspect.signature(function).parameters.items()
            if name != "self" and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)]


@pytest.mark.parametrize("cls", READY_MADE, ids=lambda cls: cls.__name__)
def test_every_added_argument_is_an_input_or_prefixed_with_the_method(cls):
    parent = set(named_parameters(diffusers_parent(cls).__call__))
    added = [name for name in named_parameters(cls.__call__) if name not in parent]
    assert added, cls  # the method has arguments of its own
    off_rule = [name for name in added
                if name not in cls.method_inputs and not name.startswith(f"{cls.method_prefix}_")]
    assert off_rule == [], f"{cls.__name__}: {off_rule} are neither inputs nor {cls.method_prefix}_*"
    for old, new in getattr(cls.__call__, "deprecated_arguments", {}).items():
        assert new in added and old not in added and new.startswith(f"{cls.method_prefix}_"), (old, new)


def test_the_renamed_arguments_are_the_ones_before_the_rule():
    assert WanUltraViCoPipeline.__call__.deprecated_arguments == {
        "train_frames": "ultravico_train_frames", "restrict_first_frame": "ultravico_restrict_first_frame",
        "center_keys": "ultravico_center_keys", "stock_within_training": "ultravico_stock_within_training"}
    assert WanTrajectoryPipeline.__call__.deprecated_arguments == {
        "rope_steps": "trajectory_rope_steps", "isolate_duplicates": "trajectory_isolate_duplicates",
        "mask_steps": "trajectory_mask_steps"}


def calls(cls, family="wan", **size):
    def call(pipe, **extra):
        return torch.as_tensor(pipe(**tiny_call_kwargs(family, **size), **extra)[0])
    return call


@pytest.mark.parametrize("cls, old, new, settings, size", [
    (WanUltraViCoPipeline, {"train_frames": 1, "restrict_first_frame": False},
     {"ultravico_train_frames": 1, "ultravico_restrict_first_frame": False}, {}, {}),
    (WanTrajectoryPipeline, {"rope_steps": 1, "isolate_duplicates": False},
     {"trajectory_rope_steps": 1, "trajectory_isolate_duplicates": False}, {"trajectory": MOVING},
     {"height": 64, "width": 64}),
], ids=["ultravico", "trajectory"])
def test_old_names_warn_and_compute_the_same(pipe_for, cls, old, new, settings, size):
    pipe = cls.from_pipe(pipe_for("wan"))
    pipe.set_progress_bar_config(disable=True)
    call = calls(cls, **size)
    expected = call(pipe, **settings, **new)
    assert not torch.equal(expected, run(pipe_for("wan"), "wan", **size))  # the settings matter
    with pytest.warns(FutureWarning) as caught:
        got = call(pipe, **settings, **old)
    assert torch.equal(got, expected)
    messages = [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
    for name, renamed in zip(old, new, strict=True):
        assert any(m.startswith(f"{name}=... is deprecated: use {renamed}=...") for m in messages), messages
    assert caught[0].filename == __file__  # the warning points at the caller's line


def test_new_names_do_not_warn(pipe_for):
    pipe = WanUltraViCoPipeline.from_pipe(pipe_for("wan"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        pipe(**tiny_call_kwargs("wan"), ultravico_train_frames=1)


def test_old_and_new_name_together_raise_before_any_work(pipe_for):
    pipe = WanUltraViCoPipeline.from_pipe(pipe_for("wan"))
    forwards = []
    handle = pipe.transformer.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        with pytest.raises(ValueError, match=r"train_frames=1 and ultravico_train_frames=2 are both given"):
            pipe(**tiny_call_kwargs("wan"), train_frames=1, ultravico_train_frames=2)
    finally:
        handle.remove()
    assert forwards == []


def test_errors_name_the_pipeline_argument_whichever_name_was_used(pipe_for):
    pipe = WanUltraViCoPipeline.from_pipe(pipe_for("wan"))
    for name in ("ultravico_train_frames", "train_frames"):
        with pytest.raises(ValueError, match=r"^ultravico_train_frames=0 is outside the allowed range"):
            pipe(**tiny_call_kwargs("wan"), **{name: 0})
    with pytest.raises(ValueError, match=r"^ultravico_center_keys=1 is not allowed"):
        pipe(**tiny_call_kwargs("wan"), ultravico_center_keys=1)
    trajectory = WanTrajectoryPipeline.from_pipe(pipe_for("wan"))
    with pytest.raises(ValueError, match=r"^trajectory_mask_steps=-1 is outside the allowed range"):
        trajectory(**tiny_call_kwargs("wan", height=64, width=64), trajectory=MOVING, mask_steps=-1)
