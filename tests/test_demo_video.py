"""The default demo: stock and method side by side on the shipped world model."""

from __future__ import annotations

import pytest
from PIL import Image

from diffusers_attn_ext.__main__ import main
from diffusers_attn_ext.video_demo import VIDEO_METHODS, run_video_demo


def test_the_demo_writes_stock_and_method_side_by_side_with_a_metric(tmp_path):
    assert main(["demo", "--output", str(tmp_path), "--steps", "2", "--only", "radial", "ditraj"]) == 0
    for name in ("radial", "ditraj"):
        for suffix in ("_stock.gif", "_method.gif"):
            with Image.open(tmp_path / f"{name}{suffix}") as gif:
                assert gif.n_frames == 9 and gif.size == (64, 64)
        with Image.open(tmp_path / f"{name}.png") as strip:
            assert strip.height > strip.width / 9  # two rows of frames: stock above method
    summary = (tmp_path / "summary.md").read_text()
    assert "| radial |" in summary and "PSNR" in summary
    assert "| ditraj |" in summary and "IoU" in summary


def test_an_unknown_video_method_is_a_value_error_before_any_model_work(tmp_path):
    with pytest.raises(ValueError, match=r"only=\['nope'\]"):
        run_video_demo(tmp_path, only=["nope"])
    assert not any(tmp_path.iterdir())
    assert "ultravico-4x" in VIDEO_METHODS


def test_an_output_that_cannot_be_a_folder_is_a_clean_error(capsys):
    assert main(["demo", "--output", "/dev/null/demo"]) == 2
    assert "output='/dev/null/demo' cannot be made a folder" in capsys.readouterr().err
