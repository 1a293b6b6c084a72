"""Memory and time of one guided SD3-sized transformer step: head PAG (SoftPAG) vs layer PAG vs plain CFG.

SD3-medium shapes with random weights in bf16: 24 joint blocks of 24 heads of width 64, a 1024x1024 image
(128x128 latent, 4096 image tokens after 2x2 patches) and 333 text tokens. One step is a transformer forward
plus the guidance combination:

- plain CFG: batch 2 [uncond, cond], stock processors;
- layer PAG: batch 3 [uncond, cond, perturbed], diffusers' ``PAGCFGJointAttnProcessor2_0`` on block ``--layer``
  (it builds an N x N mask for the perturbed row);
- head PAG: batch 3, ``SoftPAGProcessor`` (alpha 1) on ``--heads`` of block ``--layer`` and on all its heads.

Run on a CUDA machine from the repository root::

    PYTHONPATH=. OUT=out python benchmarks/head_pag.py            # markdown table + $OUT/head_pag.json
    PYTHONPATH=. python benchmarks/head_pag.py --tiny             # tiny sizes on CPU: a crash test

"Extra peak memory" is the peak allocated during the step minus what was allocated before it (weights and
inputs); CPU runs report no memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import JointAttnProcessor2_0, PAGCFGJointAttnProcessor2_0

from diffusers_attn_ext.context import attach_context
from diffusers_attn_ext.install import installed
from diffusers_attn_ext.processors.softpag import SoftPAGProcessor


@dataclass(frozen=True)
class Shapes:
    """Transformer and input sizes of one benchmark."""

    num_layers: int
    heads: int
    head_dim: int
    latent_side: int
    text_tokens: int
    text_dim: int
    pooled_dim: int
    pos_embed_max_size: int

    @property
    def image_tokens(self) -> int:
        return (self.latent_side // 2) ** 2


SD3_MEDIUM = Shapes(num_layers=24, heads=24, head_dim=64, latent_side=128, text_tokens=333, text_dim=4096,
                    pooled_dim=2048, pos_embed_max_size=192)
TINY = Shapes(num_layers=2, heads=2, head_dim=16, latent_side=16, text_tokens=8, text_dim=32, pooled_dim=32,
              pos_embed_max_size=16)


@dataclass
class Row:
    variant: str
    batch: int
    median_ms: float
    extra_peak_mib: float | None


def build_transformer(shapes: Shapes, device: torch.device, dtype: torch.dtype) -> SD3Transformer2DModel:
    with torch.device(device):
        transformer = SD3Transformer2DModel(
            sample_size=shapes.latent_side, patch_size=2, in_channels=16, out_channels=16,
            num_layers=shapes.num_layers, attention_head_dim=shapes.head_dim, num_attention_heads=shapes.heads,
            joint_attention_dim=shapes.text_dim, caption_projection_dim=shapes.heads * shapes.head_dim,
            pooled_projection_dim=shapes.pooled_dim, pos_embed_max_size=shapes.pos_embed_max_size,
        )
    return transformer.to(dtype).eval()


def make_inputs(shapes: Shapes, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    generator = torch.Generator(device).manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    return {
        "hidden_states": randn(batch, 16, shapes.latent_side, shapes.latent_side),
        "encoder_hidden_states": randn(batch, shapes.text_tokens, shapes.text_dim),
        "pooled_projections": randn(batch, shapes.pooled_dim),
        "timestep": torch.full((batch,), 500.0, device=device, dtype=dtype),
        "return_dict": False,
    }


def guided_step(transformer, inputs: dict, cfg: float = 5.0, pag: float = 3.0) -> torch.Tensor:
    """One forward and the guidance of diffusers' PAG pipelines (CFG alone for a batch of 2)."""
    prediction = transformer(**inputs)[0]
    if prediction.shape[0] == 2:
        uncond, cond = prediction.chunk(2)
        return uncond + cfg * (cond - uncond)
    uncond, cond, perturbed = prediction.chunk(3)
    return uncond + cfg * (cond - uncond) + pag * (cond - perturbed)


def measure(step, device: torch.device, iters: int, warmup: int) -> tuple[float, float | None]:
    """Median milliseconds of ``step`` and its extra peak memory in MiB (None on CPU)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    extra = (torch.cuda.max_memory_allocated() - before) / 2**20 if cuda else None
    return statistics.median(times), extra


def run(shapes: Shapes, layer: int, heads: list[int], device: torch.device, dtype: torch.dtype, iters: int,
        warmup: int) -> list[Row]:
    transformer = build_transformer(shapes, device, dtype)
    context = attach_context(transformer)
    module = transformer.transformer_blocks[layer].attn
    name = f"transformer_blocks.{layer}"
    two, three = make_inputs(shapes, 2, device, dtype), make_inputs(shapes, 3, device, dtype)
    rows = []

    def record(variant, inputs):
        with torch.inference_mode():
            median, extra = measure(lambda: guided_step(transformer, inputs), device, iters, warmup)
        rows.append(Row(variant, inputs["hidden_states"].shape[0], median, extra))

    record("plain CFG", two)
    module.set_processor(PAGCFGJointAttnProcessor2_0())
    record(f"layer PAG (diffusers PAGCFGJointAttnProcessor2_0, block {layer})", three)
    module.set_processor(JointAttnProcessor2_0())
    context.set_branch_labels(("uncond", "cond", "perturbed"))
    for selected in (heads, list(range(shapes.heads))):
        processor = SoftPAGProcessor({name: selected}, alpha=1.0)
        with installed(transformer, processor, layers=processor.module_patterns(transformer)):
            record(f"head PAG (SoftPAG, block {layer}, {len(selected)} heads)", three)
    context.set_branch_labels(None)
    return rows


def markdown(rows: list[Row], title: str) -> str:
    lines = [f"### {title}", "", "| variant | batch | median ms | extra peak MiB |", "|---|---|---|---|"]
    for row in rows:
        memory = "n/a" if row.extra_peak_mib is None else f"{row.extra_peak_mib:.0f}"
        lines.append(f"| {row.variant} | {row.batch} | {row.median_ms:.1f} | {memory} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes in float32 on CPU (crash test)")
    parser.add_argument("--layer", type=int, default=12, help="block index of the perturbed layer")
    parser.add_argument("--heads", default="3,7", help="comma-separated heads for the head-PAG row")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    shapes = TINY if args.tiny else SD3_MEDIUM
    if args.tiny:
        device, dtype, layer, heads, iters, warmup = torch.device("cpu"), torch.float32, 1, [1], 2, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("the full-size benchmark needs CUDA; use --tiny for the CPU crash test")
        device, dtype, iters, warmup = torch.device("cuda"), torch.bfloat16, args.iters, args.warmup
        layer, heads = args.layer, [int(head) for head in args.heads.split(",")]
    rows = run(shapes, layer, heads, device, dtype, iters, warmup)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    title = (f"One guided step, {shapes.num_layers} blocks x {shapes.heads} heads x {shapes.head_dim}, "
             f"{shapes.image_tokens} image + {shapes.text_tokens} text tokens, {str(dtype).removeprefix('torch.')}, "
             f"{device_name}")
    print(markdown(rows, title))
    result = {"title": title, "shapes": asdict(shapes), "torch": torch.__version__, "device": device_name,
              "rows": [asdict(row) for row in rows]}
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "head_pag.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
