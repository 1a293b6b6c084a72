"""Does the image model follow its prompt?  The judge's scores and a Frechet distance on held-out prompts.

    python -m diffusers_attn_ext.world.evaluate_image --model runs/image-export --prompts 64 --output runs/image-eval

Prompts are the captions of scenes from evaluation seeds (``train_video.EVAL_SEED_BASE + IMAGE_EVAL_OFFSET`` on,
never seen in training). For each generated image the judge (``world.judge``) says whether every named subject's
colour is found, whether it has the named shape, and how confident it is; the Frechet distance compares the
judge's features of the generated images with those of the same scenes rendered (the ground truth). Chance for
the class is 1/3. Writes ``eval.json`` and ``eval.png`` (generated images above, ground truth below, 16 a row).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .image_models import world_image_call
from .image_render import render_image_scenes
from .image_scenes import ImageScene, image_caption, sample_image_scene
from .judge import frechet_distance, judge_features, load_world_judge, score_prompts
from .train_video import EVAL_SEED_BASE

IMAGE_EVAL_OFFSET = 200_000_000


def evaluation_scenes(count: int, *, offset: int = 0, num_subjects: int | None = None) -> list[ImageScene]:
    """``count`` scenes from evaluation seeds."""
    return [sample_image_scene(EVAL_SEED_BASE + IMAGE_EVAL_OFFSET + offset + i, num_subjects=num_subjects)
            for i in range(count)]


@torch.no_grad()
def generate(pipe, prompts: list[str], *, seed: int = 0, batch: int = 16, size: int | None = None,
             **call) -> torch.Tensor:
    """(N, 3, H, W) images in [0, 1] for ``prompts`` (``world_image_call`` defaults, updated with ``call``); the
    generator of each chunk is seeded with ``seed + its first index``."""
    kwargs = world_image_call(**call)
    if size is not None:
        kwargs.update(height=size, width=size)
    images = []
    for start in range(0, len(prompts), batch):
        generator = torch.Generator(pipe.device).manual_seed(seed + start)
        out = pipe(prompts[start:start + batch], **kwargs, generator=generator, output_type="pt").images
        images.append(out.float().cpu())
    return torch.cat(images)


@torch.no_grad()
def evaluate(pipe, judge, count: int, *, seed: int = 0, batch: int = 16, **call) -> tuple[dict, torch.Tensor,
                                                                                        torch.Tensor]:
    """The judge's mean scores of ``count`` generations and the Frechet distance to their ground truth."""
    scenes = evaluation_scenes(count)
    prompts = [image_caption(s) for s in scenes]
    images = generate(pipe, prompts, seed=seed, batch=batch, **call)
    truth = render_image_scenes(scenes, images.shape[-2], images.shape[-1]).images
    scores = score_prompts(judge, images, prompts)
    truth_scores = score_prompts(judge, truth, scenes)
    summary = {"prompts": count, **{k: float(v.nanmean()) for k, v in scores.items() if k != "pattern"},
               "frechet": frechet_distance(judge_features(judge, images), judge_features(judge, truth)),
               "ground_truth": {k: float(v.nanmean()) for k, v in truth_scores.items()},
               "call": {k: v for k, v in world_image_call(**call).items()}, "seed": seed,
               "rows": [{"caption": p, **{k: float(v[i]) for k, v in scores.items() if k != "pattern"}}
                        for i, p in enumerate(prompts)]}
    return summary, images, truth


def save_grid(images: torch.Tensor, truth: torch.Tensor, path: Path, columns: int = 16) -> None:
    """Generated images in rows of ``columns``, each row above its ground truth; 2 pixels of white between."""
    from PIL import Image

    n, _, h, w = images.shape
    rows = []
    for start in range(0, n, columns):
        for batch in (images, truth):
            tiles = [torch.nn.functional.pad(t, (1, 1, 1, 1), value=1.0) for t in batch[start:start + columns]]
            tiles += [torch.ones(3, h + 2, w + 2)] * (columns - len(tiles))
            rows.append(torch.cat(tiles, dim=2))
    grid = torch.cat(rows, dim=1).clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(path)


def main(argv=None) -> None:
    from diffusers import FluxPipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--judge", default=None, help="save_pretrained folder of the judge (default: the shipped one)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=4.0, help="true_cfg_scale (1: no guidance)")
    parser.add_argument("--output", default=".")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = FluxPipeline.from_pretrained(args.model, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    judge = load_world_judge(args.judge, device=device)
    summary, images, truth = evaluate(pipe, judge, args.prompts, num_inference_steps=args.steps,
                                      true_cfg_scale=args.guidance)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    save_grid(images, truth, out / "eval.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}), flush=True)


if __name__ == "__main__":
    main()
