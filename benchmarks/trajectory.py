"""DiTraj overhead: one Wan2.1-1.3B transformer forward (random weights, bf16, 480x832, 81 frames: 32760 video
tokens) stock vs with DiTraj installed, at the steps where each part acts; variants interleaved over rounds,
median of rounds. The authors' default trajectory (rows 0.3-0.7, columns 0.1-0.4 -> 0.7-1.0 over 81 frames:
|F| = 3924 foreground and |D| = 2442 duplicate tokens).

- step 0, conditional: STD-RoPE + duplicate isolation (dense kernel on the other queries, F and D rows
  recomputed) + fg/bg cross-attention (text ``[background; foreground]``, 1024 tokens, as the pipeline feeds it);
- step 0, unconditional: STD-RoPE + isolation only (the negative prompt's forward);
- step 0 with the isolation as a FlexAttention score_mod (the path taken when another method acts on the same
  calls; forced here by composing a no-op method), also the exactness check of the row recompute at full size;
- step 0 without duplicate isolation (STD-RoPE positions only, dense kernel);
- step 10, conditional: fg/bg cross-attention only; step 40: nothing acts (identity, the stock kernels);
- the mean forward of a 50-step generation with guidance on the authors' schedule (isolation and STD-RoPE
  on steps < 5 of both branches, fg/bg on conditional steps < 30), from the medians above.

    PYTHONPATH=. python benchmarks/trajectory.py            # CUDA GPU
    PYTHONPATH=. python benchmarks/trajectory.py --smoke    # the same code on a tiny model on CPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import WAN_1_3B, device_name, write_results

from diffusers_attn_ext import install, uninstall
from diffusers_attn_ext.processors.base import AttnExtProcessor
from diffusers_attn_ext.processors.fg_bg_guidance import DEFAULT_MASK_STEPS, ForegroundBackgroundCrossAttnProcessor
from diffusers_attn_ext.processors.std_rope import DEFAULT_ROPE_STEPS, STDRoPEProcessor
from diffusers_attn_ext.trajectory import Trajectory

ROUNDS = 5
STEPS = 50
TINY = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=24, text_dim=32, freq_dim=32, ffn_dim=64,
            num_layers=2, rope_max_seq_len=64)


def authors_trajectory(num_frames: int, height: int, width: int) -> Trajectory:
    """run.py's default: [frame, top, bottom, left, right] fractions (0, .3, .7, .1, .4) -> (80, .3, .7, .7, 1)."""
    return Trajectory.from_key_boxes(
        {0: (0.1 * width, 0.3 * height, 0.4 * width, 0.7 * height),
         num_frames - 1: (0.7 * width, 0.3 * height, 1.0 * width, 0.7 * height)},
        num_frames=num_frames, height=height, width=width,
    )


def timer(device: str):
    """Milliseconds of ``fn()``: CUDA events on a GPU, wall clock on CPU; median of ``iters`` after warmup."""
    def time_ms(fn, warmup: int = 1, iters: int = 3) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - began))
        return statistics.median(times)

    return time_ms


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (checks the script, times nothing real)")
    args = parser.parse_args()
    device, dtype = ("cpu", torch.float32) if args.smoke else ("cuda", torch.bfloat16)
    config = TINY if args.smoke else WAN_1_3B
    frames, height, width = (9, 128, 128) if args.smoke else (81, 480, 832)
    text_tokens = 16 if args.smoke else 512
    with torch.device(device):
        from diffusers import WanTransformer3DModel

        model = WanTransformer3DModel(**config).to(dtype).eval()
    g = torch.Generator(device).manual_seed(0)
    latent = torch.randn(1, 16, (frames - 1) // 4 + 1, height // 8, width // 8, generator=g, device=device, dtype=dtype)
    text = torch.randn(1, text_tokens, config["text_dim"], generator=g, device=device, dtype=dtype)
    split_text = torch.randn(1, 2 * text_tokens, config["text_dim"], generator=g, device=device, dtype=dtype)
    trajectory = authors_trajectory(frames, height, width)
    time_ms = timer(device)

    def forward(step: int, encoder_hidden_states: torch.Tensor, branch: str = "cond"):
        with model.cache_context(branch, step_index=step, num_inference_steps=STEPS):
            return model(hidden_states=latent, timestep=torch.full((1,), 500.0, device=device),
                         encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    def ditraj(isolate: bool = True):
        return (STDRoPEProcessor(trajectory, isolate_duplicates=isolate),
                ForegroundBackgroundCrossAttnProcessor(trajectory, text_tokens, text_tokens))

    cond_0, uncond_0 = "DiTraj step 0, cond (STD-RoPE + isolation + fg/bg)", "DiTraj step 0, uncond (STD-RoPE + isolation)"
    fg_bg_only, nothing = "DiTraj step 10, cond (fg/bg only)", "DiTraj step 40 (nothing acts)"
    score_mod = "DiTraj step 0, cond, isolation as FlexAttention score_mod (composed path)"
    variants = {
        "stock": (lambda: (), 0, text, "cond"),
        cond_0: (ditraj, 0, split_text, "cond"),
        uncond_0: (ditraj, 0, text, "uncond"),
        score_mod: (lambda: (*ditraj(), AttnExtProcessor()), 0, split_text, "cond"),
        "DiTraj step 0, cond, no isolation (STD-RoPE + fg/bg)": (lambda: ditraj(False), 0, split_text, "cond"),
        fg_bg_only: (ditraj, 10, split_text, "cond"),
        nothing: (ditraj, 40, text, "cond"),
    }
    times = {name: [] for name in variants}
    with torch.inference_mode():
        stock_out = forward(40, text)
        install(model, *ditraj())
        identity = torch.equal(stock_out, forward(40, text))
        recomputed = forward(0, split_text)
        uninstall(model)
        install(model, *variants[score_mod][0]())
        flex = forward(0, split_text)
        uninstall(model)
        exactness = ((recomputed.float() - flex.float()).norm() / flex.float().norm()).item()
        del stock_out, recomputed, flex
        for _ in range(ROUNDS):
            for name, (processors, step, encoder_hidden_states, branch) in variants.items():
                chosen = processors()
                if chosen:
                    install(model, *chosen)
                times[name].append(time_ms(lambda s=step, e=encoder_hidden_states, b=branch: forward(s, e, b)))
                uninstall(model)
    base = statistics.median(times["stock"])
    rows = [{"forward": name, "ms (median of rounds)": statistics.median(t), "ms (best)": min(t),
             "overhead % (median)": 100 * (statistics.median(t) / base - 1)} for name, t in times.items()]
    median = {name: statistics.median(t) for name, t in times.items()}
    rope, mask = DEFAULT_ROPE_STEPS, DEFAULT_MASK_STEPS
    generation = (rope * (median[cond_0] + median[uncond_0]) + (mask - rope) * (median[fg_bg_only] + median[nothing])
                  + (STEPS - mask) * 2 * median[nothing]) / (2 * STEPS)
    rows.append({"forward": f"mean forward of a {STEPS}-step generation with guidance (authors' schedule)",
                 "ms (median of rounds)": generation, "ms (best)": float("nan"),
                 "overhead % (median)": 100 * (generation / base - 1)})
    header = (f"DiTraj, Wan2.1-1.3B-shaped transformer{' (tiny, smoke)' if args.smoke else ''}, "
              f"{width}x{height}x{frames}, {dtype}, {device_name()}; step 40 bit-identical to stock: {identity}; "
              f"step-0 output, row recompute vs score_mod: relative L2 difference {exactness:.2e}")
    print(write_results("trajectory_smoke" if args.smoke else "trajectory", rows, header))


if __name__ == "__main__":
    main()
