"""WanTrajectoryPipeline / CogVideoXTrajectoryPipeline: stock parity, fg/bg guidance, loading, bad input."""

import pytest
import torch
from conftest import run

from diffusers_attn_ext.context import AttnContext, TokenGrid
from diffusers_attn_ext.families.base import AttentionCall
from diffusers_attn_ext.kernels import attend
from diffusers_attn_ext.pipelines.trajectory_video import CogVideoXTrajectoryPipeline, WanTrajectoryPipeline
from diffusers_attn_ext.processors.fg_bg_guidance import ForegroundBackgroundCrossAttnProcessor
from diffusers_attn_ext.testing import TEXT_COMPONENTS, TEXT_DIM, TEXT_SEQ_LEN, tiny_call_kwargs, tiny_pipeline
from diffusers_attn_ext.trajectory import Trajectory, foreground_mask

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
SIZE = {"height": 64, "width": 64}  # 9 frames: 3 latent frames of 4x4 tokens
MOVING = Trajectory.from_key_boxes({0: (0, 0, 32, 48), 8: (32, 0, 64, 48)}, num_frames=9, height=64, width=64)


def split_embeds(seed=1):
    generator = torch.Generator().manual_seed(seed)
    background = torch.randn(1, TEXT_SEQ_LEN, TEXT_DIM, generator=generator)
    foreground = torch.randn(1, TEXT_SEQ_LEN // 2, TEXT_DIM, generator=generator)
    return {"background_prompt_embeds": background, "foreground_prompt_embeds": foreground}


def trajectory_pipe(pipe):
    traj = WanTrajectoryPipeline.from_pipe(pipe)
    traj.set_progress_bar_config(disable=True)
    return traj


def call(pipe, **extra):
    return torch.as_tensor(pipe(**tiny_call_kwargs("wan", **SIZE), **extra)[0])


def test_no_trajectory_and_full_frame_box_equal_stock(pipe_for):
    pipe = pipe_for("wan")
    stock = run(pipe, "wan", **SIZE)
    traj = trajectory_pipe(pipe)
    assert torch.equal(call(traj), stock)
    assert torch.equal(call(traj, trajectory=Trajectory.static((0, 0, 64, 64), 9, 64, 64)), stock)


def test_processors_are_installed_for_the_call_only(pipe_for):
    pipe = pipe_for("wan")
    before = dict(pipe.transformer.attn_processors)
    traj = trajectory_pipe(pipe)
    out = call(traj, trajectory=MOVING, **split_embeds())
    assert torch.isfinite(out).all() and not torch.equal(out, run(pipe, "wan", **SIZE))
    assert all(pipe.transformer.attn_processors[n] is p for n, p in before.items())
    assert pipe.transformer._diffusers_hook.get_hook("diffusers_attn_ext.fg_bg_prompts") is None


def test_fg_bg_guidance_acts_on_its_steps_only(pipe_for):
    traj = trajectory_pipe(pipe_for("wan"))
    rope_only = call(traj, trajectory=MOVING)
    assert torch.equal(call(traj, trajectory=MOVING, trajectory_mask_steps=0, **split_embeds()), rope_only)
    assert not torch.equal(call(traj, trajectory=MOVING, trajectory_mask_steps=1, **split_embeds()), rope_only)
    assert torch.equal(call(traj, trajectory=MOVING, trajectory_rope_steps=0), call(traj))


def test_fg_bg_cross_attention_matches_float64_masked_reference():
    grid = TokenGrid(3, 4, 4)
    context = AttnContext(family="wan", grid=grid, step_index=0, batch_size=2, branch="cond")
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 48, 2, 16, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(2, 12 + 5, 2, 16, generator=generator, dtype=torch.float64) for _ in range(2))
    attention = AttentionCall(module=torch.nn.Identity(), family="wan", kind="cross", query=q, key=k, value=v,
                              text=None, visual=slice(0, 48), context=context)
    processor = ForegroundBackgroundCrossAttnProcessor(MOVING, background_tokens=12, foreground_tokens=5)
    assert processor.applies_to(attention)
    processor.edit_attention(attention)
    out = processor.edit_output(attention, attend(attention))
    # The authors' mask on [background; foreground]: box tokens see the foreground part, others the background.
    inside = foreground_mask(MOVING.token_boxes(grid, 4), grid).flatten()
    text_is_foreground = torch.arange(17) >= 12
    allowed = inside[:, None] == text_is_foreground[None, :]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    scores = (qh @ kh.transpose(-1, -2)) / 16**0.5
    expected = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vh).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    context.branch = "uncond"
    assert not processor.applies_to(attention)


def test_from_pretrained_and_save(pipe_for, tmp_path):
    pipe_for("wan").save_pretrained(tmp_path)
    loaded = WanTrajectoryPipeline.from_pretrained(tmp_path, **dict.fromkeys(TEXT_COMPONENTS["wan"]))
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded, WanTrajectoryPipeline)
    full = Trajectory.static((0, 0, 64, 64), 9, 64, 64)
    assert torch.equal(call(loaded, trajectory=full), call(loaded))
    assert torch.isfinite(call(loaded, trajectory=MOVING, **split_embeds())).all()


def test_cogvideox_pipeline_runs_std_rope(pipe_for):
    pipe = CogVideoXTrajectoryPipeline.from_pipe(pipe_for("cogvideox"))
    pipe.set_progress_bar_config(disable=True)
    out = torch.as_tensor(pipe(**tiny_call_kwargs("cogvideox", **SIZE), trajectory=MOVING)[0])
    assert torch.isfinite(out).all() and not torch.equal(out, run(pipe_for("cogvideox"), "cogvideox", **SIZE))
    with pytest.raises(ValueError, match="WanTrajectoryPipeline only"):
        pipe(**tiny_call_kwargs("cogvideox", **SIZE), trajectory=MOVING, **split_embeds())


def test_cogvideox_without_rope_raises():
    pipe, _ = tiny_pipeline("cogvideox", transformer_config={"use_rotary_positional_embeddings": False})
    traj = CogVideoXTrajectoryPipeline.from_pipe(pipe)
    with pytest.raises(ValueError, match="use_rotary_positional_embeddings=False"):
        traj(**tiny_call_kwargs("cogvideox", **SIZE), trajectory=MOVING)


def test_bad_input_raises(pipe_for):
    traj = trajectory_pipe(pipe_for("wan"))
    with pytest.raises(ValueError, match="num_frames=13 but the trajectory has 9 boxes"):
        traj(**tiny_call_kwargs("wan", **SIZE, num_frames=13), trajectory=MOVING)
    with pytest.raises(ValueError, match="height=32, width=32"):
        traj(**tiny_call_kwargs("wan"), trajectory=MOVING)
    with pytest.raises(ValueError, match="both a foreground and a background"):
        traj(**tiny_call_kwargs("wan", **SIZE), trajectory=MOVING,
             foreground_prompt_embeds=split_embeds()["foreground_prompt_embeds"])
    with pytest.raises(ValueError, match="trajectory must be a Trajectory"):
        traj(**tiny_call_kwargs("wan", **SIZE), trajectory=[(0, 0, 16, 16)])
    with pytest.raises(ValueError, match="background_prompt_embeds of shape"):
        traj(**tiny_call_kwargs("wan", **SIZE), trajectory=MOVING, background_prompt_embeds=torch.zeros(1, 4, 7),
             foreground_prompt_embeds=split_embeds()["foreground_prompt_embeds"])


def test_cogvideox_default_num_frames_is_the_config_sample_frames(pipe_for):
    pipe = CogVideoXTrajectoryPipeline.from_pipe(pipe_for("cogvideox"))
    pipe.set_progress_bar_config(disable=True)
    kwargs = tiny_call_kwargs("cogvideox", **SIZE)
    assert kwargs.pop("num_frames") == pipe.transformer.config.sample_frames == 9
    out = torch.as_tensor(pipe(**kwargs, trajectory=MOVING)[0])
    assert out.shape[1] == 9 and torch.isfinite(out).all()


def test_wan_num_frames_that_the_pipeline_would_round_raises(pipe_for):
    traj = trajectory_pipe(pipe_for("wan"))
    ten = Trajectory.static((0, 0, 32, 32), 10, 64, 64)
    with pytest.raises(ValueError, match=r"num_frames=10 with a trajectory must be 4k \+ 1"):
        traj(**tiny_call_kwargs("wan", **SIZE, num_frames=10), trajectory=ten)


def test_fg_bg_batch_is_checked_against_the_prompts_and_repeated_per_video(pipe_for):
    traj = trajectory_pipe(pipe_for("wan"))
    first, second = split_embeds(1), split_embeds(2)
    pair = {name: torch.cat([first[name], second[name]]) for name in first}
    with pytest.raises(ValueError, match=r"batch size 2 but the call has 1 prompt\(s\) \(1 videos\)"):
        call(traj, trajectory=MOVING, **pair)
    # Two prompts, two videos each: each prompt's split is repeated for the videos of that prompt.
    call_kwargs = {"prompt": ["a", "b"], "num_videos_per_prompt": 2}
    background, foreground = traj.foreground_background_text(
        None, None, pair["foreground_prompt_embeds"], pair["background_prompt_embeds"], call_kwargs)
    assert torch.equal(background, pair["background_prompt_embeds"].repeat_interleave(2, dim=0))
    assert torch.equal(foreground, pair["foreground_prompt_embeds"].repeat_interleave(2, dim=0))
    out = torch.as_tensor(traj(**tiny_call_kwargs("wan", batch_size=2, **SIZE), trajectory=MOVING, **pair)[0])
    assert out.shape[0] == 2 and torch.isfinite(out).all()
