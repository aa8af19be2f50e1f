"""hetero_graph at Visium HD sizes: graph building, one training epoch and prediction on a 100,000-spot section.

Run from the repository root::

    python benchmarks/bench_hetero_graph_scale.py               # 100k spots, writes docs/benchmarks/hetero_graph_scale.md
    python benchmarks/bench_hetero_graph_scale.py --spots 20000 # smaller

Synthetic data (``stfm.datasets.synthetic_st``): a reference bank of three 10,000-spot training sections and a
query section of ``--spots`` spots, embeddings of ``--dim`` dimensions (768, a ViT-B width), 50 genes. Times are
wall clock on this machine's CPU threads; peak memory is the process's peak resident set size (``VmHWM``) measured
in a fresh subprocess per stage, so stages do not inherit each other's peak.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "benchmarks" / "hetero_graph_scale.md"
RESULTS = REPO / "benchmarks" / "results" / "hetero_graph_scale.json"


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _grid(n: int) -> tuple[int, int]:
    side = round(n**0.5)
    return side, max(1, round(n / side))


def stage(name: str, spots: int, dim: int, workdir: Path) -> dict:
    """Run one stage in this process (called in a subprocess by ``main``)."""
    import warnings

    import numpy as np
    import torch

    import stfm

    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    stfm.settings.show_progress_bar = False
    model_dir = workdir / "model"
    if name == "fit_small":
        bank = stfm.datasets.synthetic_st(n_sections=3, n_patients=3, grid=_grid(10_000), n_genes=50, embedding_dim=dim, seed=0)
        t0 = time.perf_counter()
        model = stfm.tl.fit_expression(bank, method="hetero_graph", embedding_key="X_synthetic", n_top_genes=50,
                                       max_epochs=2, smoothing=0, seed=0)  # fmt: skip
        model.save(model_dir, overwrite=True)
        return {"stage": "fit on 3 × 10,000 spots (2 epochs)", "seconds": time.perf_counter() - t0, "peak_rss_mb": _hwm_mb()}
    model = stfm.model.load_model(model_dir)
    query = stfm.datasets.synthetic_st(n_sections=1, n_patients=1, grid=_grid(spots), n_genes=50, embedding_dim=dim, seed=7)
    query.obs["section"] = "query"
    arrays = model._query_arrays(query)
    if name == "graph":
        t0 = time.perf_counter()
        graphs = model._section_graphs(arrays["embedding"], arrays["coords"], None, list(model.bank_sections_))
        dt = time.perf_counter() - t0
        n_links = sum(int(g["rt_index"].shape[1]) for _, g in graphs)
        return {"stage": f"graph building, {query.n_obs:,} spots ({len(graphs)} blocks, {n_links:,} links)",
                "seconds": dt, "peak_rss_mb": _hwm_mb()}  # fmt: skip
    if name == "predict":
        t0 = time.perf_counter()
        pred = model.predict(query, library_size="predicted", smooth=0)
        dt = time.perf_counter() - t0
        assert pred.shape == (query.n_obs, 50) and np.isfinite(pred).all()
        return {"stage": f"prediction (graph building included), {query.n_obs:,} spots", "seconds": dt, "peak_rss_mb": _hwm_mb()}
    if name == "epoch":
        # one training epoch with the big section as a training target and two 10k sections as references
        bank = stfm.datasets.synthetic_st(n_sections=2, n_patients=2, grid=_grid(10_000), n_genes=50, embedding_dim=dim, seed=0)
        big = query.copy()
        big.obs["patient"] = "Pq"
        import anndata as ad

        train = ad.concat([bank, big], merge="same", uns_merge="first")
        train.uns["stfm"] = bank.uns["stfm"]
        t0 = time.perf_counter()
        stfm.tl.fit_expression(train, method="hetero_graph", embedding_key="X_synthetic", n_top_genes=50, max_epochs=1,
                               validation_sections=[], smoothing=0, seed=0)  # fmt: skip
        return {"stage": f"one training epoch, a {query.n_obs:,}-spot target section + two 10,000-spot sections (graphs built inside)",
                "seconds": time.perf_counter() - t0, "peak_rss_mb": _hwm_mb()}  # fmt: skip
    msg = f"unknown stage {name!r}"
    raise ValueError(msg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spots", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default="/tmp/stfm_hetero_scale")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if args.stage:
        print(json.dumps(stage(args.stage, args.spots, args.dim, workdir)))
        return
    rows = []
    for name in ("fit_small", "graph", "predict", "epoch"):
        cmd = [sys.executable, __file__, "--stage", name, "--spots", str(args.spots), "--dim", str(args.dim), "--workdir", str(workdir)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            raise SystemExit(res.returncode)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{row['stage']}: {row['seconds']:.1f} s, peak RSS {row['peak_rss_mb']:.0f} MB", flush=True)
    import torch

    import stfm

    results = {"command": "python benchmarks/bench_hetero_graph_scale.py" + (f" --spots {args.spots}" if args.spots != 100_000 else ""),
               "stfm_version": stfm.__version__, "torch": torch.__version__, "python": platform.python_version(),
               "spots": args.spots, "dim": args.dim, "rows": rows}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    lines = [
        "# hetero_graph at scale (synthetic, CPU)",
        "",
        f"Produced by `{results['command']}` (stfm {results['stfm_version']}, torch {results['torch']}, Python "
        f"{results['python']}, {platform.machine()}, 2 CPU threads). Raw results: `benchmarks/results/hetero_graph_scale.json`.",
        "",
        f"Query section: {args.spots:,} spots on a square grid, {args.dim}-dimensional embeddings, 50 genes; bank: three "
        "10,000-spot training sections; top-6 references per bank section, 4 layers, 256 hidden units, blocks of at most "
        "2,048 target spots with a halo covering the receptive field. Each stage runs in a fresh process; peak memory is "
        "that process's peak RSS.",
        "",
        "| stage | time (s) | peak RSS (MB) | target |",
        "|---|---|---|---|",
    ]
    for r in rows:
        target = "graph + prediction < 10 min, < 4 GB" if r["stage"].startswith(("graph", "prediction")) else ""
        lines.append(f"| {r['stage']} | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} | {target} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
