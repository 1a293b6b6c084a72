"""HeadHunter search, built-in objectives, the benchmark's CPU crash test and the notebook."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from diffusers_attn_ext import headhunter
from diffusers_attn_ext.headset import HeadSet
from diffusers_attn_ext.install import attention_modules
from diffusers_attn_ext.objectives import colorfulness, contrast, sharpness, similarity_to
from diffusers_attn_ext.pipelines.head_pag import FluxHeadPAGPipeline, StableDiffusion3HeadPAGPipeline
from diffusers_attn_ext.testing import tiny_call_kwargs

ROOT = Path(__file__).resolve().parent.parent
HEAD_PAG = {"sd3": StableDiffusion3HeadPAGPipeline, "flux": FluxHeadPAGPipeline}


def images_with(pipe, family, heads, seeds):
    """The images the search generates for its prompts with ``heads`` (same seeds, scale and alpha)."""
    return torch.cat([torch.as_tensor(pipe(**tiny_call_kwargs(family, seed=seed), pag_heads=heads, pag_scale=3.0,
                                           pag_alpha=1.0)[0]) for seed in seeds])


@pytest.mark.parametrize(("family", "planted"), [("sd3", ("transformer_blocks.0.attn", 1)),
                                                 ("flux", ("single_transformer_blocks.0.attn", 1))])
def test_search_finds_a_planted_head_in_the_first_round(tiny_pipes, family, planted):
    """An objective that rewards exactly one head (closeness to the images guided by that head alone)."""
    pipe = HEAD_PAG[family].from_pipe(tiny_pipes(family))
    seeds = (0, 1)
    objective = similarity_to(images_with(pipe, family, HeadSet.from_pairs([planted]), seeds))
    prompts = [tiny_call_kwargs(family, seed=seed) for seed in seeds]
    result = headhunter.search(pipe, objective, prompts, rounds=1, per_round=1, progress=False)
    assert result.rounds[0].selected == (planted,)
    assert result.headset.pairs == (planted,)
    best = result.ranking(0)[0]
    assert best[:3] == (*planted, 0.0) and best[3] > 0  # exactly the reference images: score 0, a gain
    assert len(result.rounds[0].scores) == sum(module.heads for module in attention_modules(pipe.transformer).values())


def test_greedy_rounds_grow_the_set_and_stop_without_gain(tiny_pipes, tmp_path):
    pipe = tiny_pipes("sd3")  # a plain pipeline: search builds the head-PAG one with from_pipe
    prompts = [tiny_call_kwargs("sd3", seed=0)]
    result = headhunter.search(pipe, "colorfulness", prompts, rounds=2, per_round=2, require_gain=False,
                               candidates=["transformer_blocks.0", "transformer_blocks.1"], progress=False)
    assert [len(r.selected) for r in result.rounds] == [2, 2] and len(result.headset) == 4
    first = result.rounds[0]
    assert set(result.rounds[1].scores) == {head for head in first.scores if head not in first.selected}
    assert result.rounds[1].base_score == pytest.approx(  # round 2 starts from the score of round 1's set
        headhunter._Evaluator(headhunter.head_pag_pipeline(pipe), colorfulness, prompts, [0],
                              {"pag_scale": 3.0, "pag_alpha": 1.0})(HeadSet.from_pairs(result.rounds[0].selected)))

    flat = headhunter.search(pipe, lambda images, prompts: torch.zeros(len(images)), prompts, rounds=3, progress=False)
    assert len(flat.rounds) == 1 and flat.rounds[0].selected == () and len(flat.headset) == 0

    started = headhunter.search(pipe, contrast, prompts, rounds=1, per_round=1, require_gain=False,
                                initial=HeadSet({"transformer_blocks.1": [0]}), progress=False)
    assert ("transformer_blocks.1.attn", 0) in started.headset.pairs and len(started.headset) == 2
    assert ("transformer_blocks.1.attn", 0) not in started.rounds[0].scores


def test_result_table_heat_map_and_files(tiny_pipes, tmp_path):
    result = headhunter.search(tiny_pipes("sd3"), sharpness, [tiny_call_kwargs("sd3")], rounds=1, per_round=1,
                               require_gain=False, progress=False)
    gains = result.gain_matrix(0)
    assert gains.shape == (2, 2) and not gains.isnan().any()
    layer, head, _, gain = result.ranking(0)[0]
    assert gains[result.layers.index(layer), head] == pytest.approx(gain) == pytest.approx(float(gains.max()))
    table = result.ranking_table(0)
    assert table.splitlines()[2].startswith(f"| 1 | {layer} | {head} (selected) |")
    result.save(tmp_path)
    assert HeadSet.load(tmp_path / "headset.json").pairs == ((layer, head),)
    assert json.loads((tmp_path / "rounds.json").read_text())["rounds"][0]["selected"] == [[layer, head]]
    assert (tmp_path / "gains.png").stat().st_size > 0 and "## Round 1" in (tmp_path / "ranking.md").read_text()


def test_search_bad_input(tiny_pipes):
    pipe, prompts = tiny_pipes("sd3"), [tiny_call_kwargs("sd3")]
    with pytest.raises(ValueError, match=r"rounds=0 is outside the allowed range: an integer >= 1"):
        headhunter.search(pipe, contrast, prompts, rounds=0)
    with pytest.raises(ValueError, match=r"objective='pickscore' is not one of \['colorfulness', 'contrast', 'sh"):
        headhunter.search(pipe, "pickscore", prompts)
    with pytest.raises(ValueError, match=r"heads has unknown layer 'transformer_blocks.5'"):
        headhunter.search(pipe, contrast, prompts, candidates=["transformer_blocks.5"])
    with pytest.raises(ValueError, match=r"has head index 2; allowed range for transformer_blocks.0.attn: 0..1"):
        headhunter.search(pipe, contrast, prompts, candidates=[("transformer_blocks.0", 2)])
    with pytest.raises(ValueError, match=r"seeds has 2 values for 1 prompts"):
        headhunter.search(pipe, contrast, prompts, seeds=[0, 1])


def test_builtin_objectives_on_synthetic_images():
    gray = torch.full((1, 3, 8, 8), 0.5)
    checker = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2).float().expand(1, 3, 8, 8)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    assert contrast(gray).item() == 0 and contrast(checker).item() == pytest.approx(checker[0, 0].std().item())
    assert sharpness(gray).item() == 0 and sharpness(checker).item() > sharpness(0.5 * checker).item() > 0
    assert colorfulness(gray).item() == 0 and colorfulness(red).item() == pytest.approx(0.3 * (1 + 0.25) ** 0.5)
    assert similarity_to(gray)(gray).item() == 0 and similarity_to(gray)(red).item() < 0


def test_benchmark_runs_tiny_on_cpu(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("head_pag_benchmark", ROOT / "benchmarks" / "head_pag.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    monkeypatch.setenv("OUT", str(tmp_path))
    result = module.main(["--tiny"])
    written = json.loads((tmp_path / "head_pag.json").read_text())
    assert written["rows"] == result["rows"] and [row["batch"] for row in written["rows"]] == [2, 3, 3, 3]
    assert all(row["median_ms"] > 0 for row in written["rows"])
