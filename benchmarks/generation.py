"""A whole text-to-video generation on the GPU (issue 19): diffusers' WanPipeline with random weights built from the
real Wan2.1 configs, 50 UniPC steps with classifier-free guidance (two transformer forwards per step), the
transformer compiled with ``compile_repeated_blocks(fullgraph=True)``, VAE decode included; stock vs Radial
Attention and the adaptive draft pattern with their authors' dense-step schedules, each with and without the
quantized kernel (INT8 QK + 16-bit or FP8 PV, ``kernels/quantized_triton.py``). Wall time, speedup over stock, peak memory.

- Wan2.1-1.3B at 480x832, 81 frames (32760 video tokens; UniPC flow_shift 3.0), Wan2.1-14B at 720x1280, 81 frames
  (75600 tokens; flow_shift 5.0). The text encoder (UMT5-XXL) is not built: random prompt embeddings ``[1, 512,
  4096]`` go in (it runs once per generation, not per step); the VAE is diffusers' default AutoencoderKLWan (the
  Wan2.1 VAE's config), random weights.
- Radial: the authors' shell-script schedule for 50 steps, ``decay_factor=0.2, dense_steps=12, dense_layers=1``
  (mit-han-lab/radial-attention ``scripts/wan_t2v_inference.sh``). Adaptive: DraftAttention's Wan rule
  (shawnricecake/draft-attention ``wan/wan/modules/attention.py``): dense while the timestep is above 925 (10 of 50
  steps at flow_shift 3, 15 at 5) and in the first block, sparsity 0.75 (density 0.25); compiled, the pattern is
  searched at every step (``cache_steps=1``: a cache cannot be filled in a compiled region).
- Quantized: a "+ quantized" variant runs under the dispatcher's opt-in ``kernels.use_quantized_attention(pv=...)``
  (``--quantized-pv``, default bf16, the opt-in's default): our processors' dense self-attention, block-sparse and fused-rule calls take the
  quantized kernel (dense steps its dense-equivalent form); cross-attention (512 text keys) stays bf16. "stock +
  quantized" is StockAttnProcessor with the opt-in on. The "quantized kernels" column is ``kernel_report()``'s line
  for it during the run.

Timing. ``--full``: each variant generates 50 steps after a warm-up generation that compiles every phase; the
wall time is measured end to end. Default: each variant's steps are timed in a short generation (``--measure-steps``
steps after a 1-step warm-up that compiles) with the method's sparse phase at every step, and the 50-step time is
EXTRAPOLATED as prep + n_dense x (dense step) + n_sparse x (sparse step) + VAE decode, with the dense step of stock
(or stock + quantized) standing in for a method's dense steps (StockAttnProcessor's dense path; its own overhead is
what compiled_forward.py measures) and the decode measured once on stock. The output says which.

    PYTHONPATH=. python benchmarks/generation.py --output $OUT [--model 1.3b|14b] [--quick] [--full]
        [--measure-steps 3] [--variants stock radial ...] [--quantized-pv fp8|bf16] [--budget S] [--smoke]

Writes generation_<model>.{json,md} under --output after every variant.
"""

from __future__ import annotations

import statistics
import time

import torch
from harness import Deadline, parser, peak_gib, reset_peak, setup, synchronize, write

WAN_14B_CHANGES = dict(num_attention_heads=40, ffn_dim=13824, num_layers=40)
STEPS = 50
RADIAL_SCHEDULE = dict(decay_factor=0.2, dense_steps=12, dense_layers=1)
DRAFT_DENSE_TIMESTEP, DRAFT_DENSITY = 925, 0.25
# In order of need, so that a run cut by its budget keeps the most (the quantized methods' dense steps are timed on
# "stock + quantized").
VARIANTS = ("stock", "stock + quantized", "adaptive + quantized", "radial + quantized", "adaptive", "radial")


def model_setting(name: str, smoke: bool) -> dict:
    from common import WAN_1_3B

    if smoke:
        config = dict(WAN_1_3B, num_layers=2, num_attention_heads=2, attention_head_dim=64, ffn_dim=256, text_dim=64)
        return dict(config=config, height=64, width=64, frames=9, flow_shift=3.0, text_dim=64,
                    vae=dict(base_dim=16, num_res_blocks=1), block_size=16, label="smoke (tiny Wan, CPU)")
    if name == "14b":
        return dict(config=dict(WAN_1_3B, **WAN_14B_CHANGES), height=720, width=1280, frames=81, flow_shift=5.0,
                    text_dim=4096, vae={}, block_size=128, label="Wan2.1-14B shape, 720x1280x81")
    return dict(config=WAN_1_3B, height=480, width=832, frames=81, flow_shift=3.0, text_dim=4096, vae={},
                block_size=128, label="Wan2.1-1.3B shape, 480x832x81")


def build_pipeline(setting: dict, device: str):
    """WanPipeline with random weights (transformer and VAE from their configs), no text encoder."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    with torch.device(device):
        transformer = WanTransformer3DModel(**setting["config"]).eval()
        vae = AutoencoderKLWan(**setting["vae"]).eval()  # float32, as diffusers' Wan examples load it
    if device == "cuda":
        from common import cast_as_loaded

        cast_as_loaded(transformer, torch.bfloat16)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=setting["flow_shift"])
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draft_dense_steps(flow_shift: float, steps: int = STEPS) -> int:
    """Steps whose timestep is above 925 (DraftAttention's dense steps) in a ``steps``-step UniPC schedule."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=flow_shift)
    scheduler.set_timesteps(steps)
    return int((scheduler.timesteps > DRAFT_DENSE_TIMESTEP).sum())


def method(variant: str, setting: dict, dense_steps: int | None):
    """The processor of ``variant`` with its authors' dense steps (or ``dense_steps``: 0 for a sparse-phase probe);
    None for stock diffusers. Also the number of dense steps of its 50-step schedule."""
    from diffusers_attn_ext.processors import AdaptiveSparseProcessor, RadialSparseProcessor, StockAttnProcessor

    block = setting["block_size"]
    if variant.startswith("radial"):
        schedule = RADIAL_SCHEDULE["dense_steps"]
        steps = schedule if dense_steps is None else dense_steps
        return RadialSparseProcessor(**dict(RADIAL_SCHEDULE, dense_steps=steps), block_size=block), schedule
    if variant.startswith("adaptive"):
        schedule = draft_dense_steps(setting["flow_shift"])
        steps = schedule if dense_steps is None else dense_steps
        return AdaptiveSparseProcessor(density=DRAFT_DENSITY, dense_steps=steps, dense_layers=1, cache_steps=1,
                                       block_size=block), schedule
    if variant == "stock + quantized":
        return StockAttnProcessor(), STEPS
    return None, STEPS


def uncompile(transformer) -> None:
    """Undo ``compile_repeated_blocks`` (it sets ``_compiled_call_impl`` on each block)."""
    for module in transformer.modules():
        module._compiled_call_impl = None


class Runner:
    def __init__(self, args, setting: dict):
        self.args, self.setting = args, setting
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pipe = build_pipeline(setting, self.device)
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        g = torch.Generator(self.device).manual_seed(0)
        shape = (1, 512, setting["text_dim"])
        self.embeds = [torch.randn(shape, generator=g, device=self.device, dtype=dtype) for _ in range(2)]

    def generate(self, steps: int, output_type: str = "latent"):
        """One generation; returns (seconds from call to return, per-step seconds, seconds after the last step)."""
        marks = []

        def on_step_end(pipe, i, t, kwargs):
            synchronize()
            marks.append(time.perf_counter())
            return kwargs

        synchronize()
        start = time.perf_counter()
        self.pipe(prompt_embeds=self.embeds[0], negative_prompt_embeds=self.embeds[1], height=self.setting["height"],
                  width=self.setting["width"], num_frames=self.setting["frames"], num_inference_steps=steps,
                  guidance_scale=5.0, output_type=output_type, generator=torch.Generator(self.device).manual_seed(1),
                  callback_on_step_end=on_step_end)
        synchronize()
        end = time.perf_counter()
        step_times = [b - a for a, b in zip([start] + marks[:-1], marks, strict=True)]
        return end - start, step_times, end - marks[-1]

    def prepare(self, variant: str, dense_steps: int | None):
        """Install the variant's processor and compile; returns its schedule's dense steps."""
        from diffusers_attn_ext import uninstall

        uninstall(self.pipe)
        uncompile(self.pipe.transformer)
        torch._dynamo.reset()
        processor, schedule = method(variant, self.setting, dense_steps)
        if processor is not None:
            from diffusers_attn_ext import install

            install(self.pipe, processor)
        if not self.args.eager:
            self.pipe.transformer.compile_repeated_blocks(fullgraph=True, backend=self.args.compile_backend)
        return schedule


def measure(runner: Runner, variant: str, full: bool, measure_steps: int) -> dict:
    """One variant's row (times in seconds)."""
    from diffusers_attn_ext import kernels

    schedule = runner.prepare(variant, None if full else 0)
    quantized = variant.endswith("quantized")
    with kernels.use_quantized_attention(quantized, pv=runner.args.quantized_pv):
        routed = kernels.kernel_report()["quantized"] if quantized else ""
        warm_steps = (schedule + 2 if schedule < STEPS else 2) if full else 1  # every phase compiles here
        warm_start = time.perf_counter()
        runner.generate(min(warm_steps, runner.args.steps))
        warm = time.perf_counter() - warm_start
        reset_peak()
        if full:
            total, steps, after = runner.generate(runner.args.steps, output_type="np")
        else:
            output = "np" if variant == "stock" else "latent"  # the decode is measured once, on stock
            total, steps, after = runner.generate(measure_steps, output_type=output)
    row = {"variant": variant, "dense steps": min(schedule, runner.args.steps), "warm-up + compile s": warm,
           "peak GiB": peak_gib(), "quantized kernels": routed}
    if full:
        dense_part = steps[:row["dense steps"]]
        sparse_part = steps[row["dense steps"]:]
        row.update({"dense step s": statistics.median(dense_part) if dense_part else "",
                    "sparse step s": statistics.median(sparse_part) if sparse_part else "",
                    "decode s": after, f"{runner.args.steps}-step wall s": total, "measured": "end to end"})
    else:
        row.update({"step s (measured)": statistics.median(steps[1:] if len(steps) > 1 else steps),
                    "prep s": total - sum(steps) - after, "decode s": after if variant == "stock" else ""})
    return row


def extrapolate(rows: list[dict], steps: int) -> None:
    """Fill each timed row's ``steps``-step estimate and speedup from the measured step times (module docstring)."""
    by_name = {row["variant"]: row for row in rows if "step s (measured)" in row}
    stock = by_name.get("stock")
    if stock is None:
        return
    decode = stock["decode s"]
    for row in by_name.values():
        quantized = row["variant"].endswith("quantized")
        dense_source = by_name.get("stock + quantized" if quantized else "stock")
        n_dense = row["dense steps"] if row["variant"] not in ("stock", "stock + quantized") else steps
        if n_dense and dense_source is None:
            row[f"{steps}-step wall s (extrapolated)"] = "needs the stock + quantized row"
            continue
        dense_step = dense_source["step s (measured)"] if n_dense else 0.0
        sparse_step = row["step s (measured)"] if n_dense < steps else 0.0
        row[f"{steps}-step wall s (extrapolated)"] = row["prep s"] + n_dense * dense_step + (steps - n_dense) * sparse_step + decode
    base = stock[f"{steps}-step wall s (extrapolated)"]
    for row in by_name.values():
        estimate = row[f"{steps}-step wall s (extrapolated)"]
        row["speedup vs stock"] = base / estimate if isinstance(estimate, float) else ""


def main() -> None:
    from diffusers_attn_ext.kernels.quantize import PV_DTYPES

    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("1.3b", "14b"), default="1.3b")
    p.add_argument("--steps", type=int, default=STEPS, help="denoising steps of the generation (default 50)")
    p.add_argument("--measure-steps", type=int, default=3, help="steps timed per variant when extrapolating")
    p.add_argument("--full", action="store_true", help="time whole generations end to end instead of extrapolating")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--eager", action="store_true", help="do not compile")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--quantized-pv", choices=PV_DTYPES, default="bf16",
                   help="PV precision of the quantized kernel in the '+ quantized' variants")
    args = p.parse_args()
    setup(args)
    if args.smoke:
        args.steps, args.measure_steps, args.compile_backend = 2, 2, "eager"
        args.variants = [v for v in args.variants if not v.endswith("quantized")] + ["stock + quantized",
                                                                                    "radial + quantized"]
    if args.quick:
        args.measure_steps = min(args.measure_steps, 2)
    from common import device_name

    deadline = Deadline(args.budget)
    setting = model_setting(args.model, args.smoke)
    runner = Runner(args, setting)
    mode = "end to end" if args.full else f"EXTRAPOLATED to {args.steps} steps from {args.measure_steps} timed steps"
    header = (f"Whole generation, {setting['label']}, CFG 5.0, UniPC, random weights, "
              f"{'eager' if args.eager else 'compile_repeated_blocks(fullgraph=True)'}, {mode}, {device_name()}")
    notes = [f"radial: {RADIAL_SCHEDULE} (authors' shell scripts); adaptive: density {DRAFT_DENSITY}, dense while "
             f"timestep > {DRAFT_DENSE_TIMESTEP} ({draft_dense_steps(setting['flow_shift'])} of {STEPS} steps) and in "
             "block 0, pattern searched every step (DraftAttention's Wan rule)",
             "no text encoder: random prompt embeddings (UMT5 runs once per generation)"]
    if not args.full:
        notes.append("the 50-step wall time is extrapolated: prep + dense steps x stock's (or stock + quantized's) "
                     "step + sparse steps x the variant's step + stock's VAE decode; run with --full to time it")
    if args.smoke:
        notes.append("SMOKE RUN: tiny model on CPU, compile backend 'eager': the numbers mean nothing")
    rows: list[dict] = []
    for variant in args.variants:
        if rows and not deadline.allows(40):
            rows.append({"variant": variant, "measured": "skipped: time budget"})
            continue
        try:
            rows.append(measure(runner, variant, args.full, args.measure_steps))
        except Exception as error:  # report and go on: one failing variant must not hide the others
            rows.append({"variant": variant, "error": f"{type(error).__name__}: {error}"[:300]})
            print(f"{variant} failed: {type(error).__name__}: {str(error)[:1000]}")
        if not args.full:
            extrapolate(rows, args.steps)
        elif any(row["variant"] == "stock" and f"{args.steps}-step wall s" in row for row in rows):
            base = next(row for row in rows if row["variant"] == "stock")[f"{args.steps}-step wall s"]
            for row in rows:
                if isinstance(row.get(f"{args.steps}-step wall s"), float):
                    row["speedup vs stock"] = base / row[f"{args.steps}-step wall s"]
        write(f"generation_{args.model}", rows, header, notes)
    print(write(f"generation_{args.model}", rows, header, notes))


if __name__ == "__main__":
    main()
