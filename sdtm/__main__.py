"""Command line: ``sdtm demo`` (also ``python -m sdtm demo``)."""

from __future__ import annotations

import argparse
import sys


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _even_size(text: str) -> int:
    value = _positive(text)
    if value % 2:
        raise argparse.ArgumentTypeError(f"must be even (2 pixels per token), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdtm", description="Structure-then-Detail Token Merging for SD3 / SD3.5.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="generate on a tiny built-in SD3 pipeline with and without SDTM and compare",
        description="Builds a tiny SD3 pipeline from config (random weights, no downloads), generates with and "
                    "without SDTM, and prints latency, MACs and the tokens per phase.")
    demo.add_argument("--size", type=_even_size, default=96, help="image side in pixels (default 96: 48x48 tokens)")
    demo.add_argument("--steps", type=_positive, default=12, help="denoising steps (default 12)")
    demo.add_argument("--repeats", type=_positive, default=3, help="timed runs of each variant (default 3)")
    demo.add_argument("--backend", choices=["auto", "torch", "cpp", "triton"], default="auto")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        try:
            run_demo(size=args.size, steps=args.steps, repeats=args.repeats, backend=args.backend)
        except ValueError as error:
            print(f"sdtm demo: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
