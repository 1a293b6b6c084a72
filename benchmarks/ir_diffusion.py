"""IR-Diffusion attention at FLUX.1 size: peak memory and time of one joint-attention call over 3 images
(reference + 2 targets, 2 subjects each) at 1024x1024 (4096 image + 512 text tokens, 24 heads of 128), bf16,
FLUX RoPE; the method (stock SDPA, then each target subject's queries recomputed by unmasked SDPA over its
gathered keys, one call per chunk of heads) against dense SDPA alone, at the pipelines' reference dropout 0.5
(the authors' query dropout, and dropout of repositioned keys, ``dropout_mode="keys"``) and without dropout,
for three working-memory budgets. Target: peak within 10% of dense SDPA.

    PYTHONPATH=. python benchmarks/ir_diffusion.py           # CUDA GPU, writes $OUT/ir_diffusion.{json,md}
    PYTHONPATH=. python benchmarks/ir_diffusion.py --smoke   # the same code at tiny size on CPU

Columns: ``ms`` best of interleaved rounds of the median of CUDA-event timings; ``peak GiB`` max allocated
during one call with q, k, v and FLUX's (cos, sin) resident; ``extra MiB`` the peak above dense SDPA's;
``SDPA calls`` kernel calls of the subject recomputation; ``max abs err`` against the same computation on
float32 inputs (float64 in --smoke).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from common import cuda_time_ms, device_name, peak_memory_gib, write_results
from diffusers.models.transformers.transformer_flux import FluxPosEmbed
from torch.utils._python_dispatch import TorchDispatchMode

from diffusers_attn_ext.families.flux import FluxAdapter
from diffusers_attn_ext.processors.isolation_reposition import (
    DEFAULT_CHUNK_BYTES,
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
SMOKE = dict(heads=4, head_dim=16, text=8, grid=8, axes=(4, 6, 6), dtype=torch.float32, device="cpu")
# (reference dropout, dropout mode, max_chunk_bytes); the default budget first. --smoke scales budgets down.
SETTINGS = [(0.5, "queries", DEFAULT_CHUNK_BYTES), (0.5, "keys", DEFAULT_CHUNK_BYTES),
            (0.0, "queries", DEFAULT_CHUNK_BYTES), (0.5, "queries", DEFAULT_CHUNK_BYTES // 2),
            (0.5, "queries", DEFAULT_CHUNK_BYTES * 2)]
SMOKE_BUDGET_SCALE = 2**-11
ROUNDS = 3


def inputs(heads, head_dim, text, grid, axes, dtype, device):
    """q, k, v ``[3, text + grid^2, heads, head_dim]`` and FLUX's key rotation for text-then-image ids."""
    g = torch.Generator(device).manual_seed(0)
    seq = text + grid * grid
    q, k, v = (torch.randn(3, seq, heads, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3))
    image_ids = torch.zeros(grid, grid, 3)
    image_ids[..., 1], image_ids[..., 2] = torch.arange(grid)[:, None], torch.arange(grid)[None, :]
    ids = torch.cat([torch.zeros(text, 3), image_ids.flatten(0, 1)]).to(device)
    return q, k, v, FluxAdapter().key_rotation(FluxPosEmbed(theta=10000, axes_dim=list(axes))(ids))


def dense(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


class CountSDPA(TorchDispatchMode):
    """Counts the SDPA kernel calls (flash, cuDNN, efficient, CPU flash) made inside the mode."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += "scaled_dot_product" in func.__name__
        return func(*args, **(kwargs or {}))


def main(smoke: bool) -> None:
    shape = SMOKE if smoke else FULL
    if smoke:
        torch.set_num_threads(1)  # tiny CPU kernels: a busy OpenMP pool makes each call ~1000x slower
    q, k, v, rotary = inputs(**shape)
    reference_dtype = torch.float64 if smoke else torch.float32
    q_ref, k_ref, v_ref = (t.to(reference_dtype) for t in (q, k, v))
    variants = {"dense SDPA (stock)": (lambda: dense(q, k, v), None)}
    for dropout, mode, budget in SETTINGS:
        budget = int(budget * SMOKE_BUDGET_SCALE) if smoke else budget
        processor = IsolationRepositionProcessor(SubjectLayout.from_boxes(BOXES), reference_dropout=dropout,
                                                 max_chunk_bytes=budget, dropout_mode=mode)
        plans = processor.plans(shape["grid"], shape["grid"], shape["text"], q.shape[1], q.device)
        step_plans = processor.step_plans(plans, step=0)

        def method(q=q, k=k, v=v, step_plans=step_plans, budget=budget):
            return isolation_reposition_attention(q, k, v, dense(q, k, v), step_plans, rotary, max_chunk_bytes=budget)

        size = f"{budget / 2**20:g} MiB" if budget >= 2**20 else f"{budget / 2**10:g} KiB"
        dropped = f"dropout {dropout} ({mode})" if dropout else "no dropout"
        variants[name := f"IR-Diffusion, {dropped}, budget {size}"] = (
            method, lambda method=method: method(q_ref, k_ref, v_ref))
    subject_queries = sum(int(p.queries.numel()) for image in plans for p in image)

    times = {name: [] for name in variants}
    for _ in range(1 if smoke else ROUNDS):
        for name, (fn, _) in variants.items():
            if smoke:
                start = time.perf_counter()
                fn()
                times[name].append(1000 * (time.perf_counter() - start))
            else:
                times[name].append(cuda_time_ms(fn))
    rows = []
    for name, (fn, reference) in variants.items():
        out = fn()
        assert out.shape == q.shape and torch.isfinite(out).all()
        counter = CountSDPA()
        with counter:
            fn()
        rows.append({
            "variant": name, "ms": min(times[name]), "peak GiB": float("nan") if smoke else peak_memory_gib(fn),
            "SDPA calls": counter.calls - 1,  # the stock pass
            "max abs err": float("nan") if reference is None else float((out.to(reference_dtype) - reference()).abs().max()),
        })
    base = rows[0]
    for row in rows:
        row["extra MiB"] = (row["peak GiB"] - base["peak GiB"]) * 1024
        row["time x dense"] = row["ms"] / base["ms"]
        row["peak x dense"] = row["peak GiB"] / base["peak GiB"]
    header = (f"IR-Diffusion attention, {device_name()}: 3 images x ({shape['text']} text + {shape['grid']}^2 image) "
              f"tokens, {shape['heads']} heads x {shape['head_dim']}, {shape['dtype']}, FLUX RoPE; {subject_queries} "
              "target subject queries recomputed (unmasked SDPA over gathered keys per chunk of heads); q, k, v and "
              "(cos, sin) resident in every peak")
    print(write_results("ir_diffusion_smoke" if smoke else "ir_diffusion", rows, header))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the code path)")
    main(parser.parse_args().smoke)
