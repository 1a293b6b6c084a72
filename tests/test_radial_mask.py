"""Radial Attention's block mask against the authors' algorithm written at token level, and plot_mask.

Reference provenance: mit-han-lab/radial-attention, ``radial_attn/attn_mask.py`` at commit 72788d4
(``gen_log_mask_shrinked``, ``get_window_width``, ``get_diagonal_split_mask``, ``shrinkMaskStrict``), read and
rewritten here from its logic: for each frame pair a dense token mask, padded at the pair's offset on the global
block grid, shrunk to blocks by column densities, OR-ed into the mask. The implementation under test never
builds token masks (it counts band rows per column analytically).
"""

import pytest
import torch

from diffusers_attn_ext.masks import radial_block_mask


def authors_window(d, tpf, decay, bs, model):
    if d == 0 or d == 1:  # wan: d < 1 -> tpf, d == 1 -> tpf (since 72788d4); hunyuan: d <= 1 -> tpf
        return tpf
    decay_length = 2 ** tpf.bit_length() / 2 ** d.bit_length() * decay
    return decay_length if decay_length >= bs else bs


def authors_split(d, tpf):
    decay_length = 2 ** tpf.bit_length() / 2 ** d.bit_length()
    if decay_length >= 128:
        return True
    return d % int(128 / decay_length) == 0


def authors_shrink(token_mask, bs):
    n = token_mask.shape[0] // bs
    tiles = token_mask[: n * bs, : n * bs].view(n, bs, n, bs)
    col_density = tiles.sum(dim=1) / bs
    high = (col_density > 1 / 3).sum(-1)
    nonzero = (col_density > 0).sum(-1)
    return high / (nonzero + 1e-9) > 0.6


def reference_mask(frames, tpf, bs=128, decay=1.0, model="wan"):
    video = frames * tpf
    s = -(-video // bs) * bs  # padded as in the authors' first commits (pad_qkv)
    mask = torch.zeros(s // bs, s // bs, dtype=torch.bool)
    mask[video // bs:, :] = True
    mask[:, video // bs:] = True
    idx = torch.arange(tpf)
    distance = (idx[None, :] - idx[:, None]).abs()
    per_frame = -(-tpf // bs)
    for i in range(frames):
        for j in range(frames):
            d = abs(i - j)
            if j == 0 and model == "wan":
                local = torch.ones(tpf, tpf, dtype=torch.bool)
            else:
                local = (distance <= authors_window(d, tpf, decay, bs, model)) & authors_split(d, tpf)
            r0, c0 = (i * tpf) % bs, (j * tpf) % bs
            placed = torch.zeros(r0 + per_frame * bs, c0 + per_frame * bs, dtype=torch.bool)
            placed[r0:r0 + tpf, c0:c0 + tpf] = local
            br, bc = (i * tpf) // bs, (j * tpf) // bs
            mask[br:br + per_frame, bc:bc + per_frame] |= authors_shrink(placed, bs)
    return mask


@pytest.mark.parametrize(
    "frames, height, width, decay",
    [
        (21, 30, 52, 1.0),  # Wan2.1 480p 81 frames: 32760 tokens, padded to 32768
        (13, 12, 20, 0.2),  # the decay of the authors' shell scripts; 240 tokens per frame
        (11, 10, 25, 0.5),
        (5, 4, 4, 1.0),  # 16 tokens per frame: diagonal split drops adjacent frames
    ],
)
def test_matches_authors_algorithm(frames, height, width, decay):
    tpf = height * width
    assert torch.equal(radial_block_mask(frames, tpf, decay_factor=decay), reference_mask(frames, tpf, decay=decay))


@pytest.mark.parametrize("block_size", [16, 64])
def test_matches_authors_algorithm_other_block_sizes(block_size):
    assert torch.equal(radial_block_mask(9, 80, block_size), reference_mask(9, 80, block_size))


def test_hunyuan_rule_has_no_sink():
    mask = radial_block_mask(9, 300, model="hunyuan")
    assert torch.equal(mask, reference_mask(9, 300, model="hunyuan"))
    assert not torch.equal(mask, radial_block_mask(9, 300, model="wan"))


def test_known_small_mask_and_wan_density():
    """8 frames of 200 tokens (research notes' worked example from the authors' code, s = 1664)."""
    expected = [
        "1111101100001", "1111110110001", "1111110110001", "1111111101101", "1111111101101",
        "1111111110111", "1101111111101", "1101111111101", "1110111111111", "1101101111111",
        "1101101111111", "1100110111111", "1111111111111",
    ]
    mask = radial_block_mask(8, 200)
    assert ["".join(str(int(x)) for x in row) for row in mask.tolist()] == expected
    wan = radial_block_mask(21, 1560)
    assert wan.shape == (256, 256)
    assert wan.float().mean().item() == pytest.approx(0.4492, abs=1e-4)  # authors' HEAD code gives 0.44925


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_frames=0, tokens_per_frame=4), r"num_frames=0 is outside the allowed range"),
        (dict(num_frames=2, tokens_per_frame=4, block_size=-1), r"block_size=-1 is outside"),
        (dict(num_frames=2, tokens_per_frame=4, decay_factor=0.0), r"decay_factor=0.0 is outside the allowed range"),
        (dict(num_frames=2, tokens_per_frame=4, model="cog"), r"model='cog' is not one of \('wan', 'hunyuan'\)"),
    ],
)
def test_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        radial_block_mask(**kwargs)


def test_plot_mask(tmp_path):
    from diffusers_attn_ext.plotting import plot_mask

    path = tmp_path / "radial.png"
    figure = plot_mask(radial_block_mask(8, 200), title="radial", path=path)
    assert path.stat().st_size > 0 and figure.axes[0].get_title() == "radial"
    with pytest.raises(ValueError, match="mask of shape"):
        plot_mask(torch.ones(2, 3, 4, 5, dtype=torch.bool))
