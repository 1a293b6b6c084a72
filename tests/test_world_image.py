"""The image world (``world.image_scenes``, ``world.image_render``), its FLUX.1 model (``world.image_models``), the
resumable training loop (``world.train_image``) and the quality judge (``world.judge``). CPU only and fast: a few
dozen small scenes, pipelines at 32x32 for two steps, a toy model trained for a few steps."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_attn_ext.world.image_render import render_image_scenes, render_image_seeds
from diffusers_attn_ext.world.image_scenes import (
    BOUND_FACTOR,
    GAP,
    MAX_SUBJECTS,
    PATTERNS,
    RADIUS_RANGE,
    ImageScene,
    ImageSubject,
    image_caption,
    parse_image_caption,
    sample_image_scene,
    subject_boxes,
)
from diffusers_attn_ext.world.render import boxes_from_masks
from diffusers_attn_ext.world.vocabulary import OBJECT_COLOURS

PROMPT = "a red circle and a blue square on a gray background"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tensors here are tiny: one thread is many times faster than two that contend with other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def scenes():
    return [sample_image_scene(seed) for seed in range(60)]


@pytest.fixture(scope="module")
def rendered(scenes):
    return render_image_scenes(scenes)


# ----------------------------------------------------------------------------------------------- the world
def test_scenes_and_images_are_deterministic_from_the_seed(scenes, rendered):
    assert [sample_image_scene(seed) for seed in range(60)] == scenes
    assert sample_image_scene(0) != sample_image_scene(1)
    again = render_image_seeds(list(range(60)))
    assert torch.equal(again.images, rendered.images) and torch.equal(again.masks, rendered.masks)
    counts = [len(s.subjects) for s in scenes]
    assert set(counts) == {1, 2, 3}


def test_scene_layout_rules(scenes):
    for scene in scenes:
        subjects = scene.subjects
        assert len({s.colour for s in subjects}) == len(subjects)
        assert [s.centre[0] for s in subjects] == sorted(s.centre[0] for s in subjects)  # named left to right
        low, high = RADIUS_RANGE[len(subjects)]
        for s in subjects:
            assert 0.9**10 * low <= s.radius <= high
            half = BOUND_FACTOR * s.radius
            assert half <= s.centre[0] <= 1 - half and half <= s.centre[1] <= 1 - half
        for i, a in enumerate(subjects):
            for b in subjects[i + 1:]:
                reach = BOUND_FACTOR * (a.radius + b.radius) + GAP
                assert abs(a.centre[0] - b.centre[0]) >= reach or abs(a.centre[1] - b.centre[1]) >= reach


def test_identity_is_drawn_per_sample_not_per_class():
    """Two samples of one class (shape and colour) almost never share an identity: the caption does not fix it."""
    by_class = {}
    for seed in range(400):
        for s in sample_image_scene(seed, num_subjects=1).subjects:
            by_class.setdefault(s.name, []).append(s)
    pairs = [(a, b) for group in by_class.values() for a, b in zip(group, group[1:], strict=False)]
    assert len(pairs) > 100
    same_pattern = sum(a.pattern == b.pattern for a, b in pairs) / len(pairs)
    assert 0.1 < same_pattern < 0.5  # four patterns drawn uniformly: about 1/4
    assert all(a.radius != b.radius and a.rotation != b.rotation for a, b in pairs)
    assert {s.pattern for group in by_class.values() for s in group} == set(PATTERNS)


def test_caption_round_trip(scenes):
    for scene in scenes:
        text = image_caption(scene)
        parsed = parse_image_caption(text)
        assert [(s.colour, s.shape) for s in parsed.subjects] == [(s.colour, s.shape) for s in scene.subjects]
        assert parsed.background == scene.background
        assert image_caption(parsed) == text
    assert image_caption(ImageScene((ImageSubject("circle", "red"),), "white")) == "a red circle on a white background"


@pytest.mark.parametrize("text, word", [
    ("a red blob on a gray background", "blob"),
    ("a red circle on a pink background", "pink"),
    ("a red circle on a gray background please", "please"),
    ("a red circle", "the end of the caption"),
])
def test_parse_caption_names_the_bad_word(text, word):
    with pytest.raises(ValueError, match=word):
        parse_image_caption(text)


def test_bad_scenes_are_refused():
    with pytest.raises(ValueError, match="num_subjects"):
        sample_image_scene(0, num_subjects=MAX_SUBJECTS + 1)
    with pytest.raises(ValueError, match="seed"):
        sample_image_scene(1.5)
    with pytest.raises(ValueError, match="colour"):
        ImageSubject("circle", "pink")
    with pytest.raises(ValueError, match="pattern"):
        ImageSubject("circle", "red", pattern="tartan")
    with pytest.raises(ValueError, match="distinct colours"):
        ImageScene((ImageSubject("circle", "red"), ImageSubject("square", "red")))
    with pytest.raises(ValueError, match="no position"):
        render_image_scenes([parse_image_caption(PROMPT)])


def _reference_masks(scene: ImageScene, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 restatement of the masks (coverage >= 1/2 <=> signed distance <= 0) and the distances."""
    c = (torch.arange(size, dtype=torch.float64) + 0.5)
    ys, xs = c.view(-1, 1), c.view(1, -1)
    masks, distances = [], []
    for s in scene.subjects:
        ox, oy = xs - s.centre[0] * size, ys - s.centre[1] * size
        cos, sin = math.cos(s.rotation), math.sin(s.rotation)
        dx, dy = cos * ox + sin * oy, -sin * ox + cos * oy
        r = s.radius * size
        if s.shape == "circle":
            d = torch.sqrt(dx**2 + dy**2) - r
        elif s.shape == "square":
            d = torch.maximum(dx.abs(), dy.abs()) - 0.85 * r
        else:
            big = 1.15 * r
            d = torch.maximum((math.sqrt(3) * dx.abs() - dy - big) / 2, dy - big / 2)
        masks.append(d <= 0)
        distances.append(d)
    return torch.stack(masks), torch.stack(distances)


@pytest.mark.parametrize("size", [32, 64])
def test_masks_and_boxes_are_exact(scenes, size):
    world = render_image_scenes(scenes[:30], size, size)
    for b, scene in enumerate(scenes[:30]):
        n = len(scene.subjects)
        reference, distance = _reference_masks(scene, size)
        decided = distance.abs() > 1e-4  # float32 and float64 may round a pixel on the outline either way
        assert torch.equal(world.masks[b, :n][decided], reference[decided])
        assert not world.masks[b, n:].any() and world.present[b].tolist() == [k < n for k in range(MAX_SUBJECTS)]
        assert (world.masks[b].sum(0) <= 1).all()  # disjoint
        assert torch.equal(world.boxes[b, :n], boxes_from_masks(reference))
        assert torch.isnan(world.boxes[b, n:]).all()
        for k, (x0, y0, x1, y1) in enumerate(subject_boxes(scene).values()):  # mask pixel centres lie in the boxes
            bx0, by0, bx1, by1 = world.boxes[b, k].tolist()
            assert x0 * size <= bx0 + 0.5 and bx1 - 0.5 <= x1 * size and y0 * size <= by0 + 0.5
            assert by1 - 0.5 <= y1 * size
        assert list(subject_boxes(scene)) == [s.name for s in scene.subjects]


def test_subject_boxes_are_an_ir_diffusion_layout(scenes):
    """Every sampled scene's boxes are a valid IR-Diffusion layout, disjoint on the token grids of 0.5x, 1x, 2x."""
    from diffusers_attn_ext.subjects import SubjectLayout

    for scene in scenes:
        boxes = subject_boxes(scene)
        layout = SubjectLayout.from_boxes([boxes, boxes], [image_caption(scene)] * 2)
        for side in (4, 8, 16):
            grids = layout.grids(1, side, side)
            assert all(g.any() for g in grids) and (sum(g.int() for g in grids) <= 1).all()


def test_pixels_inside_a_mask_have_the_subject_colour_or_its_shade(scenes, rendered):
    for b, scene in enumerate(scenes):
        for k, s in enumerate(scene.subjects):
            inner = rendered.masks[b, k] & (F.max_pool2d((~rendered.masks[b, k]).float()[None], 3, 1, 1)[0] == 0)
            pixels = rendered.images[b].permute(1, 2, 0)[inner]
            colour = torch.tensor(OBJECT_COLOURS[s.colour])
            ratio = pixels / colour
            assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)  # a multiple of the colour
            factors = ratio[:, 0]
            is_full = (factors - 1).abs() < 1e-5
            assert (is_full | ((factors - s.shade).abs() < 1e-5)).all()
            if s.pattern == "plain":
                assert is_full.all()
        outside = ~rendered.masks[b].any(0)
        edge = F.max_pool2d(rendered.masks[b].any(0).float()[None], 5, 1, 2)[0] > 0  # anti-aliased ring
        background = rendered.images[b][:, outside & ~edge]
        assert torch.allclose(background, background[:, :1].expand_as(background))


# ----------------------------------------------------------------------------------------------- the model
@pytest.fixture(scope="module")
def pipe():
    from diffusers_attn_ext.world.image_models import build_image_pipeline

    torch.manual_seed(0)
    pipe = build_image_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _call(**overrides):
    from diffusers_attn_ext.world.image_models import world_image_call

    return {**world_image_call(num_inference_steps=2), "output_type": "pt",
            "generator": torch.Generator().manual_seed(0), **overrides}


def test_tokenizers_round_trip(pipe, tmp_path):
    from transformers import AutoTokenizer

    clip, t5 = pipe.tokenizer, pipe.tokenizer_2
    ids = clip(PROMPT).input_ids
    assert ids[0] == clip.bos_token_id and ids[-1] == clip.eos_token_id
    assert clip.unk_token_id not in ids
    assert clip.decode(ids, skip_special_tokens=True) == PROMPT
    padded = clip(PROMPT, padding="max_length", max_length=clip.model_max_length).input_ids
    assert len(padded) == 32 and padded[len(ids):] == [clip.pad_token_id] * (32 - len(ids))
    assert clip.pad_token_id == clip.eos_token_id == pipe.text_encoder.config.eos_token_id != 2
    ids = t5(PROMPT).input_ids
    assert ids[-1] == t5.eos_token_id and t5.pad_token_id == 0 and t5.unk_token_id not in ids
    assert t5.decode(ids, skip_special_tokens=True) == PROMPT
    assert clip("a red blob").input_ids[3] == clip.unk_token_id
    clip.save_pretrained(tmp_path / "clip")
    assert AutoTokenizer.from_pretrained(tmp_path / "clip")(PROMPT).input_ids == clip(PROMPT).input_ids


def test_pipeline_builds_from_config_and_generates_from_a_prompt(pipe):
    from diffusers import FluxPipeline

    from diffusers_attn_ext.world.image_models import ImageModelConfig, parameter_counts

    config = ImageModelConfig()
    assert isinstance(pipe, FluxPipeline) and not pipe.transformer.config.guidance_embeds
    assert config.image_tokens == 64 and pipe.vae_scale_factor == 2
    assert sum(parameter_counts(pipe).values()) * 2 < 10 * 2**20  # under 10 MiB in bfloat16
    images = pipe(PROMPT, **_call()).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    guided = pipe([PROMPT, PROMPT], **_call(negative_prompt=["", ""])).images
    plain = pipe([PROMPT, PROMPT], **_call(true_cfg_scale=1.0)).images
    assert guided.shape == (2, 3, 32, 32) and not torch.allclose(guided, plain)


def test_encode_text_is_flux_pipelines(pipe):
    from diffusers_attn_ext.world.train_image import encode_text, tokenize

    captions = [PROMPT, "", "a green triangle on a black background"]
    clip_ids = tokenize(pipe.tokenizer, captions, 32)
    t5_ids = tokenize(pipe.tokenizer_2, captions, 32)
    with torch.no_grad():
        for length in (32, 512):
            pooled, text = encode_text(pipe, clip_ids, t5_ids, length)
            reference, reference_pooled, _ = pipe.encode_prompt(captions, None, max_sequence_length=length)
            assert torch.equal(pooled, reference_pooled) and torch.equal(text, reference)


def test_pipeline_parts_and_prompt_ids_are_checked_against_the_embedding_tables(pipe):
    """What ``--check`` validates before phase 2 trains: on the CPU an id outside an embedding table raises an
    IndexError, on the GPU it is an asynchronous device assert that a later matrix product reports
    (CUBLAS_STATUS_EXECUTION_FAILED), so the checks must refuse every such id by name, before the model runs."""
    from diffusers_attn_ext.world.image_models import check_image_pipeline, check_text_ids
    from diffusers_attn_ext.world.train_image import LONG_TEXT_TOKENS, tokenize

    check_image_pipeline(pipe)
    captions = [PROMPT, "", "a blue square and a yellow triangle and a green circle on a white background"]
    clip_ids, t5_ids = tokenize(pipe.tokenizer, captions, 32), tokenize(pipe.tokenizer_2, captions, 32)
    for length in (32, LONG_TEXT_TOKENS):
        check_text_ids(pipe, clip_ids, t5_ids, length)
    clip_vocab, t5_vocab = pipe.text_encoder.config.vocab_size, pipe.text_encoder_2.config.vocab_size
    too_big = clip_ids.clone()
    too_big[1, 5] = clip_vocab
    with pytest.raises(IndexError):  # what the check prevents, as the CPU reports it
        pipe.text_encoder(too_big)
    bad = {
        r"max\(clip_ids\) \(CLIP vocab_size 32\)=32 ": (too_big, t5_ids, 32),
        r"min\(clip_ids\) \(CLIP vocab_size 32\)=-1 ": (clip_ids.masked_fill(clip_ids == 0, -1), t5_ids, 32),
        r"max\(t5_ids\) \(T5 vocab_size 32\)=32 ": (clip_ids, t5_ids.masked_fill(t5_ids == t5_ids.max(), t5_vocab),
                                                     32),
        r"clip_ids.shape\[1\] \(CLIP max_position_embeddings 32\)=33": (
            tokenize(pipe.tokenizer, captions, 33), t5_ids, 32),
        r"without CLIP's eos_token_id": (clip_ids.masked_fill(clip_ids == pipe.tokenizer.eos_token_id, 4), t5_ids, 32),
        r"T5 length \(t5_ids.shape\[1\] 32\)=16": (clip_ids, t5_ids, 16),
        r"t5_ids dtype=torch.float32": (clip_ids, t5_ids.float(), 32),
    }
    for message, (c, t, length) in bad.items():
        with pytest.raises(ValueError, match=message):
            check_text_ids(pipe, c, t, length)
    length, embedder = pipe.tokenizer.model_max_length, pipe.transformer.context_embedder  # the shared pipe: restore
    try:
        pipe.tokenizer.model_max_length = 77  # CLIP's usual length; this CLIP has 32 positions
        with pytest.raises(ValueError, match=r"tokenizer.model_max_length \(CLIP max_position_embeddings 32\)=77"):
            check_image_pipeline(pipe)
        pipe.tokenizer.model_max_length = length
        pipe.transformer.context_embedder = torch.nn.Linear(32, 160)
        with pytest.raises(ValueError, match=r"context_embedder in_features \(= T5 d_model\)=32"):
            check_image_pipeline(pipe)
    finally:
        pipe.tokenizer.model_max_length, pipe.transformer.context_embedder = length, embedder
    check_image_pipeline(pipe)


def test_round_trip_through_flux_and_our_pipelines(pipe, tmp_path):
    from diffusers import FluxPipeline

    from diffusers_attn_ext.pipelines import FluxHeadPAGPipeline, FluxMultiSubjectPipeline
    from diffusers_attn_ext.world.image_models import load_world_image_pipeline

    pipe.save_pretrained(tmp_path)
    stock = pipe(PROMPT, **_call()).images
    reloaded = FluxPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert torch.allclose(reloaded(PROMPT, **_call()).images, stock, atol=1e-6)

    pag = load_world_image_pipeline(str(tmp_path), pipeline_class=FluxHeadPAGPipeline)
    assert isinstance(pag, FluxHeadPAGPipeline)
    assert torch.allclose(pag(PROMPT, **_call()).images, stock, atol=1e-6)  # no head set: stock
    perturbed = pag(PROMPT, **_call(), pag_heads={"single_transformer_blocks.1": [0, 2]}, pag_scale=3.0).images
    assert not torch.allclose(perturbed, stock, atol=1e-4)

    multi = load_world_image_pipeline(str(tmp_path), pipeline_class=FluxMultiSubjectPipeline)
    scene = sample_image_scene(3, num_subjects=2)
    boxes = subject_boxes(scene)
    prompts = [image_caption(scene), image_caption(dataclasses.replace(scene, background="white"))]
    kwargs = _call(negative_prompt=["", ""])
    plain = multi(prompts, **kwargs).images
    story = multi(prompts, subject_boxes=[boxes, boxes], **_call(negative_prompt=["", ""])).images
    assert story.shape == (2, 3, 32, 32)
    assert torch.allclose(story[0], plain[0], atol=1e-6)  # the reference is generated as stock
    assert not torch.allclose(story[1], plain[1], atol=1e-4)


# ----------------------------------------------------------------------------------------------- training
TINY = json.dumps({"vae_channels": [8, 16], "vae_norm_groups": 4, "heads": 1, "head_dim": 16,
                   "axes_dims_rope": [4, 6, 6], "double_layers": 1, "single_layers": 1, "clip_dim": 16,
                   "clip_ff": 16, "clip_layers": 1, "t5_dim": 16, "t5_ff": 16, "t5_layers": 1, "size": 16})


def _train_argv(workdir, budget: float, *extra) -> list[str]:
    return ["--workdir", str(workdir), "--model-config", TINY, "--vae-steps", "3", "--vae-batch", "2",
            "--dit-steps", "3", "--dit-batch", "2", "--warmup", "2", "--caption-dropout", "0.5",
            "--long-text-fraction", "0.5", "--dit-object-weight", "2", "--workers", "0", "--moment-dtype", "float32",
            "--time-budget", str(budget), "--device", "cpu", *extra]


def _checkpoint(workdir):
    from diffusers_attn_ext.world.train_video import load_checkpoint

    return load_checkpoint(workdir)


def test_training_cut_into_pieces_is_bit_identical(tmp_path, capsys):
    from diffusers_attn_ext.world import train_image

    whole, pieces = tmp_path / "whole", tmp_path / "pieces"
    train_image.main(_train_argv(whole, 1e9, "--check"))  # --check changes nothing: the pieces run without it
    checks = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"check"')]
    assert [(c["batch"], c["text_tokens"]) for c in checks if c["check"] == "step"] == [(2, 32), (2, 512)]
    assert all(math.isfinite(c["loss"]) for c in checks if c["check"] == "step") and checks[-1]["check"] == "passed"
    seen = []
    for _ in range(10):
        state = train_image.main(_train_argv(pieces, 0))  # budget 0: one step per call
        seen.append((state["phase"], state["step"]))
        if state["phase"] == "done":
            break
    assert seen == [("vae", 1), ("vae", 2), ("dit", 1), ("dit", 2), ("done", 3)]
    state_whole, tensors_whole = _checkpoint(whole)
    state_pieces, tensors_pieces = _checkpoint(pieces)
    assert state_whole == state_pieces and tensors_whole.keys() == tensors_pieces.keys()
    assert any(k.startswith("opt.text_encoder_2.") for k in tensors_whole)
    for key, value in tensors_whole.items():
        assert torch.equal(value, tensors_pieces[key]), key


def test_training_plans_its_length_and_exports_a_flux_pipeline(tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    from diffusers_attn_ext.world import train_image

    monkeypatch.setattr(train_image, "PROBE_SKIP", 1)
    monkeypatch.setattr(train_image, "PROBE_STEPS", 2)
    argv = _train_argv(tmp_path / "run", 1e9, "--export", str(tmp_path / "export"), "--export-dtype", "float32")
    argv[argv.index("--dit-steps") + 1] = "0"
    state = train_image.main([*argv, "--dit-seconds", "0"])  # planned after 2 steps: nothing left, stop at 3
    assert (state["phase"], state["step"], state["dit_steps"]) == ("done", 3, 3)
    export = tmp_path / "export"
    training = json.loads((export / "training.json").read_text())
    assert training["phase"] == "done" and training["model"]["size"] == 16
    pipe = FluxPipeline.from_pretrained(export)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.shift_factor == pytest.approx(state["shift_factor"])
    assert pipe.vae.config.scaling_factor == pytest.approx(state["scaling_factor"])
    _, tensors = _checkpoint(tmp_path / "run")
    assert torch.equal(pipe.transformer.proj_out.weight, tensors["transformer.proj_out.weight"])
    images = pipe(PROMPT, **_call(height=16, width=16)).images
    assert images.shape == (1, 3, 16, 16)


def test_check_mode_refuses_out_of_range_ids_before_phase_2_trains(tmp_path, monkeypatch):
    from diffusers_attn_ext.world import train_image

    real_tokenize = train_image.tokenize

    def tokenize(tokenizer, captions, length):  # as a tokenizer with a larger vocabulary than its encoder's table
        ids = real_tokenize(tokenizer, captions, length)
        ids[:, -1] = 40
        return ids

    monkeypatch.setattr(train_image, "tokenize", tokenize)
    with pytest.raises(ValueError, match=r"max\(clip_ids\) \(CLIP vocab_size 32\)=40 is outside"):
        train_image.main(_train_argv(tmp_path, 1e9, "--check"))
    state, _ = _checkpoint(tmp_path)  # phase 1 finished and saved; phase 2 did not take a step
    assert (state["phase"], state["step"]) == ("dit", 0)
    assert all(json.loads(line)["phase"] == "vae" for line in (tmp_path / "log.jsonl").read_text().splitlines())


def test_check_names_the_module_where_a_device_error_surfaces(monkeypatch):
    """A device error stands for a CUDA one (reported at the next synchronisation): the check raises it naming the
    batch, the T5 length, the stage and the module, and leaves no gradient behind."""
    from diffusers_attn_ext.world import train_image

    model = train_image.model_config_from_json(TINY)
    cfg = train_image.ImageTrainConfig(dit_batch=3)
    torch.manual_seed(0)
    pipe = train_image.build_image_pipeline(model)
    trainable = [p for m in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2) for p in m.parameters()]
    autocast = torch.autocast("cpu", enabled=False)
    faulty = {"ran": False}
    pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.o.register_forward_pre_hook(
        lambda module, inputs: faulty.update(ran=True))

    def synchronize(device):
        if faulty["ran"]:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(train_image, "_synchronize", synchronize)
    message = (r"batch 3 with 32 T5 tokens failed on cpu after stage 'noise' \(module in "
               r"text_encoder_2.encoder.block.0.layer.0.SelfAttention.o, after "
               r"text_encoder_2.encoder.block.0.layer.0.SelfAttention.\w+\): CUDA error: an illegal memory access")
    with pytest.raises(RuntimeError, match=message):
        train_image.check_first_step(pipe, model, cfg, (0.0, 1.0), 0, trainable, autocast)
    assert all(p.grad is None for p in trainable)


def test_evaluation_scores_generations_with_the_judge(pipe, shipped_judge, tmp_path):
    from diffusers_attn_ext.world.evaluate_image import evaluate, evaluation_scenes, save_grid
    from diffusers_attn_ext.world.train_video import EVAL_SEED_BASE

    assert all(s == sample_image_scene(EVAL_SEED_BASE + 200_000_000 + i) for i, s in enumerate(evaluation_scenes(3)))
    summary, images, truth = evaluate(pipe, shipped_judge, 3, batch=2, num_inference_steps=2)
    assert images.shape == truth.shape == (3, 3, 32, 32)
    assert summary["prompts"] == 3 and len(summary["rows"]) == 3 and summary["frechet"] > 0
    assert summary["ground_truth"]["class"] == 1.0 and summary["ground_truth"]["colour"] == 1.0
    assert 0.0 <= summary["class"] <= summary["colour"] <= 1.0  # a class counts only where the colour is found
    save_grid(images, truth, tmp_path / "eval.png")
    assert (tmp_path / "eval.png").stat().st_size > 0


def test_training_arguments_are_validated(tmp_path):
    from diffusers_attn_ext.world import train_image

    with pytest.raises(ValueError, match="--caption-dropout"):
        train_image.main([*_train_argv(tmp_path, 0), "--caption-dropout", "1.5"])
    with pytest.raises(ValueError, match="--dit-batch"):
        train_image.main([*_train_argv(tmp_path, 0), "--dit-batch", "0"])
    assert not (tmp_path / "ckpt").exists()


def test_training_seeds_are_below_the_evaluation_seeds():
    from diffusers_attn_ext.world import evaluate_image, judge, train_image
    from diffusers_attn_ext.world.train_video import EVAL_SEED_BASE

    bases = sorted([train_image.IMAGE_DIT_SEED_BASE, train_image.IMAGE_STAT_SEED_BASE,
                    train_image.IMAGE_VAE_SEED_BASE, judge.JUDGE_SEED_BASE])
    # a base's seeds run to base + steps * batch: 10^8 seeds each (400k steps of 256) before the next
    assert all(b + 10**7 <= nxt for b, nxt in zip(bases, bases[1:], strict=False)) and bases[-1] + 10**8 <= EVAL_SEED_BASE
    assert evaluate_image.IMAGE_EVAL_OFFSET != judge.JUDGE_EVAL_OFFSET


# ----------------------------------------------------------------------------------------------- the judge
@pytest.fixture(scope="module")
def shipped_judge():
    from diffusers_attn_ext.world.judge import load_world_judge

    return load_world_judge()


def test_shipped_judge_reads_ground_truth_images(shipped_judge):
    """The acceptance bar of the issue: class and colour >= 95% on ground-truth world images (held-out seeds)."""
    from diffusers_attn_ext.world.judge import ground_truth_accuracy

    scores = ground_truth_accuracy(shipped_judge, 256)
    assert scores["colour"] >= 0.95 and scores["class"] >= 0.95, scores
    assert scores["extra"] <= 0.05 and scores["background"] >= 0.95, scores


def test_judge_scores_follow_their_definitions(shipped_judge):
    from diffusers_attn_ext.world.judge import COLOURS, score_prompts

    world = render_image_seeds([10**9 + 7, 10**9 + 8])
    with torch.no_grad():
        out = shipped_judge(world.images)
    scores = score_prompts(shipped_judge, world.images, world.scenes)
    for b, scene in enumerate(world.scenes):
        p = torch.sigmoid(out["present"][b].double())
        shapes = torch.softmax(out["shape"][b].double(), -1)
        expected = sum(float(p[COLOURS.index(s.colour)] * shapes[COLOURS.index(s.colour), ["circle", "square",
                       "triangle"].index(s.shape)]) for s in scene.subjects) / len(scene.subjects)
        assert scores["confidence"][b] == pytest.approx(expected)
    blank = torch.full((1, 3, 32, 32), 0.5)
    empty = score_prompts(shipped_judge, blank, [PROMPT])
    assert empty["colour"].item() == 0.0 and empty["class"].item() == 0.0 and empty["confidence"].item() < 0.1
    wrong = score_prompts(shipped_judge, world.images[:1], [image_caption(world.scenes[1])])
    assert wrong["class"].item() < 1.0


def test_frechet_distance_follows_its_formula():
    """Against a float64 restatement for 2-D features, where Tr (S_a S_b)^1/2 = sqrt(tr M + 2 sqrt(det M)) for
    M = S_a S_b (its eigenvalues are real and positive)."""
    from diffusers_attn_ext.world.judge import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 2, generator=g, dtype=torch.float64) @ torch.tensor([[1.0, 0.5], [0.0, 2.0]], dtype=torch.float64) + 1.0
    b = torch.randn(300, 2, generator=g, dtype=torch.float64) @ torch.tensor([[0.5, -0.3], [0.2, 1.0]], dtype=torch.float64)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    m = ca @ cb
    trace_root = math.sqrt(float(torch.trace(m)) + 2 * math.sqrt(float(torch.det(m))))
    expected = float((a.mean(0) - b.mean(0)).pow(2).sum() + torch.trace(ca) + torch.trace(cb)) - 2 * trace_root
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="frechet_distance"):
        frechet_distance(a[:1], b)


def test_judge_features_separate_real_from_degraded(shipped_judge):
    """Frechet distances over 256 images each: another real set is closer than a blurred one, which is closer than
    a noised one (the judge was trained to read blurred images, so blur moves its features only a little)."""
    from diffusers_attn_ext.world.judge import frechet_distance, judge_features

    real_a = render_image_seeds(list(range(10**9 + 400, 10**9 + 656))).images
    real_b = render_image_seeds(list(range(10**9 + 700, 10**9 + 956))).images
    blurred = F.avg_pool2d(real_b, 5, 1, 2, count_include_pad=False)
    noised = (real_b + 0.1 * torch.randn(real_b.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    features = judge_features(shipped_judge, real_a)
    distances = [frechet_distance(features, judge_features(shipped_judge, x)) for x in (real_b, blurred, noised)]
    assert distances == sorted(distances) and distances[2] > 5 * distances[0], distances


def test_judge_objective_scores_a_headhunter_batch(shipped_judge):
    from diffusers_attn_ext.world.judge import judge_objective

    world = render_image_seeds([10**9 + 9, 10**9 + 10])
    objective = judge_objective(shipped_judge)
    scores = objective(world.images, [image_caption(s) for s in world.scenes])
    assert scores.shape == (2,) and (scores > 0.5).all()
    with pytest.raises(ValueError, match="prompt"):
        objective(world.images, [None, None])


def test_judge_training_learns_above_chance():
    """60 CPU steps: the pixel colour head finds most subject pixels of held-out images (chance: 1 in 6)."""
    from diffusers_attn_ext.world.judge import pixel_labels, train_judge

    judge = train_judge(steps=60, batch=16, lr=5e-3, device="cpu", every=1000)
    world = render_image_seeds(list(range(10**9 + 300, 10**9 + 316)))
    with torch.no_grad():
        predicted = judge(world.images)["pixels"].argmax(1)
    labels = pixel_labels(world.scenes, world.masks)
    foreground = labels > 0
    assert (predicted[foreground] == labels[foreground]).float().mean() > 0.5


# ----------------------------------------------------------------------------------------------- the shipped model
@pytest.fixture(scope="module")
def shipped_pipe():
    from diffusers import FluxPipeline

    from diffusers_attn_ext.world.image_models import SHIPPED_IMAGE_MODEL
    from diffusers_attn_ext.world.models import shipped_model_path

    pipe = FluxPipeline.from_pretrained(shipped_model_path(SHIPPED_IMAGE_MODEL), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_shipped_model_generates_after_from_pretrained_without_a_dtype():
    """A plain ``FluxPipeline.from_pretrained(path)``: every part loads in float32 (the exports keep the
    transformers text encoders in float32, ``world.training.save_pipeline``; with bfloat16 ones the call failed on
    mixed dtypes) and the call generates."""
    from diffusers import FluxPipeline

    from diffusers_attn_ext.world.image_models import SHIPPED_IMAGE_MODEL
    from diffusers_attn_ext.world.models import shipped_model_path

    pipe = FluxPipeline.from_pretrained(shipped_model_path(SHIPPED_IMAGE_MODEL))
    pipe.set_progress_bar_config(disable=True)
    assert {p.dtype for m in pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()} \
        == {torch.float32}
    assert pipe(PROMPT, **_call()).images.shape == (1, 3, 32, 32)


def test_shipped_model_loads_with_flux_and_our_pipelines(shipped_pipe):
    """``FluxPipeline.from_pretrained(path)`` loads the shipped model as saved; ``FluxHeadPAGPipeline`` and
    ``FluxMultiSubjectPipeline`` load the same folder, give the stock images without their method's arguments and
    other images with them."""
    from diffusers import FluxPipeline

    from diffusers_attn_ext.pipelines import FluxHeadPAGPipeline, FluxMultiSubjectPipeline
    from diffusers_attn_ext.world.image_models import load_world_image_pipeline

    assert type(shipped_pipe) is FluxPipeline and not shipped_pipe.transformer.config.guidance_embeds
    assert shipped_pipe.transformer.config.in_channels == 16 and shipped_pipe.vae_scale_factor == 2
    stock = shipped_pipe(PROMPT, **_call()).images
    pag = load_world_image_pipeline(pipeline_class=FluxHeadPAGPipeline)
    assert isinstance(pag, FluxHeadPAGPipeline) and torch.equal(pag(PROMPT, **_call()).images, stock)
    guided = pag(PROMPT, **_call(), pag_heads={"transformer_blocks.0": [2]}, pag_scale=3.0).images
    assert (guided - stock).abs().max() > 1e-3
    multi = load_world_image_pipeline(pipeline_class=FluxMultiSubjectPipeline)
    assert isinstance(multi, FluxMultiSubjectPipeline) and torch.equal(multi(PROMPT, **_call()).images, stock)


def test_shipped_model_draws_the_named_colour_and_class(shipped_pipe, shipped_judge):
    """One subject per prompt, every colour with every shape (backgrounds in a Latin square), one batch at seed 0,
    10 steps (the demo's), judged by the shipped judge. Measured on this batch at seeds 0-5: colour 108/108,
    class 77/108 (71%; 12 to 15 of 18 per seed; squares are the weak class), and "a red circle on a white
    background" right at 5 of the 6 seeds (seed 1 drew a red blob the judge does not call a circle); over 216
    single-subject prompts at 4 seeds the class rate is 77% (chance 1/3: 6 of 18; 11 or more of 18 by chance has a
    probability of about 1.4%)."""
    from diffusers_attn_ext.world.judge import score_prompts
    from diffusers_attn_ext.world.vocabulary import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES

    backgrounds = list(BACKGROUND_COLOURS)
    prompts = [f"a {colour} {shape} on a {backgrounds[(i + j + 2) % 3]} background"
               for i, colour in enumerate(OBJECT_COLOURS) for j, shape in enumerate(SHAPES)]
    assert prompts[0] == "a red circle on a white background"
    images = shipped_pipe(prompts, **_call(num_inference_steps=10)).images
    scores = score_prompts(shipped_judge, images, prompts)
    assert scores["colour"][0] == 1.0 and scores["class"][0] == 1.0  # the red circle
    assert scores["colour"].sum() >= 16 and scores["class"].sum() >= 11, (scores["colour"], scores["class"])
