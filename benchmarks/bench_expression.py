"""Expression prediction from H&E on her2st: ridge probe vs ZINB predictor, patient splits (DESIGN.md §6).

Run from the repository root (needs the her2st mirror, ``STFM_DATA_DIR``)::

    python benchmarks/bench_expression.py            # full protocol, writes docs/benchmarks/expression.md
    python benchmarks/bench_expression.py --quick    # fewer epochs, no leaky block (smoke run)

Protocol
--------
* Data: her2st sections with a full-resolution H&E image (B4; C2–C6), ``efficientnet_lite0`` features from
  ``stfm.pp.extract_features`` (ImageNet weights, 112 µm tiles at 0.5 µm/px).
* Gene panel: the 50 most variable genes (variance of log1p counts, genes detected in ≥10 % of spots) chosen on
  the training sections of each fold only.
* Patient splits: train C2–C6 → test B4; train B4 → test C2–C6. ZINB epochs are chosen on a whole validation
  section of the training patient (C6 for the C fold); with B4 alone there is no validation section and the
  a-priori default of 300 epochs is used.
* Model selection (ZINB variants: neighbour pooling, seed ensembles) happens **inside the training patient**:
  train C2–C5 (early stopping on C5), score C6; B4 is never looked at. The selected variant is reported on the
  C2–C6 → B4 fold only: choosing it for B4 → C2–C6 would have used the test patient.
* Leave-one-section-out within patient C (train four C sections, test the fifth): labelled **leaky**.
* Metrics per test section on log1p counts: mean Pearson over the 50 panel genes (= the top-50 variable and,
  with a 50-gene panel, the same genes as the top-50 expressed), MSE, MAE. Predictions use the library size each
  model predicts from the image (``library_size='predicted'``): nothing measured on the test section is used.
* Training time = wall time of ``fit_expression``; peak memory = peak resident set size of the process sampled
  every 20 ms during the fit, minus the RSS before it (CPU, 2 cores shared).
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")
EMB = "X_efficientnet_lite0"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class PeakRSS:
    """Peak RSS above the starting RSS while the block runs (sampled in a thread)."""

    def __enter__(self):
        self.base = rss_mb()
        self.peak = self.base
        self._stop = threading.Event()

        def run():
            while not self._stop.is_set():
                self.peak = max(self.peak, rss_mb())
                time.sleep(0.02)

        self._t = threading.Thread(target=run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())
        self.delta = self.peak - self.base


def load_sections():
    import stfm

    stfm.settings.show_progress_bar = False
    out = {}
    for s in SECTIONS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            a = stfm.datasets.her2st(s)
        stfm.pp.extract_features(a, "efficientnet_lite0", show_progress_bar=False)
        out[s] = a
    return out


def run_fold(sections, train, test, method, label, fit_kwargs, *, leaky=False):
    """Fit on ``train``, predict and score every section of ``test``; one row per test section."""
    import stfm

    ref = [sections[s] for s in train]
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        model = stfm.tl.fit_expression(ref, method=method, embedding_key=EMB, n_top_genes=50, **fit_kwargs)
        fit_s = time.perf_counter() - t0
    members = getattr(model, "members", [model])
    val = sorted({v for m in members for v in getattr(m, "validation_sections_", [])})
    epochs = [m.best_epoch_ + 1 for m in members if getattr(m, "best_epoch_", None) is not None]
    rows = []
    for t in test:
        q = sections[t]
        missing = [g for g in model.genes if g not in q.var_names]
        if missing:  # not detected in this section: measured zeros
            import anndata as ad
            from scipy import sparse

            pad = ad.AnnData(X=sparse.csr_matrix((q.n_obs, len(missing)), dtype=np.int32))
            pad.obs_names = q.obs_names
            pad.var_names = missing
            q2 = ad.concat([q, pad], axis=1, merge="first")
            q2.obs = q.obs.copy()
            q = q2
        q = q[:, model.genes].copy()
        q.obsm[EMB] = np.asarray(sections[t].obsm[EMB])
        q.obsm["spatial"] = np.asarray(sections[t].obsm["spatial"])
        stfm.tl.predict_expression(q, model, library_size="predicted")
        m = stfm.tl.evaluate_expression(q, model=model).iloc[0]
        rows.append(
            {
                "split": "leaky: leave-one-section-out (patient C)" if leaky else "patient",
                "train": ",".join(train),
                "validation": ",".join(val) if val else ("none" if method == "zinb" else "n/a"),
                "test": t,
                "method": label,
                "pearson": m["pearson_all"],
                "mse": m["mse"],
                "mae": m["mae"],
                "epochs": ",".join(map(str, epochs)) if epochs else "n/a",
                "train_s": fit_s,
                "peak_mem_mb": mem.delta,
            }
        )
        print(f"  {label:<28} {','.join(train):>16} → {t}: pearson={m['pearson_all']:.3f} ({fit_s:.0f} s)", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="20 epochs, no model selection, no leaky block")
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "expression.md"))
    p.add_argument(
        "--selected",
        default=None,
        help="skip the selection stage and use this ZINB variant (one chosen by the selection stage of an earlier run)",
    )
    p.add_argument("--selection-note", default="", help="where the --selected variant comes from (printed in the card)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "scvi", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(2)
    t_all = time.perf_counter()
    sections = load_sections()
    max_epochs = 20 if args.quick else 300
    base = {"max_epochs": max_epochs, "seed": 0}
    variants = {
        "zinb": {},
        "zinb + neighbours (k=4)": {"neighbor_pooling": 4},
        "zinb + neighbours (k=4,12)": {"neighbor_pooling": (4, 12)},
    }
    rows, sel_rows = [], []

    def report():
        write_report(rows, sel_rows, chosen, args, time.perf_counter() - t_all)

    # 1. model selection inside the training patient C: train C2–C5 (early stopping on C5), score C6
    chosen = "zinb"
    if args.selected:
        chosen = args.selected
        ks = (4, 12) if "4,12" in chosen else ((4,) if "k=4" in chosen else None)
        variants[chosen] = {
            **({"neighbor_pooling": ks} if ks else {}),
            **({"n_models": 3} if "× 3 seeds" in chosen else {}),
        }
    elif not args.quick:
        print("model selection: train C2–C5, score C6 (B4 untouched)", flush=True)
        for label, kw in variants.items():
            sel_rows += run_fold(sections, ["C2", "C3", "C4", "C5"], ["C6"], "zinb", label, {**base, **kw})
        best = max(sel_rows, key=lambda r: r["pearson"])
        chosen = best["method"]
        ens_label = f"{chosen} × 3 seeds"
        sel_rows += run_fold(
            sections, ["C2", "C3", "C4", "C5"], ["C6"], "zinb", ens_label, {**base, **variants[chosen], "n_models": 3}
        )
        variants[ens_label] = {**variants[chosen], "n_models": 3}
        if sel_rows[-1]["pearson"] > best["pearson"]:
            chosen = ens_label
        print(f"selected on C6: {chosen}", flush=True)

    # 2. patient splits (the report is rewritten after every fold)
    print("patient splits", flush=True)
    c = ["C2", "C3", "C4", "C5", "C6"]
    rows += run_fold(sections, c, ["B4"], "ridge", "ridge (HEST probe)", {})
    rows += run_fold(sections, c, ["B4"], "zinb", "zinb", base)
    report()
    rows += run_fold(sections, ["B4"], c, "ridge", "ridge (HEST probe)", {})
    rows += run_fold(sections, ["B4"], c, "zinb", "zinb", base)
    report()

    # 3. leaky leave-one-section-out within patient C
    if not args.quick:
        print("leaky: leave-one-section-out within patient C", flush=True)
        for t in c:
            rows += run_fold(sections, [s for s in c if s != t], [t], "ridge", "ridge (HEST probe)", {}, leaky=True)
        report()
        for t in c:
            rows += run_fold(sections, [s for s in c if s != t], [t], "zinb", "zinb", base, leaky=True)
            report()

    # 4. the variant selected inside patient C, on C2–C6 → B4
    if chosen != "zinb":
        rows += run_fold(sections, c, ["B4"], "zinb", f"{chosen} (selected on C6)", {**base, **variants[chosen]})
    total = time.perf_counter() - t_all
    write_report(rows, sel_rows, chosen, args, total)


def write_report(rows, sel_rows, chosen, args, total):
    import torch

    import stfm

    df = pd.DataFrame(rows)
    pd.set_option("display.width", 200)
    print(df.round(3).to_string())
    fmt = {"pearson": "{:.3f}", "mse": "{:.3f}", "mae": "{:.3f}", "train_s": "{:.0f}", "peak_mem_mb": "{:.0f}"}

    def md(d: pd.DataFrame) -> str:
        d = d.copy()
        for k, f in fmt.items():
            if k in d:
                d[k] = d[k].map(lambda v, f=f: f.format(v))
        head = "| " + " | ".join(map(str, d.columns)) + " |"
        sep = "|" + "---|" * len(d.columns)
        body = ["| " + " | ".join(map(str, r)) + " |" for r in d.itertuples(index=False)]
        return "\n".join([head, sep, *body])

    patient = df["split"] == "patient"
    target = np.where(df["test"] == "B4", "B4", "C2–C6")
    fold = np.where(
        patient, "patient: " + df["train"] + " → " + target, "leaky: leave-one-section-out within C → each C section"
    )
    summary = (
        df.assign(fold=fold)
        .groupby(["fold", "method"], sort=False)[["pearson", "mse", "mae", "train_s", "peak_mem_mb"]]
        .mean()
        .reset_index()
    )
    lines = [
        "# Expression prediction benchmark (her2st, efficientnet_lite0)",
        "",
        f"Produced by `python benchmarks/bench_expression.py{' --quick' if args.quick else ''}` "
        f"(stfm {stfm.__version__}, torch {torch.__version__}, {platform.machine()}, CPU, "
        f"{torch.get_num_threads()} threads; total {total / 60:.1f} min).",
        "",
        "## Protocol card",
        "",
        "| item | value |",
        "|---|---|",
        "| data | her2st (Andersson et al. 2021), sections with full-resolution H&E: B4 (patient B), C2–C6 (patient C) |",
        "| features | `stfm.pp.extract_features(adata, 'efficientnet_lite0')`: ImageNet weights, 112 µm tiles at 0.5 µm/px, 1280-d |",
        "| genes | 50 most variable (variance of log1p counts, detected in ≥10 % of spots), chosen on the training sections of each fold |",
        "| splits | patient: C2–C6 → B4 and B4 → C2–C6; leave-one-section-out within C is **leaky** (same patient in train and test) |",
        "| epochs | ZINB early stopping on a whole training section (C6 when training on C2–C6, patience 30, best epoch restored); B4 alone: fixed 300 epochs |",
        f"| model selection | ZINB variants compared by training on C2–C5 and scoring C6 (B4 never seen); selected: **{chosen}**; applied to C2–C6 → B4 only{'; ' + args.selection_note if args.selection_note else ''} |",
        "| prediction | `library_size='predicted'` (ZINB: library size predicted from the image; ridge: expm1 of predicted log1p counts, clipped at 0) |",
        "| metric | per test section, mean over genes of the Pearson correlation across spots of log1p(predicted) vs log1p(counts); MSE/MAE on log1p; then averaged over sections |",
        "| ridge | HEST probe: StandardScaler + PCA-256 + Ridge(alpha=100/(256·50), lsqr, no intercept; training target mean added back) |",
        "| time / memory | wall time of `fit_expression`; peak RSS increase of the process during the fit (sampled every 20 ms) |",
        "",
        "## Summary (mean over test sections)",
        "",
        md(summary),
        "",
        "## Per section",
        "",
        md(df),
        "",
    ]
    if sel_rows:
        lines += [
            "## Model selection inside patient C (train C2–C5, early stopping on C5, score C6)",
            "",
            md(pd.DataFrame(sel_rows)),
            "",
        ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())
