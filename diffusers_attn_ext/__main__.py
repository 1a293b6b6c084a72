"""Command line: ``python -m diffusers_attn_ext info | demo --output DIR [--model ID] [--family F]``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m diffusers_attn_ext", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("info", help="print the kernels available on this machine and which one is chosen")
    demo = commands.add_parser("demo", help="run every method on tiny pipelines (or --model) and write outputs")
    demo.add_argument("--output", required=True, help="folder for images, videos and summary.md")
    demo.add_argument("--model", default=None, help="a diffusers checkpoint id or path (default: tiny random pipelines)")
    demo.add_argument("--family", default=None, choices=["sd3", "flux", "cogvideox", "wan"], help="run only this family")
    args = parser.parse_args(argv)

    if args.command == "info":
        import diffusers

        from . import __version__
        from .kernels import kernel_report

        print(f"diffusers-attn-ext {__version__}, diffusers {diffusers.__version__}")
        for name, value in kernel_report().items():
            print(f"{name:>26}: {value}")
        return 0
    from .demo import run_demo

    summary = run_demo(args.output, model=args.model, family=args.family)
    print(summary.read_text())
    print(f"written to {summary.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
