"""Does the video model follow its prompt?  Colour, presence and direction on held-out prompts.

    python -m diffusers_attn_ext.world.evaluate_video --model diffusers_attn_ext/shipped/world-video --prompts 32

Prompts are single-object straight-path captions from evaluation seeds (``train_video.EVAL_SEED_BASE`` on, never
seen in training). For each generated video: is an object of the prompt's colour found in every frame
(``metrics.track_colour``), and does it move the prompt's way (``metrics.moves_towards``)? Chance for the
direction is about 1/4. Writes ``eval.json`` and ``eval.png`` (first, middle and last frame per prompt).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from .metrics import frames_from_pipeline, moves_towards, track_colour
from .models import wan_num_frames
from .scenes import TRAIN_FRAMES, Scene, caption, sample_scene
from .tasks import GUIDANCE, STEPS
from .train_video import EVAL_SEED_BASE


def evaluation_scenes(count: int, *, offset: int = 0) -> list[Scene]:
    """``count`` single-object, straight-path scenes from evaluation seeds."""
    return [sample_scene(EVAL_SEED_BASE + offset + i, num_objects=1, path="straight") for i in range(count)]


@torch.no_grad()
def evaluate(pipe, count: int, *, steps: int = STEPS, guidance: float = GUIDANCE, batch: int = 16, frames: int = TRAIN_FRAMES,
             seed: int = 0) -> tuple[dict, list[torch.Tensor]]:
    scenes = evaluation_scenes(count)
    videos: list[torch.Tensor] = []
    rows = []
    for start in range(0, count, batch):
        chunk = scenes[start:start + batch]
        generator = torch.Generator(pipe.device).manual_seed(seed + start)
        out = pipe([caption(s) for s in chunk], num_frames=wan_num_frames(frames, pipe.vae), height=64, width=64, num_inference_steps=steps,
                   guidance_scale=guidance, generator=generator, output_type="np").frames
        for scene, video in zip(chunk, out, strict=True):
            frames_t = frames_from_pipeline(video)
            videos.append(frames_t)
            obj = scene.objects[0]
            centres, found = track_colour(frames_t, obj.colour)
            rows.append({"caption": caption(scene), "found_fraction": float(found.float().mean()),
                         "found_every_frame": bool(found.all()), "direction_ok": moves_towards(centres, obj.direction)})
    summary = {
        "prompts": count,
        "found_every_frame": sum(r["found_every_frame"] for r in rows) / count,
        "found_frames": sum(r["found_fraction"] for r in rows) / count,
        "direction_ok": sum(r["direction_ok"] for r in rows) / count,
        "steps": steps,
        "guidance": guidance,
        "rows": rows,
    }
    return summary, videos


def save_grid(videos: list[torch.Tensor], path: Path, columns: int = 8) -> None:
    from PIL import Image

    tiles = []
    for video in videos:
        t = video.shape[0]
        tiles.append(torch.cat([video[0], video[t // 2], video[-1]], dim=2))
    rows = [torch.cat(tiles[i:i + columns], dim=2) for i in range(0, len(tiles), columns)]
    width = max(r.shape[2] for r in rows)
    rows = [torch.nn.functional.pad(r, (0, width - r.shape[2])) for r in rows]
    image = torch.cat(rows, dim=1).clamp(0, 1).mul(255).byte().permute(1, 2, 0).numpy()
    Image.fromarray(image).save(path)


def main(argv=None) -> None:
    from diffusers import WanPipeline

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--guidance", type=float, default=GUIDANCE, help="default: the model's (world.tasks)")
    parser.add_argument("--output", default=".")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = WanPipeline.from_pretrained(args.model, dtype=torch.float32).to(device)
    pipe.set_progress_bar_config(disable=True)
    summary, videos = evaluate(pipe, args.prompts, steps=args.steps, guidance=args.guidance)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(summary, indent=1))
    save_grid(videos, out / "eval.png")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}), flush=True)


if __name__ == "__main__":
    main()
