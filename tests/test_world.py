"""The procedural world (``diffusers_attn_ext.world``): scenes, captions, rendered ground truth, task metrics, the
per-frame VAE, the resumable training loop and the shipped model. CPU only and fast (the whole file runs in
seconds): rendering is kept to a few dozen small scenes, the training run to a toy model of a few steps."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_attn_ext.world import (
    Scene,
    WorldObject,
    boxes_from_masks,
    caption,
    object_centres,
    parse_caption,
    render_scenes,
    sample_scene,
)
from diffusers_attn_ext.world import metrics as M
from diffusers_attn_ext.world.scenes import MAX_OBJECTS, TRAIN_FRAMES, TRAIN_SIZE
from diffusers_attn_ext.world.vocabulary import (
    CURVE_AMPLITUDE,
    DIRECTIONS,
    OBJECT_COLOURS,
    SIZES,
    SPEEDS,
)

OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one thread is many times faster than two that contend with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _single(shape="circle", colour="red", *, path="straight", direction="right", speed="slowly", size="large",
            start=(0.3, 0.5), texture="plain", background="gray", phase=0.0) -> Scene:
    return Scene((WorldObject(shape, colour, size, texture, path, direction, speed, start, phase),), background)


@pytest.fixture(scope="module")
def mixed():
    """40 sampled scenes (1 to 3 objects) rendered at the trained size."""
    scenes = [sample_scene(seed) for seed in range(40)]
    return render_scenes(scenes, TRAIN_FRAMES)


@pytest.fixture(scope="module")
def singles():
    """30 single-object scenes (objects never occluded) rendered at the trained size."""
    scenes = [sample_scene(1000 + seed, num_objects=1) for seed in range(30)]
    return render_scenes(scenes, TRAIN_FRAMES)


@pytest.fixture(scope="module")
def busy():
    """Three large, fast, bouncing objects on gray: enough moving content for frame order to matter."""
    objects = (
        WorldObject("circle", "red", "large", "plain", "bounce", "right", "quickly", (0.3, 0.4)),
        WorldObject("square", "blue", "large", "striped", "bounce", "down", "quickly", (0.7, 0.2)),
        WorldObject("triangle", "green", "large", "plain", "bounce", "left", "quickly", (0.5, 0.8)),
    )
    return render_scenes([Scene(objects, "gray")], 16).frames[0]


# ----------------------------------------------------------------------------------------------- scenes
def test_scenes_are_deterministic_from_the_seed():
    for seed in range(50):
        assert sample_scene(seed) == sample_scene(seed)
        assert len({o.colour for o in sample_scene(seed).objects}) == len(sample_scene(seed).objects)
    assert len({sample_scene(seed) for seed in range(50)}) == 50
    counts = {len(sample_scene(seed).objects) for seed in range(50)}
    assert counts == set(range(1, MAX_OBJECTS + 1))
    a = render_scenes([sample_scene(7), sample_scene(8)], 4)
    b = render_scenes([sample_scene(7), sample_scene(8)], 4)
    assert torch.equal(a.frames, b.frames) and torch.equal(a.masks, b.masks)
    assert torch.equal(a.present, torch.tensor([[True] * len(s.objects) + [False] * (3 - len(s.objects))
                                                for s in a.scenes]))


def test_caption_round_trip():
    for seed in range(200):
        scene = sample_scene(seed)
        text = caption(scene)
        parsed = parse_caption(text)
        expected = dataclasses.replace(
            scene, objects=tuple(dataclasses.replace(o, start=None, phase=0.0) for o in scene.objects)
        )
        assert parsed == expected, text
        assert caption(parsed) == text
    assert parse_caption("A small red circle moves left slowly, on a gray background.") == Scene(
        (WorldObject("circle", "red", "small", "plain", "straight", "left", "slowly"),), "gray"
    )


@pytest.mark.parametrize(
    "text, word",
    [
        ("a small purple circle moves left slowly on a gray background", "'purple'"),
        ("a tiny red circle moves left slowly on a gray background", "'tiny'"),
        ("a small red circle moves sideways slowly on a gray background", "'sideways'"),
        ("a small red circle jumps left slowly on a gray background", "'jumps'"),
        ("a small red circle moves left slowly on a pink background", "'pink'"),
        ("a small red circle moves left slowly on a gray background now", "'now'"),
        ("a small red circle moves left slowly and on a gray background", "'on'"),
        ("a small red circle moves left slowly on a gray", "the end of the caption"),
    ],
)
def test_parse_caption_names_the_bad_word(text, word):
    with pytest.raises(ValueError, match=word):
        parse_caption(text)


@pytest.mark.parametrize("field", ["shape", "colour", "size", "texture", "path", "direction", "speed"])
def test_world_object_rejects_bad_attributes(field):
    kwargs = {"shape": "circle", "colour": "red", field: "nonsense"}
    with pytest.raises(ValueError, match=rf"WorldObject {field}="):
        WorldObject(**kwargs)


def test_scene_and_render_reject_bad_arguments():
    obj = WorldObject("circle", "red", start=(0.5, 0.5))
    with pytest.raises(ValueError, match="objects"):
        Scene(())
    with pytest.raises(ValueError, match="objects"):
        Scene((obj,) * (MAX_OBJECTS + 1))
    with pytest.raises(ValueError, match="background='pink'"):
        Scene((obj,), background="pink")
    with pytest.raises(ValueError, match="background_texture="):
        Scene((obj,), background_texture="striped")
    with pytest.raises(ValueError, match="num_objects"):
        sample_scene(0, num_objects=MAX_OBJECTS + 1)
    for name, bad in (("num_frames", 0), ("num_frames", True), ("height", -1), ("width", 2.5)):
        kwargs = {"num_frames": 2, "height": 8, "width": 8, name: bad}
        with pytest.raises(ValueError, match=rf"render_scenes {name}="):
            render_scenes([Scene((obj,))], **kwargs)
    with pytest.raises(ValueError, match="start"):
        object_centres(WorldObject("circle", "red"), 3, 64, 64)
    with pytest.raises(ValueError, match="start"):  # a parsed caption has no start: it cannot be rendered
        render_scenes([parse_caption("a small red circle moves left slowly on a gray background")], 2)


# ----------------------------------------------------------------------------------------------- rendering
def test_boxes_are_the_mask_extent(mixed):
    masks = mixed.masks
    for b, k, t in torch.nonzero(masks.flatten(-2).any(-1)).tolist():
        ys, xs = torch.nonzero(masks[b, k, t], as_tuple=True)
        expected = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
        assert torch.equal(mixed.boxes[b, k, t], expected)
    assert torch.isnan(mixed.boxes[~masks.flatten(-2).any(-1)]).all()
    assert torch.equal(mixed.present, masks.flatten(-3).any(-1))
    mask = torch.zeros(2, 6, 5, dtype=torch.bool)
    mask[0, 1:3, 2] = True
    boxes = boxes_from_masks(mask)
    assert boxes[0].tolist() == [2.0, 1.0, 3.0, 3.0] and torch.isnan(boxes[1]).all()


@pytest.mark.parametrize("size", [64, 128])
def test_straight_paths_have_constant_velocity(size):
    scale = size / TRAIN_SIZE
    for direction, (ux, uy) in DIRECTIONS.items():
        for speed, step in SPEEDS.items():
            obj = WorldObject("circle", "red", "small", path="straight", direction=direction, speed=speed,
                              start=(0.5, 0.5))
            centres = torch.tensor(object_centres(obj, 12, size, size), dtype=torch.float64)
            velocity = centres[1:] - centres[:-1]
            expected = torch.tensor([ux, uy], dtype=torch.float64) * step * scale
            assert torch.allclose(velocity, expected.expand_as(velocity), atol=1e-9), (direction, speed)
            assert torch.allclose(centres[0], torch.tensor([size / 2, size / 2], dtype=torch.float64))


def test_rendered_masks_follow_the_path():
    """The mask's centroid is the path's centre (a circle, away from the edges) in every frame, at 64 and 128."""
    for size in (64, 128):
        scene = _single(direction="down", speed="quickly", start=(0.5, 0.3))
        video = render_scenes([scene], 8, size, size)
        found_centres, found = M.centroids(video.masks[0, 0], min_pixels=1)
        path = torch.tensor(object_centres(scene.objects[0], 8, size, size))
        assert found.all()
        assert (found_centres - path).abs().max() < 0.25
        velocity = found_centres[1:] - found_centres[:-1]
        assert torch.allclose(velocity, torch.tensor([0.0, 2.0 * size / TRAIN_SIZE]).expand_as(velocity), atol=0.1)


def test_bounce_stays_inside_the_frame():
    for i, (direction, speed) in enumerate((d, s) for d in DIRECTIONS for s in SPEEDS):
        size = "large" if i % 2 else "small"
        obj = WorldObject("circle", "red", size, path="bounce", direction=direction, speed=speed,
                          start=(0.2 + 0.07 * i, 0.8 - 0.07 * i))
        centres = torch.tensor(object_centres(obj, 200, 64, 64))
        radius = SIZES[size]
        assert ((centres >= radius - 1e-6) & (centres <= 64 - radius + 1e-6)).all(), (direction, speed)
        along = centres @ torch.tensor(DIRECTIONS[direction])
        steps = along[1:] - along[:-1]
        assert (steps.abs() <= SPEEDS[speed] + 1e-5).all()
        assert (steps > 0).any() and (steps < 0).any()  # it really turns back
        across = centres @ torch.tensor(DIRECTIONS[direction]).flip(0)
        assert torch.allclose(across, across[0].expand_as(across))
    # the rendered object keeps its whole area in the frame for 200 frames
    video = render_scenes([_single(path="bounce", direction="left", speed="quickly", start=(0.2, 0.6))], 200)
    area = video.masks[0, 0].flatten(1).sum(1)
    assert area.min() > 0.9 * area.max()
    boxes = video.boxes[0, 0]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all() and (boxes[:, 0] <= 2).any()


def test_curve_deviates_across_its_direction():
    for direction, (ux, uy) in DIRECTIONS.items():
        curve = WorldObject("circle", "red", path="curve", direction=direction, start=(0.5, 0.5), phase=0.3)
        straight = dataclasses.replace(curve, path="straight")
        c = torch.tensor(object_centres(curve, 17, 64, 64), dtype=torch.float64)
        s = torch.tensor(object_centres(straight, 17, 64, 64), dtype=torch.float64)
        offset = c - s
        along = offset @ torch.tensor([ux, uy], dtype=torch.float64)
        across = offset @ torch.tensor([-uy, ux], dtype=torch.float64)
        assert torch.allclose(along, torch.zeros_like(along), atol=1e-9)
        assert across.abs().max() > 0.95 * CURVE_AMPLITUDE and across.abs().max() <= CURVE_AMPLITUDE + 1e-9
        assert (across > 1).any() and (across < -1).any()
        t = torch.arange(17, dtype=torch.float64)
        expected = CURVE_AMPLITUDE * torch.sin(2 * math.pi * t / 16 + 0.3)
        assert torch.allclose(across, expected, atol=1e-9)


def test_masks_scale_with_the_frame():
    scenes = [sample_scene(seed, num_objects=1) for seed in range(6)]
    small = render_scenes(scenes, 3, 64, 64)
    large = render_scenes(scenes, 3, 128, 128)
    area_small = small.masks.flatten(-2).sum(-1).float()
    area_large = large.masks.flatten(-2).sum(-1).float()
    present = area_small > 0
    ratio = area_large[present] / area_small[present]
    assert ((ratio > 3.3) & (ratio < 4.7)).all(), ratio  # 4, up to the pixel grid
    both = ~torch.isnan(small.boxes).any(-1) & ~torch.isnan(large.boxes).any(-1)
    assert ((large.boxes[both] - 2 * small.boxes[both]).abs() <= 2).all()
    for b, scene in enumerate(scenes):
        c64 = torch.tensor(object_centres(scene.objects[0], 3, 64, 64))
        c128 = torch.tensor(object_centres(scene.objects[0], 3, 128, 128))
        assert torch.allclose(c128, 2 * c64, atol=1e-5)
        assert large.masks[b, 0].any()


# ----------------------------------------------------------------------------------------------- metrics
def test_ground_truth_scores_perfectly_against_itself(mixed):
    frames = mixed.frames[0]
    assert M.psnr(frames, frames) == math.inf
    assert M.ssim(frames, frames) == pytest.approx(1.0, abs=1e-12)
    assert M.ssim(frames.clone(), frames) == pytest.approx(1.0, abs=1e-12)


def test_ssim_follows_its_formula():
    # constant frames: no variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1)
    a, b = 0.3, 0.6
    x, y = torch.full((2, 3, 16, 16), a), torch.full((2, 3, 16, 16), b)
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert M.ssim(x, y) == pytest.approx(expected, rel=1e-5)
    # the Gaussian-window statistics of every 'valid' 11x11 window, computed window by window
    gen = torch.Generator().manual_seed(3)
    u = torch.rand(1, 3, 12, 13, generator=gen, dtype=torch.float64)
    v = (u + 0.2 * torch.rand(1, 3, 12, 13, generator=gen, dtype=torch.float64)).clamp(0, 1)
    g = torch.exp(-((torch.arange(11, dtype=torch.float64) - 5) ** 2) / (2 * 1.5**2))
    w = torch.outer(g, g) / g.sum() ** 2
    values = []
    for c in range(3):
        for i in range(2):
            for j in range(3):
                px, py = u[0, c, i:i + 11, j:j + 11], v[0, c, i:i + 11, j:j + 11]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                c2 = 0.03**2
                values.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    assert M.ssim(u.float(), v.float()) == pytest.approx(float(torch.stack(values).mean()), abs=1e-6)
    noise = torch.rand(2, 3, 20, 24, generator=torch.Generator().manual_seed(0))
    assert M.ssim(noise, noise.flip(-1)) == pytest.approx(M.ssim(noise.flip(-1), noise), abs=1e-12)
    assert M.ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)) < 0.5  # smaller than the window: it shrinks
    with pytest.raises(ValueError, match="shape"):
        M.ssim(x, y[:1])
    with pytest.raises(ValueError, match=r"\(T, 3, H, W\)"):
        M.ssim(x[0], y[0])


def test_shuffled_or_noised_video_scores_badly(busy):
    shuffled = busy[torch.randperm(busy.shape[0], generator=torch.Generator().manual_seed(0))]
    noised = (busy + 0.2 * torch.randn(busy.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    for video in (shuffled, noised):
        assert M.ssim(video, busy) < 0.6
        assert M.psnr(video, busy) < 20


def test_segment_colour_finds_every_visible_object_and_no_other(mixed):
    """Found in every frame where at least MIN_PIXELS of its mask are visible (not covered by a later object,
    nor within a pixel of one: the anti-aliased seam between two objects mixes their hues), and no colour of the
    palette that is not in the scene is ever found."""
    for b, scene in enumerate(mixed.scenes):
        frames = mixed.frames[b]
        masks = mixed.masks[b]
        for k, obj in enumerate(scene.objects):
            later = masks[k + 1:len(scene.objects)].any(0)
            near_later = F.max_pool2d(later.float().unsqueeze(1), 3, 1, 1).squeeze(1) > 0
            visible = (masks[k] & ~near_later).flatten(1).sum(1)
            _, found = M.track_colour(frames, obj.colour)
            assert found[visible >= M.MIN_PIXELS].all(), (b, caption(scene))
            segment = M.segment_colour(frames, obj.colour)
            # what is found is the object: its pixels lie on its mask (or its one-pixel anti-aliased rim)
            rim = F.max_pool2d(masks[k].float().unsqueeze(1), 3, 1, 1).squeeze(1) > 0
            assert not (segment & ~rim).any()
        for colour in set(OBJECT_COLOURS) - {o.colour for o in scene.objects}:
            _, found = M.track_colour(frames, colour)
            assert not found.any(), (b, colour, caption(scene))


def test_moves_towards_on_ground_truth():
    scenes = [s for s in (sample_scene(2000 + seed, num_objects=1) for seed in range(80))
              if s.objects[0].path == "straight"][:20]
    assert {s.objects[0].direction for s in scenes} == set(DIRECTIONS)
    video = render_scenes(scenes, TRAIN_FRAMES)
    for b, scene in enumerate(scenes):
        obj = scene.objects[0]
        centres, found = M.track_colour(video.frames[b], obj.colour)
        assert found.all()
        assert M.moves_towards(centres, obj.direction), caption(scene)
        assert not M.moves_towards(centres, OPPOSITE[obj.direction]), caption(scene)
    with pytest.raises(ValueError, match="direction"):
        M.moves_towards(centres, "north")


def test_trajectory_iou_of_ground_truth(singles):
    """Against the ground-truth boxes the segmented box agrees to the pixel: its edges are at most one pixel off
    (a pixel less than half covered still has the object's hue on some backgrounds), and exactly 1 against the
    box of the segmentation itself."""
    ious = []
    for b, scene in enumerate(singles.scenes):
        frames, colour, truth = singles.frames[b], scene.objects[0].colour, singles.boxes[b, 0]
        iou = M.trajectory_iou(frames, colour, truth)
        assert iou.shape == (TRAIN_FRAMES,)
        ious.append(iou)
        segmented = boxes_from_masks(M.segment_colour(frames, colour))
        assert ((segmented - truth).abs() <= 1).all()
        assert torch.equal(M.trajectory_iou(frames, colour, segmented), torch.ones(TRAIN_FRAMES))
        assert torch.equal(M.trajectory_iou(frames, colour, truth + 64), torch.zeros(TRAIN_FRAMES))
        absent = next(c for c in OBJECT_COLOURS if c != colour)
        assert torch.equal(M.trajectory_iou(frames, absent, truth), torch.zeros(TRAIN_FRAMES))
    ious = torch.stack(ious)
    assert ious.mean() > 0.9 and ious.min() > 0.5
    with pytest.raises(ValueError, match="boxes"):
        M.trajectory_iou(frames, colour, truth[:3])


def test_presence_continuity_and_speed(singles, busy):
    frames, obj = singles.frames[0], singles.scenes[0].objects[0]
    assert M.presence(frames, obj.colour) == 1.0
    absent = next(c for c in OBJECT_COLOURS if c != obj.colour)
    assert M.presence(frames, absent) == 0.0
    background = frames[:, :, :1, :1].expand_as(frames).clone()  # a corner pixel: no object there
    gone = frames.clone()
    gone[1::2] = background[1::2]
    assert M.presence(gone, obj.colour) == pytest.approx(5 / 9)
    for b, scene in enumerate(singles.scenes):
        obj = scene.objects[0]
        centres, _ = M.track_colour(singles.frames[b], obj.colour)
        assert M.continuity(centres) == 1.0
        if obj.path == "straight":
            assert M.mean_speed(centres) == pytest.approx(SPEEDS[obj.speed], abs=0.25)
    centres, found = M.track_colour(busy, "red")
    assert found.all() and M.continuity(centres) == 1.0
    shuffled = centres[torch.randperm(busy.shape[0], generator=torch.Generator().manual_seed(0))]
    assert M.continuity(shuffled) < 0.7
    assert M.mean_speed(shuffled) > 2 * M.mean_speed(centres)
    # NaN-safe: pairs with a missing frame are left out
    nan = float("nan")
    track = torch.tensor([[0.0, 0.0], [1.0, 0.0], [nan, nan], [30.0, 0.0], [31.0, 0.0], [50.0, 0.0]])
    assert M.continuity(track) == pytest.approx(2 / 3)
    assert M.mean_speed(track) == pytest.approx((1 + 1 + 19) / 3)
    assert M.continuity(track, max_jump=20.0) == 1.0
    for few in (track[:1], track[1:3], torch.tensor([[0.0, 0.0], [nan, nan], [5.0, 0.0]])):
        assert M.continuity(few) == 0.0
        assert math.isnan(M.mean_speed(few))


def test_edge_sharpness_drops_with_blur(singles):
    for b in range(6):
        frames, colour = singles.frames[b], singles.scenes[b].objects[0].colour
        blurred = F.avg_pool2d(frames, 5, 1, 2, count_include_pad=False)
        sharp, soft = M.edge_sharpness(frames, colour), M.edge_sharpness(blurred, colour)
        assert sharp > 0 and sharp > soft, (b, sharp, soft)
    absent = next(c for c in OBJECT_COLOURS if c != colour)
    assert math.isnan(M.edge_sharpness(frames, absent))


def test_repetition_of_a_tiled_video(busy, singles):
    tiled = busy[:3].repeat(busy.shape[0] // 3, 1, 1, 1)
    assert M.repetition(tiled, 3) == M.REPETITION_PSNR_CAP
    assert M.repetition(tiled, 3) > M.repetition(busy, 3) + 10
    frames = singles.frames[0]
    assert M.repetition(frames[:3].repeat(3, 1, 1, 1), 3) > M.repetition(frames, 3)
    frame_psnr = [min(M.psnr(busy[t], busy[t - 2]), 60.0) for t in range(2, busy.shape[0])]
    assert M.repetition(busy, 2) == pytest.approx(sum(frame_psnr) / len(frame_psnr))
    assert math.isnan(M.repetition(busy[:3], 3))
    with pytest.raises(ValueError, match="lag"):
        M.repetition(busy, 0)


# ----------------------------------------------------------------------------------------------- models
def test_per_frame_vae_codes_each_frame_on_its_own():
    from diffusers import AutoencoderKLWan

    from diffusers_attn_ext.world.models import per_frame_vae
    from diffusers_attn_ext.world.train_video import as_frames, from_frames

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, attn_scales=[], temperal_downsample=[False, False],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4, scale_factor_temporal=1, scale_factor_spatial=4,
    ).eval()
    latents = torch.randn(2, 4, 5, 4, 4, generator=torch.Generator().manual_seed(1))
    video = torch.rand(2, 3, 5, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1

    def whole_and_per_frame():
        with torch.no_grad():
            decoded = vae.decode(latents).sample
            decoded_frames = from_frames(vae.decode(as_frames(latents)).sample, 2)
            encoded = vae.encode(video).latent_dist.mode()
            encoded_frames = from_frames(vae.encode(as_frames(video)).latent_dist.mode(), 2)
        return decoded, decoded_frames, encoded, encoded_frames

    decoded, decoded_frames, _, _ = whole_and_per_frame()
    assert not torch.allclose(decoded, decoded_frames, atol=1e-3)  # a stock VAE mixes frames
    per_frame_vae(vae)
    decoded, decoded_frames, encoded, encoded_frames = whole_and_per_frame()
    assert decoded.shape == (2, 3, 5, 16, 16)
    assert torch.equal(decoded, decoded_frames)
    assert torch.equal(encoded, encoded_frames)
    assert torch.equal(from_frames(as_frames(video), 2), video)


TINY_MODEL = json.dumps({"layers": 1, "ffn_dim": 32, "vae_base_dim": 4, "heads": 1, "head_dim": 16, "text_dim": 16,
                         "text_ff": 16, "text_layers": 1, "frames": 3, "height": 16, "width": 16})


def _train_argv(workdir, budget: float) -> list[str]:
    return ["--workdir", str(workdir), "--model-config", TINY_MODEL, "--vae-steps", "3", "--vae-batch", "2",
            "--dit-steps", "3", "--dit-batch", "2", "--warmup", "2", "--caption-dropout", "0.5", "--workers", "0",
            "--moment-dtype", "float32", "--time-budget", str(budget), "--device", "cpu"]


def test_training_cut_into_pieces_is_bit_identical(tmp_path):
    from safetensors.torch import load_file

    from diffusers_attn_ext.world import train_video

    def checkpoint(workdir):
        tensors = {}
        for shard in sorted((workdir / "ckpt").glob("ckpt-*.safetensors")):
            tensors.update(load_file(str(shard)))
        return json.loads((workdir / "ckpt" / "state.json").read_text()), tensors

    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    train_video.main(_train_argv(whole, 1e9))
    calls, seen = 0, []
    while calls < 10:
        train_video.main(_train_argv(pieces, 0))
        calls += 1
        state, _ = checkpoint(pieces)
        seen.append((state["phase"], state["step"]))
        if state["phase"] == "done":
            break
    # one step per call; the call that ends the VAE phase also takes the first transformer step
    assert seen == [("vae", 1), ("vae", 2), ("dit", 1), ("dit", 2), ("done", 3)]
    state_whole, tensors_whole = checkpoint(whole)
    state_pieces, tensors_pieces = checkpoint(pieces)
    assert state_whole == state_pieces
    assert tensors_whole.keys() == tensors_pieces.keys()
    assert any(k.startswith("opt.transformer.") for k in tensors_whole)
    assert any(k.startswith("transformer.") for k in tensors_whole)
    for key, value in tensors_whole.items():
        assert torch.equal(value, tensors_pieces[key]), key


def test_training_continues_from_an_export(tmp_path):
    """--init-from: phase 2 starts from an exported pipeline's weights at the given step, and trains on."""
    from safetensors.torch import load_file

    from diffusers_attn_ext.world import train_video

    first, second = tmp_path / "first", tmp_path / "second"
    train_video.main([*_train_argv(first, 1e9), "--export", str(tmp_path / "export"), "--export-dtype", "float32"])
    argv = [*_train_argv(second, 0), "--init-from", str(tmp_path / "export"), "--init-step", "1",
            "--dit-object-weight", "4", "--dit-straight-fraction", "0.5"]
    train_video.main(argv)  # budget 0: one step (step 1 -> 2), then save
    state = json.loads((second / "ckpt" / "state.json").read_text())
    assert (state["phase"], state["step"], state["init_from"]) == ("dit", 2, str(tmp_path / "export"))
    exported = load_file(str(tmp_path / "export" / "vae" / "diffusion_pytorch_model.safetensors"))
    tensors = {}
    for shard in (second / "ckpt").glob("ckpt-*.safetensors"):
        tensors.update(load_file(str(shard)))
    for key, value in exported.items():  # the VAE is frozen in phase 2: still the export's
        assert torch.equal(tensors[f"vae.{key}"], value), key
    first_state = json.loads((first / "ckpt" / "state.json").read_text())
    assert state["latents_mean"] == pytest.approx(first_state["latents_mean"])
    train_video.main(argv)
    assert json.loads((second / "ckpt" / "state.json").read_text())["phase"] == "done"
    with pytest.raises(ValueError, match="init-step"):
        train_video.main([*_train_argv(tmp_path / "third", 0), "--init-from", str(tmp_path / "export"),
                          "--init-step", "3"])
    with pytest.raises(ValueError, match="model_index"):
        train_video.main([*_train_argv(tmp_path / "fourth", 0), "--init-from", str(tmp_path)])
    with pytest.raises(ValueError, match="straight-fraction"):
        train_video.main([*_train_argv(tmp_path / "fifth", 0), "--dit-straight-fraction", "1.5"])


def test_a_straight_fraction_of_the_batch_is_single_straight_movers():
    from diffusers_attn_ext.world.models import VideoModelConfig
    from diffusers_attn_ext.world.train_video import _Batches

    config = VideoModelConfig(frames=3, height=16, width=16)
    _, _, captions, _ = _Batches(0, 8, config, 0, 1, straight_fraction=0.5)[0]
    _, _, free, _ = _Batches(0, 8, config, 0, 1)[0]
    assert all(" and " not in c and " moves " in c for c in captions[:4])
    assert captions[4:] == free[4:]


def test_latent_object_weight_marks_the_cells_an_object_touches():
    from diffusers_attn_ext.world.train_video import latent_object_weight

    objects = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    objects[0, 0, 1, 6] = True  # one pixel in latent cell (0, 1) of frame 0 at factor 4
    weight = latent_object_weight(objects, torch.Size([1, 3, 2, 2, 2]), 4.0)
    assert weight.shape == (1, 1, 2, 2, 2)
    expected = torch.ones(1, 1, 2, 2, 2)
    expected[0, 0, 0, 0, 1] = 5.0
    assert torch.equal(weight, expected)
    with pytest.raises(ValueError, match="tile"):
        latent_object_weight(objects, torch.Size([1, 3, 2, 3, 3]), 4.0)


def test_shipped_model_loads():
    from diffusers import WanPipeline

    from diffusers_attn_ext.world import load_world_video_pipeline, wan_num_frames
    from diffusers_attn_ext.world.vocabulary import all_words

    pipe = load_world_video_pipeline()
    assert isinstance(pipe, WanPipeline)
    tokenizer = pipe.tokenizer
    ids = tokenizer("a small red circle moves left slowly on a gray background").input_ids
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.convert_ids_to_tokens(ids) == [*"a small red circle moves left slowly on a gray background".split(),
                                                    "</s>"]
    assert tokenizer.unk_token_id not in tokenizer(" ".join(all_words())).input_ids
    assert tokenizer.unk_token_id in tokenizer("a purple circle").input_ids
    assert pipe.vae.config.scale_factor_temporal == 1
    assert wan_num_frames(TRAIN_FRAMES, pipe.vae) == TRAIN_FRAMES - 1
    assert pipe.transformer.dtype == torch.float32


def test_fixed_path_and_size_keep_the_other_draws_and_a_straight_mover_in_frame():
    from diffusers_attn_ext.world.render import object_centres

    for seed in range(200):
        free = sample_scene(seed, num_objects=1).objects[0]
        fixed = sample_scene(seed, num_objects=1, path="straight", size="large").objects[0]
        assert (fixed.path, fixed.size) == ("straight", "large")
        assert (fixed.shape, fixed.colour, fixed.direction, fixed.speed) == (free.shape, free.colour, free.direction,
                                                                              free.speed)
        radius = SIZES["large"]
        for x, y in object_centres(fixed, TRAIN_FRAMES, TRAIN_SIZE, TRAIN_SIZE):
            assert radius - 1e-6 <= x <= TRAIN_SIZE - radius + 1e-6 and radius - 1e-6 <= y <= TRAIN_SIZE - radius + 1e-6
    with pytest.raises(ValueError, match="path"):
        sample_scene(0, path="zigzag")
