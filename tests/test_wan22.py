"""Wan 2.2: a method acts in both experts of an A14B pipeline (``transformer`` on the high-noise steps,
``transformer_2`` on the low-noise ones), ``uninstall`` restores both exactly, the same through each ready-made
Wan pipeline; the TI2V-5B layout (48-channel latents, 16x VAE, a timestep per token) runs with a method.

How "acts in an expert" is checked: every forward of each expert during a call is recorded (its inputs and
output); afterwards, with stock processors back, the same expert is run on the same inputs. A forward the method
changed gives another output; on a stock call the recomputation is bitwise equal (the control in the first test).
"""

import pytest
import torch

from diffusers_attn_ext import (
    AdaptiveSparseProcessor,
    RadialSparseProcessor,
    StockAttnProcessor,
    UltraViCoProcessor,
    install,
    uninstall,
)
from diffusers_attn_ext.context import CONTEXT_HOOK_NAME
from diffusers_attn_ext.install import SAVED_PROCESSORS_ATTR, attach_contexts, pipeline_transformers
from diffusers_attn_ext.pipelines import WanSparsePipeline, WanTrajectoryPipeline, WanUltraViCoPipeline
from diffusers_attn_ext.pipelines.trajectory_video import FG_BG_HOOK_NAME
from diffusers_attn_ext.processors.ultravico import default_train_frames
from diffusers_attn_ext.testing import (
    TEXT_DIM,
    TEXT_SEQ_LEN,
    WAN22_BOUNDARY_RATIO,
    load_tiny_pipeline,
    tiny_call_kwargs,
    tiny_pipeline,
)
from diffusers_attn_ext.trajectory import Trajectory

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
A14B, TI2V = "2.2-a14b", "2.2-ti2v-5b"
EXPERTS = ("transformer", "transformer_2")
# The tiny schedule of 2 steps is t = 1000 (transformer) and t = 47 (transformer_2); CFG: cond and uncond forwards.
BOTH_PHASES = ["transformer", "transformer", "transformer_2", "transformer_2"]
LARGER = dict(height=64, width=64, num_frames=17)  # 5 latent frames of 4x4 tokens: radial masks drop blocks
SIZE = dict(height=64, width=64)  # 3 latent frames of 4x4 tokens
MOVING = Trajectory.from_key_boxes({0: (0, 0, 32, 48), 8: (32, 0, 64, 48)}, num_frames=9, height=64, width=64)


@pytest.fixture(scope="module")
def a14b():
    pipe = tiny_pipeline("wan", variant=A14B)[0]
    yield pipe
    uninstall(pipe)


@pytest.fixture
def experts(a14b):
    """The two-expert pipeline, restored to stock after the test."""
    yield a14b
    uninstall(a14b)


class ExpertForwards:
    """Records every forward of each expert of ``pipe`` inside the ``with`` block: (expert, kwargs, output)."""

    def __init__(self, pipe):
        self.pipe, self.calls, self.handles = pipe, [], []

    def __enter__(self):
        for name in EXPERTS:
            def record(module, args, kwargs, output, name=name):
                assert not args  # WanPipeline passes keywords only
                self.calls.append((name, dict(kwargs), output[0].clone()))
            self.handles.append(getattr(self.pipe, name).register_forward_hook(record, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()

    @property
    def experts(self):
        return [name for name, _, _ in self.calls]

    def changed(self):
        """Per recorded forward: whether the expert, run now on the same inputs, gives another output."""
        with torch.no_grad():
            return [not torch.equal(getattr(self.pipe, name)(**kwargs)[0], output) for name, kwargs, output in self.calls]


def run(pipe, variant=A14B, **overrides):
    return torch.as_tensor(pipe(**tiny_call_kwargs("wan", variant=variant, **overrides))[0])


def processors(pipe):
    return {name: dict(getattr(pipe, name).attn_processors) for name in EXPERTS}


def assert_stock(pipe, before):
    """Both experts have exactly the processors of ``before`` and none of this package's hooks or saved state."""
    assert all(processors(pipe)[name][key] is processor
               for name in EXPERTS for key, processor in before[name].items())
    for name in EXPERTS:
        transformer = getattr(pipe, name)
        registry = getattr(transformer, "_diffusers_hook", None)
        hooks = () if registry is None else tuple(registry._hook_order)
        assert CONTEXT_HOOK_NAME not in hooks and FG_BG_HOOK_NAME not in hooks, (name, hooks)
        assert SAVED_PROCESSORS_ATTR not in transformer.__dict__


def split_embeds():
    generator = torch.Generator().manual_seed(1)
    return {"background_prompt_embeds": torch.randn(1, TEXT_SEQ_LEN, TEXT_DIM, generator=generator),
            "foreground_prompt_embeds": torch.randn(1, TEXT_SEQ_LEN // 2, TEXT_DIM, generator=generator)}


def test_tiny_a14b_layout(a14b):
    assert a14b.config.boundary_ratio == WAN22_BOUNDARY_RATIO == 0.875
    assert a14b.transformer_2 is not None and a14b.transformer_2 is not a14b.transformer
    first, second = (dict(t.named_parameters()) for t in (a14b.transformer, a14b.transformer_2))
    assert first.keys() == second.keys() and not all(torch.equal(first[k], second[k]) for k in first)
    assert pipeline_transformers(a14b) == [a14b.transformer, a14b.transformer_2]


def test_install_acts_in_both_experts_and_uninstall_restores_both(experts):
    pipe = experts
    before = processors(pipe)
    with ExpertForwards(pipe) as stock_forwards:
        stock = run(pipe)
    assert stock_forwards.experts == BOTH_PHASES
    assert stock_forwards.changed() == [False] * 4  # control: recomputing a stock forward is exact

    processor = install(pipe, UltraViCoProcessor(alpha=0.5, train_frames=1))
    for name in EXPERTS:
        assert all(p is processor for p in getattr(pipe, name).attn_processors.values()), name
    contexts = attach_contexts(pipe)
    assert len(contexts) == 2 and contexts[0] is not contexts[1]
    with ExpertForwards(pipe) as method_forwards:
        out = run(pipe)
    assert method_forwards.experts == BOTH_PHASES
    assert not torch.equal(out, stock)

    uninstall(pipe)
    assert_stock(pipe, before)
    assert method_forwards.changed() == [True] * 4  # the method changed every forward of both experts
    assert torch.equal(run(pipe), stock)


def test_the_low_noise_expert_counts_the_steps_of_the_whole_schedule(experts):
    """dense_steps=1: step 0 (transformer) is dense, step 1 (transformer_2) sparse. An expert that counted its
    own forwards from 0 would run step 1 dense too."""
    pipe = experts
    install(pipe, RadialSparseProcessor(dense_steps=1, block_size=16))
    with ExpertForwards(pipe) as forwards:
        run(pipe, **LARGER)
    uninstall(pipe)
    assert forwards.experts == BOTH_PHASES
    assert forwards.changed() == [False, False, True, True]


def test_a_call_interrupted_in_the_low_noise_phase_leaves_no_state_to_the_next(experts):
    """The low-noise expert's context knows the pipeline (its scheduler): a new call starts a new generation there
    too, even when the last call raised after ``transformer_2`` had cached adaptive patterns (4 steps: 0, 1 on
    ``transformer``, 2, 3 on ``transformer_2``; the patterns of steps 2-3 are searched at step 2)."""

    class Stop(Exception):
        pass

    def stop_at_step_2(pipe, i, t, callback_kwargs):
        if i == 2:
            raise Stop
        return {}

    def call(seed, **extra):
        kwargs = tiny_call_kwargs("wan", variant=A14B, seed=seed, num_inference_steps=4, **LARGER)
        return torch.as_tensor(experts(**kwargs, **extra)[0])

    def method():
        return AdaptiveSparseProcessor(density=0.5, cache_steps=2, block_size=16)

    install(experts, method())
    with pytest.raises(Stop):
        call(1, callback_on_step_end=stop_at_step_2)
    after_interruption = call(0)
    uninstall(experts)
    install(experts, method())
    assert torch.equal(after_interruption, call(0))


READY_MADE = {
    "ultravico": (WanUltraViCoPipeline, lambda: dict(ultravico_alpha=0.5, ultravico_train_frames=1), {}),
    "sparse": (WanSparsePipeline, lambda: dict(sparse_options={"block_size": 16}), LARGER),
    "trajectory": (WanTrajectoryPipeline, lambda: dict(trajectory=MOVING, trajectory_rope_steps=None,
                                                       **split_embeds()), SIZE),
}


@pytest.mark.parametrize("method", sorted(READY_MADE))
def test_ready_made_pipeline_acts_in_both_experts_and_restores_both(experts, method):
    cls, method_kwargs, size = READY_MADE[method]
    before = processors(experts)
    stock = run(experts, **size)
    pipe = cls.from_pipe(experts)
    assert pipe.transformer_2 is experts.transformer_2 and pipe.config.boundary_ratio == WAN22_BOUNDARY_RATIO
    with ExpertForwards(pipe) as forwards:
        out = run(pipe, **size, **method_kwargs())
    assert forwards.experts == BOTH_PHASES
    assert not torch.equal(out, stock)
    assert_stock(experts, before)  # installed for the call only, in both experts
    assert forwards.changed() == [True] * 4
    assert torch.equal(run(experts, **size), stock)


def test_trajectory_prompt_split_reaches_the_conditional_forwards_of_both_experts(experts):
    """Foreground/background guidance alone (no STD-RoPE step): both experts' conditional forwards change (the
    text swap and the cross-attention mask), their unconditional forwards stay stock."""
    pipe = WanTrajectoryPipeline.from_pipe(experts)
    with ExpertForwards(pipe) as forwards:
        run(pipe, **SIZE, trajectory=MOVING, trajectory_rope_steps=0, **split_embeds())
    assert forwards.experts == BOTH_PHASES
    assert forwards.changed() == [True, False, True, False]  # cond, uncond of each step


def test_ready_made_call_composes_with_a_method_installed_on_both_experts(experts):
    mine = StockAttnProcessor()
    install(experts, mine)
    WanUltraViCoPipeline.from_pipe(experts)(**tiny_call_kwargs("wan", variant=A14B), ultravico_train_frames=1)
    for name in EXPERTS:
        assert all(p is mine for p in getattr(experts, name).attn_processors.values()), name


def test_a14b_saves_and_loads_with_both_experts(experts, tmp_path):
    experts.save_pretrained(tmp_path)
    loaded = load_tiny_pipeline("wan", tmp_path)
    assert loaded.transformer_2 is not None and loaded.config.boundary_ratio == WAN22_BOUNDARY_RATIO
    # as for Wan2.1's tiny pipeline, a reload agrees to float32 rounding, not bitwise
    torch.testing.assert_close(run(loaded), run(experts), rtol=0, atol=1e-6)


def test_ti2v_5b_layout_runs_with_a_method_installed():
    pipe = tiny_pipeline("wan", variant=TI2V)[0]
    assert pipe.transformer_2 is None and pipe.config.expand_timesteps
    assert pipe.vae.config.z_dim == pipe.transformer.config.in_channels == 48
    assert pipe.vae_scale_factor_spatial == 16 and pipe.vae_scale_factor_temporal == 4
    # its training length: 121 frames, 31 latent frames
    assert default_train_frames("wan", pipe.transformer.config) == 31
    assert WanUltraViCoPipeline.from_pipe(pipe).extrapolated_num_frames(1) == 121
    stock = run(pipe, TI2V)
    assert stock.shape == (1, 9, 3, 64, 64)
    install(pipe, UltraViCoProcessor(alpha=0.5, train_frames=1))
    out = run(pipe, TI2V)
    assert torch.isfinite(out).all() and not torch.equal(out, stock)
    uninstall(pipe)
    assert torch.equal(run(pipe, TI2V), stock)
