"""``compare_outputs``: are two slide outputs the same (a cluster run against a serial one, a rerun against a clean run)?"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["VOLATILE_KEYS", "compare_outputs"]

#: Provenance entries that describe how a run went rather than what it computed.
VOLATILE_KEYS = frozenset({"cache_hit", "cache_key", "malloc_tuned", "num_workers"})


def _dense(x: Any) -> np.ndarray:
    if hasattr(x, "toarray"):
        x = x.toarray()
    return np.asarray(x)


def _same_array(a: Any, b: Any) -> bool:
    a, b = _dense(a), _dense(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc" and b.dtype.kind in "fc":
        return bool(np.array_equal(a, b, equal_nan=True))
    return [str(v) for v in a.ravel().tolist()] == [str(v) for v in b.ravel().tolist()]


def _compare_uns(a: Any, b: Any, where: str, out: list[str]) -> None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        keys = (set(a) | set(b)) - VOLATILE_KEYS
        for k in sorted(keys, key=str):
            if k not in a or k not in b:
                out.append(f"{where}[{k!r}] only in {'first' if k in a else 'second'}")
            else:
                _compare_uns(a[k], b[k], f"{where}[{k!r}]", out)
    elif isinstance(a, np.ndarray | list | tuple) or isinstance(b, np.ndarray | list | tuple):
        if not _same_array(np.asarray(a), np.asarray(b)):
            out.append(f"{where} differs")
    elif hasattr(a, "equals"):
        if not a.equals(b):
            out.append(f"{where} differs")
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b)):
        out.append(f"{where} differs ({a!r} vs {b!r})")


def _compare_table(a: Any, b: Any, name: str, out: list[str]) -> None:
    w = f"tables[{name!r}]"
    if a.shape != b.shape:
        out.append(f"{w} shape {a.shape} vs {b.shape}")
        return
    if list(a.obs_names) != list(b.obs_names) or list(a.var_names) != list(b.var_names):
        out.append(f"{w} obs_names or var_names differ")
    if (a.X is None) != (b.X is None) or (a.X is not None and not _same_array(a.X, b.X)):
        out.append(f"{w}.X differs")
    for slot in ("layers", "obsm", "obsp", "varm"):
        sa, sb = getattr(a, slot), getattr(b, slot)
        if set(sa) != set(sb):
            out.append(f"{w}.{slot} keys {sorted(sa)} vs {sorted(sb)}")
        for k in set(sa) & set(sb):
            if not _same_array(sa[k], sb[k]):
                out.append(f"{w}.{slot}[{k!r}] differs")
    for frame in ("obs", "var"):
        fa, fb = getattr(a, frame), getattr(b, frame)
        if list(fa.columns) != list(fb.columns):
            out.append(f"{w}.{frame} columns differ")
            continue
        for c in fa.columns:
            if not _same_array(fa[c].astype(str).to_numpy(), fb[c].astype(str).to_numpy()):
                out.append(f"{w}.{frame}[{c!r}] differs")
    _compare_uns(dict(a.uns), dict(b.uns), f"{w}.uns", out)


def compare_outputs(first: str | os.PathLike[str] | Any, second: str | os.PathLike[str] | Any) -> list[str]:
    """Differences between two SpatialData outputs (paths or objects); an empty list means identical.

    Tables are compared exactly (X, layers, obsm, obsp, obs, var, uns), shapes by geometry and columns, images
    and labels by pixel values. Provenance entries that record how a run went rather than what it computed
    (:data:`VOLATILE_KEYS`: feature-cache hits, DataLoader workers) are ignored.
    """
    import spatialdata as sd

    a = sd.read_zarr(first) if isinstance(first, str | os.PathLike) else first
    b = sd.read_zarr(second) if isinstance(second, str | os.PathLike) else second
    out: list[str] = []
    for kind in ("images", "labels", "points", "shapes", "tables"):
        ea, eb = getattr(a, kind), getattr(b, kind)
        if set(ea) != set(eb):
            out.append(f"{kind}: {sorted(ea)} vs {sorted(eb)}")
        for k in sorted(set(ea) & set(eb)):
            x, y = ea[k], eb[k]
            if kind == "tables":
                _compare_table(x, y, k, out)
            elif kind == "shapes":
                if len(x) != len(y) or not x.geometry.geom_equals_exact(y.geometry, tolerance=0).all():
                    out.append(f"shapes[{k!r}] geometry differs")
                elif not x.drop(columns="geometry").equals(y.drop(columns="geometry")):
                    out.append(f"shapes[{k!r}] columns differ")
            elif kind == "points":
                if not x.compute().equals(y.compute()):
                    out.append(f"points[{k!r}] differ")
            else:
                xa = x if hasattr(x, "dims") else next(iter(x.values()))["image" if kind == "images" else "labels"]
                ya = y if hasattr(y, "dims") else next(iter(y.values()))["image" if kind == "images" else "labels"]
                if not _same_array(np.asarray(xa.data), np.asarray(ya.data)):
                    out.append(f"{kind}[{k!r}] pixels differ")
    return out
