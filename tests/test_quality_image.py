"""The image quality metrics (world/image_tasks.py) on the world's ground truth, and benchmarks/quality_image.py's
isolation-only ablation and report on tiny inputs (no benchmark run)."""

import dataclasses
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from diffusers_attn_ext.install import installed
from diffusers_attn_ext.subjects import SubjectLayout
from diffusers_attn_ext.testing import tiny_call_kwargs
from diffusers_attn_ext.world import image_caption, parse_image_caption, render_image_scenes, sample_image_scene
from diffusers_attn_ext.world.image_scenes import ImageScene, ImageSubject
from diffusers_attn_ext.world.image_tasks import (
    consistency,
    descriptor,
    detected_token_masks,
    fusion,
    similarity,
    story_scenes,
    story_scores,
)

ROOT = Path(__file__).resolve().parent.parent


def render(scenes):
    return render_image_scenes(scenes).images


def test_similarity_is_the_float64_formula_and_one_only_for_equal_descriptors():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, generator=g), torch.randn(50, generator=g)
    a64, b64 = a.double(), b.double()
    expected = 2 * float((a64 * b64).sum()) / (float((a64 * a64).sum()) + float((b64 * b64).sum()))
    assert similarity(a, b) == pytest.approx(expected, abs=1e-12)
    assert similarity(a, a) == pytest.approx(1.0, abs=1e-12)
    assert similarity(a, 2 * a) == pytest.approx(0.8, abs=1e-12)  # scale matters: 2*2 / (1 + 4)
    assert similarity(a, -a) == pytest.approx(-1.0, abs=1e-12)


def test_story_targets_name_the_reference_subjects_and_keep_identity_only_when_asked():
    for index in range(4):
        same, independent = story_scenes(index), story_scenes(index, same_identity=False)
        reference = same[0]
        assert independent[0] == reference and len(same) == 4
        names = {s.name for s in reference.subjects}
        by_name = {s.name: s for s in reference.subjects}
        for a, b in zip(same[1:], independent[1:], strict=True):
            for scene in (a, b):
                assert {s.name for s in scene.subjects} == names
                assert parse_image_caption(image_caption(scene)).subjects == tuple(
                    ImageSubject(s.shape, s.colour) for s in scene.subjects)
                xs = [s.centre[0] for s in scene.subjects]
                assert xs == sorted(xs)  # captions name subjects left to right
            for s in a.subjects:
                ref = by_name[s.name]
                assert (s.rotation, s.pattern, s.pattern_phase, s.shade) == (ref.rotation, ref.pattern,
                                                                              ref.pattern_phase, ref.shade)
            assert any(s.rotation != by_name[s.name].rotation for s in b.subjects)
            # the same layout (slots) in both variants
            assert [s.centre for s in a.subjects] == [s.centre for s in b.subjects]


def test_consistency_is_high_for_one_subject_and_lower_for_independent_identities():
    same, independent = [], []
    for index in range(8):
        for scenes, out in ((story_scenes(index), same), (story_scenes(index, same_identity=False), independent)):
            out.append(story_scores(render(scenes), scenes[0])["consistency"])
    assert min(same) > 0.8
    assert sum(same) / len(same) > sum(independent) / len(independent) + 0.1
    scene = story_scenes(0)[0]
    image = render([scene])[0]
    assert consistency(image, image, scene.subjects[0].colour) == pytest.approx(1.0, abs=1e-9)
    # a subject not in the image: no descriptor, NaN consistency
    absent = next(c for c in ("red", "yellow", "green", "cyan", "blue", "magenta")
                  if c not in {s.colour for s in scene.subjects})
    assert descriptor(image, absent) is None and math.isnan(consistency(image, image, absent))


def test_pattern_changes_lower_consistency_at_the_same_outline():
    scene = story_scenes(1)[0]
    subject = scene.subjects[0]
    plain = dataclasses.replace(subject, pattern="plain")
    striped = dataclasses.replace(subject, pattern="striped", shade=0.5)
    images = render([ImageScene((plain, scene.subjects[1]), scene.background),
                     ImageScene((striped, scene.subjects[1]), scene.background)])
    assert consistency(images[0], images[1], subject.colour) < 0.9
    assert consistency(images[0], images[1], scene.subjects[1].colour) == pytest.approx(1.0, abs=1e-9)


def test_world_scenes_never_fuse_and_stories_score_no_fusion():
    for seed in range(40):
        scene = sample_image_scene(1000 + seed, num_subjects=2)
        row = fusion(render([scene])[0], scene.subjects[0].colour, scene.subjects[1].colour)
        assert row["fused"] == 0.0 and row["contact"] < 0.05 and row["box_overlap"] == 0.0
    scenes = story_scenes(2)
    scores = story_scores(render(scenes), scenes[0])
    assert scores["fusion"] == 0.0 and scores["found"] == 1.0


def test_fusion_detects_overlapping_blended_and_missing_subjects():
    scene = sample_image_scene(7, num_subjects=2)
    a, b = scene.subjects
    # the second subject drawn over the first (the world never samples this)
    overlapping = ImageScene((a, dataclasses.replace(b, centre=(a.centre[0] + 0.05, a.centre[1]), radius=a.radius)),
                             scene.background)
    row = fusion(render([overlapping])[0], a.colour, b.colour)
    assert row["merged"] == 1.0 and row["fused"] == 1.0
    # one blob, half of each colour: a blend of the two subjects
    image = render([ImageScene((dataclasses.replace(a, pattern="plain"),), scene.background)])[0]
    from diffusers_attn_ext.world.image_tasks import subject_mask
    from diffusers_attn_ext.world.vocabulary import OBJECT_COLOURS
    mask = subject_mask(image, a.colour)
    cols = mask.nonzero()[:, 1]
    right = mask & (torch.arange(mask.shape[1])[None, :] >= cols.float().median())
    image[:, right] = torch.tensor(OBJECT_COLOURS[b.colour]).view(3, 1)
    row = fusion(image, a.colour, b.colour)
    assert row["merged"] == 1.0 and row["contact"] > 0.1
    # only one of the two subjects drawn
    alone = render([ImageScene((a,), scene.background)])[0]
    row = fusion(alone, a.colour, b.colour)
    assert row["missing"] == 1.0 and row["fused"] == 1.0
    scores = story_scores(torch.stack([render([scene])[0], alone]), scene)
    assert scores["fusion"] == 1.0 and scores["missing"] == 1.0 and scores["found"] == 0.5


def test_detected_token_masks_cover_each_subject_and_fall_back_to_the_nominal_boxes():
    scene = sample_image_scene(11, num_subjects=2)
    image = render([scene])[0]
    masks, detected = detected_token_masks(image, scene, 8)
    assert detected and set(masks) == {s.name for s in scene.subjects}
    a, b = masks.values()
    assert a.any() and b.any() and not (a & b).any()
    for s, m in zip(scene.subjects, masks.values(), strict=True):
        row, col = int(s.centre[1] * 8), int(s.centre[0] * 8)
        assert m[row, col]  # the token under the subject's centre is its own
    blank = torch.full_like(image, 0.5)
    fallback, detected = detected_token_masks(blank, scene, 8)
    assert not detected
    a, b = fallback.values()
    assert a.any() and b.any() and not (a & b).any()
    SubjectLayout.from_boxes([masks, fallback], [image_caption(scene)] * 2)  # valid IR-Diffusion regions


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="images"):
        story_scenes(0, 1)
    with pytest.raises(ValueError, match="index"):
        story_scenes(-1)
    with pytest.raises(ValueError, match="image"):
        descriptor(torch.zeros(1, 3, 8, 8), "red")
    with pytest.raises(ValueError, match="grid"):
        detected_token_masks(torch.zeros(3, 32, 32), sample_image_scene(0, num_subjects=2), 5)
    with pytest.raises(ValueError, match="colour"):
        fusion(torch.zeros(3, 8, 8), "red", "purple")


def _benchmark():
    if str(ROOT / "benchmarks") not in sys.path:  # its sibling quality_common, as when run as a script
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("quality_image_benchmark", ROOT / "benchmarks" / "quality_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BOXES = [{"dog": (0.0, 0.25, 0.5, 1.0), "cat": (0.5, 0.25, 1.0, 1.0)},
         {"dog": (0.5, 0.0, 1.0, 0.5), "cat": (0.0, 0.5, 0.25, 1.0)}]


def test_isolation_only_targets_ignore_the_reference_and_reposition_does_not(tiny_pipes):
    """Isolation alone takes no reference key: a target is the same whatever the reference row holds; with
    reposition it changes. The reference row is stock in both."""
    bench = _benchmark()
    from diffusers_attn_ext.processors.isolation_reposition import IsolationRepositionProcessor

    pipe = tiny_pipes("flux")
    layout = SubjectLayout.from_boxes(BOXES)

    def run(processor, reference_seed):
        kwargs = tiny_call_kwargs("flux", batch_size=2)
        other = tiny_call_kwargs("flux", seed=reference_seed, batch_size=2)
        for name in ("prompt_embeds", "pooled_prompt_embeds"):  # only the reference's prompt differs
            kwargs[name][0] = other[name][0]
        with installed(pipe, processor):
            return pipe(**kwargs).images

    isolation = [run(bench.IsolationOnlyProcessor(layout), seed) for seed in (0, 1)]
    both = [run(IsolationRepositionProcessor(layout), seed) for seed in (0, 1)]
    stock = pipe(**tiny_call_kwargs("flux", batch_size=2)).images
    torch.testing.assert_close(isolation[0][1], isolation[1][1], rtol=0, atol=1e-6)
    assert not torch.allclose(isolation[0][0], isolation[1][0], atol=1e-4)  # the reference did change
    assert not torch.allclose(both[0][1], both[1][1], atol=1e-4)
    torch.testing.assert_close(isolation[0][0], stock[0], rtol=0, atol=1e-5)
    assert not torch.allclose(isolation[0][1], stock[1], atol=1e-4)  # isolation changes the target


def test_report_renders_every_section():
    bench = _benchmark()
    seeds = [0.5, 0.7]
    ir = {k: seeds for k in ("consistency", "pattern_agreement", "fusion", "missing", "merged", "colour", "class",
                             "regions detected")}
    judged = {"colour": seeds, "class": seeds, "confidence": seeds, "frechet": 3.0, "seconds": 1.0}
    results = {"ir/stock": {**ir, "seconds": 2.0}, "ir/ground truth, same identities": ir,
               "pag/search": {"heads": {"transformer_blocks.0.attn": [1]}, "prompts": ["p"], "rounds": 1,
                              "per_round": 1, "seconds": 5.0, "generations": 31,
                              "round_records": [{"base": 0.1, "selected": [["transformer_blocks.0.attn", 1]],
                                                 "top": [["transformer_blocks.0.attn", 1, 0.2]]}]},
               "pag/random heads": {"single_transformer_blocks.0.attn": [2]},
               "pag/CFG 4": judged, "pag/ground truth": {**judged, "frechet": 0.0},
               "entropy/16/stock": judged, "entropy/64/entropy scaling": judged}
    text = bench.report(results)
    for needle in ("| stock | 0.600 ± 0.196", "31 generations", "transformer_blocks.0.attn [1]", "| CFG 4 | 0.60",
                   "at 16x16", "at 64x64", "| ground truth | 0.60 ± 0.20 | 0.60 ± 0.20 | 0.60 ± 0.20 | n/a |"):
        assert needle in text, needle
