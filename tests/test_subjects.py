"""Subject layouts: validation, token-grid mapping and the reposition map (hand-computed cases)."""

import pytest
import torch
import torch.nn.functional as F

from diffusers_attn_ext import subjects
from diffusers_attn_ext.subjects import Box, SubjectLayout, TokenRect, box_rect, reposition_map, subject_tokens


def test_box_to_token_rect_rounds_edges_and_keeps_border_boxes_inside():
    assert box_rect(Box(0.5, 0.0, 1.0, 0.5), 8, 8) == TokenRect(0, 4, 4, 8)
    assert box_rect(Box(0.0, 0.75, 0.25, 1.0), 8, 8) == TokenRect(6, 8, 0, 2)
    assert box_rect(Box(0.99, 0.99, 1.0, 1.0), 4, 4) == TokenRect(3, 4, 3, 4)  # at least one token


def test_reposition_nearest_downscale_between_opposite_borders():
    # Reference subject in the top-right quarter (4x4 tokens), target in the bottom-left corner (2x2 tokens).
    reference, target = box_rect(Box(0.5, 0.0, 1.0, 0.5), 8, 8), box_rect(Box(0.0, 0.75, 0.25, 1.0), 8, 8)
    rows, cols, weights = reposition_map(reference, target, "nearest")
    # Target (6 + i, j) reads reference (0 + floor(i * 4 / 2), 4 + floor(j * 4 / 2)).
    assert rows[..., 0].tolist() == [[0, 0], [2, 2]]
    assert cols[..., 0].tolist() == [[4, 6], [4, 6]]
    assert torch.equal(weights, torch.ones(2, 2, 1, dtype=torch.float64))


def test_reposition_upscale_nearest_and_bilinear_by_hand():
    reference = TokenRect(0, 2, 0, 2)  # 2x2 at the top-left border
    target = TokenRect(4, 8, 5, 8)  # 4x3 at the bottom-right border
    rows, cols, _ = reposition_map(reference, target, "nearest")
    assert rows[:, 0, 0].tolist() == [0, 0, 1, 1]  # floor(i * 2 / 4)
    assert cols[0, :, 0].tolist() == [0, 0, 1]  # floor(j * 2 / 3)
    rows, cols, weights = reposition_map(reference, target, "bilinear")
    # Row source coordinates (i + 0.5) * 2/4 - 0.5 = -0.25, 0.25, 0.75, 1.25 clamped to [0, 1];
    # column ones (j + 0.5) * 2/3 - 0.5 = -1/6, 1/2, 7/6 clamped to [0, 1].
    for i in range(4):
        for j in range(3):
            blended_row = float((rows[i, j].double() * weights[i, j]).sum())
            blended_col = float((cols[i, j].double() * weights[i, j]).sum())
            expected_row = [0.0, 0.25, 0.75, 1.0][i]
            expected_col = [0.0, 0.5, 1.0][j]
            assert blended_row == pytest.approx(expected_row) and blended_col == pytest.approx(expected_col)
            assert float(weights[i, j].sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_reposition_map_resamples_like_interpolate(mode):
    grid = torch.randn(9, 7, dtype=torch.float64)
    reference, target = TokenRect(1, 6, 2, 7), TokenRect(0, 3, 0, 7)
    rows, cols, weights = reposition_map(reference, target, mode)
    ours = (grid[rows, cols] * weights).sum(-1)
    crop = grid[reference.row0:reference.row1, reference.col0:reference.col1][None, None]
    kwargs = {} if mode == "nearest" else {"align_corners": False}
    expected = F.interpolate(crop, size=(target.height, target.width), mode=mode, **kwargs)[0, 0]
    torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 14, 22, 26, 30, 33, 46, 64, 69])
def test_nearest_reposition_takes_the_indices_of_interpolate_for_every_target_size(size):
    # PyTorch scales by a float32 ratio; a float64 floor(dst * size / target) differs e.g. for 26->22, 14->46.
    positions = torch.arange(size, dtype=torch.float32)[None, None, :, None]
    for target_size in range(1, 130):
        rows, _, _ = reposition_map(TokenRect(3, 3 + size, 0, 1), TokenRect(0, target_size, 0, 1), "nearest")
        expected = F.interpolate(positions, size=(target_size, 1), mode="nearest")[0, 0, :, 0].long()
        assert torch.equal(rows[:, 0, 0], 3 + expected), (size, target_size)


def test_subject_tokens_sequence_indices_with_text_first():
    layout = SubjectLayout.from_boxes([
        {"cat": (2 / 3, 0, 1, 1), "dog": (0, 0, 1 / 3, 1)},
        {"cat": (0, 0, 1 / 3, 1), "dog": (1 / 3, 0, 1, 0.5)},
    ])
    cat, dog = subject_tokens(layout, 1, 2, 3, visual_start=1, seq_len=7)
    assert cat.queries.tolist() == [1, 4] and dog.queries.tolist() == [2, 3]
    assert cat.own_allowed.tolist() == [True, True, False, False, True, True, True]
    assert cat.ref_sources[:, 0].tolist() == [3, 6] and cat.ref_positions.tolist() == [1, 4]
    assert dog.ref_sources[:, 0].tolist() == [1, 1] and dog.ref_positions.tolist() == [2, 3]


def test_box_outside_the_image_is_a_value_error_naming_the_subject():
    with pytest.raises(ValueError, match="'dog' in image 1"):
        SubjectLayout.from_boxes([{"dog": (0, 0, 0.5, 0.5)}, {"dog": (0.6, 0.2, 1.2, 0.8)}])
    with pytest.raises(ValueError, match="'cat' in image 0"):
        SubjectLayout.from_boxes([{"cat": (0.5, 0.5, 0.4, 0.9)}])


def test_overlapping_boxes_are_a_value_error_naming_both_subjects():
    with pytest.raises(ValueError, match="'cat' and 'dog' overlap in image 1"):
        SubjectLayout.from_boxes([
            {"cat": (0, 0, 0.5, 1), "dog": (0.5, 0, 1, 1)},  # touching is fine
            {"cat": (0, 0, 0.6, 1), "dog": (0.5, 0, 1, 1)},
        ])


def test_overlapping_masks_on_the_token_grid_are_a_value_error():
    a = torch.zeros(4, 4, dtype=torch.bool)
    a[:, :3] = True
    b = torch.zeros(4, 4, dtype=torch.bool)
    b[:, 2:] = True
    layout = SubjectLayout.from_boxes([{"a": a, "b": b}, {"a": a, "b": b}])
    with pytest.raises(ValueError, match="'a' and 'b' share tokens in image 0"):
        layout.grids(0, 4, 4)


def test_subject_in_one_image_only_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match=r"subject 'hat' has a region in image\(s\) \[1\] but not in image\(s\) \[0, 2\]"):
        SubjectLayout.from_boxes([{"dog": (0, 0, 0.5, 1)}, {"dog": (0, 0, 0.5, 1), "hat": (0.5, 0, 1, 1)},
                                  {"dog": (0, 0, 0.5, 1)}])


def test_subject_named_in_one_prompt_only_is_a_value_error_naming_it():
    boxes = [{"dog": (0, 0, 0.5, 1), "cat": (0.5, 0, 1, 1)}] * 2
    with pytest.raises(ValueError, match=r"subject 'cat' is not named in prompt\(s\) \[1\]"):
        SubjectLayout.from_boxes(boxes, prompts=["a dog and a cat", "a dog on a beach"])


def test_box_of_three_numbers_is_a_value_error_naming_subject_and_image():
    with pytest.raises(ValueError, match=r"box of subject 'dog' in image 1 is \(0, 0, 0.5\): give 4 numbers"):
        SubjectLayout.from_boxes([{"dog": (0, 0, 0.5, 1)}, {"dog": (0, 0, 0.5)}])


def test_subject_must_be_named_as_a_whole_word():
    boxes = [{"cat": (0, 0, 0.5, 1)}] * 2
    with pytest.raises(ValueError, match=r"subject 'cat' is not named in prompt\(s\) \[0\]"):
        SubjectLayout.from_boxes(boxes, prompts=["a category of things", "a cat"])
    assert SubjectLayout.from_boxes(boxes, prompts=["A Cat, sleeping", "the cat."]).names == ("cat",)


@pytest.mark.parametrize(("mode", "maps"), [("nearest", 1), ("bilinear", 2)])
def test_subject_tokens_computes_the_nearest_map_once(mode, maps, monkeypatch):
    calls = []
    monkeypatch.setattr(subjects, "reposition_map", lambda *args: calls.append(args) or reposition_map(*args))
    layout = SubjectLayout.from_boxes([{"cat": (0, 0, 0.5, 1)}, {"cat": (0.5, 0, 1, 1)}])
    subject_tokens(layout, 1, 4, 4, visual_start=0, seq_len=16, mode=mode)
    assert len(calls) == maps
