"""Command line: info, demo, inspect and bench."""

import json

import torch

from diffusers_attn_ext.__main__ import main
from diffusers_attn_ext.demo import DEMOS


def test_info_prints_kernels(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "flex" in out and "xformers" in out and "diffusers_active_backend" in out


def test_demo_writes_every_entry_of_a_family(tmp_path):
    assert main(["demo", "--output", str(tmp_path), "--family", "sd3"]) == 0
    summary = (tmp_path / "summary.md").read_text().splitlines()
    entries = [entry for entry in DEMOS if entry.family == "sd3"]
    assert len(summary) == 2 + len(entries)
    assert "| stock (StockAttnProcessor) | sd3 |" in summary[2] and summary[2].split("|")[4].strip() == "0"
    for row in summary[2:]:
        assert (tmp_path / row.split("|")[5].strip()).exists()


def test_the_default_demo_runs_the_video_then_the_image_methods_into_one_summary(tmp_path, monkeypatch, capsys):
    """Dispatch only (both demos stubbed; tests/test_demo_video.py runs them): the default runs every video and
    every image method, --only splits its names between the two, an unknown name is refused before either runs."""
    from diffusers_attn_ext import image_demo, video_demo

    calls = []

    def video(output_dir, steps=None, only=None):
        calls.append(("video", steps, only))
        (tmp_path / "summary.md").write_text("video table\n")
        return tmp_path / "summary.md"

    def image(output_dir, steps=None, only=None):
        calls.append(("image", steps, only))
        return "image table\n"

    monkeypatch.setattr(video_demo, "run_video_demo", video)
    monkeypatch.setattr(image_demo, "image_section", image)
    assert main(["demo", "--output", str(tmp_path)]) == 0
    assert calls == [("video", None, None), ("image", None, None)]
    assert (tmp_path / "summary.md").read_text() == "video table\n\nimage table\n"
    calls.clear()
    assert main(["demo", "--output", str(tmp_path), "--steps", "3", "--only", "softpag", "radial", "entropy-2x"]) == 0
    assert calls == [("video", 3, ["radial"]), ("image", 3, ["softpag", "entropy-2x"])]
    calls.clear()
    assert main(["demo", "--output", str(tmp_path), "--only", "ir-diffusion"]) == 0
    assert calls == [("image", None, ["ir-diffusion"])]
    assert (tmp_path / "summary.md").read_text() == "image table\n"
    calls.clear()
    assert main(["demo", "--output", str(tmp_path / "new"), "--only", "radial", "nope"]) == 2
    error = capsys.readouterr().err
    assert "only='nope' is not one of" in error and "'radial'" in error and "'ir-diffusion'" in error
    assert calls == [] and not (tmp_path / "new").exists()
    assert main(["demo", "--output", str(tmp_path), "--tiny", "--model", "some/checkpoint"]) == 2
    assert "take no --model" in capsys.readouterr().err and calls == []


def test_inspect_writes_plots_and_summary(tmp_path):
    assert main(["inspect", "--family", "cogvideox", "--output", str(tmp_path), "--layers", r"blocks\.1\.attn1",
                 "--heads", "1", "--steps", "0"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["family"] == "cogvideox" and list(summary["layers"]) == ["transformer_blocks.1.attn1"]
    layer = summary["layers"]["transformer_blocks.1.attn1"]
    assert layer["heads"] == [1] and layer["steps"] == [0] and layer["grid"] == [3, 2, 2]
    assert abs(layer["text_mass"][0] + sum(layer["temporal_profile"][0]) - 1) < 1e-5
    for name in summary["files"]:
        assert (tmp_path / name).stat().st_size > 0
    assert {"heads_entropy.png", "decay_temporal.png", "transformer_blocks_1_attn1_maps.png"} <= set(summary["files"])


def test_inspect_bad_input_is_an_error_naming_the_parameter(tmp_path, capsys):
    assert main(["inspect", "--family", "wan", "--output", str(tmp_path), "--heads", "7"]) == 2
    assert "heads has index 7" in capsys.readouterr().err
    assert main(["inspect", "--family", "wan", "--output", str(tmp_path), "--layers", "nothing"]) == 2
    assert "layers pattern 'nothing'" in capsys.readouterr().err
    assert main(["inspect", "--family", "wan", "--output", str(tmp_path), "--num-inference-steps", "0"]) == 2
    assert "num_inference_steps=0 must be an integer >= 1" in capsys.readouterr().err
    assert main(["inspect", "--family", "wan", "--output", str(tmp_path), "--num-inference-steps", "2",
                 "--steps", "7"]) == 2
    assert "steps=[7] must be below num_inference_steps=2" in capsys.readouterr().err


def test_bench_lists_and_checks_before_running(capsys, monkeypatch):
    assert main(["bench"]) == 0
    listed = capsys.readouterr().out
    assert "inspect_memory [--smoke]" in listed and "stock_overhead" in listed and "common" not in listed
    assert main(["bench", "no_such_bench"]) == 2
    assert "no_such_bench" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "stock_overhead"]) == 2
    assert "CUDA" in capsys.readouterr().err
    assert main(["bench", "stock_overhead", "--smoke"]) == 2
    assert "--smoke is not supported by ['stock_overhead']" in capsys.readouterr().err


def test_bench_smoke_runs_the_script(tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert main(["bench", "inspect_memory", "--smoke"]) == 0
    table = (tmp_path / "inspect_memory_smoke.md").read_text()
    assert "output unchanged by the inspector: True" in table and "attn1 call, inspector" in table


def test_bench_launches_the_parallel_benchmark_through_torchrun_and_others_with_python():
    from diffusers_attn_ext.__main__ import benchmark_scripts, launch_command

    scripts = benchmark_scripts()
    assert launch_command(scripts["parallel"])[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert launch_command(scripts["sparse"])[1:] == [str(scripts["sparse"])]
