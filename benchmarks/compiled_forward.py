"""The compiled whole forward on the GPU (issue 16's missing table): one Wan2.1-1.3B-shaped transformer forward at
480x832, 81 frames (32760 video tokens, random weights, bf16), eager vs ``compile_repeated_blocks(fullgraph=True)``,
for stock diffusers processors, our StockAttnProcessor, UltraViCo at 3x, Radial Attention and the adaptive pattern
at density 0.1. Per variant: ms per forward eager and compiled (median of ``--iters``), the first compiled call
(compile time), dynamo's graph count and graph breaks after it, the graphs added by the later calls (recompiles;
goal 0), and the compiled output against the eager one.

- UltraViCo at 3x: ``UltraViCoProcessor(train_frames=7)``, so the 21-latent-frame video is 3x its training window
  at the same shape (the rule and its fused kernel act as at 3x the length; a true 3x-length forward, 98280 tokens,
  is ``--ultravico-frames 63``).
- Radial: ``RadialSparseProcessor()`` (decay 1.0), every call sparse. Adaptive: ``AdaptiveSparseProcessor(density=0.1,
  cache_steps=1)``: a compiled region cannot fill the pattern cache, so the pattern is searched at every call,
  eager and compiled alike.
- Goals (issue 16): StockAttnProcessor's compiled overhead <= 1% of compiled stock; the sparse speedups vs compiled
  stock.

    PYTHONPATH=. python benchmarks/compiled_forward.py --output $OUT [--iters 3] [--variants ...] [--budget S] [--smoke]

Writes compiled_forward.{json,md} under --output after every variant.
"""

from __future__ import annotations

import time

import torch
from harness import Deadline, parser, setup, synchronize, wall_ms, write

VARIANTS = ("stock", "StockAttnProcessor", "radial", "adaptive 0.1", "UltraViCo 3x")


def processor(variant: str, args):
    from diffusers_attn_ext.processors import (
        AdaptiveSparseProcessor,
        RadialSparseProcessor,
        StockAttnProcessor,
        UltraViCoProcessor,
    )

    block = dict(block_size=16) if args.smoke else {}
    return {
        "stock": lambda: None,
        "StockAttnProcessor": StockAttnProcessor,
        "radial": lambda: RadialSparseProcessor(**block),
        "adaptive 0.1": lambda: AdaptiveSparseProcessor(density=0.1, cache_steps=1, **block),
        "UltraViCo 3x": lambda: UltraViCoProcessor(train_frames=args.ultravico_train_frames),
    }[variant]()


def dynamo_counts() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far, from dynamo's counters."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def uncompile(transformer) -> None:
    """Undo ``compile_repeated_blocks`` (it sets ``_compiled_call_impl`` on each block)."""
    for module in transformer.modules():
        module._compiled_call_impl = None


def measure(model, inputs, variant: str, args) -> dict:
    from torch._dynamo.utils import counters

    from diffusers_attn_ext import install, reset_context, uninstall

    uninstall(model)
    proc = processor(variant, args)
    if proc is not None:
        install(model, proc)
    row = {"variant": variant, "tokens": inputs["hidden_states"][0, 0].numel() // 4}

    def eager():
        if variant.startswith("adaptive"):
            reset_context(model)  # a new generation: the eager pattern cache is dropped, as compiled code searches
        return model(**inputs)

    with torch.inference_mode():
        eager_out = eager()[0]
        row["eager ms"] = wall_ms(eager, warmup=0, iters=args.iters)
    torch._dynamo.reset()
    counters.clear()
    model.compile_repeated_blocks(fullgraph=True, backend=args.compile_backend)
    try:
        with torch.inference_mode():
            synchronize()
            start = time.perf_counter()
            compiled_out = model(**inputs)[0]
            synchronize()
            row["first compiled call s"] = time.perf_counter() - start
            graphs, breaks = dynamo_counts()
            row["compiled ms"] = wall_ms(lambda: model(**inputs), warmup=1, iters=args.iters)
            row.update({"graphs": graphs, "graph breaks": breaks, "recompiles": dynamo_counts()[0] - graphs,
                        "max abs(compiled - eager)": (compiled_out.float() - eager_out.float()).abs().max().item()})
    finally:
        uncompile(model)
        uninstall(model)
    return row


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--ultravico-frames", type=int, default=None,
                   help="latent frames of a true long UltraViCo forward trained on 21 (e.g. 63 = 3x; default: the "
                        "same 21 frames, trained on 7)")
    p.add_argument("--compile-backend", default="inductor")
    args = p.parse_args()
    setup(args)
    from common import WAN_1_3B, device_name, wan_inputs, wan_transformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        config = dict(WAN_1_3B, num_layers=2, num_attention_heads=2, attention_head_dim=64, ffn_dim=256)
        frames, height, width, args.iters, args.compile_backend = 9, 64, 64, 1, "eager"
        dtype = torch.float32
    else:
        config, frames, height, width, dtype = WAN_1_3B, 81, 480, 832, torch.bfloat16
    latent_frames = (frames - 1) // 4 + 1
    args.ultravico_train_frames = latent_frames if args.ultravico_frames else max(1, latent_frames // 3)
    model = wan_transformer(config, dtype=dtype, device=device)
    inputs = wan_inputs(frames, height, width, dtype=dtype, device=device)
    deadline = Deadline(args.budget)
    header = (f"Wan2.1-1.3B-shaped forward, {height}x{width}x{frames}, random weights, {str(dtype)[6:]}, eager vs "
              f"compile_repeated_blocks(fullgraph=True) ({args.compile_backend}), {device_name()}")
    notes = ["compiled ms: after the first (compiling) call; recompiles: graphs added by the calls after the first",
             "UltraViCo 3x: train_frames = latent frames / 3 at this shape (the rule acts as at 3x its window), "
             "unless --ultravico-frames gives a longer video",
             "adaptive 0.1: cache_steps=1 (pattern searched every call), as compiled code requires"]
    if args.smoke:
        notes.append("SMOKE RUN: tiny model on CPU, compile backend 'eager': the numbers mean nothing")
    rows: list[dict] = []
    for variant in args.variants:
        if rows and not deadline.allows(30):
            rows.append({"variant": variant, "error": "skipped: time budget"})
            continue
        variant_inputs = inputs
        if variant == "UltraViCo 3x" and args.ultravico_frames:  # a true 3x-length video, trained on 21 frames
            variant_inputs = wan_inputs((args.ultravico_frames - 1) * 4 + 1, height, width, dtype=dtype, device=device)
        try:
            rows.append(measure(model, variant_inputs, variant, args))
        except Exception as error:  # report and go on: one failing variant must not hide the others
            rows.append({"variant": variant, "error": f"{type(error).__name__}: {error}"[:300]})
            print(f"{variant} failed: {type(error).__name__}: {str(error)[:1500]}")
        stock = next((row for row in rows if row["variant"] == "stock" and "compiled ms" in row), None)
        for row in rows:
            if stock and "compiled ms" in row:
                row["x compiled stock"] = stock["compiled ms"] / row["compiled ms"]
                row["overhead % vs compiled stock"] = 100 * (row["compiled ms"] / stock["compiled ms"] - 1)
        write("compiled_forward", rows, header, notes)
    print(write("compiled_forward", rows, header, notes))


if __name__ == "__main__":
    main()
