"""Input checks shared by every stfm function; each error says what was expected and what to do."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "assert_key_in",
    "assert_one_of",
    "check_copy_inplace",
    "check_obs_key",
    "check_positive",
    "check_spatial",
    "check_unique_name",
    "check_valid_key",
]

_VALID_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def check_valid_key(key: str, *, what: str = "key_added") -> str:
    """Check ``key`` against spatialdata's naming rules and return it.

    Names may hold only letters, digits, ``_``, ``-`` and ``.``, must not be ``.``/``..`` and must not
    start with ``__`` (spatialdata ``check_valid_name``), so that every slot stfm writes survives
    ``SpatialData.write`` as well as ``write_h5ad``.
    """
    if not isinstance(key, str):
        msg = f"Expected `{what}` to be a string, found {type(key).__name__}."
        raise TypeError(msg)
    problem = None
    if not key:
        problem = "it is empty"
    elif key in {".", ".."}:
        problem = f"{key!r} is reserved"
    elif key.startswith("__"):
        problem = "it starts with '__'"
    elif not _VALID_NAME.match(key):
        bad = sorted({c for c in key if not re.match(r"[A-Za-z0-9_.\-]", c)})
        problem = f"it contains {', '.join(repr(c) for c in bad)}"
    if problem is not None:
        msg = (
            f"`{what}`={key!r} breaks SpatialData naming rules: {problem}. Use only letters, digits, "
            "'_', '-' and '.', and do not start with '__' (e.g. 'X_uni2_h')."
        )
        raise ValueError(msg)
    return key


def check_unique_name(key: str, existing: Iterable[str], *, what: str = "key_added") -> None:
    """Raise if ``key`` collides case-insensitively with another element name (spatialdata rule)."""
    clash = [e for e in existing if e.lower() == key.lower() and e != key]
    if clash:
        msg = (
            f"`{what}`={key!r} differs only in case from the existing element {clash[0]!r}; SpatialData element "
            "names must be unique regardless of case. Pick another name."
        )
        raise ValueError(msg)


def assert_key_in(key: str, mapping: Mapping[str, Any] | Iterable[str], *, where: str, hint: str = "") -> None:
    """Raise a :class:`KeyError` naming the slot, the available keys and the call to make first."""
    keys = list(mapping.keys()) if isinstance(mapping, Mapping) else list(mapping)
    if key in keys:
        return
    msg = f"`{where}[{key!r}]` not found. Available: {sorted(map(str, keys))}."
    if hint:
        msg += f" {hint}"
    raise KeyError(msg)


def check_copy_inplace(*, copy: bool, inplace: bool) -> None:
    """``copy=True`` returns a modified copy; ``inplace=False`` returns the result; not both (scanpy)."""
    if copy and not inplace:
        msg = "`copy=True` and `inplace=False` cannot be combined: `copy` returns a modified copy of the data, `inplace=False` returns only the result."
        raise ValueError(msg)


def check_positive(value: float, *, name: str, allow_zero: bool = False) -> float:
    """Return ``value`` if it is a finite positive number, else raise a :class:`ValueError`."""
    import math

    ok = isinstance(value, int | float) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        msg = f"Expected `{name}` to be a finite number {bound}, found {value!r}."
        raise ValueError(msg)
    return float(value)


def assert_one_of(value: Any, options: Iterable[Any], *, name: str) -> Any:
    """Return ``value`` if it is one of ``options``, else raise a :class:`ValueError` listing them."""
    opts = list(options)
    if isinstance(value, str | int | float | bool | type(None)) and value in opts:
        return value
    msg = f"Expected `{name}` to be one of {', '.join(repr(o) for o in opts)}; found {value!r}."
    raise ValueError(msg)


def check_obs_key(adata: Any, key: str, *, what: str = "column", hint: str = "") -> None:
    """Raise a :class:`KeyError` naming the missing ``obs`` column and the columns available."""
    if key in adata.obs:
        return
    msg = f"`adata.obs[{key!r}]` not found ({what}). Available columns: {sorted(map(str, adata.obs.columns))}."
    if hint:
        msg += f" {hint}"
    raise KeyError(msg)


def check_spatial(adata: Any, spatial_key: str = "spatial", *, purpose: str, where: str = "adata") -> Any:
    """Spot / tile centres ``obsm[spatial_key]`` as a float64 ``(n, 2)`` array (x, y), checked for shape and NaN.

    ``purpose`` completes the message ("… are needed for {purpose}").
    """
    import numpy as np

    if spatial_key not in adata.obsm:
        msg = (
            f"`{where}.obsm[{spatial_key!r}]` not found: spot coordinates are needed for {purpose}. Available obsm "
            f"keys: {sorted(map(str, adata.obsm.keys()))}. Read the section with an `stfm.io` reader / "
            "`stfm.datasets`, or set `obsm['spatial']` to the (x, y) centres in full-resolution pixels."
        )
        raise KeyError(msg)
    xy = adata.obsm[spatial_key]
    xy = np.asarray(getattr(xy, "values", xy))
    if xy.ndim != 2 or xy.shape[1] < 2 or xy.shape[0] != adata.n_obs:
        msg = f"Expected `{where}.obsm[{spatial_key!r}]` of shape ({adata.n_obs}, 2) holding (x, y); found {xy.shape}."
        raise ValueError(msg)
    if not np.issubdtype(xy.dtype, np.number):
        msg = f"Expected numeric coordinates in `{where}.obsm[{spatial_key!r}]`, found dtype {xy.dtype}."
        raise TypeError(msg)
    xy = xy[:, :2].astype(np.float64)
    bad = ~np.isfinite(xy).all(axis=1)
    if bad.any():
        ex = [str(o) for o in adata.obs_names[bad][:3]]
        msg = (
            f"`{where}.obsm[{spatial_key!r}]` has NaN or inf coordinates for {int(bad.sum())} of {adata.n_obs} spots "
            f"(e.g. {ex}). Drop them first: `adata = adata[np.isfinite(adata.obsm[{spatial_key!r}]).all(1)].copy()`."
        )
        raise ValueError(msg)
    return xy
