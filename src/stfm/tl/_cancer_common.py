"""Shared pieces of the cancer-region tools: label handling, section splitting."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import CANCER_MARKERS, REGION_CATEGORIES, REGION_COLORS
from .._containers import is_spatialdata

__all__ = ["CANCER_MARKERS", "DEFAULT_IGNORE", "DEFAULT_POSITIVE", "REGION_CATEGORIES", "REGION_COLORS"]

DEFAULT_POSITIVE = ("invasive cancer", "cancer in situ")
DEFAULT_IGNORE = ("undetermined",)


def _as_list(data: Any) -> tuple[list[Any], list[str] | None]:
    """A list of AnnData/SpatialData and their names (mapping keys) from one object, a sequence or a mapping."""
    if isinstance(data, Mapping):
        return list(data.values()), [str(k) for k in data]
    if isinstance(data, AnnData) or is_spatialdata(data):
        return [data], None
    if isinstance(data, Sequence) and not isinstance(data, str):
        return list(data), None
    msg = f"Expected an AnnData, a SpatialData, or a list/dict of them; found {type(data).__name__}."
    raise TypeError(msg)


def _split_sections(adata: AnnData, section_key: str) -> list[tuple[str, np.ndarray]]:
    """(section name, integer indices) for each section of ``adata`` (one section when the column is absent)."""
    if section_key in adata.obs:
        col = adata.obs[section_key].astype(str).to_numpy()
        return [(s, np.flatnonzero(col == s)) for s in pd.unique(col)]
    lib = next(iter(adata.uns.get("spatial", {})), "section")
    return [(str(lib), np.arange(adata.n_obs))]


def _check_labels(
    adata: AnnData, label_key: str, positive: Sequence[str], ignore: Sequence[str], *, where: str, names: bool = True
) -> None:
    if label_key not in adata.obs:
        msg = (
            f"Label column `obs[{label_key!r}]` not found in {where}. Available obs columns: {sorted(map(str, adata.obs))}. "
            "Pass `label_key=` naming the annotation column (her2st: 'pathologist_label', sections A1, B1, C1, D1)."
        )
        raise KeyError(msg)
    if not names:
        return
    found = set(pd.Series(adata.obs[label_key]).dropna().astype(str).unique())
    unknown = [lab for lab in (*positive, *ignore) if lab not in found]
    if unknown and not ((set(positive) | set(ignore)) & found):
        msg = (
            f"Unknown label names {unknown} for `obs[{label_key!r}]` in {where}. Labels present: {sorted(found)}. "
            "Set `positive=` / `ignore=` to names from that list."
        )
        raise ValueError(msg)


def _provenance_kind(t: AnnData, key: str) -> str | None:
    """What produced ``obsm[key]`` according to ``uns['stfm']`` (e.g. 'expression_embedding:scvi'), if recorded."""
    entry = t.uns.get("stfm", {}).get(key) if isinstance(t.uns.get("stfm"), Mapping) else None
    if not isinstance(entry, Mapping):
        return None
    detail = entry.get("method", entry.get("encoder"))
    return f"{entry.get('function', '?')}:{detail}" if detail is not None else str(entry.get("function", "?"))
