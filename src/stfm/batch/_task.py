"""One slide, start to finish, on a worker: read lazily, run the steps, write one SpatialData zarr atomically.

:func:`run_slide` receives a small dict of paths and settings (never slide data) and returns one row of the
summary. Errors caused by the slide or the configuration (a missing file, a table without coordinates, an
unreadable image) are recorded in that row and the slide is marked ``failed``; errors that another attempt may
not meet (an I/O hiccup of a network file system, running out of memory) are raised so that distributed
retries the task (``retries=``) on a worker that may be healthier.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._hash import read_record, slide_hash

__all__ = ["is_transient", "main_table_key", "output_path", "run_slide"]

#: Encoders and models loaded by this process, reused by the next slide it runs (keyed by content hash).
_RESOURCES: dict[tuple[Any, ...], Any] = {}
_PERMANENT_OS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)
_MAX_MESSAGES = 20
_DOWNSCALED = ("_hires_image", "_lowres_image")


def is_transient(err: BaseException) -> bool:
    """Whether another attempt may succeed: I/O errors other than a missing or unwritable path, memory errors."""
    if isinstance(err, MemoryError | TimeoutError | ConnectionError):
        return True
    if type(err).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return True
    return isinstance(err, OSError) and not isinstance(err, _PERMANENT_OS)


def output_path(payload: dict[str, Any]) -> Path:
    """``<output>/<slide id>.zarr``."""
    return Path(payload["output"]) / f"{payload['slide']['id']}.zarr"


def main_table_key(slide: dict[str, Any]) -> str | None:
    """Name of the table that holds features, cancer calls and the batch record in the slide's output."""
    if slide["kind"] == "h5ad":
        return "table"
    if slide["kind"] == "image":
        return "tiles_table"
    if slide.get("table_key"):
        return slide["table_key"]
    tables = Path(slide["input"]) / "tables"
    names = sorted(p.name for p in tables.iterdir() if p.is_dir()) if tables.is_dir() else []
    return names[0] if len(names) == 1 else None


class _Capture(logging.Handler):
    """Collect stfm warnings and Python warnings raised while a slide runs (they go to the batch log)."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self._add(f"{record.levelname.lower()}: {record.getMessage()}")

    def _add(self, text: str) -> None:
        if text not in self.messages and len(self.messages) < _MAX_MESSAGES:
            self.messages.append(text)


@contextlib.contextmanager
def _captured() -> Iterator[_Capture]:
    cap = _Capture()
    log = logging.getLogger("stfm")
    log.addHandler(cap)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield cap
        for w in caught:
            cap._add(f"{w.category.__name__}: {w.message}")
    finally:
        log.removeHandler(cap)


@contextlib.contextmanager
def _settings_applied(values: dict[str, Any]) -> Iterator[None]:
    """Apply the driver's stfm settings in this process (a worker does not share the driver's memory)."""
    from .._settings import settings

    names = [k for k in values if hasattr(settings, k)]
    before = {k: getattr(settings, k) for k in names}
    try:
        for k in names:
            setattr(settings, k, values[k])
        yield
    finally:
        for k, v in before.items():
            setattr(settings, k, v)


def _resource(key: tuple[Any, ...], build: Any) -> Any:
    if key not in _RESOURCES:
        _RESOURCES[key] = build()
    return _RESOURCES[key]


def _worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return f"local (pid {os.getpid()})"


def run_slide(payload: dict[str, Any]) -> dict[str, Any]:
    """Run every configured step on one slide and write ``<output>/<id>.zarr``; return its summary row.

    Parameters
    ----------
    payload
        ``slide`` (a manifest row as a dict), ``output``, ``steps``, ``tiles``, ``images``, ``config_digest``,
        ``version``, ``force``, ``settings``, ``device``, ``torch_threads``, ``model_fingerprints``.
    """
    t0 = time.perf_counter()
    slide = payload["slide"]
    out = output_path(payload)
    row: dict[str, Any] = {"slide_id": slide["id"], "kind": slide["kind"], "input": slide["input"], "status": "failed",
                           "n_obs": None, "n_genes_predicted": None, "n_tumor": None, "time_s": None,
                           "worker": _worker_name(), "output": str(out), "hash": None, "error": None,
                           "traceback": None, "messages": []}  # fmt: skip
    with (
        _torch_threads(payload.get("torch_threads")),
        _settings_applied(payload.get("settings", {})),
        _local_dask(payload.get("torch_threads")),
        _captured() as cap,
    ):
        try:
            digest, fps = slide_hash(slide, payload["config_digest"], payload["version"])
            row["hash"] = digest
            table_key = main_table_key(slide)
            record = read_record(out, table_key) if (out.exists() and table_key and not payload.get("force")) else None
            if record is not None and record.get("hash") == digest:
                row.update(
                    status="skipped", **{k: _int(record.get(k)) for k in ("n_obs", "n_genes_predicted", "n_tumor")}
                )
            else:
                row.update(_process(payload, out, digest, fps))
                row["status"] = "done"
        except Exception as err:
            if is_transient(err):
                raise
            row["error"] = f"{type(err).__name__}: {err}"
            row["traceback"] = traceback.format_exc()
    row["messages"] = cap.messages
    row["time_s"] = round(time.perf_counter() - t0, 3)
    return row


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value == "None" else int(value)
    except (TypeError, ValueError):
        return None


def _process(payload: dict[str, Any], out: Path, digest: str, fps: dict[str, str]) -> dict[str, Any]:
    from spatialdata.models import get_table_keys

    from .._provenance import record
    from ..io import write_zarr

    slide, steps = payload["slide"], payload["steps"]
    device = payload.get("device", "auto")
    sdata, table_key = _read_and_embed(payload, device)
    table = sdata.tables[table_key]
    region, region_key, instance_key = get_table_keys(table)

    with _single_threaded(device), _quiet("scvi"):  # small dense math: bit-identical whatever the worker layout
        n_genes = _predict(payload, sdata, table_key, (region, region_key, instance_key), device)
        n_tumor = _cancer(payload, sdata, table_key, region, device)

    table = sdata.tables[table_key]
    if not payload.get("images", False):  # keep the small downscaled images that plots use, drop the full ones
        for key in [k for k in sdata.images if not k.endswith(_DOWNSCALED)]:
            del sdata.images[key]
    record(table, "batch", "stfm batch", hash=digest, slide_id=slide["id"], kind=slide["kind"],
           input=Path(slide["input"]).name, platform=slide.get("platform"), mpp=slide.get("mpp"),
           config_digest=payload["config_digest"], inputs=fps, steps=list(steps), n_obs=int(table.n_obs),
           n_genes_predicted=n_genes, n_tumor=n_tumor)  # fmt: skip
    write_zarr(sdata, out, overwrite=True)
    if str(device).startswith("cuda") or device == "auto":
        _empty_cuda_cache()
    return {"n_obs": int(table.n_obs), "n_genes_predicted": n_genes, "n_tumor": n_tumor}


def _predict(
    payload: dict[str, Any], sdata: Any, table_key: str, keys: tuple[Any, str, str], device: str
) -> int | None:
    """The expression step: ``tables[expression.table_key]`` with the predicted panel; returns its size."""
    expr = payload["steps"].get("expression")
    if expr is None:
        return None
    from spatialdata.models import TableModel

    from ..tl import predict_expression

    name = expr.get("table_key", "predicted")
    if name == table_key:
        msg = (
            f"steps.expression.table_key {name!r} is the slide's main table; choose another name (default 'predicted')."
        )
        raise ValueError(msg)
    model = _resource(("expression", expr["model"], payload["model_fingerprints"].get("expression")),
                      lambda: _load_expression(expr["model"]))  # fmt: skip
    kw = {k: expr[k] for k in ("genes", "smooth", "return_std") if expr.get(k) is not None}
    pred = predict_expression(sdata, model, table_key=table_key, library_size=expr.get("library_size", 1e4),
                              device=device, inplace=False, **kw)  # fmt: skip
    pred.uns.pop("spatialdata_attrs", None)
    region, region_key, instance_key = keys
    sdata.tables[name] = TableModel.parse(pred, region=region, region_key=region_key, instance_key=instance_key)
    return int(pred.n_vars)


def _cancer(payload: dict[str, Any], sdata: Any, table_key: str, region: Any, device: str) -> int | None:
    """The cancer step: calls and scores in the main table, tumour polygons; returns the number of tumour spots."""
    cancer = payload["steps"].get("cancer")
    if cancer is None:
        return None
    from ..tl import detect_cancer_regions

    clf = _resource(("cancer", cancer["model"], payload["model_fingerprints"].get("cancer"), str(device)),
                    lambda: _load_cancer(cancer["model"], device))  # fmt: skip
    kw = {k: cancer[k] for k in ("threshold", "boundary_distance", "min_spots") if cancer.get(k) is not None}
    shapes = f"{region}_tumor" if cancer.get("shapes", True) and isinstance(region, str) else None
    detect_cancer_regions(sdata, clf, table_key=table_key, shapes_added=shapes, **kw)
    return int((sdata.tables[table_key].obs["cancer_region"] == "tumor").sum())


@contextlib.contextmanager
def _local_dask(threads: int | None) -> Iterator[None]:
    """Dask arrays inside the task (lazy images, zarr writes) compute in this process, on local threads.

    Inside a distributed worker, ``dask.compute`` would otherwise submit them to the cluster's scheduler, sending
    slide pixels through it (and waiting on the cluster from inside one of its tasks).
    """
    if _worker_name().startswith("local"):  # not in a distributed worker: dask's defaults are local already
        yield
        return
    import dask

    with dask.config.set({"scheduler": "threads", "num_workers": max(1, int(threads or 1))}):
        yield


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """``torch.set_num_threads(n)`` for the task (``None``: leave it), restored afterwards."""
    if not n:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Raise a library logger to WARNING (scvi-tools logs every model load and AnnData transfer at INFO)."""
    log = logging.getLogger(name)
    before = log.level
    log.setLevel(max(before, logging.WARNING))
    try:
        yield
    finally:
        log.setLevel(before)


@contextlib.contextmanager
def _single_threaded(device: str) -> Iterator[None]:
    """One BLAS / OpenMP / torch thread on the CPU (matrix products then sum in the same order in every process)."""
    if str(device) not in ("auto", "cpu"):
        yield
        return
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(before)


def _read_and_embed(payload: dict[str, Any], device: str) -> tuple[Any, str]:
    """The slide as SpatialData (read lazily where the format allows) with features added; its main table key."""
    from ..io import to_spatialdata
    from ..pp import extract_features, make_tiles

    slide, steps = payload["slide"], payload["steps"]
    feats = steps.get("features")
    path = Path(slide["input"])
    if not path.exists():
        msg = f"Input of slide {slide['id']!r} not found: {str(path)!r}."
        raise FileNotFoundError(msg)
    fkw: dict[str, Any] = {}
    if feats is not None:
        fkw = {
            k: feats[k]
            for k in ("batch_size", "tile_px", "mpp", "spot_scale", "amp", "revision")
            if feats.get(k) is not None
        }
        fkw["cache"] = bool(feats.get("cache", True))
        fkw["num_workers"] = int(feats.get("num_workers", 0) or 0)
        fkw["show_progress_bar"] = False
        fkw["device"] = device
        enc_id = ("encoder", feats["encoder"], feats.get("model_path"), feats.get("revision"), str(device))
        encoder = _resource(enc_id, lambda: _load_encoder(feats, device))
    kind = slide["kind"]
    if kind == "h5ad":
        import anndata as ad

        adata = ad.read_h5ad(path)
        lib = _library(adata, slide)
        if feats is not None:
            img = slide.get("image")
            extract_features(adata, encoder, img=img, library_id=lib, slide_mpp=slide.get("mpp"), **fkw)
        full: Any = False
        if payload.get("images", False):
            from ..io._images import read_image

            full = read_image(slide["image"]) if slide.get("image") else None
        return to_spatialdata(adata, library_id=lib, fullres_image=full), "table"
    if kind == "spatialdata":
        import spatialdata as sd

        sdata = sd.read_zarr(path)
        table_key = main_table_key(slide)
        if table_key is None or table_key not in sdata.tables:
            msg = (
                f"Slide {slide['id']!r}: cannot tell which table of {str(path)!r} to use; set `table_key` in its manifest "
                f"row (tables: {sorted(sdata.tables)})."
            )
            raise ValueError(msg)
        if feats is not None:
            extract_features(sdata, encoder, table_key=table_key, image_key=slide.get("image_key"),
                             slide_mpp=slide.get("mpp"), **fkw)  # fmt: skip
        return sdata, table_key
    tiles = dict(payload.get("tiles") or {})
    sdata = make_tiles(path, slide_mpp=slide["mpp"], **tiles)
    table = sdata.tables["tiles_table"]
    if slide.get("platform"):
        table.uns["spatial"]["tiles"]["metadata"]["platform"] = str(slide["platform"])
    if feats is not None:
        extract_features(sdata, encoder, table_key="tiles_table", image_key="he_image", **fkw)
    return sdata, "tiles_table"


def _library(adata: Any, slide: dict[str, Any]) -> str | None:
    from .._containers import get_library_id

    lib = get_library_id(adata, slide.get("library_id"))
    if lib is not None:
        meta = adata.uns["spatial"][lib].setdefault("metadata", {})
        if slide.get("platform") and "platform" not in meta:
            meta["platform"] = str(slide["platform"])
    return lib


def _load_encoder(feats: dict[str, Any], device: str) -> Any:
    from ..encoders import load_encoder

    return load_encoder(
        feats["encoder"], model_path=feats.get("model_path"), revision=feats.get("revision"), device=device
    )


def _load_expression(folder: str) -> Any:
    from ..model import load_model

    return load_model(folder)


def _load_cancer(folder: str, device: str) -> Any:
    from ..model import CancerClassifier

    return CancerClassifier.load(folder)


def _empty_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
