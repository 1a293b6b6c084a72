"""The quantized attention kernel on the GPU (issue 19): INT8 Q/K (per-block scales, smoothed keys) with FP8 e4m3
P/V (``kernels/quantized_triton.py``) against dense cuDNN SDPA bf16 and our bf16 block-sparse Triton kernel, at the
Wan2.1-1.3B self-attention shape (12 heads, 21x30x52 = 32760 tokens) and the Wan2.1-14B shape (40 heads,
21x45x80 = 75600 tokens at 720p/81f), d 128, B 1.

1. Accuracy (1.3B shape, full-size tensors): rel. L2 error (%) of each kernel's output against cuDNN bf16 (whole
   output) and against float64 attention on a fixed sample of 256 query rows (all heads, all keys), on three kinds
   of q/k/v: standard normal; "DiT-like" (keys with a shared per-channel offset of 3 sigma and queries with 4 outlier
   channels, the statistics that key smoothing is for); and "local" (benchmarks/sparse.py's spatio-temporal
   locality). The INT8-QK variants with 16-bit PV, and FP8 without smoothing, show where the error comes from.
   Block-sparse rows use the adaptive draft pattern at density 0.25 on the local inputs (vs float64 with the same
   mask).
2. Speed: median ms (CUDA events, 5 calls queued back to back as inside a forward; quantization pre-pass included)
   at density 1 (dense-equivalent: the quantized kernel without a table, our bf16 kernel with a full table) and at
   random per-head tables of density 0.5/0.25/0.1 (diagonal kept). "x cuDNN" is cuDNN's time over the kernel's;
   "x cuDNN * d" its efficiency against the ideal 1/d. Targets (issue 19): quantized dense-equivalent >= 1.6x
   cuDNN; quantized block-sparse >= 1.5/d, i.e. "x cuDNN * d" >= 1.5. The pre-pass alone is timed as the quantized
   kernel on an empty table (the attention programs exit at once).

    PYTHONPATH=. python benchmarks/quantized_kernel.py --output $OUT [--quick] [--configs | --configs-only]
        [--budget S] [--smoke]

``--quick``: 1.3B shape with all densities, 14B at densities 1 and 0.1. ``--configs``: also, timed last, the
tuning rows at densities 1 and 0.1 (1.3B): the FP8 and 16-bit-PV kernels with each INT32 -> float32 cast
(``config["int_to_float"]``: "convert" = I2F, "magic" = the exact magic-number cast, "magic-fma" = its offset
folded into the exponent's FMA, the default; ``quantized_triton`` module docstring) at 8 warps / 3 stages, then the
default cast at 8 warps with 2 and 4 stages (and FP8 at 4 warps / 3 stages); with them, per cast, the outputs'
accuracy on the 1.3B inputs (whether "magic" is bit for bit "convert" on the GPU too) and, in the speed table's
notes, the INT32 -> float32 conversions left in each compiled attention kernel (PTX ``cvt.rn.f32.s32``, SASS
``I2F``), which shows whether the compiler kept the cast. ``--configs-only``: cuDNN and the tuning rows alone (the
decision in one short run). ``--smoke``: tiny shapes on CPU through Triton's interpreter (only checks that the
script runs; its numbers mean nothing). Writes quantized_accuracy.{json,md} and quantized_speed.{json,md} under
--output, after every row.
"""

from __future__ import annotations

import math

import torch
from harness import Deadline, parser, setup, synchronize, wall_ms, write

SHAPES = {  # name: (heads, frames, height, width) in latent tokens after patching
    "Wan2.1-1.3B 480p 81f": (12, 21, 30, 52),
    "Wan2.1-14B 720p 81f": (40, 21, 45, 80),
}
SMOKE_SHAPE = {"smoke (2 heads, 3x10x13)": (2, 3, 10, 13)}
DENSITIES = (1.0, 0.5, 0.25, 0.1)
TARGET_DENSE, TARGET_SPARSE = 1.6, 1.5
BACK_TO_BACK = 5
SAMPLE_ROWS = 256


class Bench:
    """Inputs, kernels and timing of one run (CUDA, or Triton's interpreter on CPU for ``--smoke``)."""

    def __init__(self, args):
        from diffusers_attn_ext.kernels import block_sparse_triton, quantized_triton
        from diffusers_attn_ext.kernels.block_sparse_table import mark_static

        self.smoke = args.smoke
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.dtype = torch.bfloat16 if self.device == "cuda" else torch.float32  # the interpreter's 16-bit dots are wrong
        self.head_dim = 64 if args.smoke else 128
        self.deadline = Deadline(args.budget)
        self.shapes = SMOKE_SHAPE if args.smoke else SHAPES
        self.mark_static = mark_static
        cuda = self.device == "cuda"
        self.sparse = block_sparse_triton.block_sparse_attention if cuda else block_sparse_triton.launch_block_sparse
        self.quantized = quantized_triton.quantized_block_sparse_attention if cuda else quantized_triton.launch_quantized
        self.fp8_supported = quantized_triton.fp8_supported
        self.notes: list[str] = []

    def qkv(self, heads: int, grid: tuple[int, int, int], kind: str = "gaussian", seed: int = 0):
        """q, k, v ``[1, N, heads, D]`` of one kind (module docstring)."""
        if kind == "local" and self.device == "cuda":
            from sparse import local_qkv

            return local_qkv(heads, *grid, seed=seed, dtype=self.dtype)
        g = torch.Generator(self.device).manual_seed(seed)
        n, d = math.prod(grid), self.head_dim
        q, k, v = (torch.randn(1, n, heads, d, generator=g, device=self.device) for _ in range(3))
        if kind == "DiT-like":
            k = k + 3.0 * torch.randn(1, 1, heads, d, generator=g, device=self.device)
            q[..., :4] *= 8.0
        return [x.to(self.dtype).contiguous() for x in (q, k, v)]

    def random_table(self, heads: int, blocks: int, density: float, seed: int = 0) -> torch.Tensor:
        """A static ``[1, heads, blocks, blocks]`` table keeping the diagonal and a random ``density`` per head."""
        g = torch.Generator(self.device).manual_seed(seed)
        table = torch.rand(1, heads, blocks, blocks, generator=g, device=self.device) < density
        table[..., torch.arange(blocks), torch.arange(blocks)] = True
        return self.mark_static(table)

    def dense(self, q, k, v):
        """cuDNN SDPA (plain SDPA on CPU) on ``[B, N, H, D]``."""
        args = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        if self.device != "cuda":
            return torch.nn.functional.scaled_dot_product_attention(*args).transpose(1, 2)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(*args).transpose(1, 2)

    def time_ms(self, fn, heavy: bool = False) -> float:
        if self.device != "cuda":
            return wall_ms(fn, warmup=1, iters=1)
        from common import cuda_time_ms

        if heavy:  # the 14B shape: fewer repetitions
            return cuda_time_ms(fn, warmup=1, iters=5, back_to_back=2)
        return cuda_time_ms(fn, warmup=2, iters=10, back_to_back=BACK_TO_BACK)


def float64_rows(q, k, v, rows: torch.Tensor, table: torch.Tensor | None) -> torch.Tensor:
    """Float64 attention of the sampled query ``rows``, ``[1, rows, H, D]`` (all keys; ``table`` masks)."""
    n, d = q.shape[1], q.shape[-1]
    qd = q[:, rows].double().transpose(1, 2)
    kd, vd = k.double().transpose(1, 2), v.double().transpose(1, 2)
    out = []
    for h in range(q.shape[2]):  # one head at a time: rows x N float64 scores
        scores = qd[:, h] @ kd[:, h].transpose(-1, -2) * d**-0.5
        if table is not None:
            t = table[0, min(h, table.shape[1] - 1)]
            keep = t[(rows // 128)[:, None], (torch.arange(n, device=q.device) // 128)[None, :]]
            scores = scores.masked_fill(~keep, -math.inf)
        out.append(scores.softmax(-1) @ vd[:, h])
    return torch.stack(out, 2)


def rel_percent(a: torch.Tensor, b: torch.Tensor) -> float:
    return 100 * ((a.double() - b.double()).norm() / b.double().norm()).item()


def dense_variants(bench: Bench, heads: int, blocks: int) -> dict:
    """The density-1 kernels compared for accuracy: name -> fn(q, k, v)."""
    return {
        "cuDNN bf16 (noise floor)": bench.dense,
        "Triton bf16 (all blocks)": lambda q, k, v: bench.sparse(q, k, v, bench.random_table(heads, blocks, 1.0)),
        "quantized INT8 QK + FP8 PV": lambda q, k, v: bench.quantized(q, k, v, pv_dtype="fp8"),
        "quantized INT8 QK + 16-bit PV": lambda q, k, v: bench.quantized(q, k, v, pv_dtype="bf16"),
        "quantized FP8 PV, keys not smoothed": lambda q, k, v: bench.quantized(q, k, v, pv_dtype="fp8",
                                                                                 smooth_keys=False),
    }


def accuracy_rows(bench: Bench, shape: str, rows_out: list, header: str) -> None:
    heads, *grid = bench.shapes[shape]
    n = math.prod(grid)
    blocks = -(-n // 128)
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:SAMPLE_ROWS].sort().values.to(bench.device)
    for kind in ("gaussian", "DiT-like", "local"):
        if not bench.deadline.allows(10):
            print(f"accuracy on {kind} inputs skipped: time budget")
            return
        q, k, v = bench.qkv(heads, tuple(grid), kind, seed=1)
        reference, exact = bench.dense(q, k, v), float64_rows(q, k, v, sample, None)
        for name, fn in dense_variants(bench, heads, blocks).items():
            try:
                out = fn(q, k, v)
            except Exception as error:  # report and go on: one failing kernel must not hide the others
                rows_out.append({"inputs": kind, "kernel": name, "density": 1.0,
                                 "error": f"{type(error).__name__}: {error}"[:200]})
                continue
            rows_out.append({"inputs": kind, "kernel": name, "density": 1.0, "bf16 baseline": "cuDNN",
                             "rel. L2 % vs bf16 baseline": rel_percent(out, reference),
                             "rel. L2 % vs float64 (sampled rows)": rel_percent(out[:, sample], exact)})
            write("quantized_accuracy", rows_out, header)
        if kind == "local":  # block-sparse: the adaptive draft pattern of these inputs, density 0.25
            from diffusers_attn_ext.processors.adaptive_sparse import draft_block_pattern

            table = bench.mark_static(draft_block_pattern(q, k, 128, density=0.25))
            exact_sparse, bf16_sparse = float64_rows(q, k, v, sample, table), bench.sparse(q, k, v, table)
            for name, out in (("Triton bf16 block-sparse", bf16_sparse),
                              ("quantized block-sparse INT8 QK + FP8 PV", bench.quantized(q, k, v, table, pv_dtype="fp8"))):
                rows_out.append({"inputs": kind, "kernel": name, "density": table.float().mean().item(),
                                 "bf16 baseline": "Triton bf16 block-sparse, same mask",
                                 "rel. L2 % vs bf16 baseline": rel_percent(out, bf16_sparse),
                                 "rel. L2 % vs float64 (sampled rows)": rel_percent(out[:, sample], exact_sparse)})
            write("quantized_accuracy", rows_out, header)


class SpeedTable:
    """Rows of the speed table for one shape: every kernel timed against cuDNN on the same q/k/v."""

    def __init__(self, bench: Bench, shape: str, rows_out: list, header: str):
        self.bench, self.shape, self.rows, self.header = bench, shape, rows_out, header
        self.heavy = "14B" in shape
        heads, *grid = bench.shapes[shape]
        self.heads, self.blocks = heads, -(-math.prod(grid) // 128)
        self.q, self.k, self.v = bench.qkv(heads, tuple(grid), seed=0)
        self.dense_ms = bench.time_ms(lambda: bench.dense(self.q, self.k, self.v), self.heavy)
        self.rows.append({"shape": shape, "kernel": "cuDNN SDPA bf16", "density": 1.0, "ms": self.dense_ms,
                          "x cuDNN": 1.0, "x cuDNN * d": 1.0, "target": "", "meets target": ""})
        write("quantized_speed", self.rows, header, bench.notes)

    def add(self, kernel: str, density: float, fn, target: float | None = None, per_density: bool = False) -> None:
        """Time ``fn(q, k, v)``; ``target`` is on "x cuDNN" (dense) or on "x cuDNN * d" (``per_density``)."""
        if not self.bench.deadline.allows(20 if self.heavy else 5):
            print(f"{kernel} at density {density:.2f} on {self.shape} skipped: time budget")
            return
        try:
            ms = self.bench.time_ms(lambda: fn(self.q, self.k, self.v), self.heavy)
        except Exception as error:  # a tuning config may not fit shared memory; report and go on
            self.rows.append({"shape": self.shape, "kernel": kernel, "density": density,
                              "error": f"{type(error).__name__}: {error}"[:200]})
            print(f"{kernel} on {self.shape} failed: {type(error).__name__}: {str(error)[:300]}")
            return
        speedup = self.dense_ms / ms
        reached = speedup * density if per_density else speedup
        self.rows.append({
            "shape": self.shape, "kernel": kernel, "density": density, "ms": ms, "x cuDNN": speedup,
            "x cuDNN * d": speedup * density,
            "target": "" if target is None else (f">= {target}/d" if per_density else f">= {target}x"),
            "meets target": "" if target is None else str(reached >= target),
        })
        write("quantized_speed", self.rows, self.header, self.bench.notes)


def speed_rows(bench: Bench, shape: str, densities, rows_out: list, header: str) -> None:
    table = SpeedTable(bench, shape, rows_out, header)
    heads, blocks, quantized, sparse = table.heads, table.blocks, bench.quantized, bench.sparse
    empty = bench.mark_static(torch.zeros(1, heads, blocks, blocks, dtype=torch.bool, device=bench.device))
    table.add("quantize pre-pass only (empty table)", 0.0, lambda q, k, v: quantized(q, k, v, empty, pv_dtype="fp8"))
    for density in densities:
        if density >= 1.0:
            full = bench.random_table(heads, blocks, 1.0)
            table.add("Triton bf16 (all blocks)", 1.0, lambda q, k, v, t=full: sparse(q, k, v, t))
            table.add("quantized INT8 QK + FP8 PV (no table)", 1.0, lambda q, k, v: quantized(q, k, v, pv_dtype="fp8"),
                      TARGET_DENSE)
            table.add("quantized INT8 QK + 16-bit PV (no table)", 1.0,
                      lambda q, k, v: quantized(q, k, v, pv_dtype="bf16"))
            continue
        mask = bench.random_table(heads, blocks, density)
        d = mask.float().mean().item()
        table.add("Triton bf16 block-sparse", d, lambda q, k, v, t=mask: sparse(q, k, v, t))
        table.add("quantized block-sparse INT8 QK + FP8 PV", d, lambda q, k, v, t=mask: quantized(q, k, v, t, pv_dtype="fp8"),
                  TARGET_SPARSE, per_density=True)
        table.add("quantized block-sparse INT8 QK + 16-bit PV", d,
                  lambda q, k, v, t=mask: quantized(q, k, v, t, pv_dtype="bf16"))
    synchronize()


CASTS = ("convert", "magic", "magic-fma")  # quantized_triton.INT_TO_FLOAT, in the order of the tuning rows
PV_NAMES = {"fp8": "FP8 PV", "bf16": "16-bit PV"}


def tuning_configs() -> list[tuple[str, dict]]:
    """(pv_dtype, config) of the tuning rows: each cast at the default launch, then the default cast at other
    pipeline depths."""
    configs = [(pv, {"int_to_float": cast}) for pv in PV_NAMES for cast in CASTS]
    configs += [(pv, {"num_warps": 8, "num_stages": stages}) for pv in PV_NAMES for stages in (2, 4)]
    return configs + [("fp8", {"num_warps": 4, "num_stages": 3})]


def conversion_notes(kernel) -> list[str]:
    """Per compiled variant of the attention kernel so far (none under the interpreter): its constants, launch and
    INT32 -> float32 conversions (PTX ``cvt.rn.f32.s32``, SASS ``I2F``): whether the compiler kept the cast."""
    notes = []
    for cache in getattr(kernel, "device_caches", {}).values():
        for compiled in cache[0].values():
            if not hasattr(compiled, "asm"):
                continue
            try:
                constants = {kernel.arg_names[key[0]]: value for key, value in compiled.src.constants.items()}
                name = ", ".join(f"{c} {constants.get(c)}" for c in ("INT_TO_FLOAT", "PV_FP8", "SPARSE", "RULE"))
                name += f", w{compiled.metadata.num_warps} s{compiled.metadata.num_stages}"
            except Exception as error:  # Triton's internals differ between versions
                name = f"(constants n/a: {type(error).__name__})"
            ptx = compiled.asm["ptx"].count("cvt.rn.f32.s32")
            try:
                sass = str(compiled.asm["sass"].count("I2F"))
            except Exception as error:  # the disassembler may be missing
                sass = f"n/a ({type(error).__name__})"
            notes.append(f"compiled attention kernel {name}: PTX cvt.rn.f32.s32 {ptx}, SASS I2F {sass}")
    return notes


def cast_accuracy(bench: Bench, table: SpeedTable, rows_out: list, header: str) -> None:
    """Each cast's output on the speed table's gaussian inputs, against cuDNN and float64 rows, and whether it is
    bit for bit the "convert" output."""
    n = table.q.shape[1]
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:SAMPLE_ROWS].sort().values.to(bench.device)
    q, k, v = table.q, table.k, table.v
    reference, exact = bench.dense(q, k, v), float64_rows(q, k, v, sample, None)
    for pv in PV_NAMES:
        outs = {}
        for cast in CASTS:
            try:
                outs[cast] = bench.quantized(q, k, v, pv_dtype=pv, config={"int_to_float": cast})
            except Exception as error:
                rows_out.append({"inputs": "gaussian (speed inputs)", "kernel": f"quantized {PV_NAMES[pv]}, {cast}",
                                 "density": 1.0, "error": f"{type(error).__name__}: {error}"[:200]})
                continue
            out = outs[cast]
            rows_out.append({
                "inputs": "gaussian (speed inputs)", "kernel": f"quantized {PV_NAMES[pv]}, int_to_float {cast}",
                "density": 1.0, "bf16 baseline": "cuDNN", "rel. L2 % vs bf16 baseline": rel_percent(out, reference),
                "rel. L2 % vs float64 (sampled rows)": rel_percent(out[:, sample], exact),
                "bit-equal to convert": str(torch.equal(out, outs["convert"])) if "convert" in outs else "",
                "rel. L2 % vs convert": rel_percent(out, outs["convert"]) if "convert" in outs else "",
            })
            write("quantized_accuracy", rows_out, header)


def config_rows(bench: Bench, shape: str, rows_out: list, header: str, accuracy: list, accuracy_header: str) -> None:
    """The tuning rows (:func:`tuning_configs`) at density 1 and 0.1, the casts' accuracy, and the conversions
    left in each compiled kernel (notes)."""
    from diffusers_attn_ext.kernels.quantized_triton import DEFAULT_CONFIG, INT_TO_FLOAT, _quantized_forward

    assert set(CASTS) == set(INT_TO_FLOAT), (CASTS, INT_TO_FLOAT)
    table = SpeedTable(bench, shape, rows_out, header)
    mask = bench.random_table(table.heads, table.blocks, 0.1)
    d = mask.float().mean().item()
    for pv, config in tuning_configs():
        full = {**DEFAULT_CONFIG, "int_to_float": INT_TO_FLOAT[0], **config}
        label = f"{PV_NAMES[pv]} {full['int_to_float']} w{full['num_warps']} s{full['num_stages']}"
        target = pv == "fp8"
        table.add(f"quantized {label} (no table)", 1.0,
                  lambda q, k, v, c=config, pv=pv: bench.quantized(q, k, v, pv_dtype=pv, config=c),
                  TARGET_DENSE if target else None)
        table.add(f"quantized block-sparse {label}", d,
                  lambda q, k, v, c=config, pv=pv: bench.quantized(q, k, v, mask, pv_dtype=pv, config=c),
                  TARGET_SPARSE if target else None, per_density=True)
    bench.notes.extend(conversion_notes(_quantized_forward))
    write("quantized_speed", rows_out, header, bench.notes)
    if bench.deadline.allows(5):
        cast_accuracy(bench, table, accuracy, accuracy_header)
    else:
        print("cast accuracy skipped: time budget")


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--configs", action="store_true",
                   help="also the tuning rows: INT32 -> float32 casts, pipeline stages (timed last)")
    p.add_argument("--configs-only", action="store_true", help="cuDNN and the tuning rows alone")
    args = p.parse_args()
    setup(args)
    from common import device_name

    bench = Bench(args)
    device = device_name()
    shapes = list(bench.shapes)
    fp8 = "" if args.smoke else f"; FP8 tensor cores: {bench.fp8_supported()}"
    notes = [f"targets (issue 19): quantized dense-equivalent >= {TARGET_DENSE}x cuDNN bf16; quantized block-sparse "
             f"x cuDNN * d >= {TARGET_SPARSE}",
             "times include the quantization pre-pass (Q/K INT8, V FP8 transposed, K mean, V channel scales)"]
    if args.smoke:
        notes.append("SMOKE RUN on CPU through Triton's interpreter: the numbers mean nothing")
    bench.notes = notes
    speed: list[dict] = []
    speed_header = f"Quantized attention speed, d {bench.head_dim}, B 1, {device}{fp8}"
    accuracy: list[dict] = []
    accuracy_header = f"Quantized attention accuracy, {shapes[0]}, d {bench.head_dim}, {device}{fp8}"
    # In order of need, so that a run cut by its budget keeps the most: the first shape's speeds, the accuracy,
    # the second shape's speeds, then tuning configs.
    if not args.configs_only:
        speed_rows(bench, shapes[0], DENSITIES, speed, speed_header)
        accuracy_rows(bench, shapes[0], accuracy, accuracy_header)
        print(write("quantized_accuracy", accuracy, accuracy_header))
        for shape in shapes[1:]:
            speed_rows(bench, shape, (1.0, 0.1) if args.quick else DENSITIES, speed, speed_header)
    if args.configs or args.configs_only:
        config_rows(bench, shapes[0], speed, speed_header, accuracy, accuracy_header)
        print(write("quantized_accuracy", accuracy, accuracy_header))
    print(write("quantized_speed", speed, speed_header, notes))


if __name__ == "__main__":
    main()
