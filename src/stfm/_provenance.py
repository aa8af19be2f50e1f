"""Provenance records in ``uns['stfm'][<slot>]`` (values kept writable by h5ad and zarr)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["record", "sanitize"]


def sanitize(value: Any) -> Any:
    """Turn ``value`` into something anndata can write: str, numbers, bools, arrays, nested dicts.

    ``None`` becomes the string ``'None'`` (h5ad cannot store it), tuples and lists of strings become
    string arrays, paths become strings and unknown objects their ``repr``.
    """
    import os

    if value is None:
        return "None"
    if isinstance(value, bool | int | float | str | np.integer | np.floating | np.bool_):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        return {str(k): sanitize(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, list | tuple | set):
        items = [sanitize(v) for v in value]
        if all(isinstance(v, str) for v in items):
            return np.asarray(items, dtype=object).astype(str)
        if all(isinstance(v, bool | int | float | np.number) for v in items):
            return np.asarray(items)
        return {str(i): v for i, v in enumerate(items)}
    return repr(value)


def record(adata: Any, slot: str, function: str, **params: Any) -> dict[str, Any]:
    """Write ``uns['stfm'][slot]`` = {function, stfm version, **params} and return it."""
    from . import __version__

    entry = sanitize({"function": function, "stfm_version": __version__, **params})
    store = adata.uns.setdefault("stfm", {})
    store[slot] = entry
    return entry
