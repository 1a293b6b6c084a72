"""What the two quality benchmarks (``quality.py``: the video methods, ``quality_image.py``: the image methods)
share: the command line's common options and the results file that is read, extended and rewritten after every
measurement (so a run stopped anywhere keeps what it measured, and a rerun skips it)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def quality_parser(description: str, *, steps: int, sections: str, results: str) -> argparse.ArgumentParser:
    """``--seeds --steps --sections --results --report --device --model --threads``; callers add their own."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--sections", default=sections)
    parser.add_argument("--results", default=results)
    parser.add_argument("--report", action="store_true", help="print the tables of --results and stop")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="save_pretrained folder (default: the shipped model)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    return parser


def open_results(args: argparse.Namespace, **meta) -> tuple[dict, Callable[[], None]]:
    """The results of ``args.results`` (empty if absent) with a ``_meta`` record (seeds, steps, device, torch, the
    command, ``meta``), and the function that writes them back. Sets ``args.threads`` torch threads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault("_meta", {"seeds": args.seeds, "steps": args.steps, "device": args.device,
                                 "torch": torch.__version__, "command": " ".join(sys.argv), **meta})
    if args.device != "cpu":
        results["_meta"]["gpu"] = torch.cuda.get_device_name()

    def save() -> None:
        path.write_text(json.dumps(results, indent=1))
        print(f"{time.strftime('%H:%M:%S')} saved {len(results) - 1} results", flush=True)

    return results, save


def read_results(path: str) -> dict:
    """The results file at ``path`` (empty if absent), for ``--report``."""
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {}


def run_sections(sections: str, runners: dict[str, Callable[[], None]], results: dict, save: Callable[[], None],
                 report: Callable[[dict], str]) -> None:
    """Run the comma-separated ``sections`` in order (each saves as it measures), save, print the tables."""
    for section in sections.split(","):
        runners[section]()
    save()
    print(report(results))
