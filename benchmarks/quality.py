"""Quality of the video methods on the shipped world model: stock vs method at the same seeds.

    PYTHONPATH=. python benchmarks/quality.py --seeds 16 --results quality_results.json   # runs what is missing
    PYTHONPATH=. python benchmarks/quality.py --report --results quality_results.json      # markdown tables
    PYTHONPATH=. python benchmarks/quality.py --device cuda --model runs/export               # on a GPU, another model

Noise is drawn on the CPU from each video's seed whatever the device, so a GPU run makes the same videos as a CPU
run up to floating-point differences (and on CUDA, sparse attention runs on our Triton block-sparse kernel).

Sections (``diffusers_attn_ext.world.tasks`` defines each task and its scores):
- ``sparse``: radial and adaptive (densities 0.5, 0.25, 0.1), each with no dense steps and with the first
  quarter of the steps dense (the authors' 12 of 50), block size 32 (a latent frame is 64 tokens); PSNR and SSIM
  of the video against the dense video at the same seed and prompt;
- ``layers``: relative L2 error of each self-attention layer's output, the method on that layer alone (every
  earlier layer dense, so its input is the dense model's own activation), on world videos encoded by the VAE and
  noised to sigma 0.5, with their captions;
- ``ultravico``: 1x to 4x the trained 9 frames, stock vs UltraViCo (``ultravico_alpha=0.9``,
  ``ultravico_train_frames=9``), object scores of one bouncing object, and the same scores of the ground-truth
  video;
- ``ditraj``: per-frame IoU of the object against the requested boxes: stock, STD-RoPE, STD-RoPE + fg/bg
  guidance (the authors' step fractions), and the ground truth's own IoU (the segmentation's ceiling);
- ``rettention``: Re-ttention (adaptive 0.1 and the 3.125% window, the first fifth of the steps dense, a refresh
  every 4 or 2 steps) against the uncorrected adaptive pattern with as many full-attention steps; PSNR and SSIM
  against the dense video, as ``sparse``;
- ``quantized``: our quantized attention kernel (``kernels.use_quantized_attention``: INT8 QK + FP8 PV, and INT8
  QK + 16-bit PV) on a bf16 copy of the transformer (VAE and text encoder float32) with ``StockAttnProcessor``
  installed (stock processors never reach the kernel), against bf16 dense attention and against the float32
  model; plus bf16 dense against float32 dense, the floor of 16-bit arithmetic itself. PSNR and SSIM at the
  ``sparse`` section's seeds and prompts. The kernel is CUDA-only: elsewhere only the bf16 row is made.

Results are appended to ``--results`` as they finish (one key per configuration), so a cut run resumes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from common import cast_as_loaded
from quality_common import open_results, quality_parser, read_results, run_sections

from diffusers_attn_ext import kernels
from diffusers_attn_ext.install import install, uninstall
from diffusers_attn_ext.pipelines.sparse_video import WanSparsePipeline
from diffusers_attn_ext.pipelines.trajectory_video import WanTrajectoryPipeline
from diffusers_attn_ext.pipelines.ultravico_video import WanUltraViCoPipeline
from diffusers_attn_ext.processors import StockAttnProcessor
from diffusers_attn_ext.sparse import sparse_processor
from diffusers_attn_ext.world import caption, load_world_video_pipeline
from diffusers_attn_ext.world.metrics import psnr, ssim
from diffusers_attn_ext.world.tasks import (
    GUIDANCE,
    SPARSE_BLOCK,
    STEPS,
    generate,
    generate_many,
    ground_truth,
    mask_steps,
    mean_interval,
    object_scores,
    rope_steps,
    sparse_scene,
    trajectory_for,
    trajectory_prompts,
    trajectory_scene,
    trajectory_score,
    ultravico_scene,
)
from diffusers_attn_ext.world.train_video import as_frames, encode_text, from_frames

DENSITIES = (0.5, 0.25, 0.1)
LENGTHS = (1, 2, 3, 4)
PSNR_CAP = 99.0  # identical videos have infinite PSNR; averaged as this


def sparse_configs(steps: int) -> dict[str, dict]:
    dense = max(1, round(steps * 12 / 50))
    configs = {}
    for first in (0, dense):
        suffix = f", first {first} steps dense" if first else ""
        configs[f"radial{suffix}"] = {"sparse_method": "radial", "sparse_dense_steps": first}
        for d in DENSITIES:
            configs[f"adaptive {d}{suffix}"] = {"sparse_method": "adaptive", "sparse_density": d,
                                                "sparse_dense_steps": first}
    for kwargs in configs.values():
        kwargs["sparse_options"] = {"block_size": SPARSE_BLOCK}
    return configs


@dataclass(frozen=True, eq=False)
class Videos:
    """One set of videos of :func:`run_against_dense`: ``pipe`` (None: ``WanSparsePipeline`` around the section's
    pipeline) called with ``kwargs`` for every seed, all of it inside ``context()``. The context's value (a dict,
    or None) is stored with every row made from these videos; it may fill the dict until it exits. Made at most
    once per section run (the same object as two rows' method or reference is generated once)."""

    kwargs: dict = field(default_factory=dict)
    pipe: Any = None
    context: Callable[[], AbstractContextManager] = nullcontext


DENSE_VIDEOS = Videos({"sparse_method": None})  # the pipeline as it is: the reference of every sparse row


def run_sparse(pipe, seeds: list[int], steps: int, results: dict, save, guidance: float = GUIDANCE) -> None:
    run_against_dense(pipe, seeds, steps, results, save, "sparse",
                      {name: ({}, Videos(kwargs), DENSE_VIDEOS) for name, kwargs in sparse_configs(steps).items()},
                      guidance)


def run_against_dense(pipe, seeds: list[int], steps: int, results: dict, save, section: str,
                      configs: dict[str, tuple[dict, Videos, Videos]], guidance: float = GUIDANCE) -> None:
    """For each config (name -> (fields stored with its result, its videos, the reference videos)): PSNR and SSIM
    of its videos against the reference videos of the same seeds and prompts (``sparse_scene`` captions), stored
    under ``{section}/{name}`` with ``seconds``, the time its videos took; configs already in ``results`` are
    skipped, and each set of videos is made only if a config still needs it, the reference first."""
    sparse = WanSparsePipeline.from_pipe(pipe)
    sparse.set_progress_bar_config(disable=True)
    prompts = [caption(sparse_scene(i)) for i in seeds]
    made: dict[int, tuple[list[torch.Tensor], dict, float]] = {}  # id(Videos) -> (videos, context's fields, s)

    def make(spec: Videos) -> tuple[list[torch.Tensor], dict, float]:
        if id(spec) not in made:
            target = spec.pipe if spec.pipe is not None else sparse
            start = time.perf_counter()
            with spec.context() as extra:
                videos = batched(lambda p, s: generate_many(target, p, s, steps=steps, guidance=guidance, **spec.kwargs),
                                 prompts, seeds)
            made[id(spec)] = videos, dict(extra or {}), time.perf_counter() - start
        return made[id(spec)]

    for name, (fields, spec, reference) in configs.items():
        key = f"{section}/{name}"
        if key in results:
            continue
        dense = make(reference)[0]
        videos, extra, seconds = make(spec)
        results[key] = {
            **fields,
            **extra,
            "psnr": [min(psnr(v, d), PSNR_CAP) for v, d in zip(videos, dense, strict=True)],
            "ssim": [ssim(v, d) for v, d in zip(videos, dense, strict=True)],
            "seconds": seconds,
        }
        save()


def rettention_configs(steps: int) -> dict[str, tuple[int, dict]]:
    """Name -> (steps with full attention, the sparse pipeline's arguments). The first fifth of the steps dense
    (docs/rettention.md's first table: 2 of 10), then a refresh every 4 or 2 steps; each Re-ttention row has an
    uncorrected adaptive row with as many full steps, all of them first."""
    first = max(1, round(steps / 5))
    configs: dict[str, tuple[int, dict]] = {}

    def adaptive(full: int, density: float = 0.1) -> None:
        configs[f"adaptive {density}, first {full} steps dense"] = (full, {
            "sparse_method": "adaptive", "sparse_density": density, "sparse_dense_steps": full,
            "sparse_options": {"block_size": SPARSE_BLOCK}})

    def rettention(refresh: int, pattern: str = "adaptive", density: float = 0.1, use_ratio: bool = True) -> int:
        full = first + -(-(steps - first) // refresh)
        suffix = "" if use_ratio else ", use_ratio=False"
        configs[f"Re-ttention {pattern} {density}, first {first} dense, refresh every {refresh}{suffix}"] = (full, {
            "sparse_method": "rettention", "sparse_density": density, "sparse_dense_steps": first,
            "sparse_options": {"block_size": SPARSE_BLOCK, "pattern": pattern, "refresh_steps": refresh,
                               "use_ratio": use_ratio}})
        return full

    adaptive(first)
    for refresh in (4, 2):
        adaptive(rettention(refresh))
    rettention(4, use_ratio=False)
    window = 1 / 32  # one block of 32 tokens per row of a 576-token video: the authors' 3.125%
    adaptive(first, window)
    adaptive(rettention(4, "window", window), window)
    return configs


def run_rettention(pipe, seeds: list[int], steps: int, results: dict, save, guidance: float = GUIDANCE) -> None:
    run_against_dense(pipe, seeds, steps, results, save, "rettention",
                      {name: ({"full_steps": full}, Videos(kwargs), DENSE_VIDEOS)
                       for name, (full, kwargs) in rettention_configs(steps).items()}, guidance)


QUANTIZED_PV = {"fp8": "FP8 PV", "bf16": "16-bit PV"}  # use_quantized_attention's pv -> the rows' wording


def bf16_pipeline(pipe):
    """A ``WanSparsePipeline`` sharing ``pipe``'s VAE, text encoder and scheduler, with a bf16 copy of its
    transformer on which :class:`StockAttnProcessor` is installed (so its attention calls reach our dispatcher
    and, opted in, the quantized kernel). ``pipe``'s own float32 weights are only read.

    The copy is bf16 as diffusers' ``from_pretrained(torch_dtype=torch.bfloat16)`` makes it: the modules of the
    class's ``_keep_in_fp32_modules`` (Wan: rope, time_embedder, scale_shift_table, norm1-3) stay float32, as
    diffusers warns a plain ``.to(torch.bfloat16)`` would not. It is built from the config and loaded from the
    state dict rather than deep-copied, so that context hooks an earlier section left on ``pipe.transformer``
    (which hold its pipeline) are not copied with it, and cast after ``from_pipe``, which casts every component to
    its ``dtype`` argument (float32 by default). Diffusers' Wan pipeline casts the text embeddings and latents to
    the transformer's dtype for each step and the latents back to the VAE's dtype for decoding, so the rest of the
    pipeline stays float32."""
    source = pipe.transformer
    transformer = type(source).from_config(source.config)
    transformer.load_state_dict(source.state_dict())
    transformer = transformer.to(source.device).eval()
    bf16 = WanSparsePipeline.from_pipe(pipe, transformer=transformer)
    cast_as_loaded(transformer, torch.bfloat16)
    if bf16.transformer is not transformer or transformer.dtype != torch.bfloat16:
        raise RuntimeError(f"the bf16 pipeline's transformer is {bf16.transformer.dtype}")
    bf16.set_progress_bar_config(disable=True)
    install(bf16, StockAttnProcessor())
    return bf16


@contextmanager
def unquantized_attention():
    """The quantized kernel off inside, whatever the process set (the bf16 dense reference must be bf16 dense)."""
    with kernels.use_quantized_attention(False):
        yield None


@contextmanager
def quantized_attention(pv: str):
    """Our processors' calls on the quantized kernel with PV precision ``pv`` inside; yields the fields stored
    with the rows: ``kernel`` (``kernels.kernel_report()["quantized"]`` inside) and, filled on exit,
    ``quantized_calls``, the launches of the kernel counted inside. RuntimeError unless every self-attention
    request (query and key of one shape) the dispatcher saw inside was launched on the kernel: else the rows
    would be partly or wholly bf16 dense under another name."""
    from diffusers_attn_ext.kernels import triton_ops

    fields, self_attention = {}, []

    def counted(request):
        self_attention.extend([1] if request.key.shape == request.query.shape else [])
        return choose(request)

    choose = kernels.quantized_kernel
    with kernels.use_quantized_attention(True, pv=pv), \
            mock.patch.object(kernels, "quantized_kernel", counted), \
            mock.patch.object(triton_ops, "quantized", wraps=triton_ops.quantized) as launches:
        fields["kernel"] = kernels.kernel_report()["quantized"]
        yield fields
    if launches.call_count == 0 or launches.call_count != len(self_attention):
        raise RuntimeError(f"the quantized kernel (pv={pv!r}) took {launches.call_count} of "
                           f"{len(self_attention)} self-attention calls: {fields['kernel']}")
    fields["quantized_calls"] = launches.call_count


def quantized_configs(pipe, cuda: bool) -> dict[str, tuple[dict, Videos, Videos]]:
    """The ``quantized`` section's rows: bf16 dense vs float32 dense, and (``cuda`` only) each PV precision of
    the quantized kernel vs bf16 dense and vs float32 dense. Builds the bf16 pipeline only when called."""
    bf16 = bf16_pipeline(pipe)
    dense16 = Videos({"sparse_method": None}, bf16, unquantized_attention)
    configs = {"bf16 dense": ({"reference": "bf16 dense vs float32 dense"}, dense16, DENSE_VIDEOS)}
    if not cuda:
        return configs
    for pv, wording in QUANTIZED_PV.items():
        videos = Videos({"sparse_method": None}, bf16, lambda pv=pv: quantized_attention(pv))
        for reference, against in (("bf16 dense", dense16), ("float32 dense", DENSE_VIDEOS)):
            suffix = "" if against is dense16 else ", vs float32"
            configs[f"INT8 QK + {wording}{suffix}"] = (
                {"reference": f"quantized INT8 QK + {wording} vs {reference}"}, videos, against)
    return configs


def run_quantized(pipe, seeds: list[int], steps: int, results: dict, save, guidance: float = GUIDANCE) -> None:
    """The ``quantized`` section (module docstring). Without CUDA (or with the pipeline off CUDA) only the bf16
    row is made; the quantized rows are left out of ``results``, so a CUDA run with the same file fills them in."""
    cuda = pipe.device.type == "cuda"
    if not cuda:
        print("quantized: the quantized kernel needs CUDA (this pipeline is on "
              f"{pipe.device.type}): only the bf16-vs-float32 row is made, the quantized rows are skipped", flush=True)
    configs = quantized_configs(pipe, cuda)
    try:
        run_against_dense(pipe, seeds, steps, results, save, "quantized", configs, guidance)
    finally:
        uninstall(configs["bf16 dense"][1].pipe)


def run_layers(pipe, seeds: list[int], results: dict, save) -> None:
    """Per-layer attention-output relative L2 error, one layer sparse at a time."""
    if all(f"layers/{name}" in results for name in _layer_configs()):
        return
    transformer = pipe.transformer
    scenes = [sparse_scene(i) for i in seeds]
    device = pipe.device
    with torch.no_grad():
        video = torch.stack([ground_truth(s, 9) for s in scenes]).permute(0, 2, 1, 3, 4).to(device) * 2 - 1
        latents = from_frames(pipe.vae.encode(as_frames(video)).latent_dist.mode(), len(scenes))
        mean = torch.tensor(pipe.vae.config.latents_mean, device=device).view(1, -1, 1, 1, 1)
        std = torch.tensor(pipe.vae.config.latents_std, device=device).view(1, -1, 1, 1, 1)
        latents = (latents - mean) / std
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)).to(device)
        noisy = 0.5 * latents + 0.5 * noise
        text = encode_text(pipe, [caption(s) for s in scenes], device)
        timestep = torch.full((len(scenes),), 500.0, device=device)
    layers = [f"blocks.{i}.attn1" for i in range(len(transformer.blocks))]

    def outputs(selected: list[str]) -> dict[str, torch.Tensor]:
        captured = {}
        handles = [transformer.get_submodule(name).register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out)) for name in selected]
        try:
            with torch.no_grad():
                transformer(hidden_states=noisy, timestep=timestep, encoder_hidden_states=text, return_dict=False)
        finally:
            for h in handles:
                h.remove()
        return captured

    reference = outputs(layers)
    for name, make in _layer_configs().items():
        key = f"layers/{name}"
        if key in results:
            continue
        errors = []
        for layer in layers:
            install(pipe, make(), layers=layer.replace(".", r"\.") + "$")
            try:
                out = outputs([layer])[layer]
            finally:
                uninstall(pipe)
            ref = reference[layer]
            errors.append(float((out - ref).norm() / ref.norm()))
        results[key] = {"rel_l2_per_layer": errors}
        save()


def _layer_configs() -> dict:
    configs = {"radial": lambda: sparse_processor("radial", block_size=SPARSE_BLOCK)}
    for d in DENSITIES:
        configs[f"adaptive {d}"] = lambda d=d: sparse_processor("adaptive", density=d, block_size=SPARSE_BLOCK)
    return configs


def run_ultravico(pipe, seeds: list[int], steps: int, results: dict, save, lengths=LENGTHS,
                  methods=("stock", "UltraViCo"), guidance: float = GUIDANCE) -> None:
    uv = WanUltraViCoPipeline.from_pipe(pipe)
    uv.set_progress_bar_config(disable=True)
    scenes = [ultravico_scene(i) for i in seeds]
    prompts = [caption(s) for s in scenes]
    for ratio in lengths:
        frames = 9 * ratio
        key = f"ultravico/{ratio}x/ground truth"
        if key not in results:
            results[key] = _scores([object_scores(ground_truth(s, frames), s) for s in scenes])
        for method in methods:
            key = f"ultravico/{ratio}x/{method}"
            if key in results:
                continue
            start = time.perf_counter()
            if method == "stock":
                videos = batched(lambda p, s, f=frames: generate_many(pipe, p, s, frames=f, steps=steps, guidance=guidance), prompts, seeds,
                                 size=max(1, 8 // ratio))
            else:
                videos = batched(lambda p, s, f=frames: generate_many(uv, p, s, frames=f, steps=steps, guidance=guidance,
                                                                       ultravico_train_frames=9, ultravico_alpha=0.9),
                                 prompts, seeds, size=max(1, 8 // ratio))
            results[key] = {**_scores([object_scores(v, s) for v, s in zip(videos, scenes, strict=True)]),
                            "seconds": time.perf_counter() - start}
            save()


def run_ditraj(pipe, seeds: list[int], steps: int, results: dict, save, guidance: float = GUIDANCE) -> None:
    traj = WanTrajectoryPipeline.from_pipe(pipe)
    traj.set_progress_bar_config(disable=True)
    scenes = [trajectory_scene(i) for i in seeds]
    key = "ditraj/ground truth"
    if key not in results:
        results[key] = {"iou": [trajectory_score(ground_truth(s, 9), s) for s in scenes]}
    for method in ("stock", "STD-RoPE", "STD-RoPE + fg/bg"):
        key = f"ditraj/{method}"
        if key in results:
            continue
        start = time.perf_counter()
        ious = []
        for seed, scene in zip(seeds, scenes, strict=True):
            prompts = trajectory_prompts(scene)
            kwargs = {}
            if method != "stock":
                kwargs = {"trajectory": trajectory_for(scene), "trajectory_rope_steps": rope_steps(steps)}
            if method == "STD-RoPE + fg/bg":
                kwargs.update(foreground_prompt=prompts["foreground_prompt"],
                              background_prompt=prompts["background_prompt"], trajectory_mask_steps=mask_steps(steps))
            video = generate(traj, prompts["prompt"], seed=seed, steps=steps, guidance=guidance, **kwargs)
            ious.append(trajectory_score(video, scene))
        results[key] = {"iou": ious, "seconds": time.perf_counter() - start}
        save()


def _scores(rows: list[dict]) -> dict[str, list[float]]:
    return {k: [r[k] for r in rows] for k in rows[0]}


def batched(fn, prompts: list[str], seeds: list[int], size: int = 8) -> list[torch.Tensor]:
    videos = []
    for i in range(0, len(prompts), size):
        videos.extend(fn(prompts[i:i + size], seeds[i:i + size]))
    return videos


# ------------------------------------------------------------------------------------------------ report
def _cell(values: list[float], digits: int = 2) -> str:
    mean, half = mean_interval(values)
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if not math.isnan(half) else f"{mean:.{digits}f}"


def _section(results: dict, name: str) -> dict:
    """The results of section ``name``, keyed by configuration (the part of the key after ``name/``)."""
    prefix = f"{name}/"
    return {k[len(prefix):]: v for k, v in results.items() if k.startswith(prefix)}


def _against_dense_table(title: str, rows: dict, columns: dict[str, str] | None = None) -> list[str]:
    """Markdown lines of a PSNR/SSIM-against-dense table (``run_against_dense``), with the stored fields of
    ``columns`` (field -> header; "-" where a row lacks it) after the method."""
    columns = columns or {}
    extra = "".join(f" {header} |" for header in columns.values())
    lines = [f"### {title}", "", f"| method |{extra} PSNR (dB) | SSIM | seconds (all seeds) |",
             "|---|" + "---|" * len(columns) + "---|---|---|"]
    for k, v in rows.items():
        cells = "".join(f" {v.get(name, '-')} |" for name in columns)
        lines.append(f"| {k} |{cells} {_cell(v['psnr'])} | {_cell(v['ssim'], 3)} | {v['seconds']:.0f} |")
    return lines + [""]


def report(results: dict) -> str:
    lines = []
    sparse = _section(results, "sparse")
    if sparse:
        lines += _against_dense_table("Sparse attention vs dense (same seed and prompt)", sparse)
    layers = _section(results, "layers")
    if layers:
        n = len(next(iter(layers.values()))["rel_l2_per_layer"])
        lines += ["### Attention-output relative L2 error per self-attention layer (that layer sparse alone)", "",
                  "| method | " + " | ".join(f"layer {i}" for i in range(n)) + " |", "|---|" + "---|" * n]
        lines += [f"| {k} | " + " | ".join(f"{e:.3f}" for e in v["rel_l2_per_layer"]) + " |" for k, v in layers.items()]
        lines.append("")
    uv = _section(results, "ultravico")
    if uv:
        lines += ["### UltraViCo: one bouncing object at 1x-4x the trained length (9 frames)", "",
                  "| length | video | presence | continuity | speed / prompt's | repetition at lag 9 (dB) | "
                  "edge sharpness |", "|---|---|---|---|---|---|---|"]
        for k, v in uv.items():
            length, method = k.split("/", 1)
            lines.append(f"| {length} | {method} | {_cell(v['presence'])} | {_cell(v['continuity'])} | "
                         f"{_cell(v['speed_ratio'])} | {_cell(v['repetition'], 1)} | {_cell(v['sharpness'], 3)} |")
        lines.append("")
    traj = _section(results, "ditraj")
    if traj:
        lines += ["### DiTraj: mean per-frame IoU of the object against the requested boxes", "",
                  "| video | IoU |", "|---|---|"]
        lines += [f"| {k} | {_cell(v['iou'], 3)} |" for k, v in traj.items()]
        lines.append("")
    rett = _section(results, "rettention")
    if rett:
        lines += _against_dense_table("Re-ttention vs the uncorrected adaptive pattern with as many full-attention steps",
                                      rett, {"full_steps": "full steps"})
    quantized = _section(results, "quantized")
    if quantized:
        lines += _against_dense_table("Quantized attention (our kernel, bf16 transformer) and bf16 dense, same seed "
                                      "and prompt", quantized, {"reference": "reference", "kernel": "kernel",
                                                                "quantized_calls": "kernel launches"})
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = quality_parser(__doc__.split("\n")[0], steps=STEPS, sections="sparse,layers,ditraj,ultravico,rettention,quantized",
                            results="quality_results.json")
    parser.add_argument("--lengths", default="1,2,3,4", help="ultravico: multiples of the trained length")
    parser.add_argument("--methods", default="stock,UltraViCo", help="ultravico: which videos")
    parser.add_argument("--guidance", type=float, default=GUIDANCE, help="default: the model's (world.tasks)")
    args = parser.parse_args(argv)
    if args.report:
        print(report(read_results(args.results)))
        return
    results, save = open_results(args, guidance=args.guidance)
    pipe = load_world_video_pipeline(args.model).to(args.device)
    seeds = list(range(args.seeds))
    g = args.guidance
    runners = {"sparse": lambda: run_sparse(pipe, seeds, args.steps, results, save, g),
               "layers": lambda: run_layers(pipe, seeds, results, save),
               "ultravico": lambda: run_ultravico(pipe, seeds, args.steps, results, save,
                                                  [int(x) for x in args.lengths.split(",")], args.methods.split(","), g),
               "ditraj": lambda: run_ditraj(pipe, seeds, args.steps, results, save, g),
               "rettention": lambda: run_rettention(pipe, seeds, args.steps, results, save, g),
               "quantized": lambda: run_quantized(pipe, seeds, args.steps, results, save, g)}
    run_sections(args.sections, runners, results, save, report)


if __name__ == "__main__":
    main()
