"""The README's main job: her2st section → SpatialData zarr + overview figure."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path


def _step(name: str):
    print(f"[stfm demo] {name} …", flush=True)
    return time.perf_counter()


def _done(t0: float, what: str) -> None:
    print(f"[stfm demo]   {what} ({time.perf_counter() - t0:.1f} s)", flush=True)


def write_zarr_atomic(sdata, target: Path) -> None:
    """Write ``sdata`` to ``target`` through a temporary folder beside it, then swap it in."""
    target = Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staged = tmp / target.name
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="zarr v3 autosharding", category=UserWarning)
            sdata.write(staged)
        if target.exists():
            shutil.rmtree(target)
        staged.replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_demo(out: str | os.PathLike[str] = "stfm_demo_out", *, section: str = "B4") -> Path:
    """Run the demo and return the output folder.

    Reads her2st ``section`` (local mirror at ``STFM_DATA_DIR`` or checksummed download), writes it as
    ``<out>/<section>.zarr`` (SpatialData: full-resolution and hires images, spot circles, table) and
    ``<out>/<section>_overview.png`` (H&E with spots at their physical size).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import datasets, io, pl

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    t0 = _step(f"reading her2st {section}")
    sdata = datasets.her2st(section, as_spatialdata=True)
    table = sdata.tables["table"]
    sf = table.uns["spatial"][section]["scalefactors"]
    _done(t0, f"{table.n_obs} spots × {table.n_vars} genes, {sf['microns_per_pixel']:.3f} µm/px")

    t0 = _step("writing SpatialData zarr")
    write_zarr_atomic(sdata, out / f"{section}.zarr")
    _done(t0, str(out / f"{section}.zarr"))

    t0 = _step("drawing the overview")
    adata = io.to_anndata(sdata)
    color = "cluster_annotation" if "cluster_annotation" in adata.obs else None
    fig = pl.overview(adata, color=color, return_fig=True)
    fig.savefig(out / f"{section}_overview.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    _done(t0, str(out / f"{section}_overview.png"))
    return out
