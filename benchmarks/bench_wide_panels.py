"""Wide panels: every registered method on C2–C6 → B4 with 50, 1,000 and 5,000 genes — time, peak memory, Pearson.

Run from the repository root (needs the her2st mirror at ``STFM_DATA_DIR``)::

    python benchmarks/bench_wide_panels.py                          # writes docs/benchmarks/wide_panels.md
    python benchmarks/bench_wide_panels.py --methods zinb ridge --genes 50 5000

Each (method, panel) runs in a fresh subprocess: fit on C2–C6 (the method's defaults, validation C6, seed 0) with the
``n`` most variable training genes (``stfm.tl.select_genes``; genes detected in fewer than 10 % of the spots are
never taken, so the widest panel may hold fewer), then predict B4 from its embedding (``library_size='predicted'``).
Peak memory is the subprocess's peak resident set (``VmHWM``), loading the sections included. Pearson: mean over
genes of the raw metric (log1p counts) and of the composition metric (log1p counts per 10k of the genes scored),
over the panel genes that B4 measured (a wide panel of patient C holds some that B4 lacks) and over the 50 most
variable training genes.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "benchmarks" / "wide_panels.md"
RESULTS = REPO / "benchmarks" / "results" / "wide_panels.json"
EMB = "X_efficientnet_lite0"
TRAIN = ["C2", "C3", "C4", "C5", "C6"]
METHODS = ("ridge", "zinb", "retrieval", "hetero_graph", "graph_ae", "multimodal")


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def one(method: str, n_genes: int) -> dict:
    import anndata as ad
    import torch

    import stfm

    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    stfm.settings.show_progress_bar = False
    sections = {}
    for s in ["B4", *TRAIN]:
        a = stfm.datasets.her2st(s)
        stfm.pp.extract_features(a, "efficientnet_lite0", show_progress_bar=False)
        sections[s] = a
    train = [sections[s] for s in TRAIN]
    top50 = stfm.tl.select_genes(ad.concat(train, join="inner"), 50)
    t0 = time.perf_counter()
    model = stfm.tl.fit_expression(train, method=method, embedding_key=EMB, n_top_genes=n_genes, seed=0)
    fit_s = time.perf_counter() - t0
    b4 = sections["B4"]
    t0 = time.perf_counter()
    pred = model.predict(b4, library_size="predicted")
    predict_s = time.perf_counter() - t0
    # a wide panel of patient C's genes holds genes that B4 did not measure: score on the panel genes B4 has
    genes = [g for g in model.genes if g in b4.var_names]
    cols = [list(model.genes).index(g) for g in genes]
    pred = pred[:, cols]
    truth = b4[:, genes].X
    truth = np.asarray(truth.todense() if hasattr(truth, "todense") else truth, dtype=np.float64)
    groups = np.zeros(b4.n_obs)
    all_genes = stfm.model.validation_scores(pred, truth, groups)
    pos = [genes.index(g) for g in top50 if g in genes]
    top = stfm.model.validation_scores(pred[:, pos], truth[:, pos], groups)
    return {"method": method, "requested": n_genes, "n_genes": len(model.genes), "n_scored": len(genes), "top50_in_panel": len(pos),
            "n_train_spots": int(sum(a.n_obs for a in train)),
            "fit_s": fit_s, "predict_s": predict_s, "peak_rss_mb": _hwm_mb(),
            "raw_all": all_genes["raw"], "composition_all": all_genes["composition"],
            "raw_top50": top["raw"], "composition_top50": top["composition"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--genes", nargs="+", type=int, default=[50, 1000, 5000])
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per (method, panel) run")
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="rewrite the page from the results JSON")
    ap.add_argument("--merge", action="store_true",
                    help="keep the saved rows of the (method, panel) pairs not run now; the page names both commands")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]))))
        return
    if args.render:
        saved = json.loads(RESULTS.read_text())
        render(saved["meta"], saved["rows"])
        return
    import torch

    command = "python benchmarks/bench_wide_panels.py"
    if args.methods != list(METHODS):
        command += " --methods " + " ".join(args.methods)
    if args.genes != [50, 1000, 5000]:
        command += " --genes " + " ".join(map(str, args.genes))
    meta = {"command": command, "python": platform.python_version(), "torch": torch.__version__, "threads": 2}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if args.merge and RESULTS.exists():
        saved = json.loads(RESULTS.read_text())
        rerun = {(m, n) for m in args.methods for n in args.genes}
        rows = [r for r in saved["rows"] if (r["method"], r["requested"]) not in rerun]
        meta["command"] = f"{saved['meta']['command']}`, then `{command} --merge"

    def save() -> None:  # after every run, so an interrupted benchmark keeps what it measured
        RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        render(meta, rows)

    # the widest panel of every method first: an interrupted run still has the rows the targets are about
    for n in sorted(args.genes, reverse=True):
        for method in args.methods:
            cmd = [sys.executable, __file__, "--one", method, str(n)]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                rows.append({"method": method, "requested": n, "error": f"over {args.timeout} s"})
                print(f"{method:<13} {n:>5}: over {args.timeout} s", flush=True)
                save()
                continue
            if res.returncode != 0:
                err = (res.stderr.strip().splitlines() or ["?"])[-1]
                rows.append({"method": method, "requested": n, "error": err[:200]})
                print(f"{method:<13} {n:>5}: failed: {err}", flush=True)
                save()
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{method:<13} {r['n_genes']:>5} genes  fit {r['fit_s']:7.1f} s  predict {r['predict_s']:5.1f} s  "
                  f"{r['peak_rss_mb']:6.0f} MB  all {r['raw_all']:.3f}/{r['composition_all']:.3f}  "
                  f"top-50 {r['raw_top50']:.3f}/{r['composition_top50']:.3f}", flush=True)  # fmt: skip
            save()
    print(f"wrote {PAGE.relative_to(REPO)} and {RESULTS.relative_to(REPO)}")


def render(meta: dict, rows: list[dict]) -> None:
    lines = [
        "# Wide panels",
        "",
        f"Generated by `{meta['command']}` (Python {meta['python']}, torch {meta['torch']}, {meta['threads']} CPU "
        "threads). C2–C6 → B4, every method at its defaults; method and metrics: the script's docstring. Raw / "
        "composition Pearson.",
        "",
        "| method | genes | scored on B4 | fit (s) | predict (s) | fit + predict (min) | peak RSS (MB) | all scored genes | 50 most variable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {m: i for i, m in enumerate(METHODS)}
    for r in sorted(rows, key=lambda r: (order.get(r["method"], len(order)), r.get("n_genes", r["requested"]))):
        if "error" in r:
            lines.append(f"| {r['method']} | {r['requested']:,} | failed: {r['error']} | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['n_genes']:,} | {r.get('n_scored', r['n_genes']):,} | {r['fit_s']:.0f} | {r['predict_s']:.1f} | "
            f"{(r['fit_s'] + r['predict_s']) / 60:.1f} | {r['peak_rss_mb']:,.0f} | "
            f"{r['raw_all']:.3f} / {r['composition_all']:.3f} | {r['raw_top50']:.3f} / {r['composition_top50']:.3f} |"
        )
    ok = [r for r in rows if "error" not in r]
    if ok:
        wide = max(ok, key=lambda r: r["n_genes"])
        mb = wide["n_train_spots"] * wide["n_genes"] * 4 / 2**20
        lines += [
            "",
            "The panel's counts stay sparse: models read them a batch of rows at a time (graph methods: one block of a "
            "section per batch, filled in when the batch is drawn), reference banks are stored as CSR buffers, and "
            "statistics and validation scores stream over blocks of 4,096 rows. Dense as one block the training "
            f"counts would be {wide['n_train_spots']:,} × {wide['n_genes']:,} float32 = {mb:.0f} MB here; the peak "
            "RSS is mostly the six sections' images and the feature extraction. Predictions (the output, "
            "`layers['predicted']`) are dense.",
        ]
    PAGE.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
