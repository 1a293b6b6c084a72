"""Bad input (issue 15): every public numeric and string argument, property-based.

For each argument a spec gives its allowed range. Hypothesis draws values inside it (Python, NumPy and 0-d
tensor numbers) and outside it (out of range, NaN, +-inf, fractional counts, bools, strings, None where None is
not allowed): a value inside is accepted, a value outside raises a ValueError naming the parameter and the
value. Construction-time arguments are checked by building the object; install-time ones (family, layers,
heads) by ``install`` on the tiny pipelines; pipeline-call ones by a call that is stopped at the first
transformer forward (a value inside reaches it, a value outside raises before it). The state test: after any
of these errors, the pipeline's processors and hooks are as before.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffusers_attn_ext import (
    AdaptiveSparseProcessor,
    AttentionInspector,
    EntropyScalingProcessor,
    ForegroundBackgroundCrossAttnProcessor,
    IsolationRepositionProcessor,
    RadialSparseProcessor,
    SoftPAGProcessor,
    STDRoPEProcessor,
    StockAttnProcessor,
    SubjectLayout,
    Trajectory,
    UltraViCoProcessor,
    headhunter,
    install,
    installed,
    radial_block_mask,
    sequence_range,
    ulysses_head_range,
    uninstall,
    validation,
)
from diffusers_attn_ext.headset import HeadSet
from diffusers_attn_ext.inspect.clustering import kmeans
from diffusers_attn_ext.inspect.head_importance import HeadImportance, HeadPerturbation
from diffusers_attn_ext.install import SAVED_PROCESSORS_ATTR, attention_modules
from diffusers_attn_ext.pipelines import (
    FluxHeadPAGPipeline,
    FluxMultiSubjectPipeline,
    HeadPerturbedAttentionGuidance,
    StableDiffusion3HeadPAGPipeline,
    WanSparsePipeline,
    WanTrajectoryPipeline,
    WanUltraViCoPipeline,
)
from diffusers_attn_ext.sparse import sparse_processor
from diffusers_attn_ext.testing import tiny_call_kwargs

FAST = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
CALLS = settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


# ---------------------------------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Real:
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    allow_none: bool = False


@dataclass(frozen=True)
class Integer:
    low: int | None = None
    high: int | None = None
    allow_none: bool = False
    sample_high: int | None = None  # the largest value drawn inside the range (to keep a call fast)


@dataclass(frozen=True)
class Choice:
    choices: tuple[str, ...]
    allow_none: bool = False


@dataclass(frozen=True)
class Boolean:
    pass


def number_forms(value):
    """The same number as Python, NumPy and 0-d tensor scalars."""
    if isinstance(value, int):
        if abs(value) >= 2**63:
            return st.just(value)
        return st.sampled_from([value, np.int64(value), torch.tensor(value)])
    return st.sampled_from([value, np.float64(value), torch.tensor(value, dtype=torch.float64)])


NOT_NUMBERS = st.sampled_from(["0.5", "1", [1], (0.5,), {"a": 1}, object()])
BOOLS = st.sampled_from([True, False, np.bool_(True), torch.tensor(True)])


def inside(spec) -> st.SearchStrategy:
    if isinstance(spec, Real):
        low = max(spec.low, -1e6)
        high = min(spec.high, 1e6)
        values = st.floats(low, high, exclude_min=spec.low_open and low == spec.low,
                           exclude_max=spec.high_open and high == spec.high, allow_nan=False, allow_infinity=False)
        values = values.flatmap(number_forms)
        if spec.low <= 1 <= spec.high and not (spec.low_open and spec.low == 1) and not (spec.high_open and spec.high == 1):
            values = values | number_forms(1)  # an integer is a number
    elif isinstance(spec, Integer):
        low = -1000 if spec.low is None else spec.low
        high = spec.high if spec.high is not None else spec.sample_high if spec.sample_high is not None else low + 1000
        values = st.integers(low, high).flatmap(number_forms)
    elif isinstance(spec, Choice):
        values = st.sampled_from(spec.choices)
    else:
        values = st.sampled_from([True, False, np.bool_(False)])
    return values | st.none() if getattr(spec, "allow_none", False) else values


def outside(spec) -> st.SearchStrategy:
    if isinstance(spec, Real):
        options = [st.sampled_from([math.nan, math.inf, -math.inf]).flatmap(number_forms), NOT_NUMBERS, BOOLS]
        if spec.low > -math.inf:
            options.append(st.floats(max_value=spec.low, exclude_max=not spec.low_open, allow_nan=False,
                                     allow_infinity=False).flatmap(number_forms))
        if spec.high < math.inf:
            options.append(st.floats(min_value=spec.high, exclude_min=not spec.high_open, allow_nan=False,
                                     allow_infinity=False).flatmap(number_forms))
    elif isinstance(spec, Integer):
        options = [st.floats(allow_nan=True, allow_infinity=True).flatmap(number_forms), NOT_NUMBERS, BOOLS]
        if spec.low is not None:
            options.append(st.integers(max_value=spec.low - 1).flatmap(number_forms))
        if spec.high is not None:
            options.append(st.integers(min_value=spec.high + 1).flatmap(number_forms))
    elif isinstance(spec, Choice):
        options = [st.text(max_size=8).filter(lambda s: s not in spec.choices), st.integers(), st.sampled_from([
            [spec.choices[0]], spec.choices[0].upper() + "x"])]
    else:
        options = [st.integers(), st.sampled_from(["True", "yes", None, 1.0, [True]])]
    if not getattr(spec, "allow_none", True) or isinstance(spec, Boolean):
        options.append(st.none())
    return st.one_of(options)


def assert_names(error: pytest.ExceptionInfo, name: str, value) -> None:
    """The message names the parameter and the value."""
    message = str(error.value)
    assert name in message, message
    assert repr(value) in message, message


# ------------------------------------------------------------------------------------- construction-time specs

TRAJECTORY = Trajectory.static((0, 0, 16, 16), 9, 32, 32)
LAYOUT = SubjectLayout.from_boxes([{"cat": (0, 0, 0.5, 0.5)}, {"cat": (0.5, 0.5, 1, 1)}])


def top_k(k):
    return HeadImportance({("blocks.0.attn1", 0): 1.0, ("blocks.0.attn1", 1): 0.5}, "identity").top(k)


# (entry, parameter name as in the message, build from a value, range)
CONSTRUCTION: list[tuple[str, str, Callable[[Any], Any], Any]] = [
    ("UltraViCoProcessor", "alpha", lambda v: UltraViCoProcessor(alpha=v), Real(0, 1, low_open=True)),
    ("UltraViCoProcessor", "train_frames", lambda v: UltraViCoProcessor(train_frames=v), Integer(1, allow_none=True)),
    ("UltraViCoProcessor", "restrict_first_frame", lambda v: UltraViCoProcessor(restrict_first_frame=v), Boolean()),
    ("UltraViCoProcessor", "center_keys", lambda v: UltraViCoProcessor(center_keys=v), Boolean()),
    ("UltraViCoProcessor", "stock_within_training", lambda v: UltraViCoProcessor(stock_within_training=v), Boolean()),
    ("SoftPAGProcessor", "alpha", lambda v: SoftPAGProcessor({"transformer_blocks.0": [0]}, alpha=v), Real(0, 1)),
    ("SoftPAGProcessor", "alpha", lambda v: SoftPAGProcessor({"b.0": [0, 1]}, alpha={"b.0": [0.5, v]}), Real(0, 1)),
    ("SoftPAGProcessor", "identity", lambda v: SoftPAGProcessor({"b.0": [0]}, identity=v), Choice(("image", "all"))),
    ("SoftPAGProcessor", "dual_attention", lambda v: SoftPAGProcessor({"b.0": [0]}, dual_attention=v), Boolean()),
    ("HeadSet", "heads['b.0']", lambda v: HeadSet({"b.0": [v]}), Integer(0)),
    ("RadialSparseProcessor", "decay_factor", lambda v: RadialSparseProcessor(decay_factor=v), Real(0, low_open=True)),
    ("RadialSparseProcessor", "dense_steps", lambda v: RadialSparseProcessor(dense_steps=v), Integer(0)),
    ("RadialSparseProcessor", "dense_layers", lambda v: RadialSparseProcessor(dense_layers=v), Integer(0)),
    ("RadialSparseProcessor", "block_size", lambda v: RadialSparseProcessor(block_size=v), Integer(1)),
    ("RadialSparseProcessor", "model", lambda v: RadialSparseProcessor(model=v), Choice(("wan", "hunyuan"))),
    ("AdaptiveSparseProcessor", "density", lambda v: AdaptiveSparseProcessor(density=v),
     Real(0, 1, low_open=True, allow_none=True)),
    ("AdaptiveSparseProcessor", "mass", lambda v: AdaptiveSparseProcessor(mass=v), Real(0, 1, low_open=True,
                                                                                        allow_none=True)),
    ("AdaptiveSparseProcessor", "cache_steps", lambda v: AdaptiveSparseProcessor(cache_steps=v), Integer(1)),
    ("AdaptiveSparseProcessor", "block_size", lambda v: AdaptiveSparseProcessor(block_size=v), Integer(1)),
    ("sparse_processor", "method", lambda v: sparse_processor(v), Choice(("radial", "adaptive"))),
    ("sparse_processor", "density", lambda v: sparse_processor("adaptive", density=v),
     Real(0, 1, low_open=True, allow_none=True)),
    ("sparse_processor", "dense_steps", lambda v: sparse_processor(dense_steps=v), Integer(0)),
    ("sparse_processor", "dense_layers", lambda v: sparse_processor("adaptive", dense_layers=v), Integer(0)),
    ("radial_block_mask", "num_frames", lambda v: radial_block_mask(v, 4, 4), Integer(1, sample_high=40)),
    ("radial_block_mask", "tokens_per_frame", lambda v: radial_block_mask(2, v, 512), Integer(1, sample_high=1000)),
    ("radial_block_mask", "block_size", lambda v: radial_block_mask(2, 4, v), Integer(1)),
    ("radial_block_mask", "decay_factor", lambda v: radial_block_mask(2, 4, 4, v), Real(0, low_open=True)),
    ("radial_block_mask", "model", lambda v: radial_block_mask(2, 4, 4, 1.0, v), Choice(("wan", "hunyuan"))),
    ("STDRoPEProcessor", "steps", lambda v: STDRoPEProcessor(TRAJECTORY, steps=v), Integer(0, allow_none=True)),
    ("STDRoPEProcessor", "frame_stride", lambda v: STDRoPEProcessor(TRAJECTORY, frame_stride=v), Integer(1)),
    ("STDRoPEProcessor", "isolate_duplicates", lambda v: STDRoPEProcessor(TRAJECTORY, isolate_duplicates=v),
     Boolean()),
    ("ForegroundBackgroundCrossAttnProcessor", "background_tokens",
     lambda v: ForegroundBackgroundCrossAttnProcessor(TRAJECTORY, v, 4), Integer(1)),
    ("ForegroundBackgroundCrossAttnProcessor", "foreground_tokens",
     lambda v: ForegroundBackgroundCrossAttnProcessor(TRAJECTORY, 4, v), Integer(1)),
    ("ForegroundBackgroundCrossAttnProcessor", "steps",
     lambda v: ForegroundBackgroundCrossAttnProcessor(TRAJECTORY, 4, 4, steps=v), Integer(0)),
    ("ForegroundBackgroundCrossAttnProcessor", "frame_stride",
     lambda v: ForegroundBackgroundCrossAttnProcessor(TRAJECTORY, 4, 4, frame_stride=v), Integer(1)),
    ("IsolationRepositionProcessor", "start_step", lambda v: IsolationRepositionProcessor(LAYOUT, start_step=v),
     Integer(0)),
    ("IsolationRepositionProcessor", "end_step", lambda v: IsolationRepositionProcessor(LAYOUT, 3, end_step=v),
     Integer(4, allow_none=True)),
    ("IsolationRepositionProcessor", "interpolation",
     lambda v: IsolationRepositionProcessor(LAYOUT, interpolation=v), Choice(("nearest", "bilinear"))),
    ("IsolationRepositionProcessor", "reference_dropout",
     lambda v: IsolationRepositionProcessor(LAYOUT, reference_dropout=v), Real(0, 1, high_open=True)),
    ("IsolationRepositionProcessor", "dropout_seed", lambda v: IsolationRepositionProcessor(LAYOUT, dropout_seed=v),
     Integer(0)),
    ("IsolationRepositionProcessor", "max_chunk_bytes",
     lambda v: IsolationRepositionProcessor(LAYOUT, max_chunk_bytes=v), Integer(1)),
    ("IsolationRepositionProcessor", "dropout_mode", lambda v: IsolationRepositionProcessor(LAYOUT, dropout_mode=v),
     Choice(("queries", "keys"))),
    ("EntropyScalingProcessor", "train_tokens", lambda v: EntropyScalingProcessor(v), Integer(2, allow_none=True)),
    ("HeadPerturbation", "head", lambda v: HeadPerturbation(v), Integer(0)),
    ("HeadPerturbation", "mode", lambda v: HeadPerturbation(0, v), Choice(("identity", "zero"))),
    ("AttentionInspector", "chunk_elements", lambda v: AttentionInspector(chunk_elements=v), Integer(1)),
    ("AttentionInspector", "sampled_rows", lambda v: AttentionInspector(sampled_rows=v), Integer(0)),
    ("AttentionInspector", "full_map_tokens", lambda v: AttentionInspector(full_map_tokens=v), Integer(0)),
    ("AttentionInspector", "heads", lambda v: AttentionInspector(heads=[v]), Integer(0)),
    ("AttentionInspector", "steps", lambda v: AttentionInspector(steps=[v]), Integer(0)),
    ("HeadImportance.top", "k", top_k, Integer(1)),
    ("kmeans", "k", lambda v: kmeans(torch.rand(5, 3), v), Integer(1, 5)),
    ("kmeans", "iterations", lambda v: kmeans(torch.rand(5, 3), 2, iterations=v), Integer(1)),
    ("Trajectory", "height", lambda v: Trajectory(((0, 0, 1, 1),), height=v, width=8), Integer(1)),
    ("Trajectory", "width", lambda v: Trajectory(((0, 0, 1, 1),), height=8, width=v), Integer(1)),
    ("Trajectory", "box_arithmetic", lambda v: Trajectory(((0, 0, 1, 1),), 8, 8, box_arithmetic=v),
     Choice(("authors", "exact"))),
    ("Trajectory.static", "num_frames", lambda v: Trajectory.static((0, 0, 8, 8), v, 16, 16), Integer(1)),
    ("sequence_range", "num_tokens", lambda v: sequence_range(v, 1, 0), Integer(1)),
    ("sequence_range", "parts", lambda v: sequence_range(10**6, v, 0, anything=True), Integer(1)),
    ("sequence_range", "index", lambda v: sequence_range(8, 4, v), Integer(0, 3)),
    ("sequence_range", "anything", lambda v: sequence_range(8, 4, 0, anything=v), Boolean()),
    ("ulysses_head_range", "rank", lambda v: ulysses_head_range(4, 2, v), Integer(0, 1)),
    ("ulysses_head_range", "num_heads", lambda v: ulysses_head_range(v, 1, 0), Integer(1)),
    ("HeadPerturbedAttentionGuidance", "perturbed_guidance_scale",
     lambda v: HeadPerturbedAttentionGuidance({"b.0": [0]}, perturbed_guidance_scale=v), Real(0)),
    ("HeadPerturbedAttentionGuidance", "guidance_scale",
     lambda v: HeadPerturbedAttentionGuidance({"b.0": [0]}, guidance_scale=v), Real()),
    ("HeadPerturbedAttentionGuidance", "pag_alpha",
     lambda v: HeadPerturbedAttentionGuidance({"b.0": [0]}, pag_alpha=v), Real(0, 1)),
    ("HeadPerturbedAttentionGuidance", "pag_identity",
     lambda v: HeadPerturbedAttentionGuidance({"b.0": [0]}, pag_identity=v), Choice(("image", "all"))),
]
CONSTRUCTION_IDS = [f"{entry}-{name}" for entry, name, _, _ in CONSTRUCTION]

# Parameters whose message names them with a qualifier (the value is still named).
MESSAGE_NAMES = {"HeadSet-heads['b.0']": "heads['b.0']"}


@pytest.mark.parametrize("entry, name, build, spec", CONSTRUCTION, ids=CONSTRUCTION_IDS)
def test_construction_argument_in_range_is_accepted(entry, name, build, spec):
    @FAST
    @given(inside(spec))
    def check(value):
        build(value)

    check()


@pytest.mark.parametrize("entry, name, build, spec", CONSTRUCTION, ids=CONSTRUCTION_IDS)
def test_construction_argument_out_of_range_raises_a_value_error_naming_it(entry, name, build, spec):
    @FAST
    @given(outside(spec))
    def check(value):
        with pytest.raises(ValueError) as error:
            build(value)
        assert_names(error, name, value)

    check()


def test_every_documented_range_appears_in_the_message():
    """The allowed range is part of the message, in the notation of the docs."""
    with pytest.raises(ValueError, match=r"alpha=nan is outside the allowed range \(0, 1\]$"):
        UltraViCoProcessor(alpha=float("nan"))
    with pytest.raises(ValueError, match=r"cache_steps=2.5 is outside the allowed range: an integer >= 1 \(got a"):
        AdaptiveSparseProcessor(cache_steps=2.5)
    with pytest.raises(ValueError, match=r"decay_factor=inf is outside the allowed range \(0, inf\)"):
        RadialSparseProcessor(decay_factor=float("inf"))
    with pytest.raises(ValueError, match=r"reference_dropout=1.0 is outside the allowed range \[0, 1\)"):
        IsolationRepositionProcessor(LAYOUT, reference_dropout=1.0)
    with pytest.raises(ValueError, match=r"train_frames=True is outside the allowed range: an integer >= 1 or None"):
        UltraViCoProcessor(train_frames=True)


# ------------------------------------------------------------------------------ the examples of the issue


def test_issue_examples_raise_clear_value_errors():
    with pytest.raises(ValueError, match=r"alpha='0.9' is outside the allowed range \(0, 1\]: a str, not a number"):
        UltraViCoProcessor(alpha="0.9")
    with pytest.raises(ValueError, match=r"train_frames='2' is outside the allowed range: an integer >= 1"):
        UltraViCoProcessor(train_frames="2")
    with pytest.raises(ValueError, match=r"train_frames=True is outside"):
        UltraViCoProcessor(train_frames=True)
    with pytest.raises(ValueError, match=r"decay_factor=inf is outside the allowed range \(0, inf\)"):
        RadialSparseProcessor(decay_factor=math.inf)
    assert RadialSparseProcessor(block_size=np.int64(128)).block_size == 128
    assert type(RadialSparseProcessor(block_size=np.int64(128)).block_size) is int
    assert AdaptiveSparseProcessor(density=np.float32(0.25)).density == 0.25
    assert UltraViCoProcessor(alpha=np.int64(1)).alpha == 1.0
    assert UltraViCoProcessor(alpha=torch.tensor(0.5)).alpha == 0.5
    with pytest.raises(ValueError, match=r"layers=\[\] is empty"):
        AttentionInspector(layers=[])
    with pytest.raises(ValueError, match=r"layers has pattern '\(', not a regular expression"):
        AttentionInspector(layers="(")
    with pytest.raises(ValueError, match=r"height=0 is outside the allowed range: an integer >= 1"):
        Trajectory(((0, 0, 8, 8),), height=0, width=64)
    with pytest.raises(ValueError, match=r"start_step=nan is outside the allowed range: an integer >= 0"):
        IsolationRepositionProcessor(LAYOUT, start_step=math.nan)
    with pytest.raises(ValueError, match=r"start_step=1.5 is outside"):
        IsolationRepositionProcessor(LAYOUT, start_step=1.5)


def test_issue_examples_at_install(pipe_for):
    sd3, wan = pipe_for("sd3"), pipe_for("wan")
    with pytest.raises(ValueError, match=r"layers=\[\] is empty"):
        install(sd3, StockAttnProcessor(), layers=[])
    with pytest.raises(ValueError, match=r"layers=5 is not allowed"):
        install(sd3, StockAttnProcessor(), layers=5)
    with pytest.raises(ValueError, match=r"layers has pattern '\(', not a regular expression"):
        install(sd3, StockAttnProcessor(), layers="(")
    with pytest.raises(ValueError, match=r"heads\['transformer_blocks.0'\] has head index 5; allowed range for "
                                         r"transformer_blocks.0.attn: 0..1"):
        install(sd3, SoftPAGProcessor({"transformer_blocks.0": [5]}))
    with pytest.raises(ValueError, match=r"heads has unknown layer 'blocks.7'"):
        install(sd3, SoftPAGProcessor({"blocks.7": [0]}))
    with pytest.raises(ValueError, match=r"UltraViCoProcessor applies to video families \('wan', 'cogvideox'\), "
                                         r"not family='sd3'"):
        install(sd3, UltraViCoProcessor())
    with pytest.raises(ValueError, match=r"heads has index 7; allowed range for blocks.0.attn1: 0..1"):
        install(wan, AttentionInspector(heads=[7]))


# -------------------------------------------------------------------------------------------- install time

# (family, processor) pairs install refuses: the method does not run in that family.
WRONG_FAMILY = [
    ("sd3", lambda: UltraViCoProcessor()), ("flux", lambda: RadialSparseProcessor()),
    ("sd3", lambda: AdaptiveSparseProcessor()), ("flux", lambda: STDRoPEProcessor(TRAJECTORY)),
    ("cogvideox", lambda: ForegroundBackgroundCrossAttnProcessor(TRAJECTORY, 4, 4)),
    ("wan", lambda: EntropyScalingProcessor()), ("wan", lambda: IsolationRepositionProcessor(LAYOUT)),
]


def state(pipe):
    """What an install changes: each module's processor, the transformer's hooks, the saved processors, the
    modules' context attributes."""
    transformer = pipe.transformer
    registry = getattr(transformer, "_diffusers_hook", None)
    return (
        {name: module.processor for name, module in attention_modules(transformer).items()},
        tuple(registry._hook_order) if registry is not None else (),
        dict(transformer.__dict__.get(SAVED_PROCESSORS_ATTR, {})),
        sorted(name for name, module in transformer.named_modules() if "_attn_ext_context" in module.__dict__),
    )


@pytest.mark.parametrize("family, make", WRONG_FAMILY, ids=[f"{f}-{i}" for i, (f, _) in enumerate(WRONG_FAMILY)])
def test_family_is_checked_at_install(pipe_for, family, make):
    pipe = pipe_for(family)
    before = state(pipe)
    with pytest.raises(ValueError, match=rf"applies to .*not family='{family}'"):
        install(pipe, make())
    with pytest.raises(ValueError, match=rf"applies to .*not family='{family}'"):
        with installed(pipe, StockAttnProcessor(), make()):
            pass
    assert state(pipe) == before


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_heads_are_checked_against_the_model_at_install(pipe_for, family):
    pipe = pipe_for(family)
    layer = "transformer_blocks.0" if family == "sd3" else "blocks.0"
    heads = min(module.heads for module in attention_modules(pipe.transformer).values())

    @FAST
    @given(st.integers(0, 3 * heads))
    def check(head):
        before = state(pipe)
        for processor in (SoftPAGProcessor({layer: [head]}), AttentionInspector(heads=[head]), HeadPerturbation(head)):
            if head < heads:
                install(pipe, processor)
                uninstall(pipe)
            else:
                with pytest.raises(ValueError, match=rf"{head}.*allowed range for .*: 0..{heads - 1}"):
                    install(pipe, processor)
                assert state(pipe) == before

    check()


def test_train_frames_unknown_for_the_checkpoint_is_refused_at_install(pipe_for, monkeypatch):
    from diffusers_attn_ext.processors import ultravico

    pipe = pipe_for("wan")
    monkeypatch.setattr(ultravico, "default_train_frames", lambda family, config: None)
    with pytest.raises(ValueError, match=r"train_frames=None and the training length of this checkpoint is unknown"):
        install(pipe, UltraViCoProcessor())
    install(pipe, UltraViCoProcessor(train_frames=3))


@FAST
@given(st.one_of(st.text(max_size=6), st.lists(st.text(max_size=4), max_size=3), st.integers(), st.none()))
def test_any_layers_argument_installs_or_raises_a_value_error(tiny_pipes, layers):
    """Any pattern, list or other value: install succeeds, or raises a ValueError naming layers (never a
    re.error or TypeError), and then leaves the pipeline as it was."""
    pipe = tiny_pipes("wan")
    uninstall(pipe)
    before = state(pipe)
    try:
        install(pipe, StockAttnProcessor(), layers=layers)
    except ValueError as error:
        assert "layers" in str(error)
        assert state(pipe) == before
    else:
        uninstall(pipe)


def test_layer_patterns_compile_like_install():
    assert validation.layer_patterns("layers", "blocks.0") == ("blocks.0",)
    assert validation.layer_patterns("layers", None) is None
    for bad in ([], "(", 5, [5], [""], b"x", {"a": 1}):
        with pytest.raises(ValueError, match="layers"):
            validation.layer_patterns("layers", bad)
    assert re.compile(validation.layer_patterns("layers", [r"blocks\.(0|1)"])[0])


# ------------------------------------------------------------------------------------------ pipeline calls


class Reached(Exception):
    """Raised by a forward pre-hook: the call got past every argument check to the first transformer forward."""


def stop_at_forward(pipe):
    def hook(module, args, kwargs):
        raise Reached

    return pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)


def tiny_method_pipe(tiny_pipes, cls, family):
    pipe = cls.from_pipe(tiny_pipes(family))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_kwargs(family, **overrides):
    return tiny_call_kwargs(family, **overrides)


def flux_subjects():
    kwargs = tiny_call_kwargs("flux", batch_size=2)
    kwargs["subject_boxes"] = [{"cat": (0, 0, 0.5, 0.5)}, {"cat": (0.5, 0.5, 1, 1)}]
    return kwargs


def wan_trajectory(**overrides):
    return {**tiny_call_kwargs("wan"), "trajectory": TRAJECTORY, **overrides}


def wan_ultravico():
    kwargs = tiny_call_kwargs("wan")
    kwargs.pop("num_frames", None)
    return {**kwargs, "ultravico_train_frames": 2}


# (pipeline class, family, parameter, kwargs maker, range); the tiny calls run 2 denoising steps.
CALL = [
    (StableDiffusion3HeadPAGPipeline, "sd3", "pag_scale", lambda: {**call_kwargs("sd3"), "pag_heads":
                                                                   {"transformer_blocks.0": [0]}}, Real(0)),
    (StableDiffusion3HeadPAGPipeline, "sd3", "pag_adaptive_scale", lambda: {
        **call_kwargs("sd3"), "pag_heads": {"transformer_blocks.0": [0]}}, Real(0)),
    (StableDiffusion3HeadPAGPipeline, "sd3", "pag_alpha", lambda: {**call_kwargs("sd3"), "pag_heads":
                                                                   {"transformer_blocks.0": [0]}},
     Real(0, 1, allow_none=True)),
    (StableDiffusion3HeadPAGPipeline, "sd3", "pag_identity", lambda: call_kwargs("sd3"), Choice(("image", "all"))),
    (StableDiffusion3HeadPAGPipeline, "sd3", "pag_dual_attention", lambda: call_kwargs("sd3"), Boolean()),
    (FluxHeadPAGPipeline, "flux", "pag_scale", lambda: {**call_kwargs("flux"), "pag_heads":
                                                        {"transformer_blocks.0": [0]}}, Real(0)),
    (FluxHeadPAGPipeline, "flux", "pag_adaptive_scale", lambda: {**call_kwargs("flux"), "pag_heads":
                                                                 {"transformer_blocks.0": [0]}}, Real(0)),
    (FluxMultiSubjectPipeline, "flux", "ir_start_step", flux_subjects, Integer(0, 1)),
    (FluxMultiSubjectPipeline, "flux", "ir_end_step", flux_subjects, Integer(1, allow_none=True)),
    (FluxMultiSubjectPipeline, "flux", "ir_reference_dropout", flux_subjects, Real(0, 1, high_open=True)),
    (FluxMultiSubjectPipeline, "flux", "ir_interpolation", flux_subjects, Choice(("nearest", "bilinear"))),
    (FluxMultiSubjectPipeline, "flux", "ir_dropout_mode", flux_subjects, Choice(("queries", "keys"))),
    (FluxMultiSubjectPipeline, "flux", "ir_dropout_seed", flux_subjects, Integer(0)),
    (WanSparsePipeline, "wan", "sparse_method", lambda: call_kwargs("wan"), Choice(("radial", "adaptive"),
                                                                                   allow_none=True)),
    (WanSparsePipeline, "wan", "sparse_density", lambda: {**call_kwargs("wan"), "sparse_method": "adaptive"},
     Real(0, 1, low_open=True, allow_none=True)),
    (WanSparsePipeline, "wan", "sparse_dense_steps", lambda: call_kwargs("wan"), Integer(0, 1)),
    (WanSparsePipeline, "wan", "sparse_dense_layers", lambda: call_kwargs("wan"), Integer(0)),
    (WanTrajectoryPipeline, "wan", "trajectory_rope_steps", wan_trajectory, Integer(0, allow_none=True)),
    (WanTrajectoryPipeline, "wan", "trajectory_mask_steps", wan_trajectory, Integer(0)),
    (WanTrajectoryPipeline, "wan", "trajectory_isolate_duplicates", wan_trajectory, Boolean()),
    (WanUltraViCoPipeline, "wan", "ultravico_alpha", wan_ultravico, Real(0, 1, low_open=True)),
    (WanUltraViCoPipeline, "wan", "extrapolation_ratio", wan_ultravico, Integer(1, allow_none=True, sample_high=4)),
    (WanUltraViCoPipeline, "wan", "ultravico_train_frames", wan_ultravico, Integer(1, allow_none=True, sample_high=4)),
    (WanUltraViCoPipeline, "wan", "ultravico_restrict_first_frame", wan_ultravico, Boolean()),
]
CALL_IDS = [f"{cls.__name__}-{name}" for cls, _, name, _, _ in CALL]


@pytest.mark.parametrize("cls, family, name, make, spec", CALL, ids=CALL_IDS)
def test_pipeline_argument_is_checked_before_the_first_forward(tiny_pipes, cls, family, name, make, spec):
    pipe = tiny_method_pipe(tiny_pipes, cls, family)
    handle = stop_at_forward(pipe)
    try:
        @CALLS
        @given(inside(spec), outside(spec))
        def check(good, bad):
            before = state(pipe)
            with pytest.raises(Reached):
                pipe(**{**make(), name: good})
            assert state(pipe) == before
            with pytest.raises(ValueError) as error:
                pipe(**{**make(), name: bad})
            assert_names(error, name, bad)
            assert state(pipe) == before

        check()
    finally:
        handle.remove()


def test_pipeline_examples_of_the_issue(tiny_pipes):
    """pag_scale=inf/-1/nan and pag_adaptive_scale=nan, a start step past the schedule, sparse_options='radial':
    ValueErrors before the first forward."""
    sd3 = tiny_method_pipe(tiny_pipes, StableDiffusion3HeadPAGPipeline, "sd3")
    flux = tiny_method_pipe(tiny_pipes, FluxHeadPAGPipeline, "flux")
    subjects = tiny_method_pipe(tiny_pipes, FluxMultiSubjectPipeline, "flux")
    sparse = tiny_method_pipe(tiny_pipes, WanSparsePipeline, "wan")
    heads = {"pag_heads": {"transformer_blocks.0": [0]}}
    handles = [stop_at_forward(pipe) for pipe in (sd3, flux, sparse)]
    try:
        for pipe, family in ((sd3, "sd3"), (flux, "flux")):
            for bad in (math.inf, -1, math.nan):
                with pytest.raises(ValueError, match=rf"pag_scale={bad!r} is outside the allowed range \[0, inf\)"):
                    pipe(**call_kwargs(family), **heads, pag_scale=bad)
            with pytest.raises(ValueError, match=r"pag_adaptive_scale=nan is outside the allowed range \[0, inf\)"):
                pipe(**call_kwargs(family), **heads, pag_adaptive_scale=math.nan)
        with pytest.raises(ValueError, match=r"ir_start_step=2 is outside the allowed range: an integer in 0..1"):
            subjects(**flux_subjects(), ir_start_step=2)
        with pytest.raises(ValueError, match=r"ir_start_step=5 is outside the allowed range: an integer in 0..3"):
            subjects(**{**flux_subjects(), "num_inference_steps": 4}, ir_start_step=5)
        with pytest.raises(ValueError, match=r"sparse_options='radial' is not allowed"):
            sparse(**call_kwargs("wan"), sparse_options="radial")
        with pytest.raises(ValueError, match=r"sparse_options has unknown keys \['density'\]"):
            sparse(**call_kwargs("wan"), sparse_options={"density": 0.5})
        with pytest.raises(ValueError, match=r"sparse_options: decay_factor=0 is outside"):
            sparse(**call_kwargs("wan"), sparse_options={"decay_factor": 0})
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name, spec", [("rounds", Integer(1)), ("per_round", Integer(1)), ("pag_scale", Real(0)),
                                        ("pag_alpha", Real(0, 1))])
def test_headhunter_search_checks_its_arguments_before_any_generation(monkeypatch, name, spec):
    def reached(pipe):
        raise Reached

    monkeypatch.setattr(headhunter, "head_pag_pipeline", reached)
    good = dict(rounds=1, per_round=1, pag_scale=3.0, pag_alpha=1.0)

    @FAST
    @given(inside(spec), outside(spec))
    def check(inside_value, outside_value):
        with pytest.raises(Reached):
            headhunter.search(None, "colorfulness", ["a fox"], **{**good, name: inside_value})
        with pytest.raises(ValueError) as error:
            headhunter.search(None, "colorfulness", ["a fox"], **{**good, name: outside_value})
        assert_names(error, name, outside_value)

    check()


# ------------------------------------------------------------------------------------------------ the state


BAD_INSTALLS = [
    lambda pipe: install(pipe, StockAttnProcessor(), layers=[]),
    lambda pipe: install(pipe, StockAttnProcessor(), layers="("),
    lambda pipe: install(pipe, StockAttnProcessor(), layers="blocks.99"),
    lambda pipe: install(pipe, StockAttnProcessor(), UltraViCoProcessor(train_frames=2), EntropyScalingProcessor()),
    lambda pipe: install(pipe, AttentionInspector(layers=["blocks.0", "nothing"])),
    lambda pipe: install(pipe, SoftPAGProcessor({"blocks.1": [9]})),
    lambda pipe: install(pipe, HeadPerturbation(9), layers="blocks.0"),
    lambda pipe: installed(pipe, RadialSparseProcessor(), layers=["blocks.0", 5]).__enter__(),
    lambda pipe: installed(pipe, IsolationRepositionProcessor(LAYOUT)).__enter__(),
]
BAD_CALLS = [
    dict(sparse_method="dense"), dict(sparse_options="radial"), dict(sparse_dense_steps=2),
    dict(sparse_density=0.0, sparse_method="adaptive"), dict(sparse_dense_layers=-1),
]


@CALLS
@given(st.sampled_from([None, "radial", "ultravico"]), st.integers(0, len(BAD_INSTALLS) + len(BAD_CALLS) - 1))
def test_after_any_error_processors_and_hooks_are_as_before(tiny_pipes, installed_first, which):
    """Whatever was installed before (nothing, a method, a method on some layers), a refused install or a refused
    pipeline call leaves every processor, hook, saved processor and context attribute as it was."""
    pipe = tiny_pipes("wan")
    uninstall(pipe)
    if installed_first == "radial":
        install(pipe, RadialSparseProcessor(block_size=16))
    elif installed_first == "ultravico":
        install(pipe, UltraViCoProcessor(train_frames=2), layers="blocks.0")
    before = state(pipe)
    try:
        if which < len(BAD_INSTALLS):
            with pytest.raises(ValueError):
                BAD_INSTALLS[which](pipe)
        else:
            sparse = WanSparsePipeline.from_pipe(pipe)
            handle = stop_at_forward(sparse)
            try:
                with pytest.raises(ValueError):
                    sparse(**call_kwargs("wan"), **BAD_CALLS[which - len(BAD_INSTALLS)])
            finally:
                handle.remove()
        assert state(pipe) == before
    finally:
        uninstall(pipe)
