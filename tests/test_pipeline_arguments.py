"""The naming rule of the ready-made pipelines' arguments (diffusers_attn_ext/pipelines/arguments.py): inputs as
diffusers names inputs, settings ``<method>_<name>``; the old names are deprecated aliases with a FutureWarning."""

import functools
import importlib.util
import inspect
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run
from diffusers import WanPipeline
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

import diffusers_attn_ext.pipelines as pipelines
from diffusers_attn_ext.pipelines import WanTrajectoryPipeline, WanUltraViCoPipeline
from diffusers_attn_ext.testing import TEXT_DIM, TEXT_SEQ_LEN, tiny_call_kwargs
from diffusers_attn_ext.trajectory import Trajectory
from diffusers_attn_ext.video_demo import run_video_demo
from diffusers_attn_ext.world import load_world_video_pipeline

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
READY_MADE = [getattr(pipelines, name) for name in pipelines.__all__ if name.endswith("Pipeline")]
MOVING = Trajectory.from_key_boxes({0: (0, 0, 32, 48), 8: (32, 0, 64, 48)}, num_frames=9, height=64, width=64)
ROOT = Path(__file__).resolve().parent.parent
DEPRECATED_NAME = r"\w+=\.\.\. is deprecated: use "  # the FutureWarning of arguments.deprecated_aliases


@contextmanager
def deprecated_names_raise():
    """Inside the block, a deprecated pipeline argument raises its FutureWarning (pyproject ignores
    FutureWarnings; other libraries' FutureWarnings stay ignored)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=DEPRECATED_NAME, category=FutureWarning)
        yield


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


def test_every_documented_setting_of_the_wan_pipelines_runs_without_a_deprecation_warning(pipe_for):
    ultravico = WanUltraViCoPipeline.from_pipe(pipe_for("wan"))
    trajectory = WanTrajectoryPipeline.from_pipe(pipe_for("wan"))
    generator = torch.Generator().manual_seed(0)
    fg_bg = {f"{part}_prompt_embeds": torch.randn(1, TEXT_SEQ_LEN, TEXT_DIM, generator=generator)
             for part in ("foreground", "background")}
    with deprecated_names_raise():
        ultravico(**tiny_call_kwargs("wan"), ultravico_alpha=0.5, ultravico_train_frames=1,
                  ultravico_restrict_first_frame=False, ultravico_center_keys=False,
                  ultravico_stock_within_training=False)
        trajectory(**tiny_call_kwargs("wan", height=64, width=64), trajectory=MOVING, trajectory_rope_steps=1,
                   trajectory_isolate_duplicates=False, trajectory_mask_steps=1, **fg_bg)
    with pytest.raises(FutureWarning, match=r"^mask_steps=\.\.\. is deprecated"), deprecated_names_raise():
        trajectory(**tiny_call_kwargs("wan", height=64, width=64), trajectory=MOVING, mask_steps=1)  # the filter bites


def test_the_video_demo_and_the_quality_harness_use_the_current_names(tmp_path, monkeypatch):
    """video_demo and benchmarks/quality.py call the UltraViCo and DiTraj pipelines (through world.tasks.generate)
    on the shipped world model with no deprecated argument name. Our pipelines' own work (aliases, checks,
    install, the fg/bg prompt hook) runs; diffusers' denoising loop is replaced by random frames of the asked
    size (the world model's real loop takes minutes on CPU here)."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # its sibling quality_common, as when run as a script
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, quality)
    spec.loader.exec_module(quality)
    parent_call, reached = WanPipeline.__call__, []

    @functools.wraps(parent_call)
    def random_frames(self, *args, **kwargs):
        call = inspect.signature(parent_call).bind(self, *args, **kwargs)
        call.apply_defaults()
        reached.append(type(self).__name__)
        batch = len(call.arguments["prompt"]) if isinstance(call.arguments["prompt"], list) else 1
        stride, frames = self.vae_scale_factor_temporal, call.arguments["num_frames"]
        frames = frames if frames % stride == 1 else frames // stride * stride + 1  # as WanPipeline rounds it
        size = (batch, frames, call.arguments["height"], call.arguments["width"], 3)
        return WanPipelineOutput(frames=np.random.default_rng(len(reached)).random(size, dtype=np.float32))

    monkeypatch.setattr(WanPipeline, "__call__", random_frames)
    results = {}
    with deprecated_names_raise():
        run_video_demo(tmp_path, steps=1, only=["ultravico-2x", "ditraj"])
        world = load_world_video_pipeline()
        quality.run_ultravico(world, [0], 1, results, lambda: None, lengths=(2,), methods=("UltraViCo",))
        quality.run_ditraj(world, [0], 1, results, lambda: None)
    assert reached == ["WanUltraViCoPipeline", "WanSparsePipeline", "WanTrajectoryPipeline", "WanSparsePipeline",
                       "WanUltraViCoPipeline"] + ["WanTrajectoryPipeline"] * 3  # method, stock; quality's runs
    summary = (tmp_path / "summary.md").read_text()
    assert "| ultravico-2x |" in summary and "| ditraj |" in summary
    assert {"ultravico/2x/UltraViCo", "ditraj/STD-RoPE", "ditraj/STD-RoPE + fg/bg"} <= set(results)


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
