"""Helpers of quantized_kernel.py, generation.py and compiled_forward.py (not a benchmark): their shared options, a
time budget, wall-clock timing that also runs on CPU (``--smoke``), and tables written after every row, so a run
stopped by its time limit keeps what it measured."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--output``, ``--quick``, ``--smoke`` and ``--budget``."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--output", type=Path, default=Path(os.environ.get("OUT", "out")),
                   help="folder for the JSON and markdown tables (default $OUT or ./out)")
    p.add_argument("--quick", action="store_true", help="the subset that fits the shared device call")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, CPU where there is no GPU: checks the script runs")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds: start no further measurement once this much time has passed")
    return p


def setup(args: argparse.Namespace) -> None:
    """Point common.write_results at ``--output``; on CPU with ``--smoke``, run Triton kernels in its interpreter
    (before anything imports Triton)."""
    args.output.mkdir(parents=True, exist_ok=True)
    os.environ["OUT"] = str(args.output)
    if args.smoke and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


class Deadline:
    """The ``--budget``: whether there is time left to start a measurement."""

    def __init__(self, seconds: float | None):
        self.start, self.seconds = time.monotonic(), seconds

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - (time.monotonic() - self.start)

    def allows(self, needed: float = 0.0) -> bool:
        return self.left() > needed


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_ms(fn, warmup: int = 1, iters: int = 3) -> float:
    """Median wall-clock milliseconds of ``fn()`` (synchronized on CUDA), after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        synchronize()
        start = time.perf_counter()
        fn()
        synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def write(name: str, rows: list[dict], header: str, notes: list[str] = ()) -> str:
    """``common.write_results`` (``<name>.json`` and ``<name>.md`` under ``--output``) with every row's columns (rows
    may differ), the date, the command and ``notes`` (under the table; in the JSON too)."""
    from common import write_results

    if not rows:
        return ""
    columns = list(dict.fromkeys(c for row in rows for c in row))
    header = f"{header}; {time.strftime('%Y-%m-%d')}; `python {' '.join(sys.argv)}`"
    table = write_results(name, [{c: row.get(c, "") for c in columns} for row in rows], header)
    folder = Path(os.environ["OUT"])
    result = json.loads((folder / f"{name}.json").read_text())
    result.update(date=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv), notes=list(notes))
    (folder / f"{name}.json").write_text(json.dumps(result, indent=2))
    if notes:
        table += "\n" + "\n".join(f"- {note}" for note in notes) + "\n"
        (folder / f"{name}.md").write_text(table)
    return table
