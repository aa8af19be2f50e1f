"""Command line: ``stfm demo`` and ``stfm batch CONFIG`` (also ``python -m stfm ...``)."""

from __future__ import annotations

import argparse
import sys


def _batch(args: argparse.Namespace) -> int:
    """``stfm batch``: exit 0 when every slide is done or skipped, 1 when a slide failed, 2 on a bad configuration."""
    from .batch._config import BatchConfigError
    from .batch._engine import run_batch

    try:
        summary = run_batch(
            args.config,
            scheduler=args.scheduler,
            n_workers=args.workers,
            serial=args.serial,
            force=args.force,
            connect_timeout=args.connect_timeout,
            show_progress_bar=False if args.no_progress else None,
        )
    except (BatchConfigError, FileNotFoundError, ConnectionError, ImportError, PermissionError) as err:
        print(f"stfm batch: error: {err}", file=sys.stderr)
        return 2
    import pandas as pd

    cols = ["slide_id", "status", "n_obs", "n_genes_predicted", "n_tumor", "time_s", "error"]
    with pd.option_context("display.width", 200, "display.max_colwidth", 90, "display.max_rows", 200):
        print(summary[cols].to_string(index=False))
    counts = summary["status"].value_counts().to_dict()
    print(
        f"stfm batch: {', '.join(f'{v} {k}' for k, v in counts.items())} in {summary.attrs['wall_s']:.1f} s; "
        f"summary {summary.attrs['summary_path']}, log {summary.attrs['log_path']}"
    )
    return 0 if summary["status"].isin(["done", "skipped"]).all() else 1


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
    batch = sub.add_parser(
        "batch",
        help="run features / expression / cancer steps on every slide of a manifest (Dask distributed, resumable)",
        description="Run the steps of CONFIG (YAML or TOML, see docs/cluster.md) on every slide, one Dask task per "
        "slide: one SpatialData zarr per slide, summary.csv and batch.log in the output folder. Slides whose output "
        "is up to date are skipped, so a rerun finishes what a crash left.",
    )
    batch.add_argument("config", help="batch configuration (.yaml, .yml or .toml)")
    batch.add_argument("--scheduler", default=None, metavar="ADDRESS",
                       help="address of a running Dask scheduler, e.g. tcp://host:8786 (default: a LocalCluster)")  # fmt: skip
    batch.add_argument("--workers", type=int, default=None, help="LocalCluster workers (default: GPUs, else cores)")
    batch.add_argument("--serial", action="store_true", help="run the slides one by one in this process, without Dask")
    batch.add_argument("--force", action="store_true", help="recompute every slide, even up-to-date ones")
    batch.add_argument("--connect-timeout", type=float, default=None, metavar="SECONDS",
                       help="give up on --scheduler after this long (default: engine.connect_timeout, 10 s)")  # fmt: skip
    batch.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from ._demo import run_demo

        out = run_demo(args.out, section=args.section, fast=args.fast)
        print(f"stfm demo: outputs written to {out}")
        return 0
    if args.command == "batch":
        return _batch(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
