"""The attention inspector: blockwise statistics against the explicit float64 map, planted patterns through
installed processors, head importance as HeadHunter candidates, plots, and bad inputs."""

import json

import pytest
import torch
from conftest import run

from diffusers_attn_ext import StockAttnProcessor, install
from diffusers_attn_ext.context import TokenGrid
from diffusers_attn_ext.families.base import AttentionCall
from diffusers_attn_ext.inspect import (
    AttentionInspector,
    HeadPerturbation,
    attention_statistics,
    head_importance,
    inspect_pipeline,
)
from diffusers_attn_ext.inspect.statistics import sampled_query_rows
from diffusers_attn_ext.masks import ExtrapolationWindow, ultravico_score_mod
from diffusers_attn_ext.processors.base import AttnExtProcessor
from diffusers_attn_ext.processors.ultravico import UltraViCoProcessor
from diffusers_attn_ext.testing import tiny_call_kwargs

GRID = TokenGrid(frames=3, height=2, width=3)
TEXT = 4


def _call(text_first=True, batch=2, heads=3, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = TEXT + GRID.num_tokens
    q, k, v = (torch.randn(batch, n, heads, head_dim, generator=g, dtype=torch.float64) for _ in range(3))
    text, visual = (slice(0, TEXT), slice(TEXT, n)) if text_first else (slice(GRID.num_tokens, n), slice(0, GRID.num_tokens))
    return AttentionCall(module=torch.nn.Identity(), family="cogvideox", kind="joint", query=q, key=k, value=v,
                         text=text, visual=visual, context=None)


def _explicit_statistics(call, heads, map_rows):
    """Every statistic from the explicit float64 N x N map (the definitions of inspect.statistics)."""
    q, k = call.query.transpose(1, 2)[:, heads], call.key.transpose(1, 2)[:, heads]
    n = q.shape[2]
    scores = q @ k.transpose(-1, -2) * call.head_dim**-0.5  # [B, H, N, N]
    idx = torch.arange(n)
    for mod in call.score_mods:
        scores = mod(scores, torch.arange(q.shape[0]).view(-1, 1, 1, 1), torch.tensor(heads).view(1, -1, 1, 1),
                     idx.view(1, 1, -1, 1), idx.view(1, 1, 1, -1))
    if call.block_mask is not None:
        keep = call.block_mask[:, heads][:, :, idx[:, None] // call.block_size, idx[None, :] // call.block_size]
        scores = scores.masked_fill(~keep, float("-inf"))
    p = scores.softmax(-1)
    vis = torch.arange(call.visual.start, call.visual.stop)
    local = vis - call.visual.start
    frame, y, x = local // GRID.tokens_per_frame, local % GRID.tokens_per_frame // GRID.width, local % GRID.width
    temporal_distance = (frame[:, None] - frame[None, :]).abs()
    spatial_distance = torch.maximum((y[:, None] - y[None, :]).abs(), (x[:, None] - x[None, :]).abs())
    rows = p[:, :, vis]  # [B, H, Nv, N]
    on_visual = rows[..., vis]
    mean = lambda t: t.mean((0, 2))  # noqa: E731 - over batch rows and visual queries
    return {
        "text_mass": mean(rows[..., call.text].sum(-1)) if call.text is not None else torch.zeros(len(heads), dtype=torch.float64),
        "entropy": mean(-(rows * rows.clamp(min=1e-300).log()).sum(-1)),
        "temporal": torch.stack([mean((on_visual * (temporal_distance == d)).sum(-1)) for d in range(GRID.frames)], -1),
        "spatial": torch.stack([mean((on_visual * (spatial_distance == d)).sum(-1)) for d in range(3)], -1),
        "received": rows.sum(2).mean(0) / len(vis),
        "maps": p[:, :, map_rows].mean(0),
    }


@pytest.mark.parametrize("text_first", [True, False])
@pytest.mark.parametrize("chunk_elements", [1, 50, 10**6])
def test_blockwise_statistics_equal_explicit_map_float64(text_first, chunk_elements):
    call = _call(text_first)
    window = ExtrapolationWindow(frame_tokens=GRID.tokens_per_frame, train_frames=1, video_start=call.visual.start,
                                 video_tokens=GRID.num_tokens)
    call.score_mods += [ultravico_score_mod(window, 0.7),
                        lambda s, b, h, q, kv: s + 0.3 * h - 0.2 * b + 0.1 * ((q - kv) % 3)]
    blocks = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.5
    call.block_mask, call.block_size = blocks | torch.eye(6, dtype=torch.bool), 4
    heads = (0, 2)
    map_rows = sampled_query_rows(call.visual, samples=5, full_map_tokens=4)
    assert len(map_rows) == 5
    stats = attention_statistics(call, heads, GRID, chunk_elements=chunk_elements, map_rows=map_rows)
    expected = _explicit_statistics(call, list(heads), map_rows)
    for name, value in expected.items():
        torch.testing.assert_close(getattr(stats, name), value, rtol=1e-12, atol=1e-12, msg=name)
    assert (stats.temporal.sum(-1) + stats.text_mass).sub(1).abs().max() < 1e-12


def test_statistics_without_text_and_full_maps():
    call = _call()
    call.text, call.visual = None, slice(0, GRID.num_tokens)
    call.query, call.key = call.query[:, TEXT:], call.key[:, TEXT:]
    rows = sampled_query_rows(call.visual, samples=2, full_map_tokens=256)
    assert torch.equal(rows, torch.arange(GRID.num_tokens))
    stats = attention_statistics(call, (1,), GRID, chunk_elements=7, map_rows=rows)
    expected = _explicit_statistics(call, [1], rows)
    assert torch.equal(stats.text_mass, torch.zeros(1, dtype=torch.float64))
    for name, value in expected.items():
        torch.testing.assert_close(getattr(stats, name), value, rtol=1e-12, atol=1e-12, msg=name)
    assert stats.visual_maps().shape == (1, GRID.num_tokens, GRID.frames, GRID.height, GRID.width)


class PlantedPattern(AttnExtProcessor):
    """Head 0 attends only to visual keys of its own frame, head 1 only to text keys (a score mod)."""

    def applies_to(self, call):
        return call.is_self_attention

    def edit_attention(self, call):
        grid, visual, text = call.context.grid, call.visual, call.text

        def planted(score, b, h, q_idx, kv_idx):
            q_frame = (q_idx - visual.start) // grid.tokens_per_frame
            kv_frame = (kv_idx - visual.start) // grid.tokens_per_frame
            kv_visual = (kv_idx >= visual.start) & (kv_idx < visual.stop)
            kv_text = (kv_idx >= text.start) & (kv_idx < text.stop)
            keep = torch.where(h == 0, kv_visual & (q_frame == kv_frame), kv_text)
            return score.masked_fill(~keep, float("-inf"))

        call.score_mods.append(planted)


def test_planted_patterns_through_an_installed_method(pipe_for):
    pipe = pipe_for("cogvideox")
    inspector = AttentionInspector(layers=r"transformer_blocks\.1\.attn1", steps=[1])
    install(pipe, PlantedPattern(), inspector)
    run(pipe, "cogvideox")
    assert list(inspector.records) == ["transformer_blocks.1.attn1"]
    assert list(inspector.step_records["transformer_blocks.1.attn1"]) == [1]
    stats = inspector.layer_statistics("transformer_blocks.1.attn1")
    own_frame, text_only = 0, 1
    torch.testing.assert_close(stats.temporal[own_frame], torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert stats.text_mass[own_frame] == 0
    torch.testing.assert_close(stats.text_mass[text_only], torch.tensor(1.0, dtype=torch.float64))
    assert stats.temporal[text_only].sum() == 0 and stats.spatial[text_only].sum() == 0
    summary = inspector.summary()["layers"]["transformer_blocks.1.attn1"]
    assert summary["steps"] == [1] and summary["heads"] == [0, 1]
    assert all(key < 16 for key, _ in summary["sinks"][text_only])  # text keys (CogVideoX: text first)


def test_inspector_records_what_runs_and_changes_nothing(pipe_for, stock_outputs):
    pipe = pipe_for("wan")
    plain = AttentionInspector(heads=[1])
    output, _ = inspect_pipeline(pipe, inspector=plain, **tiny_call_kwargs("wan"))
    assert torch.equal(torch.as_tensor(output[0]), stock_outputs("wan"))
    assert set(plain.records) == {"blocks.0.attn1", "blocks.1.attn1"} and all(len(s) == 2 for s in plain.step_records.values())
    damped = AttentionInspector(heads=[1])
    inspect_pipeline(pipe, UltraViCoProcessor(alpha=0.5, train_frames=1), inspector=damped, **tiny_call_kwargs("wan"))
    steps = plain.step_records["blocks.1.attn1"]
    merged = plain.layer_statistics("blocks.1.attn1")
    torch.testing.assert_close(sum(p.temporal_sum for p in steps.values()), merged.temporal_sum)
    assert sum(p.rows for p in steps.values()) == merged.rows
    far = lambda inspector: inspector.layer_statistics("blocks.1.attn1").temporal[0, 1:].sum()  # noqa: E731
    assert far(damped) != far(plain)
    assert all(type(p).__name__ == "WanAttnProcessor" for p in pipe.transformer.attn_processors.values())
    rows = merged.rows
    inspect_pipeline(pipe, inspector=plain, **tiny_call_kwargs("wan"))  # a second run records that run only
    assert plain.layer_statistics("blocks.1.attn1").rows == rows


def test_save_writes_summary_and_plots(pipe_for, tmp_path):
    pipe = pipe_for("sd3")
    _, inspector = inspect_pipeline(pipe, StockAttnProcessor(), inspector=AttentionInspector(steps=[0]),
                                    **tiny_call_kwargs("sd3"))
    files = inspector.save(tmp_path)
    assert all(path.exists() for path in files)
    summary = json.loads((tmp_path / "summary.json").read_text())
    layer = summary["layers"]["transformer_blocks.0.attn"]
    assert layer["grid"] == [1, 8, 8] and len(layer["spatial_profile"][0]) == 8
    assert list(layer["by_step"]) == ["0"] and layer["by_step"]["0"]["entropy"] == layer["entropy"]
    assert abs(layer["text_mass"][0] + sum(layer["temporal_profile"][0]) - 1) < 1e-5
    assert (tmp_path / "heads_entropy.png").exists() and (tmp_path / "transformer_blocks_1_attn_maps.png").exists()


def test_head_importance_feeds_headhunter(pipe_for):
    from diffusers_attn_ext import headhunter
    from diffusers_attn_ext.objectives import colorfulness

    pipe = pipe_for("sd3")
    result = head_importance(pipe, mode="zero", progress=False, **tiny_call_kwargs("sd3"))
    assert len(result.scores) == 4 and all(score > 0 for score in result.scores.values())
    matrix, layers, heads = result.matrix()
    assert matrix.shape == (2, 2) and layers == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    top = result.top(2)
    assert [result.scores[pair] for pair in top] == sorted(result.scores.values(), reverse=True)[:2]
    assert len(result.headset(3)) == 3
    hunt = headhunter.search(pipe, colorfulness, [tiny_call_kwargs("sd3")], candidates=top, rounds=1, per_round=1,
                             progress=False)
    assert set(hunt.rounds[0].scores) == set(top)
    assert all(type(p).__name__ == "JointAttnProcessor2_0" for p in pipe.transformer.attn_processors.values())


def test_head_perturbation_replaces_one_head():
    call = _call()
    out = torch.randn_like(call.query)
    identity = HeadPerturbation(1, "identity").edit_output(call, out)
    zero = HeadPerturbation(2, "zero").edit_output(call, out)
    assert torch.equal(identity[:, :, 1], call.value[:, :, 1]) and torch.equal(identity[:, :, [0, 2]], out[:, :, [0, 2]])
    assert torch.equal(zero[:, :, 2], torch.zeros_like(out[:, :, 2])) and torch.equal(zero[:, :, :2], out[:, :, :2])


def test_plots_return_figures_and_save(tmp_path):
    import matplotlib.pyplot as plt

    from diffusers_attn_ext.plotting import plot_decay_profiles, plot_layer_head, plot_query_maps

    call = _call()
    stats = attention_statistics(call, (0, 1), GRID, map_rows=torch.tensor([4, 10]))
    figures = [
        plot_layer_head(torch.rand(2, 3), ["a", "b"], path=tmp_path / "heads.png"),
        plot_decay_profiles(stats.temporal, ["head 0", "head 1"], path=tmp_path / "decay.png"),
        plot_query_maps(stats, path=tmp_path / "maps.png"),
    ]
    assert all(isinstance(f, plt.Figure) for f in figures)
    assert all((tmp_path / name).stat().st_size > 0 for name in ("heads.png", "decay.png", "maps.png"))
    for figure in figures:
        plt.close(figure)


def test_bad_inputs_name_the_parameter(pipe_for):
    pipe = pipe_for("wan")
    for kwargs, name in (({"layers": r"blocks\.7\.attn1"}, "layers"), ({"layers": r"blocks\.0\.attn2"}, "layers"),
                         ({"heads": [2]}, "heads")):
        with pytest.raises(ValueError, match=name):
            inspect_pipeline(pipe, inspector=AttentionInspector(**kwargs), **tiny_call_kwargs("wan"))
    for kwargs, name in (({"heads": [-1]}, "heads"), ({"steps": [1.5]}, "steps"), ({"steps": []}, "steps"),
                         ({"layers": "("}, "layers"), ({"chunk_elements": 0}, "chunk_elements"),
                         ({"sampled_rows": -1}, "sampled_rows")):
        with pytest.raises(ValueError, match=name):
            AttentionInspector(**kwargs)
    with pytest.raises(ValueError, match="heads has index 5; allowed range for blocks.0.attn1: 0..1"):
        install(pipe, AttentionInspector(heads=[5]))  # refused at install, before any model work
    with pytest.raises(ValueError, match="no attention call was recorded"):
        AttentionInspector(steps=[50]).summary()
    with pytest.raises(ValueError, match="statistic"):
        AttentionInspector().layer_head_matrix("mass")
    with pytest.raises(ValueError, match="mode"):
        head_importance(pipe, mode="prune", **tiny_call_kwargs("wan"))
    with pytest.raises(ValueError, match="unknown layer"):
        head_importance(pipe, candidates=["blocks.9"], **tiny_call_kwargs("wan"))
    with pytest.raises(ValueError, match="head"):
        HeadPerturbation(-1)
    with pytest.raises(ValueError, match="k="):
        head_importance(pipe, candidates=[("blocks.0", 0)], progress=False, **tiny_call_kwargs("wan")).top(0)
    stock = dict(pipe.transformer.attn_processors)
    pipe.transformer.set_attn_processor(AttentionInspector())  # no context attached
    try:
        with pytest.raises(ValueError, match="install"):
            run(pipe, "wan")
    finally:
        pipe.transformer.set_attn_processor(stock)


def test_subpackage_does_not_shadow_the_standard_library():
    import importlib
    import inspect as stdlib_inspect

    import diffusers_attn_ext.inspect as ours
    from diffusers_attn_ext import context

    assert ours.__name__ == "diffusers_attn_ext.inspect" and stdlib_inspect.__name__ == "inspect"
    assert context.inspect is importlib.import_module("inspect") and hasattr(context.inspect, "signature")


def test_clustering_separates_planted_kinds_of_heads(pipe_for, tmp_path):
    from diffusers_attn_ext.inspect import cluster_heads

    pipe = pipe_for("cogvideox")
    inspector = AttentionInspector()
    install(pipe, PlantedPattern(), inspector)
    run(pipe, "cogvideox")
    clusters = cluster_heads(inspector, k=2)
    layers = list(inspector.records)
    assert len(layers) >= 2 and len(clusters.heads) == 2 * len(layers)
    own_frame = {clusters.labels[i].item() for i, (_, head) in enumerate(clusters.heads) if head == 0}
    text_only = {clusters.labels[i].item() for i, (_, head) in enumerate(clusters.heads) if head == 1}
    assert len(own_frame) == 1 and len(text_only) == 1 and own_frame != text_only  # one cluster per kind
    assert clusters.members(text_only.pop()) == [(layer, 1) for layer in layers]
    assert clusters.centroids[own_frame.pop(), 0] == 1.0  # all mass at temporal distance 0
    figure = clusters.plot(path=tmp_path / "clusters.png")
    assert (tmp_path / "clusters.png").exists()
    import matplotlib.pyplot as plt

    plt.close(figure)
    n = len(clusters.heads)
    with pytest.raises(ValueError, match=f"k={n + 1} is outside the allowed range: an integer in 1..{n}"):
        cluster_heads(inspector, k=n + 1)
    with pytest.raises(ValueError, match="cluster=2 is outside"):
        clusters.members(2)
    with pytest.raises(ValueError, match="no records"):
        cluster_heads(AttentionInspector(), k=1)


def test_kmeans_finds_three_separated_groups():
    from diffusers_attn_ext.inspect.clustering import kmeans

    generator = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0, 0.0], [5.0, 0.0, 0.0], [0.0, 5.0, 5.0]], dtype=torch.float64)
    truth = torch.arange(3).repeat_interleave(10)
    points = centers[truth] + 0.1 * torch.randn(30, 3, generator=generator, dtype=torch.float64)
    labels, centroids = kmeans(points, 3, seed=1)
    for group in range(3):  # each true group is exactly one cluster
        assert labels[truth == group].unique().numel() == 1
    assert labels.unique().numel() == 3
    torch.testing.assert_close(centroids[labels[0]], points[:10].mean(dim=0))
    assert torch.equal(kmeans(points, 3, seed=1)[0], labels)  # deterministic for a seed
    with pytest.raises(ValueError, match="k=0"):
        kmeans(points, 0)
