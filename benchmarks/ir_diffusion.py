"""IR-Diffusion attention at FLUX.1 size: peak memory and time of one joint-attention call over 3 images
(reference + 2 targets, 2 subjects each) at 1024x1024 (4096 image + 512 text tokens, 24 heads of 128), bf16,
FLUX RoPE; the method (stock SDPA, then the target subject queries recomputed with the isolation mask and the
repositioned reference keys) against dense SDPA alone. Target: peak memory within 10% of dense SDPA.

    PYTHONPATH=. python benchmarks/ir_diffusion.py           # CUDA GPU, writes $OUT/ir_diffusion.{json,md}
    PYTHONPATH=. python benchmarks/ir_diffusion.py --smoke   # the same code at tiny size on CPU
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import cuda_time_ms, device_name, peak_memory_gib, write_results
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from diffusers_attn_ext.processors.isolation_reposition import (
    IsolationRepositionProcessor,
    isolation_reposition_attention,
)
from diffusers_attn_ext.subjects import SubjectLayout

BOXES = [
    {"dog": (0.05, 0.30, 0.45, 0.95), "cat": (0.55, 0.30, 0.95, 0.95)},
    {"dog": (0.55, 0.10, 0.95, 0.60), "cat": (0.00, 0.50, 0.35, 1.00)},
    {"dog": (0.00, 0.00, 0.30, 0.40), "cat": (0.40, 0.40, 1.00, 1.00)},
]
FULL = dict(heads=24, head_dim=128, text=512, grid=64, axes=(16, 56, 56), dtype=torch.bfloat16, device="cuda")
SMOKE = dict(heads=2, head_dim=16, text=8, grid=8, axes=(4, 6, 6), dtype=torch.float32, device="cpu")


def inputs(heads, head_dim, text, grid, axes, dtype, device):
    """q, k, v ``[3, text + grid^2, heads, head_dim]`` and FLUX's (cos, sin) for text-then-image ids."""
    g = torch.Generator(device).manual_seed(0)
    seq = text + grid * grid
    q, k, v = (torch.randn(3, seq, heads, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3))
    image_ids = torch.zeros(grid, grid, 3)
    image_ids[..., 1], image_ids[..., 2] = torch.arange(grid)[:, None], torch.arange(grid)[None, :]
    ids = torch.cat([torch.zeros(text, 3), image_ids.flatten(0, 1)]).to(device)
    return q, k, v, FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids)


def dense(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def main(smoke: bool) -> None:
    shape = SMOKE if smoke else FULL
    q, k, v, rotary = inputs(**shape)
    processor = IsolationRepositionProcessor(SubjectLayout.from_boxes(BOXES), reference_dropout=0.5)
    plans = processor.plans(shape["grid"], shape["grid"], shape["text"], q.shape[1], q.device)
    keep = processor.keep_masks(plans, step=0)
    subject_queries = sum(int(p.queries.numel()) for image in plans for p in image)

    def method():
        return isolation_reposition_attention(q, k, v, dense(q, k, v), plans, rotary, keep=keep,
                                              max_chunk_bytes=processor.max_chunk_bytes)

    variants = {"dense SDPA (stock)": lambda: dense(q, k, v), "IR-Diffusion (SDPA + subject queries)": method}
    rows = []
    for name, fn in variants.items():
        if smoke:
            start = time.perf_counter()
            out = fn()
            ms, peak = 1000 * (time.perf_counter() - start), float("nan")
            assert out.shape == q.shape and torch.isfinite(out).all()
        else:
            ms, peak = cuda_time_ms(fn), peak_memory_gib(fn)
        rows.append({"variant": name, "ms": ms, "peak GiB": peak})
    base = rows[0]
    for row in rows:
        row["time x dense"] = row["ms"] / base["ms"]
        row["peak x dense"] = row["peak GiB"] / base["peak GiB"] if not smoke else float("nan")
    header = (f"IR-Diffusion attention, {device_name()}: 3 images x ({shape['text']} text + {shape['grid']}^2 image) "
              f"tokens, {shape['heads']} heads x {shape['head_dim']}, {shape['dtype']}; {subject_queries} target subject "
              f"queries recomputed; chunk budget {processor.max_chunk_bytes / 2**20:.0f} MiB; inputs (q, k, v) resident "
              "in both peaks")
    print(write_results("ir_diffusion_smoke" if smoke else "ir_diffusion", rows, header))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the code path)")
    main(parser.parse_args().smoke)
