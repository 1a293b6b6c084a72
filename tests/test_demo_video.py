"""The default demo: stock and method side by side on the shipped world model."""

from __future__ import annotations

import pytest
from PIL import Image

from diffusers_attn_ext.__main__ import main
from diffusers_attn_ext.video_demo import VIDEO_METHODS, WORLD_FINDINGS, run_video_demo


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
    assert summary.rstrip().endswith(WORLD_FINDINGS)  # one seed is no measurement: the docs' findings follow


def test_an_unknown_video_method_is_a_value_error_before_any_model_work(tmp_path):
    with pytest.raises(ValueError, match=r"only=\['nope'\]"):
        run_video_demo(tmp_path, only=["nope"])
    assert not any(tmp_path.iterdir())
    assert "ultravico-4x" in VIDEO_METHODS


def test_an_output_that_cannot_be_a_folder_is_a_clean_error(capsys):
    assert main(["demo", "--output", "/dev/null/demo"]) == 2
    assert "output='/dev/null/demo' cannot be made a folder" in capsys.readouterr().err


def test_the_demo_shows_each_image_method_beside_stock_with_the_judges_scores(tmp_path):
    """The image part of the default demo (shipped world image model) at 2 steps: for each method a stock row and
    a method row of the same images at the same seed, and a summary row of the judge's scores."""
    import numpy as np

    from diffusers_attn_ext.image_demo import IMAGE_FINDINGS, IMAGE_METHODS, PROMPTS

    assert main(["demo", "--output", str(tmp_path), "--steps", "2", "--only", *IMAGE_METHODS]) == 0
    rows = {}
    for name, (count, size) in {"ir-diffusion": (3, 32), "softpag": (PROMPTS, 32), "entropy-2x": (PROMPTS, 64)}.items():
        pair = [np.asarray(Image.open(tmp_path / f"{name}_{label}.png")).astype(int) for label in ("stock", "method")]
        assert pair[0].shape == pair[1].shape == (size + 2, count * (size + 2), 3)
        rows[name] = pair
        with Image.open(tmp_path / f"{name}.png") as both:
            assert both.width / both.height == pytest.approx(count * (size + 2) / (2 * (size + 2)))
    stock, method = rows["ir-diffusion"]
    assert np.abs(stock[:, :34] - method[:, :34]).max() <= 1  # the reference is generated as stock
    assert np.abs(stock[:, 34:] - method[:, 34:]).max() > 20  # the targets attend the reference's subjects
    for name in ("softpag", "entropy-2x"):
        assert np.abs(rows[name][0] - rows[name][1]).max() > 0
    summary = (tmp_path / "summary.md").read_text()
    for name in IMAGE_METHODS:
        row = next(line for line in summary.splitlines() if line.startswith(f"| {name} |"))
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        assert "colour / class" in cells[2]
        for cell in cells[3:5]:  # stock, method: judge scores in [0, 1]
            assert all(0.0 <= float(v) <= 1.0 for v in cell.split(" / "))
    assert "Video methods" not in summary  # only image methods were asked for
    assert summary.rstrip().endswith(IMAGE_FINDINGS)  # one seed is no measurement: the docs' findings follow
