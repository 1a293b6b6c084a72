"""Trajectory: boxes in pixels -> latent token boxes, foreground masks and STD-RoPE positions (authors' rule)."""

import pytest
import torch

from diffusers_attn_ext.context import TokenGrid
from diffusers_attn_ext.trajectory import (
    TokenBox,
    Trajectory,
    duplicate_position_tokens,
    foreground_mask,
    position_source_index,
    reference_frame,
    std_rope_positions,
)

GRID = TokenGrid(3, 4, 4)  # 9 frames of 64x64: 3 latent frames of 4x4 tokens (16 pixels per token)


def moving_right() -> Trajectory:
    """A 3x2-token box moving one token right per latent frame (pixel frames 0, 4, 8)."""
    return Trajectory.from_key_boxes({0: (0, 0, 32, 48), 8: (32, 0, 64, 48)}, num_frames=9, height=64, width=64)


def test_key_boxes_interpolate_linearly_per_frame():
    trajectory = moving_right()
    assert trajectory.num_frames == 9
    assert trajectory.boxes[4] == (16.0, 0.0, 48.0, 48.0)
    assert trajectory.boxes[1] == (4.0, 0.0, 36.0, 48.0)
    held = Trajectory.from_key_boxes({2: (0, 0, 16, 16), 4: (16, 0, 32, 16)}, 6, 64, 64)
    assert held.boxes[0] == held.boxes[2] == (0.0, 0.0, 16.0, 16.0)
    assert held.boxes[5] == (16.0, 0.0, 32.0, 16.0)


def test_token_boxes_floor_pixels_to_tokens():
    boxes = moving_right().token_boxes(GRID, frame_stride=4)
    assert boxes == (TokenBox(0, 3, 0, 2), TokenBox(0, 3, 1, 3), TokenBox(0, 3, 2, 4))
    # int(fraction * tokens) as run.py: 0.3 * 4 -> 1, 0.7 * 4 -> 2
    box = Trajectory.static((0.3 * 64, 0.3 * 64, 0.7 * 64, 0.7 * 64), 9, 64, 64).token_boxes(GRID, 4)[0]
    assert box == TokenBox(1, 2, 1, 2)


def test_box_arithmetic_authors_truncates_float64_fractions_and_exact_floors_pixels():
    """An edge on a token boundary between keys: plan_path's float64 fraction lands one step low and int()
    drops the token (authors, default); "exact" floors the exact pixel position."""
    keys = {0: (2, 0, 80, 80), 8: (30, 0, 80, 80)}  # 80x80, 5x5 tokens of 16 px; frame 4: left edge at 16 px
    grid = TokenGrid(3, 5, 5)
    authors = Trajectory.from_key_boxes(keys, 9, 80, 80)
    assert authors.fractions[4][0] == 0.19999999999999998  # 4 * ((0.375 - 0.025) / 8) + 0.025
    assert [box.left for box in authors.token_boxes(grid, 4)] == [0, 0, 1]
    exact = Trajectory.from_key_boxes(keys, 9, 80, 80, box_arithmetic="exact")
    assert [box.left for box in exact.token_boxes(grid, 4)] == [0, 1, 1]
    assert authors.boxes == exact.boxes and authors.boxes[4][0] == 16.0  # same pixels, other token arithmetic
    with pytest.raises(ValueError, match=r"box_arithmetic='round' is not one of \('authors', 'exact'\)"):
        Trajectory(exact.boxes, 80, 80, box_arithmetic="round")
    with pytest.raises(ValueError, match=r"fractions\[0\]=\(0.5, 0.0, 1.0, 1.0\) is not boxes\[0\]"):
        Trajectory(((0, 0, 80, 80),), 80, 80, fractions=((0.5, 0, 1, 1),))


def test_foreground_mask():
    mask = foreground_mask(moving_right().token_boxes(GRID, 4), GRID)
    expected = torch.zeros(3, 4, 4, dtype=torch.bool)
    expected[0, 0:3, 0:2] = expected[1, 0:3, 1:3] = expected[2, 0:3, 2:4] = True
    assert torch.equal(mask, expected)


def test_std_rope_positions_of_a_box_moving_right_by_hand():
    boxes = moving_right().token_boxes(GRID, 4)
    positions = std_rope_positions(boxes, GRID)
    mask = foreground_mask(boxes, GRID)
    # (token) -> (t, h, w) position, every foreground token in frame-major order. Reference: frame 0 (all
    # regions equal). Region = box without its last row and column: rows 0-1, one column.
    expected = {
        (0, 0, 0): (0, 0, 0), (0, 0, 1): (0, 0, 1), (0, 1, 0): (0, 1, 0), (0, 1, 1): (0, 1, 1),
        (0, 2, 0): (0, 2, 0), (0, 2, 1): (0, 2, 1),
        (1, 0, 1): (1, 0, 0), (1, 0, 2): (1, 0, 2), (1, 1, 1): (1, 1, 0), (1, 1, 2): (1, 1, 2),
        (1, 2, 1): (1, 2, 1), (1, 2, 2): (1, 2, 2),
        (2, 0, 2): (2, 0, 0), (2, 0, 3): (2, 0, 3), (2, 1, 2): (2, 1, 0), (2, 1, 3): (2, 1, 3),
        (2, 2, 2): (2, 2, 2), (2, 2, 3): (2, 2, 3),
    }
    got = {tuple(token): tuple(positions[tuple(token)].tolist()) for token in mask.nonzero().tolist()}
    assert got == expected
    background = ~mask
    t, h, w = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(4), indexing="ij")
    assert torch.equal(positions[background], torch.stack([t, h, w], -1)[background])
    index = position_source_index(positions)
    assert index[1 * 16 + 0 * 4 + 1] == 1 * 16 + 0 * 4 + 0
    duplicates = duplicate_position_tokens(positions, mask)
    assert sorted(map(tuple, duplicates.nonzero().tolist())) == [(1, 0, 0), (1, 1, 0), (2, 0, 0), (2, 1, 0)]


def test_growing_box_resamples_reference_positions_nearest():
    # frame 0: 3x3 tokens (region 2x2) at the top left; frame 4: the 4x4 grid (region 3x3); frame 8: 3x3 again.
    trajectory = Trajectory.from_key_boxes({0: (0, 0, 48, 48), 4: (0, 0, 64, 64), 8: (16, 16, 64, 64)}, 9, 64, 64)
    boxes = trajectory.token_boxes(GRID, 4)
    assert reference_frame(boxes) == 0
    positions = std_rope_positions(boxes, GRID)
    # round(linspace(0, 1, 3)) = round([0, 0.5, 1]) = [0, 0, 1] (half to even)
    assert positions[1, :3, :3, 1].tolist() == [[0] * 3, [0] * 3, [1] * 3]
    assert positions[1, :3, :3, 2].tolist() == [[0, 0, 1]] * 3
    assert positions[1, 3, :, 1:].tolist() == [[3, 0], [3, 1], [3, 2], [3, 3]]  # last row keeps its own
    assert positions[2, 1:3, 1:3, 1:].tolist() == [[[0, 0], [0, 1]], [[1, 0], [1, 1]]]
    assert torch.equal(positions[..., 0], torch.arange(3)[:, None, None].expand(3, 4, 4))


def test_reference_is_the_first_smallest_region():
    boxes = (TokenBox(0, 4, 0, 4), TokenBox(0, 3, 0, 3), TokenBox(1, 4, 1, 4))
    assert reference_frame(boxes) == 1


@pytest.mark.parametrize("box", [(-1, 0, 16, 16), (0, 0, 65, 16), (0, 0, 16, 70)])
def test_box_outside_the_frame_raises(box):
    with pytest.raises(ValueError, match=r"boxes\[0\].*outside the 64x64 frame"):
        Trajectory((box,), 64, 64)


@pytest.mark.parametrize("box", [(16, 0, 16, 16), (0, 20, 16, 10)])
def test_empty_box_raises(box):
    with pytest.raises(ValueError, match=r"boxes\[0\].*is empty"):
        Trajectory((box,), 64, 64)


def test_box_covering_no_token_raises():
    with pytest.raises(ValueError, match="covers no latent token"):
        Trajectory.static((1, 1, 10, 10), 9, 64, 64).token_boxes(GRID, 4)


def test_wrong_number_of_frames_raises():
    trajectory = moving_right()
    with pytest.raises(ValueError, match="num_frames=13 but the trajectory has 9 boxes"):
        trajectory.check_video(13, 64, 64)
    with pytest.raises(ValueError, match="trajectory has 9 frames but 4 latent frames"):
        trajectory.token_boxes(TokenGrid(4, 4, 4), 4)
    with pytest.raises(ValueError, match="height=32, width=64"):
        trajectory.check_video(9, 32, 64)
    with pytest.raises(ValueError, match=r"key_boxes frames \[9\]"):
        Trajectory.from_key_boxes({9: (0, 0, 16, 16)}, 9, 64, 64)


def test_one_token_reference_with_larger_boxes_raises():
    trajectory = Trajectory.from_key_boxes({0: (0, 0, 16, 16), 8: (0, 0, 48, 48)}, 9, 64, 64)
    with pytest.raises(ValueError, match="at least 2 latent tokens"):
        std_rope_positions(trajectory.token_boxes(GRID, 4), GRID)


def test_drawing_and_gif_export(tmp_path):
    from PIL import Image

    from diffusers_attn_ext.trajectory_drawing import draw_trajectory, export_gif, export_mp4

    frames = torch.zeros(9, 3, 64, 64)
    drawn = draw_trajectory(frames, moving_right())
    assert len(drawn) == 9 and drawn[0].getpixel((0, 0)) == (127, 255, 127)
    assert drawn[0].getpixel((40, 20)) == (0, 0, 0) and drawn[8].getpixel((32, 20)) == (127, 255, 127)
    path = export_gif(drawn, tmp_path / "t.gif")
    assert Image.open(path).n_frames == 9
    with pytest.raises(ValueError, match="num_frames=9"):
        draw_trajectory(frames[:3], moving_right())
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install imageio imageio-ffmpeg"):
            export_mp4(drawn, tmp_path / "t.mp4")
    else:
        assert export_mp4(drawn, tmp_path / "t.mp4").stat().st_size > 0


def test_bad_key_box_is_named_by_its_key_and_numpy_frames_are_integers():
    with pytest.raises(ValueError, match=r"key_boxes\[8\]=\(0, 0, 80, 16\) lies outside"):
        Trajectory.from_key_boxes({0: (0, 0, 16, 16), 8: (0, 0, 80, 16)}, 9, 64, 64)
    with pytest.raises(ValueError, match=r"key_boxes\[0\]=\(0, 0, 16\) must be \(left, top, right, bottom\)"):
        Trajectory.from_key_boxes({0: (0, 0, 16)}, 9, 64, 64)
    numpy = pytest.importorskip("numpy")
    keyed = Trajectory.from_key_boxes({numpy.int64(0): (0, 0, 16, 16), numpy.int64(8): (16, 0, 32, 16)}, 9, 64, 64)
    assert keyed == Trajectory.from_key_boxes({0: (0, 0, 16, 16), 8: (16, 0, 32, 16)}, 9, 64, 64)
    with pytest.raises(ValueError, match=r"key_boxes frame 0.5 must be an integer frame index"):
        Trajectory.from_key_boxes({0.5: (0, 0, 16, 16)}, 9, 64, 64)
