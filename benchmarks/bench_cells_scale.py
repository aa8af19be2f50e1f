"""Cell-level scale: tiling + features + multimodal prediction on a synthetic 200,000-cell section, memory O(batch).

Run from the repository root::

    python benchmarks/bench_cells_scale.py                 # 50,000 and 200,000 cells; writes docs/benchmarks/cells_scale.md
    python benchmarks/bench_cells_scale.py --cells 20000   # one smaller size

The section: a tiled TIFF H&E-like image (written tile by tile, never whole in memory) at 0.5 µm/px with cells on a
jittered 10-µm lattice, each a dark disc; 20-µm cell-centred crops at 32 px. The encoder is a fixed random
two-layer CNN (64 features) so that the run measures the pipeline (reading crops, resampling, batching, graph
blocks, retrieval), not a foundation model's forward pass; ``docs/benchmarks/features.md`` has the real encoders'
throughput. The multimodal model is fitted on four 1,600-cell windows of the section (their features, and 50 genes
of counts drawn from a log-linear model of them) and predicts every cell. Each stage runs in a fresh subprocess; peak memory is that process's peak resident set
(``VmHWM``). Memory O(batch) means the peak grows with the cells only by the arrays that hold one row per cell
(coordinates, features, predictions, and their float64 temporaries), and by the image reader's chunk cache up to
its cap (``stfm.data.LazyArraySource.chunk_cache_mb``, 256 MB per process).
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
OUT = REPO / "docs" / "benchmarks" / "cells_scale.md"
RESULTS = REPO / "benchmarks" / "results" / "cells_scale.json"
MPP, PITCH_UM, TILE_UM, TILE_PX, DIM, GENES = 0.5, 10.0, 20.0, 32, 64, 50


def _hwm_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _lattice(n: int):
    import numpy as np

    side = int(np.ceil(np.sqrt(n)))
    pitch = PITCH_UM / MPP
    g = (np.arange(side) + 1.5) * pitch
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)[:n]
    xy += np.random.default_rng(0).uniform(-0.25, 0.25, xy.shape) * pitch
    size = int((side + 3) * pitch)
    return xy, size


def _write_image(path: Path, xy, size: int) -> None:
    """An H&E-coloured TIFF (pink background, dark 8-µm nuclei at the cells), written one 512-px tile at a time."""
    import numpy as np
    import tifffile
    from scipy.spatial import cKDTree

    tile = 512
    tree = cKDTree(xy)
    r = 4.0 / MPP

    def tiles():
        for y0 in range(0, size, tile):
            for x0 in range(0, size, tile):
                yy, xx = np.mgrid[y0 : y0 + tile, x0 : x0 + tile]
                d, _ = tree.query(np.c_[xx.ravel() + 0.5, yy.ravel() + 0.5])
                inside = (d < r).reshape(tile, tile)
                t = np.empty((tile, tile, 3), np.uint8)
                t[...] = (232, 190, 215)
                t[inside] = (90, 60, 140)
                yield t

    tifffile.imwrite(path, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb")


def _row_arrays_mb(stage: str, n: int) -> float:
    """MB of the float32 arrays with one row per cell that a stage must hold: features: the features (and their
    float64 coordinates); prediction: the table's features, their copy as model input, the composition, the
    zero-inflation logits and the predictions (and the coordinates)."""
    per_cell = DIM * 4 + 16 if stage == "features" else (2 * DIM + 3 * GENES) * 4 + 16
    return n * per_cell / 2**20


def _encoder():
    import torch

    import stfm

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 5, stride=2), torch.nn.GELU(), torch.nn.Conv2d(32, DIM, 3, stride=2),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
    )  # fmt: skip
    transform = {
        "tile_px": TILE_PX,
        "mpp": TILE_UM / TILE_PX,
        "mean": (0.5,) * 3,
        "std": (0.25,) * 3,
        "key": "tiny_cnn",
    }
    return stfm.encoders.load_encoder(net, transform=transform, device="cpu")


def stage(name: str, cells: int, workdir: Path) -> dict:
    """Run one stage in this process (``main`` calls it in a subprocess)."""
    import warnings

    import anndata as ad
    import numpy as np
    import torch

    import stfm

    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    stfm.settings.show_progress_bar = False
    img, table, model_dir = workdir / f"cells_{cells}.tif", workdir / f"cells_{cells}.h5ad", workdir / "model"
    if name == "image":
        t0 = time.perf_counter()
        xy, size = _lattice(cells)
        _write_image(img, xy, size)
        a = ad.AnnData(obs={"section": ["query"] * len(xy)})
        a.obs_names = [f"c{i}" for i in range(len(xy))]
        a.obsm["spatial"] = xy
        a.uns["spatial"] = {"cells": {"images": {}, "metadata": {"source_image_path": str(img)},
                                      "scalefactors": {"microns_per_pixel": MPP}}}  # fmt: skip
        a.write_h5ad(table)
        return {"stage": f"write the image ({size:,} × {size:,} px) and the table", "seconds": time.perf_counter() - t0,
                "peak_rss_mb": _hwm_mb()}  # fmt: skip
    if name == "features":
        a = ad.read_h5ad(table)
        enc = _encoder()
        t0 = time.perf_counter()
        stfm.pp.extract_features(a, enc, tile_um=TILE_UM, batch_size=512, cache=False, key_added="X_tiny")
        dt = time.perf_counter() - t0
        a.write_h5ad(table)
        prov = a.uns["stfm"]["X_tiny"]
        h, w = stfm.data.open_image(img).shape
        return {"image_mb": h * w * 3 / 2**20, "chunk_cache_mb": stfm.data.LazyArraySource.chunk_cache_mb,"stage": f"features: {a.n_obs:,} cell tiles ({TILE_UM:.0f} µm, {prov['crop_px']} px crops → {TILE_PX} px)",
                "seconds": dt, "cells_per_s": a.n_obs / dt, "peak_rss_mb": _hwm_mb(),
                "per_cell_arrays_mb": _row_arrays_mb("features", a.n_obs)}  # fmt: skip
    if name == "fit_small":
        # four 1,600-cell windows of the section, their tiny-CNN features, counts drawn from a log-linear model of them
        a = ad.read_h5ad(table)
        xy, f = a.obsm["spatial"], np.asarray(a.obsm["X_tiny"], dtype=np.float64)
        rng = np.random.default_rng(0)
        w = rng.normal(0, 1 / np.sqrt(DIM), (DIM, GENES))
        z = (f - f.mean(0)) / (f.std(0) + 1e-6)
        parts = []
        for k, (qx, qy) in enumerate([(0.2, 0.2), (0.8, 0.2), (0.2, 0.8), (0.8, 0.8)]):
            centre = np.quantile(xy, [qx, qy], axis=0).diagonal()
            rows = np.argsort(((xy - centre) ** 2).sum(1))[:1600]
            counts = rng.poisson(np.exp(1.0 + z[rows] @ w)).astype(np.float32)
            part = ad.AnnData(counts, obs={"section": [f"w{k}"] * 1600, "patient": [f"p{k // 2}"] * 1600})
            part.obs_names = a.obs_names[rows]
            part.var_names = [f"g{j}" for j in range(GENES)]
            part.obsm["spatial"], part.obsm["X_tiny"] = xy[rows], a.obsm["X_tiny"][rows]
            part.uns["stfm"] = {"X_tiny": dict(a.uns["stfm"]["X_tiny"])}
            parts.append(part)
        cohort = ad.concat(parts, uns_merge="first")
        t0 = time.perf_counter()
        model = stfm.tl.fit_expression(cohort, method="multimodal", embedding_key="X_tiny", n_top_genes=GENES,
                                       max_epochs=3, pretrain_epochs=3, seed=0)  # fmt: skip
        model.save(model_dir, overwrite=True)
        return {"stage": "fit multimodal on 4 windows × 1,600 cells (3 + 3 epochs)", "seconds": time.perf_counter() - t0,
                "peak_rss_mb": _hwm_mb()}  # fmt: skip
    if name == "predict":
        model = stfm.model.load_model(model_dir)
        a = ad.read_h5ad(table)
        t0 = time.perf_counter()
        pred = model.predict(a, library_size="predicted", smooth=0)
        dt = time.perf_counter() - t0
        assert pred.shape == (a.n_obs, GENES) and np.isfinite(pred).all()
        blocks = sum(len(model._blocks(a.obsm["spatial"])) for _ in [0])
        return {"stage": f"multimodal prediction, {a.n_obs:,} cells ({blocks} graph blocks)", "seconds": dt,
                "cells_per_s": a.n_obs / dt, "peak_rss_mb": _hwm_mb(),
                "per_cell_arrays_mb": _row_arrays_mb("predict", a.n_obs)}  # fmt: skip
    msg = f"unknown stage {name!r}"
    raise ValueError(msg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/stfm_cells_scale"))
    ap.add_argument("--stage", help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true", help="rewrite the page from the committed results JSON")
    args = ap.parse_args()
    if args.render:
        saved = json.loads(RESULTS.read_text())
        render(saved["meta"], saved["rows"], sorted({r["cells"] for r in saved["rows"]}))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    if args.stage:
        print(json.dumps(stage(args.stage, args.cells[0], args.workdir)))
        return
    rows = []
    fit = None
    for cells in args.cells:
        for name in ("image", "features", "fit_small", "predict"):
            if name == "fit_small" and fit is not None:
                continue
            cmd = [sys.executable, __file__, "--stage", name, "--cells", str(cells), "--workdir", str(args.workdir)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                sys.stderr.write(res.stderr)
                msg = f"stage {name} failed"
                raise SystemExit(msg)
            row = {"cells": cells, **json.loads(res.stdout.strip().splitlines()[-1])}
            if name == "fit_small":
                fit = row
            rows.append(row)
            print(f"{cells:>8,}  {row['stage']:<70} {row['seconds']:8.1f} s  {row['peak_rss_mb']:8.0f} MB", flush=True)
    import torch

    meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": 2, "command": "python benchmarks/bench_cells_scale.py "
            + " ".join(f"--cells {c}" for c in args.cells)}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    render(meta, rows, args.cells)


def render(meta: dict, rows: list[dict], sizes: list[int]) -> None:
    lines = [
        "# Cell-level scale: 200,000 cells",
        "",
        f"Generated by `{meta['command']}` (Python {meta['python']}, torch {meta['torch']}, 2 CPU threads). "
        "Method and caveats: the script's docstring. Peak memory is each stage's own process.",
        "",
        "| cells | stage | seconds | cells / s | peak RSS (MB) | one-row-per-cell arrays (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "per_cell_arrays_mb" in r:
            r["per_cell_arrays_mb"] = _row_arrays_mb(
                "features" if r["stage"].startswith("features") else "predict", r["cells"]
            )
        cps = f"{r['cells_per_s']:,.0f}" if "cells_per_s" in r else ""
        arr = f"{r['per_cell_arrays_mb']:.0f}" if "per_cell_arrays_mb" in r else ""
        lines.append(
            f"| {r['cells']:,} | {r['stage']} | {r['seconds']:.1f} | {cps} | {r['peak_rss_mb']:,.0f} | {arr} |"
        )
    by = {(r["cells"], r["stage"].split(":")[0].split(",")[0]): r for r in rows}
    if len(sizes) >= 2:
        a, b = sorted(sizes)[0], sorted(sizes)[-1]
        lines += [
            "",
            "Growth of the peak from the smaller to the larger section, against the growth of the one-row-per-cell arrays:",
            "",
        ]
        for key in ("features", "multimodal prediction"):
            ra, rb = by.get((a, key)), by.get((b, key))
            if ra and rb:
                lines.append(f"- {key}: peak +{rb['peak_rss_mb'] - ra['peak_rss_mb']:,.0f} MB for "
                             f"{b / a:.0f}× the cells; one-row-per-cell arrays +{rb['per_cell_arrays_mb'] - ra['per_cell_arrays_mb']:,.0f} MB.")  # fmt: skip
        fa, fb = by.get((a, "features")), by.get((b, "features"))
        if fa and fb:
            cap = fb["chunk_cache_mb"]
            held = [min(cap, r["image_mb"]) for r in (fa, fb)]
            whole = "both held whole" if fb["image_mb"] <= cap else "the larger one up to the cap"
            lines += ["", f"The image reader caches decoded chunks up to {cap} MB per process. The two images "
                      f"({fa['image_mb']:,.0f} and {fb['image_mb']:,.0f} MB decoded) are {whole}: {held[1] - held[0]:,.0f} MB "
                      "of the features stage's growth. A larger image stops at the cap; graph blocks and retrieval "
                      "work one block of at most 4,096 cells at a time."]  # fmt: skip
    OUT.write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT.relative_to(REPO)}")


if __name__ == "__main__":
    main()
