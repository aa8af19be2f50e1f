"""Whole H&E-only slides: B4's full-resolution JPEG treated as a slide with no ST, and a 40,960² pyramidal TIFF.

Run from the repository root (needs the her2st mirror at ``STFM_DATA_DIR``)::

    python benchmarks/bench_whole_slide.py                   # writes docs/benchmarks/whole_slide.md + the figure
    python benchmarks/bench_whole_slide.py --methods zinb    # fewer methods
    python benchmarks/bench_whole_slide.py --skip-big        # without the 40,960² TIFF

**B4 as an H&E-only slide.** Every method is trained on C2–C6 (validation C6, the default; seed 0; its defaults; the 50 most
variable training genes) on the spot features. B4's JPEG is then tiled on a grid (``stfm.pp.make_tiles``, 112-µm
tiles: the same physical size as the spot features) with no use of its spots, embedded, and predicted tile by tile
(``library_size='predicted'``, the model's own smoothing over the tile graph). Each measured B4 spot is compared
with the tile nearest to it; the same model's prediction on B4's spots is the reference. Both metrics: Pearson of
log1p counts (raw) and of log1p counts per 10k (composition), mean over genes.

**The 40,960² TIFF** (the feature benchmark's, 0.25 µm/px, B4 patches in an ellipse): tiling + features +
prediction of every tissue tile in one process; peak resident memory sampled every 50 ms.
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
PAGE = REPO / "docs" / "benchmarks" / "whole_slide.md"
RESULTS = REPO / "benchmarks" / "results" / "whole_slide.json"
FIGURE = REPO / "docs" / "figures" / "whole_slide_b4.png"
EMB = "X_efficientnet_lite0"
TRAIN = ["C2", "C3", "C4", "C5", "C6"]
METHODS = ("ridge", "zinb", "retrieval", "hetero_graph", "graph_ae", "multimodal")
sys.path.insert(0, str(REPO / "benchmarks"))


def _scores(pred: np.ndarray, counts: np.ndarray) -> dict:
    import stfm

    return stfm.model.validation_scores(pred, counts, np.zeros(len(counts)))


def b4_slide(methods: list[str]) -> tuple[list[dict], dict]:
    from scipy.spatial import cKDTree

    import stfm

    stfm.settings.show_progress_bar = False
    sections = {}
    for s in ["B4", *TRAIN]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            a = stfm.datasets.her2st(s)
        stfm.pp.extract_features(a, "efficientnet_lite0", show_progress_bar=False)
        sections[s] = a
    b4 = sections["B4"]
    lib = next(iter(b4.uns["spatial"]))
    jpg = b4.uns["spatial"][lib]["metadata"]["source_image_path"]
    mpp = float(b4.uns["spatial"][lib]["scalefactors"]["microns_per_pixel"])
    spot_prov = b4.uns["stfm"][EMB]

    t0 = time.perf_counter()
    sdata = stfm.pp.make_tiles(jpg, slide_mpp=mpp, tile_um=float(spot_prov["tile_um"]))
    t_tiles = time.perf_counter() - t0
    t0 = time.perf_counter()
    stfm.pp.extract_features(sdata, "efficientnet_lite0", table_key="tiles_table", show_progress_bar=False, cache=False)
    t_feats = time.perf_counter() - t0
    tiles = sdata.tables["tiles_table"]
    n_tiles = tiles.n_obs
    tree = cKDTree(tiles.obsm["spatial"])
    dist, nearest = tree.query(b4.obsm["spatial"])
    info = {"slide": Path(jpg).name, "slide_mpp": mpp, "tile_um": float(spot_prov["tile_um"]), "n_tiles": n_tiles,
            "n_spots": b4.n_obs, "make_tiles_s": t_tiles, "features_s": t_feats, "tiles_per_s": n_tiles / t_feats,
            "spot_to_tile_um_median": float(np.median(dist) * mpp), "spot_to_tile_um_max": float(dist.max() * mpp)}  # fmt: skip
    rows = []
    best = None
    for method in methods:
        t0 = time.perf_counter()
        model = stfm.tl.fit_expression([sections[s] for s in TRAIN], method=method, embedding_key=EMB, n_top_genes=50,
                                       seed=0)  # fmt: skip
        fit_s = time.perf_counter() - t0
        genes = list(model.genes)
        truth = np.asarray(b4[:, genes].X.todense() if hasattr(b4.X, "todense") else b4[:, genes].X, dtype=np.float64)
        spot = model.predict(b4, library_size="predicted")
        t0 = time.perf_counter()
        out = stfm.tl.predict_expression(sdata, model, table_key="tiles_table", library_size="predicted", inplace=False)
        pred_s = time.perf_counter() - t0
        tile_pred = np.asarray(out.X)[nearest]
        s_spot, s_tile = _scores(spot, truth), _scores(tile_pred, truth)
        rows.append({"method": method, "fit_s": fit_s, "tile_predict_s": pred_s, "smoothing": int(model.smoothing_),
                     "spot_raw": s_spot["raw"], "spot_composition": s_spot["composition"],
                     "tile_raw": s_tile["raw"], "tile_composition": s_tile["composition"]})  # fmt: skip
        print(f"{method:<13} spots {s_spot['raw']:.3f}/{s_spot['composition']:.3f}  tiles {s_tile['raw']:.3f}/"
              f"{s_tile['composition']:.3f}  fit {fit_s:.0f}s predict {pred_s:.1f}s", flush=True)  # fmt: skip
        if method == "graph_ae" or best is None:
            best = (method, model)
    # the figure: one gene over the whole slide (tiles), next to the measured spots
    _figure(sdata, b4, best[1], best[0])
    return rows, info


def _figure(sdata, b4, model, method: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import stfm

    gene = "ERBB2" if "ERBB2" in model.genes else model.genes[0]
    tab = sdata.tables["tiles_table"]
    pred_table = stfm.tl.predict_expression(sdata, model, table_key="tiles_table", library_size="predicted", copy=True)
    meas = b4[:, [gene]].copy()
    meas.layers["measured"] = np.asarray(meas.X.todense() if hasattr(meas.X, "todense") else meas.X, dtype=np.float32)
    pred = np.asarray(pred_table.tables["tiles_table"][:, gene].layers["predicted"]).ravel()
    vmax = float(max(np.quantile(pred, 0.99), np.quantile(meas.layers["measured"], 0.99)))  # one colour scale
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw={"wspace": 0.45})
    stfm.pl.spatial_pred(pred_table, gene, table_key="tiles_table", compare=False, ax=axes[0], show=False, vmin=0,
                         vmax=vmax, title=f"{gene} predicted from H&E alone\n({method}, {tab.n_obs:,} tiles)")  # fmt: skip
    stfm.pl.spatial_pred(meas, gene, layer="measured", compare=False, ax=axes[1], show=False, vmin=0, vmax=vmax,
                         title=f"{gene} measured\n(B4's {b4.n_obs} ST spots, counts)")  # fmt: skip
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=110, bbox_inches="tight")
    plt.close(fig)


def big_worker(tiff: str, model_dir: str) -> dict:
    """Tiling + features + prediction of every tissue tile of the big TIFF, peak RSS sampled (run in a subprocess)."""
    import threading

    import psutil

    import stfm

    stfm.settings.show_progress_bar = False
    peak = {"rss": 0.0, "pss": 0.0}
    me = psutil.Process()

    def monitor() -> None:
        # RSS counts a forked worker's pages shared with the main process twice; PSS splits them between the two
        while True:
            try:
                procs = [me, *me.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in procs) / 2**20
                pss = sum(p.memory_full_info().pss for p in procs) / 2**20
            except psutil.Error:
                continue
            peak["rss"], peak["pss"] = max(peak["rss"], rss), max(peak["pss"], pss)
            time.sleep(0.05)

    threading.Thread(target=monitor, daemon=True).start()
    time.sleep(0.2)
    stages = {"imports": peak["rss"]}
    model = stfm.model.load_model(model_dir)
    stages["model loaded"] = peak["rss"]
    t0 = time.perf_counter()
    sdata = stfm.pp.make_tiles(tiff, slide_mpp=0.25)
    t_tiles = time.perf_counter() - t0
    stages["make_tiles"] = peak["rss"]
    t0 = time.perf_counter()
    stfm.pp.extract_features(sdata, "efficientnet_lite0", table_key="tiles_table", cache=False)
    t_feats = time.perf_counter() - t0
    stages["features"] = peak["rss"]
    t0 = time.perf_counter()
    stfm.tl.predict_expression(sdata, model, table_key="tiles_table", library_size="predicted")
    t_pred = time.perf_counter() - t0
    time.sleep(0.2)
    stages["prediction"] = peak["rss"]
    n = sdata.tables["tiles_table"].n_obs
    hwm = next(int(ln.split()[1]) / 1024 for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return {"slide_px": list(stfm.data.open_image(tiff).shape), "n_tiles": n, "make_tiles_s": t_tiles,
            "features_s": t_feats, "tiles_per_s_features": n / t_feats, "predict_s": t_pred,
            "tiles_per_s_end_to_end": n / (t_tiles + t_feats + t_pred), "peak_rss_mb": peak["rss"], "peak_pss_mb": peak["pss"],
            "peak_rss_main_mb": hwm, "peak_after_stage_mb": stages, "method": model.method,
            "num_workers": stfm.settings.resolve_num_workers("cpu")}  # fmt: skip


def big_slide(method: str, workdir: Path) -> dict:
    from bench_features import make_big_tiff

    import stfm

    workdir.mkdir(parents=True, exist_ok=True)
    tiff = make_big_tiff(workdir / "big_40960.tif", 40960)
    sections = []
    for s in TRAIN:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            a = stfm.datasets.her2st(s)
        stfm.pp.extract_features(a, "efficientnet_lite0", show_progress_bar=False)
        sections.append(a)
    model = stfm.tl.fit_expression(
        sections, method=method, embedding_key=EMB, n_top_genes=50, seed=0
    )
    model.save(workdir / "model", overwrite=True)
    cmd = [sys.executable, __file__, "--big-worker", str(tiff), str(workdir / "model")]
    res = subprocess.run(
        cmd, capture_output=True, text=True, check=False, env={**__import__("os").environ, "PYTHONWARNINGS": "ignore"}
    )
    if res.returncode != 0:
        sys.stderr.write(res.stderr[-5000:])
        msg = "big-slide worker failed"
        raise SystemExit(msg)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--big-method", default="graph_ae")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--big-only", action="store_true", help="rerun the 40,960² TIFF only; keep the B4 rows of the results JSON")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/stfm_whole_slide"))
    ap.add_argument("--big-worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.big_worker:
        print(json.dumps(big_worker(*args.big_worker)))
        return
    warnings.simplefilter("ignore")
    if args.big_only:
        saved = json.loads(RESULTS.read_text())
        saved["big"] = big_slide(args.big_method, args.workdir)
        RESULTS.write_text(json.dumps(saved, indent=1) + "\n")
        render(saved["meta"], saved["b4"], saved["rows"], saved["big"])
        return
    rows, info = b4_slide(args.methods)
    big = None if args.skip_big else big_slide(args.big_method, args.workdir)
    import torch

    cmd = "python benchmarks/bench_whole_slide.py" + (
        "" if args.methods == list(METHODS) else " --methods " + " ".join(args.methods)
    )
    cmd += " --skip-big" if args.skip_big else ""
    meta = {"command": cmd, "python": platform.python_version(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine()}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "b4": info, "rows": rows, "big": big}, indent=1) + "\n")
    render(meta, info, rows, big)
    print(f"wrote {PAGE.relative_to(REPO)}, {RESULTS.relative_to(REPO)} and {FIGURE.relative_to(REPO)}")


def render(meta: dict, info: dict, rows: list[dict], big: dict | None) -> None:
    lines = [
        "# Whole H&E-only slides",
        "",
        f"Generated by `{meta['command']}` (Python {meta['python']}, torch {meta['torch']}, CPU). Method: the "
        "script's docstring.",
        "",
        "## B4 as a slide with no ST",
        "",
        f"`{info['slide']}` at {info['slide_mpp']:.4f} µm/px, tiled with `stfm.pp.make_tiles` at {info['tile_um']:.0f} µm: "
        f"{info['n_tiles']:,} tissue tiles (tiling {info['make_tiles_s']:.1f} s, features {info['features_s']:.0f} s = "
        f"{info['tiles_per_s']:.1f} tiles/s). Each of the {info['n_spots']} measured spots is compared with its nearest "
        f"tile (median {info['spot_to_tile_um_median']:.0f} µm away, at most {info['spot_to_tile_um_max']:.0f} µm).",
        "",
        "| method | spots raw | tiles raw | Δ raw | spots composition | tiles composition | Δ composition | "
        "smoothing | fit (s) | tile prediction (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['spot_raw']:.3f} | {r['tile_raw']:.3f} | {r['tile_raw'] - r['spot_raw']:+.3f} | "
            f"{r['spot_composition']:.3f} | {r['tile_composition']:.3f} | "
            f"{r['tile_composition'] - r['spot_composition']:+.3f} | {r['smoothing']} | {r['fit_s']:.0f} | "
            f"{r['tile_predict_s']:.1f} |"
        )
    lines += ["", f"![A predicted gene over the whole slide, next to the measured spots](../figures/{FIGURE.name})", ""]
    if big is not None:
        lines += [
            "## A 40,960 × 40,960 pyramidal TIFF",
            "",
            "| slide | method | tissue tiles | tiling (s) | features (s) | feature tiles/s | prediction (s) | "
            "end-to-end tiles/s | peak PSS (MB) | peak RSS (MB) |",
            "|---|---|---|---|---|---|---|---|---|---|",
            f"| {big['slide_px'][0]:,} × {big['slide_px'][1]:,} px | {big['method']} | {big['n_tiles']:,} | "
            f"{big['make_tiles_s']:.1f} | {big['features_s']:.0f} | {big['tiles_per_s_features']:.1f} | "
            f"{big['predict_s']:.1f} | {big['tiles_per_s_end_to_end']:.1f} | {big.get('peak_pss_mb', float('nan')):,.0f} | "
            f"{big['peak_rss_mb']:,.0f} |",
            "",
            f"Peaks are of the process and its DataLoader workers together ({big.get('num_workers', '?')} workers; PSS "
            "counts pages a worker shares with the main process once, RSS once per process; "
            f"the main process alone peaked at {big.get('peak_rss_main_mb', float('nan')):,.0f} MB). Peak after each "
            "stage: " + ", ".join(f"{k} {v:,.0f} MB" for k, v in big.get("peak_after_stage_mb", {}).items())
            + ". The feature-extraction rate of the same slide alone is in [the feature benchmark](features.md).",
        ]
    PAGE.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
