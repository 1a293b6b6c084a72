"""The context hook: token grid, text length, steps and generations, as processors see them."""

import pytest
from conftest import run

from diffusers_attn_ext import AttnExtProcessor, attach_context, install
from diffusers_attn_ext.context import AttnContext


class Recorder(AttnExtProcessor):
    """Records what the context says at every self-attention call."""

    def __init__(self):
        self.seen = []

    def edit_attention(self, call):
        ctx = call.context
        self.seen.append((ctx.grid, ctx.text_len, ctx.step_index, ctx.generation, ctx.num_steps))


def expected_grid(pipe, family, height, width, num_frames=None):
    """(frames, height, width) of latent tokens after patching, from the pipeline's own scale factors."""
    if family == "sd3":
        p = pipe.transformer.config.patch_size
        return 1, height // pipe.vae_scale_factor // p, width // pipe.vae_scale_factor // p
    if family == "flux":  # latents are packed 2x2
        return 1, height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2
    frames = (num_frames - 1) // pipe.vae_scale_factor_temporal + 1
    spatial = pipe.vae_scale_factor_spatial
    if family == "cogvideox":
        p, p_t = pipe.transformer.config.patch_size, pipe.transformer.config.patch_size_t or 1
        return frames // p_t, height // spatial // p, width // spatial // p
    _, p_h, p_w = pipe.transformer.config.patch_size
    return frames, height // spatial // p_h, width // spatial // p_w


SIZES = {
    "sd3": [dict(height=32, width=32), dict(height=48, width=64)],
    "flux": [dict(height=32, width=32), dict(height=48, width=64)],
    "cogvideox": [dict(height=32, width=32, num_frames=9), dict(height=48, width=32, num_frames=13)],
    "wan": [dict(height=32, width=32, num_frames=9), dict(height=48, width=32, num_frames=13)],
}
TEXT_LEN = {"sd3": 16, "flux": 16, "cogvideox": 16, "wan": 0}


def test_grid_and_text_length_for_two_sizes_in_a_row(family, pipe_for):
    pipe = pipe_for(family)
    for size in SIZES[family]:
        recorder = Recorder()
        install(pipe, recorder)
        run(pipe, family, **size)
        grids = {(g.frames, g.height, g.width) for g, *_ in recorder.seen}
        assert grids == {expected_grid(pipe, family, **size)}
        assert {text_len for _, text_len, *_ in recorder.seen} == {TEXT_LEN[family]}


def test_steps_count_within_a_call_and_restart_at_the_next(family, pipe_for):
    pipe = pipe_for(family)
    recorder = Recorder()
    install(pipe, recorder)
    run(pipe, family, num_inference_steps=3)
    first = [(step, generation) for _, _, step, generation, _ in recorder.seen]
    recorder.seen.clear()
    run(pipe, family, num_inference_steps=3)
    second = [(step, generation) for _, _, step, generation, _ in recorder.seen]
    steps = [step for step, _ in first]
    assert steps == sorted(steps) and set(steps) == {0, 1, 2}
    assert [step for step, _ in second] == steps
    assert len({g for _, g in first}) == 1 and len({g for _, g in second}) == 1
    assert second[0][1] == first[0][1] + 1


def test_state_is_cleared_between_generations(pipe_for):
    pipe = pipe_for("wan")
    ctx = attach_context(pipe)
    install(pipe, Recorder())
    run(pipe, "wan")
    ctx.state["cache"] = "from the first call"
    run(pipe, "wan")
    assert "cache" not in ctx.state


def test_branch_rows():
    ctx = AttnContext(family="sd3", batch_size=6)
    assert ctx.rows("cond") == list(range(6)) and ctx.rows("uncond") == []
    ctx.set_branch_labels(("uncond", "cond", "perturbed"))
    assert ctx.rows("uncond") == [0, 1] and ctx.rows("cond") == [2, 3] and ctx.rows("perturbed") == [4, 5]
    ctx.branch = "uncond"
    ctx.set_branch_labels(None)
    assert ctx.rows("uncond") == list(range(6))
    with pytest.raises(ValueError, match="branch labels"):
        ctx.set_branch_labels(("cond", "sideways"))
    with pytest.raises(ValueError, match="branch='sideways'"):
        ctx.rows("sideways")
