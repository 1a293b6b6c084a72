"""Mistakes of a new user (a walkthrough of the README), each refused by a clear ValueError before any model work.

- ``pag_heads`` as a preset name loads the preset; a misspelled name (or a missing file) is a ValueError naming
  ``pag_heads`` and the presets, not pathlib's ``FileNotFoundError``.
- ``demo --steps 0`` is refused (it used to run the default 10 steps: 0 was read as "not given"), and ``--steps``
  reaches the tiny and checkpoint demos too; the ``demo`` help names the image methods it also runs.

Nothing here generates: every error comes before the first denoising step, and the demos are stubbed.
"""

import json

import pytest

from diffusers_attn_ext import demo, image_demo, video_demo
from diffusers_attn_ext.__main__ import main
from diffusers_attn_ext.headset import HeadSet, as_headset, preset_names
from diffusers_attn_ext.pipelines.head_pag import (
    FluxHeadPAGPipeline,
    HeadPerturbedAttentionGuidance,
    StableDiffusion3HeadPAGPipeline,
)
from diffusers_attn_ext.processors.softpag import SoftPAGProcessor
from diffusers_attn_ext.testing import tiny_call_kwargs

ALLOWED = "a HeadSet, a JSON file path or a preset name, one of "


class NoModelWork(Exception):
    """Raised by a stubbed ``prepare_latents`` (the first model work of a call given embeddings): the call got
    past every check."""


def no_model_work(pipe, monkeypatch):
    """``pipe`` (a fresh ``from_pipe`` copy) whose call stops where the model work would begin."""

    def prepare_latents(*args, **kwargs):
        raise NoModelWork

    monkeypatch.setattr(pipe, "prepare_latents", prepare_latents)
    return pipe


# ----- pag_heads: preset names where JSON paths are taken

def test_a_preset_name_is_a_head_set_wherever_a_json_path_is():
    for name in ("sd3_dark", "flux_golden_hour_green"):
        assert as_headset(name) == HeadSet.preset(name)
        assert SoftPAGProcessor(name).headset == HeadSet.preset(name)
    guider = HeadPerturbedAttentionGuidance("sd3_dark")
    assert guider.processor.headset == HeadSet.preset("sd3_dark")


def test_an_existing_file_comes_before_a_preset_of_the_same_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    HeadSet({"transformer_blocks.0": [1]}).save(tmp_path / "sd3_dark")
    assert as_headset("sd3_dark").heads == {"transformer_blocks.0": (1,)}
    assert as_headset(tmp_path / "sd3_dark").heads == {"transformer_blocks.0": (1,)}


@pytest.mark.parametrize("value", ["flux_golden_hour_gren", "missing/heads.json", "", 7, ["transformer_blocks.0"]])
def test_a_misspelled_preset_missing_file_or_other_value_names_pag_heads_and_the_presets(tiny_pipes, monkeypatch,
                                                                                          value):
    pipe = no_model_work(FluxHeadPAGPipeline.from_pipe(tiny_pipes("flux")), monkeypatch)
    with pytest.raises(ValueError) as error:
        pipe(**tiny_call_kwargs("flux"), pag_heads=value)
    message = str(error.value)
    assert message.startswith(f"pag_heads={value!r} ")
    assert ALLOWED + str(preset_names()) in message
    with pytest.raises(ValueError, match=r"^pag_heads=.*a preset name, one of \["):
        StableDiffusion3HeadPAGPipeline.from_pipe(tiny_pipes("sd3"), pag_heads=value)
    with pytest.raises(ValueError, match=r"^pag_heads=.*a preset name, one of \["):
        HeadPerturbedAttentionGuidance(value)
    with pytest.raises(ValueError, match=r"^heads=.*a preset name, one of \["):
        SoftPAGProcessor(value)


def test_a_folder_is_not_a_head_set_file(tmp_path):
    with pytest.raises(ValueError, match=r"^pag_heads=.* is neither an existing file nor a preset name"):
        as_headset(str(tmp_path), "pag_heads")


def test_the_walkthroughs_preset_call_reads_the_preset_and_checks_it_against_the_model(tiny_pipes, monkeypatch):
    """The call of the walkthrough on a tiny FLUX: the preset loads (it used to be a FileNotFoundError) and its
    FLUX.1-dev layers are refused by the tiny transformer, naming the preset's first layer, before the forward."""
    pipe = no_model_work(FluxHeadPAGPipeline.from_pipe(tiny_pipes("flux")), monkeypatch)
    first = HeadSet.preset("flux_golden_hour_green").layers[0]
    with pytest.raises(ValueError, match=rf"heads has unknown layer '{first}'"):
        pipe(**tiny_call_kwargs("flux"), pag_heads="flux_golden_hour_green", pag_identity="all")


def test_a_preset_that_fits_runs_up_to_the_model(tiny_pipes, monkeypatch, tmp_path):
    """A preset-named head set that fits the model passes validation: the call reaches the transformer."""
    preset = tmp_path / "tiny.json"
    preset.write_text(json.dumps({"heads": {"transformer_blocks.1": [0]}}))
    monkeypatch.setattr("diffusers_attn_ext.headset.PRESETS", tmp_path)
    assert preset_names() == ["tiny"]
    pipe = no_model_work(FluxHeadPAGPipeline.from_pipe(tiny_pipes("flux")), monkeypatch)
    with pytest.raises(NoModelWork):
        pipe(**tiny_call_kwargs("flux"), pag_heads="tiny")


# ----- demo --steps

@pytest.fixture
def stubbed_demos(monkeypatch, tmp_path):
    """The demos record their arguments instead of loading models."""
    calls = []

    def video(output_dir, model=None, steps=None, only=None):
        calls.append(("video", steps))
        (tmp_path / "summary.md").write_text("video\n")
        return tmp_path / "summary.md"

    def image(output_dir, steps=None, only=None):
        calls.append(("image", steps))
        return "image\n"

    def tiny(output_dir, model=None, family=None, steps=None):
        calls.append(("tiny", steps))
        (tmp_path / "summary.md").write_text("tiny\n")
        return tmp_path / "summary.md"

    def checkpoint(model):
        calls.append(("load", model))
        raise NoModelWork

    monkeypatch.setattr(video_demo, "run_video_demo", video)
    monkeypatch.setattr(image_demo, "image_section", image)
    monkeypatch.setattr(demo, "run_demo", tiny)
    monkeypatch.setattr(demo, "_load_checkpoint", checkpoint)
    return calls


@pytest.mark.parametrize("extra", [[], ["--tiny"], ["--family", "wan"], ["--model", "some/checkpoint"]])
@pytest.mark.parametrize("steps", ["0", "-3"])
def test_demo_refuses_steps_below_one_before_any_model_work(tmp_path, capsys, stubbed_demos, extra, steps):
    output = tmp_path / "out"
    assert main(["demo", "--output", str(output), "--steps", steps, *extra]) == 2
    assert f"steps={steps} is outside the allowed range: an integer >= 1" in capsys.readouterr().err
    assert stubbed_demos == [] and not output.exists()


@pytest.mark.parametrize("steps", [0, 2.0, True, "3"])
def test_the_demo_function_refuses_bad_steps(tmp_path, stubbed_demos, steps):
    with pytest.raises(ValueError, match=r"^steps=.* is outside the allowed range: an integer >= 1"):
        demo.run(tmp_path, steps=steps)
    assert stubbed_demos == []


def test_demo_steps_reach_every_demo(tmp_path, stubbed_demos):
    assert main(["demo", "--output", str(tmp_path), "--steps", "1"]) == 0
    assert main(["demo", "--output", str(tmp_path), "--tiny", "--steps", "3"]) == 0
    assert stubbed_demos == [("video", 1), ("image", 1), ("tiny", 3)]


def test_run_demo_refuses_steps_zero_before_building_a_pipeline(tmp_path, monkeypatch):
    """The tiny demo itself (not stubbed) refuses 0 before it builds any tiny pipeline."""
    monkeypatch.setattr(demo, "_load", lambda *args: pytest.fail("a pipeline was built"))
    with pytest.raises(ValueError, match=r"^steps=0 is outside the allowed range: an integer >= 1"):
        demo.run_demo(tmp_path, steps=0)


def test_the_demo_help_names_the_image_methods_too(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "every video method on the shipped world model (" not in text  # the old wording, video only
    assert "every video and image method on the shipped world models" in text
    assert "every image method on the shipped world image model" in text
