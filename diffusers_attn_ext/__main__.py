"""Command line: ``python -m diffusers_attn_ext info | demo | inspect | bench``.

- ``info``: the kernels available on this machine and which one runs;
- ``demo --output DIR [--model ID] [--tiny [--family F]] [--steps N] [--only M ...]``: stock vs method for
  every video method on the shipped world video model and every image method on the shipped world image model
  (or a checkpoint; ``--tiny``: every method on tiny pipelines);
- ``inspect --family F --output DIR [--model ID] [--layers P ...] [--heads H ...] [--steps S ...]``: attention
  statistics of one generation, as plots and ``summary.json``;
- ``bench [NAME ...] [--smoke]``: list the scripts in ``benchmarks/``, or run the named ones (CUDA; ``--smoke``
  runs those that support it at tiny size on CPU).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

FAMILY_CHOICES = ["sd3", "flux", "cogvideox", "wan"]
BENCHMARK_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
BENCHMARK_HELPERS = ("common", "harness", "quality_common")


def benchmark_scripts() -> dict[str, Path]:
    """Benchmark name -> script in ``benchmarks/`` of the source checkout."""
    if not BENCHMARK_DIR.is_dir():
        raise ValueError(f"benchmarks folder {BENCHMARK_DIR} not found: bench runs from a source checkout")
    return {path.stem: path for path in sorted(BENCHMARK_DIR.glob("*.py")) if path.stem not in BENCHMARK_HELPERS}


def supports_smoke(script: Path) -> bool:
    """Whether a benchmark script takes ``--smoke`` (tiny sizes on CPU)."""
    return "--smoke" in script.read_text()


def launch_command(script: Path) -> list[str]:
    """How to start a benchmark: with this Python, or through ``torch.distributed.run`` (torchrun) for scripts
    whose docstring launches them with ``torchrun --nproc_per_node=N`` (several processes: ``parallel``)."""
    match = re.search(r"torchrun --nproc_per_node=(\d+)", script.read_text())
    if match:
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={match.group(1)}", str(script)]
    return [sys.executable, str(script)]


def run_benchmarks(names: list[str], smoke: bool) -> int:
    """List the benchmarks (no ``names``) or run the named ones with this Python; returns the exit status."""
    scripts = benchmark_scripts()
    if not names:
        for name, path in scripts.items():
            doc = (ast.get_docstring(ast.parse(path.read_text())) or "").split("\n")[0]
            print(f"{name:>22}{' [--smoke]' if supports_smoke(path) else '          '}  {doc}")
        return 0
    unknown = [name for name in names if name not in scripts]
    if unknown:
        raise ValueError(f"bench names {unknown} are not among the benchmarks {list(scripts)}")
    import torch

    if not smoke and not torch.cuda.is_available():
        raise ValueError("the benchmarks need a CUDA GPU and none is available; pass --smoke to run the scripts that "
                         "support it at tiny size on CPU")
    if smoke:
        without = [name for name in names if not supports_smoke(scripts[name])]
        if without:
            raise ValueError(f"--smoke is not supported by {without}; scripts that support it: "
                             f"{[n for n, p in scripts.items() if supports_smoke(p)]}")
    root = str(BENCHMARK_DIR.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    for name in names:
        print(f"== {name}", flush=True)
        command = [*launch_command(scripts[name]), *(["--smoke"] if smoke else [])]
        status = subprocess.run(command, cwd=root, env=env).returncode
        if status:
            return status
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusers_attn_ext", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print the kernels available on this machine and which one is chosen")
    demo = commands.add_parser("demo", help="stock vs method for every video and image method on the shipped world "
                                             "models (or --model, or --tiny) and write outputs")
    demo.add_argument("--output", required=True, help="folder for videos, strips and summary.md")
    demo.add_argument("--model", default=None, help="a diffusers checkpoint id or path (default: the shipped world model)")
    demo.add_argument("--tiny", action="store_true", help="every method on tiny random pipelines (noise: shows they run)")
    demo.add_argument("--family", default=None, choices=FAMILY_CHOICES, help="with --tiny: only this family")
    demo.add_argument("--steps", type=int, default=None,
                      help="denoising steps, an integer >= 1 (default: 10 on the shipped world models, 2 with --tiny, "
                           "the checkpoint's own with --model, 50 for a Wan checkpoint)")
    demo.add_argument("--only", nargs="+", default=None, help="methods to run, video and image names (default: all)")
    inspect = commands.add_parser("inspect", help="attention statistics of one generation: plots and summary.json")
    inspect.add_argument("--family", required=True, choices=FAMILY_CHOICES)
    inspect.add_argument("--model", default=None, help="a diffusers checkpoint id or path (default: tiny random pipeline)")
    inspect.add_argument("--output", required=True, help="folder for the plots and summary.json")
    inspect.add_argument("--layers", nargs="+", default=None, help="attention module name patterns (default: all)")
    inspect.add_argument("--heads", nargs="+", type=int, default=None, help="head indices (default: all)")
    inspect.add_argument("--steps", nargs="+", type=int, default=None, help="denoising steps from 0 (default: all)")
    inspect.add_argument("--num-inference-steps", type=int, default=None, help="denoising steps of the generation")
    bench = commands.add_parser("bench", help="list the benchmark scripts, or run the named ones")
    bench.add_argument("names", nargs="*", help="benchmarks to run (none: list them)")
    bench.add_argument("--smoke", action="store_true", help="run at tiny size on CPU (scripts that support it)")
    args = parser.parse_args(argv)

    try:
        return _run(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.command == "info":
        import diffusers

        from . import __version__
        from .kernels import kernel_report

        print(f"diffusers-attn-ext {__version__}, diffusers {diffusers.__version__}")
        for name, value in kernel_report().items():
            print(f"{name:>26}: {value}")
        return 0
    if args.command == "inspect":
        from .inspect.command import run_inspection

        summary = run_inspection(args.family, args.output, model=args.model, layers=args.layers, heads=args.heads,
                                 steps=args.steps, num_inference_steps=args.num_inference_steps)
        print(f"written to {summary.parent}: {summary.name} and the plots")
        return 0
    if args.command == "bench":
        return run_benchmarks(args.names, args.smoke)
    from .demo import run

    summary = run(args.output, model=args.model, tiny=args.tiny, family=args.family, steps=args.steps, only=args.only)
    print(summary.read_text())
    print(f"written to {summary.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
