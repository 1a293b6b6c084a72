"""Quality of the image methods on the shipped FLUX world image model, scored by the shipped judge.

    PYTHONPATH=. python benchmarks/quality_image.py --seeds 16 --threads 1 --results image_quality.json
    PYTHONPATH=. python benchmarks/quality_image.py --report --results image_quality.json      # markdown tables

Every image is drawn from its own CPU generator (``torch.Generator().manual_seed(...)``, one per image of a
batch), so an image does not depend on its batch and every method sees the same noise as stock. Calls use
``world.world_image_call`` (32x32, 20 steps, true CFG 4 with the empty negative prompt, 32 T5 tokens) unless a
row says otherwise. A "seed" is one unit of the 95% interval (``tasks.mean_interval``: mean +- 1.96 standard
errors over seeds): one story (IR) or a group of ``PER_SEED`` held-out prompts (PAG, entropy).

Sections (metrics: ``diffusers_attn_ext.world.image_tasks``, ``world.judge.score_prompts``):

- ``ir``: IR-Diffusion on story batches (``image_tasks.story_scenes``: a reference and 3 targets naming the
  same two subjects, layouts and backgrounds of other scenes): stock; *isolation* alone
  (``IsolationOnlyProcessor`` below: Isolation Attention without any reference key); isolation + reposition
  (``FluxMultiSubjectPipeline`` with its defaults: every layer and step, nearest, the authors' query dropout
  0.5). Regions: detected on the stock images of the same prompts and seeds (the authors detect masks on
  rehearsal images), on the 8x8 token grid; an image whose detection misses a subject uses its scene's
  nominal boxes. Scores on the targets: subject consistency to the reference, judge pattern agreement, fusion
  rate (missing or merged), and the judge's colour/class scores; ground-truth stories rendered with the same
  identities and with independent identities bound the consistency scale.
- ``pag``: held-out prompts (``evaluate_image.evaluation_scenes``): no guidance (true_cfg_scale 1), CFG 4,
  CFG 4 + layer PAG (``FluxHeadPAGPipeline`` with all 5 heads of ``transformer_blocks.1``, alpha 1, identity
  "image", which is diffusers' PAG attention processor on that layer: diffusers has no FLUX PAG pipeline, and
  ``transformer_blocks.1`` is the analogue of diffusers' SD3 PAG default ``blocks.1``), CFG 4 + SoftPAG on the
  heads ``headhunter.search`` picks with ``world.judge_objective`` (judge confidence) on other prompts
  (``image_tasks.SEARCH_OFFSET``), and CFG 4 + SoftPAG on as many random heads (``random.Random(0)``). PAG
  scale 3 (the search's default) for every PAG row. Scores: judge colour, class, confidence per image; a
  Frechet distance of judge features against the same scenes rendered (one number over all images).
- ``entropy``: the same held-out prompts at 16x16 and 64x64 (0.5x and 2x the trained 32x32; 16 and 256 image
  tokens against the trained 64), stock vs ``EntropyScalingProcessor(train_tokens=64)``; the judge reads every
  image resized to its trained 32x32 (``WorldJudge.prepare``: area averaging down from 64, bilinear up from
  16), and the ground truth is rendered at the generated size and resized the same way.

Results are appended to ``--results`` as they finish (one key per configuration), so a cut run resumes.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import replace

import torch
from quality_common import open_results, quality_parser, read_results, run_sections

from diffusers_attn_ext.headhunter import candidate_heads, search
from diffusers_attn_ext.install import installed
from diffusers_attn_ext.pipelines.head_pag import FluxHeadPAGPipeline
from diffusers_attn_ext.pipelines.multi_subject import FluxMultiSubjectPipeline
from diffusers_attn_ext.processors.entropy_scaling import EntropyScalingProcessor
from diffusers_attn_ext.processors.isolation_reposition import IsolationRepositionProcessor
from diffusers_attn_ext.subjects import SubjectLayout
from diffusers_attn_ext.world import (
    image_caption,
    judge_objective,
    load_world_image_pipeline,
    load_world_judge,
    render_image_scenes,
    world_image_call,
)
from diffusers_attn_ext.world.evaluate_image import evaluation_scenes
from diffusers_attn_ext.world.image_tasks import (
    SEARCH_OFFSET,
    detected_token_masks,
    story_scenes,
    story_scores,
    task_scene,
)
from diffusers_attn_ext.world.judge import frechet_distance, judge_features, score_prompts
from diffusers_attn_ext.world.tasks import mean_interval

PER_SEED = 4
PAG_SCALE = 3.0
LAYER_PAG = "transformer_blocks.1"
TRAINED_TOKENS = 64
SIZES = (16, 64)
JUDGED = ("colour", "class", "confidence")


class IsolationOnlyProcessor(IsolationRepositionProcessor):
    """Isolation Attention alone (the ablation of IR-Diffusion, Sec. 3.2): a target subject's tokens attend their
    own image and text except the other subjects' tokens, and no reference key (every repositioned key of the
    plans removed); the reference rows and every other token are stock."""

    def step_plans(self, plans, step, state=None):
        return [[replace(t, ref_sources=t.ref_sources[:0], ref_weights=t.ref_weights[:0],
                         ref_positions=t.ref_positions[:0]) for t in image_plans] for image_plans in plans]


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], **call) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1]: one image per prompt, each from its own CPU generator; ``call`` updates
    ``world_image_call()``."""
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, **world_image_call(**call), generator=generators, output_type="pt").images.float().cpu()


def grid_of(pipe, size: int) -> int:
    return size // (pipe.vae_scale_factor * 2)


# ------------------------------------------------------------------------------------------------ ir
def run_ir(pipe, judge, seeds: list[int], steps: int, results: dict, save) -> None:
    multi = FluxMultiSubjectPipeline.from_pipe(pipe)
    multi.set_progress_bar_config(disable=True)
    stories = {i: story_scenes(i) for i in seeds}
    for name, same in (("ground truth, same identities", True), ("ground truth, independent identities", False)):
        key = f"ir/{name}"
        if key not in results:
            rows = []
            for i in seeds:
                scenes = story_scenes(i, same_identity=same)
                rows.append(story_scores(render_image_scenes(scenes).images, scenes[0], judge))
            results[key] = _columns(rows)
    methods = ("stock", "isolation", "isolation + reposition")
    if all(f"ir/{m}" in results for m in methods):
        return
    size = world_image_call()["height"]
    grid = grid_of(pipe, size)
    stock, layouts = {}, {}
    for method in methods:
        key = f"ir/{method}"
        if key in results:
            continue
        start = time.perf_counter()
        rows = []
        for i in seeds:
            scenes = stories[i]
            prompts = [image_caption(s) for s in scenes]
            noise = [1000 * i + j for j in range(len(scenes))]
            if i not in stock:
                stock[i] = generate(pipe, prompts, noise, num_inference_steps=steps)
                found = [detected_token_masks(img, s, grid) for img, s in zip(stock[i], scenes, strict=True)]
                # every image's regions are named by the reference's subjects (the same two names)
                names = [s.name for s in scenes[0].subjects]
                layouts[i] = ([{n: masks[n] for n in names} for masks, _ in found], sum(d for _, d in found))
            boxes, detected = layouts[i]
            if method == "stock":
                images = stock[i]
            elif method == "isolation":
                processor = IsolationOnlyProcessor(SubjectLayout.from_boxes(boxes, prompts))
                with installed(pipe, processor):
                    images = generate(pipe, prompts, noise, num_inference_steps=steps)
            else:
                images = generate(multi, prompts, noise, num_inference_steps=steps, subject_boxes=boxes)
            row = story_scores(images, scenes[0], judge)
            judged = score_prompts(judge, images[1:], scenes[1:])
            row.update({k: float(judged[k].mean()) for k in JUDGED})
            row["regions detected"] = detected / len(scenes)
            rows.append(row)
        results[key] = {**_columns(rows), "seconds": time.perf_counter() - start}
        save()


# ------------------------------------------------------------------------------------------------ pag
def _judged_rows(judge, images: torch.Tensor, scenes, seeds: list[int]) -> dict:
    scores = score_prompts(judge, images, scenes)
    rows = {k: [float(scores[k][n * PER_SEED:(n + 1) * PER_SEED].mean()) for n in range(len(seeds))] for k in JUDGED}
    truth = render_image_scenes(scenes, images.shape[-2], images.shape[-1]).images
    rows["frechet"] = frechet_distance(judge_features(judge, images), judge_features(judge, truth))
    return rows


def held_out(seeds: list[int]):
    scenes = evaluation_scenes(PER_SEED * (max(seeds) + 1))
    chosen = [scenes[PER_SEED * n + k] for n in seeds for k in range(PER_SEED)]
    return chosen, [PER_SEED * n + k for n in seeds for k in range(PER_SEED)]


def run_search(hp, judge, steps: int, prompts: int, rounds: int, per_round: int, results: dict, save) -> dict:
    key = "pag/search"
    if key in results:
        return results[key]
    objective = judge_objective(judge)
    calls = {"images": 0}

    def counted(images, texts=()):
        calls["images"] += images.shape[0]
        return objective(images, texts)

    counted.__name__ = "world_judge_confidence"
    texts = [image_caption(task_scene(SEARCH_OFFSET, i)) for i in range(prompts)]
    start = time.perf_counter()
    result = search(hp, counted, texts, rounds=rounds, per_round=per_round, pag_scale=PAG_SCALE, pag_alpha=1.0,
                    progress=False, seeds=[10_000 + i for i in range(prompts)],
                    **world_image_call(num_inference_steps=steps))
    results[key] = {
        "seconds": time.perf_counter() - start, "generations": calls["images"], "prompts": texts,
        "rounds": rounds, "per_round": per_round, "heads": {k: list(v) for k, v in result.headset.heads.items()},
        "round_records": [{"base": r.base_score, "selected": [list(h) for h in r.selected],
                           "top": [[layer, head, score] for layer, head, score, _ in result.ranking(n)[:8]]}
                          for n, r in enumerate(result.rounds)],
    }
    save()
    return results[key]


def run_pag(pipe, judge, seeds: list[int], steps: int, results: dict, save, search_prompts: int, rounds: int,
            per_round: int) -> None:
    hp = FluxHeadPAGPipeline.from_pipe(pipe)
    hp.set_progress_bar_config(disable=True)
    found = run_search(hp, judge, steps, search_prompts, rounds, per_round, results, save)
    heads = {layer: list(h) for layer, h in found["heads"].items()}
    count = sum(len(h) for h in heads.values())
    pool = candidate_heads(hp.transformer, None)
    random_heads: dict[str, list[int]] = {}
    for layer, head in sorted(random.Random(0).sample(pool, count)) if count else []:
        random_heads.setdefault(layer, []).append(head)
    results["pag/random heads"] = random_heads
    all_heads = list(range(hp.transformer.get_submodule(LAYER_PAG).attn.heads))
    configs = {
        "no guidance (true_cfg_scale 1)": dict(true_cfg_scale=1.0),
        "CFG 4": {},
        f"CFG 4 + layer PAG ({LAYER_PAG}, all heads)": dict(pag_heads={LAYER_PAG: all_heads}, pag_scale=PAG_SCALE),
        f"CFG 4 + SoftPAG, HeadHunter heads ({count})": dict(pag_heads=heads, pag_scale=PAG_SCALE),
        f"CFG 4 + SoftPAG, random heads ({count})": dict(pag_heads=random_heads, pag_scale=PAG_SCALE),
    }
    scenes, noise = held_out(seeds)
    prompts = [image_caption(s) for s in scenes]
    key = "pag/ground truth"
    if key not in results:
        results[key] = _judged_rows(judge, render_image_scenes(scenes).images, scenes, seeds)
    for name, kwargs in configs.items():
        key = f"pag/{name}"
        if key in results or (not count and "SoftPAG" in name):
            continue
        start = time.perf_counter()
        images = torch.cat([generate(hp, prompts[n:n + PER_SEED], noise[n:n + PER_SEED], num_inference_steps=steps,
                                     **kwargs) for n in range(0, len(prompts), PER_SEED)])
        results[key] = {**_judged_rows(judge, images, scenes, seeds), "seconds": time.perf_counter() - start}
        save()


# ------------------------------------------------------------------------------------------------ entropy
def run_entropy(pipe, judge, seeds: list[int], steps: int, results: dict, save) -> None:
    scenes, noise = held_out(seeds)
    prompts = [image_caption(s) for s in scenes]
    for size in SIZES:
        key = f"entropy/{size}/ground truth"
        if key not in results:
            results[key] = _judged_rows(judge, render_image_scenes(scenes, size, size).images, scenes, seeds)
        for method in ("stock", "entropy scaling"):
            key = f"entropy/{size}/{method}"
            if key in results:
                continue
            start = time.perf_counter()
            batches = []
            for n in range(0, len(prompts), PER_SEED):
                call = dict(num_inference_steps=steps, height=size, width=size)
                if method == "stock":
                    batches.append(generate(pipe, prompts[n:n + PER_SEED], noise[n:n + PER_SEED], **call))
                else:
                    with installed(pipe, EntropyScalingProcessor(train_tokens=TRAINED_TOKENS)):
                        batches.append(generate(pipe, prompts[n:n + PER_SEED], noise[n:n + PER_SEED], **call))
            results[key] = {**_judged_rows(judge, torch.cat(batches), scenes, seeds),
                            "seconds": time.perf_counter() - start}
            save()


def _columns(rows: list[dict]) -> dict[str, list[float]]:
    return {k: [r[k] for r in rows] for k in rows[0]}


# ------------------------------------------------------------------------------------------------ report
def _cell(values, digits: int = 2) -> str:
    if isinstance(values, (int, float)):
        return f"{values:.{digits}f}"
    mean, half = mean_interval(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if not math.isnan(half) else f"{mean:.{digits}f}"


def _judged_table(rows: dict) -> list[str]:
    lines = ["| images | colour | class | confidence | Frechet (judge features) | seconds |", "|---|---|---|---|---|---|"]
    for name, v in rows.items():
        seconds = f"{v['seconds']:.0f}" if "seconds" in v else ""
        frechet = "n/a" if name == "ground truth" else _cell(v["frechet"], 1)  # against itself: 0
        lines.append(f"| {name} | {_cell(v['colour'])} | {_cell(v['class'])} | {_cell(v['confidence'])} | "
                     f"{frechet} | {seconds} |")
    return lines


def report(results: dict) -> str:
    lines = []
    ir = {k[3:]: v for k, v in results.items() if k.startswith("ir/")}
    if ir:
        lines += ["### IR-Diffusion: story batches (reference + 3 targets naming the same two subjects)", "",
                  "| images | consistency | pattern agreement | fusion | missing | merged | colour | class | "
                  "regions detected | seconds |", "|---|---|---|---|---|---|---|---|---|---|"]
        for name, v in ir.items():
            extra = [_cell(v[k]) if k in v else "" for k in ("colour", "class", "regions detected")]
            seconds = f"{v['seconds']:.0f}" if "seconds" in v else ""
            lines.append(f"| {name} | {_cell(v['consistency'], 3)} | {_cell(v['pattern_agreement'])} | "
                         f"{_cell(v['fusion'])} | {_cell(v['missing'])} | {_cell(v['merged'])} | "
                         + " | ".join(extra) + f" | {seconds} |")
        lines.append("")
    search_record = results.get("pag/search")
    if search_record:
        heads = ", ".join(f"{layer} {heads}" for layer, heads in search_record["heads"].items()) or "none"
        lines += ["### HeadHunter search (objective: judge confidence)", "",
                  f"{len(search_record['prompts'])} prompts x 1 seed, rounds {search_record['rounds']}, "
                  f"per round {search_record['per_round']}, require_gain (default), PAG scale {PAG_SCALE}, alpha 1: "
                  f"{search_record['seconds']:.0f} s, {search_record['generations']} generations; heads picked: "
                  f"{heads}; random heads: "
                  + (", ".join(f"{k} {v}" for k, v in results.get("pag/random heads", {}).items()) or "none"), ""]
        for n, r in enumerate(search_record["round_records"]):
            top = "; ".join(f"{layer}.{head} {score:.3f}" for layer, head, score in r["top"][:5])
            lines.append(f"- round {n + 1}: base {r['base']:.3f}, best candidates {top}; selected "
                         f"{[tuple(h) for h in r['selected']]}")
        lines.append("")
    pag = {k[4:]: v for k, v in results.items()
           if k.startswith("pag/") and k not in ("pag/search", "pag/random heads")}
    if pag:
        lines += ["### PAG / SoftPAG: judge scores on held-out prompts", ""] + _judged_table(pag) + [""]
    for size in SIZES:
        ent = {k.split("/", 2)[2]: v for k, v in results.items() if k.startswith(f"entropy/{size}/")}
        if ent:
            lines += [f"### Entropy scaling at {size}x{size} ({size / 32:g}x the trained side: "
                      f"{(size // 4) ** 2} image tokens vs {TRAINED_TOKENS}), judged resized to 32x32", ""]
            lines += _judged_table(ent) + [""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = quality_parser(__doc__.split("\n")[0], steps=world_image_call()["num_inference_steps"],
                            sections="ir,pag,entropy", results="image_quality_results.json")
    parser.add_argument("--search-prompts", type=int, default=8)
    parser.add_argument("--search-rounds", type=int, default=2)
    parser.add_argument("--search-per-round", type=int, default=3)
    args = parser.parse_args(argv)
    if args.report:
        print(report(read_results(args.results)))
        return
    results, save = open_results(args, per_seed=PER_SEED, date=time.strftime("%Y-%m-%d"))
    pipe = load_world_image_pipeline(args.model).to(args.device)
    judge = load_world_judge(device=args.device)
    seeds = list(range(args.seeds))
    runners = {"ir": lambda: run_ir(pipe, judge, seeds, args.steps, results, save),
               "pag": lambda: run_pag(pipe, judge, seeds, args.steps, results, save, args.search_prompts,
                                      args.search_rounds, args.search_per_round),
               "entropy": lambda: run_entropy(pipe, judge, seeds, args.steps, results, save)}
    run_sections(args.sections, runners, results, save, report)


if __name__ == "__main__":
    main()
