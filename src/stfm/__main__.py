"""Command line: ``stfm demo`` (also ``python -m stfm demo``)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``stfm`` console script."""
    from . import __version__

    parser = argparse.ArgumentParser(prog="stfm", description="stfm: H&E + spatial transcriptomics with foundation models.")
    parser.add_argument("--version", action="version", version=f"stfm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the end-to-end demo on her2st (default section B4)")
    demo.add_argument("--out", default="stfm_demo_out", help="output folder (default: ./stfm_demo_out)")
    demo.add_argument("--section", default="B4", help="her2st section to run on (needs a full-resolution image)")
    demo.add_argument("--fast", action="store_true", help="train for a few epochs only (smoke test, not a result)")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from ._demo import run_demo

        out = run_demo(args.out, section=args.section, fast=args.fast)
        print(f"stfm demo: outputs written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
