"""``evaluate_cancer_regions``: per-section AUC, AP, F1, sensitivity and specificity against annotations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._containers import get_table
from .._validation import assert_key_in
from ._cancer_common import DEFAULT_IGNORE, DEFAULT_POSITIVE, _as_list, _check_labels, _split_sections

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["evaluate_cancer_regions"]


def evaluate_cancer_regions(
    adata: AnnData | SpatialData | Sequence[AnnData],
    *,
    label_key: str = "pathologist_label",
    score_key: str = "cancer_region_score",
    positive: Sequence[str] = DEFAULT_POSITIVE,
    ignore: Sequence[str] = DEFAULT_IGNORE,
    undetermined: Literal["exclude", "negative"] = "exclude",
    threshold: float | None = None,
    section_key: str = "section",
    table_key: str | None = None,
) -> pd.DataFrame:
    """Per-section AUC, AP, F1, sensitivity and specificity of a tumour score against annotations.

    Parameters
    ----------
    adata
        Scored sections (one AnnData with ``obs[section_key]``, a SpatialData, or a list of AnnData).
    label_key
        Annotation column.
    score_key
        Score column (written by :func:`detect_cancer_regions`).
    positive
        Label names counted as tumour.
    ignore
        Label names of uncertain spots (``'undetermined'``).
    undetermined
        ``'exclude'`` drops the ``ignore`` spots (default); ``'negative'`` counts them as non-tumour.
    threshold
        Call threshold for F1 / sensitivity / specificity; default: the threshold stored by
        :func:`detect_cancer_regions` in ``uns['stfm'][score_key minus '_score']``, else 0.5.
    section_key
        ``obs`` column of sections.
    table_key
        Table of a SpatialData input.

    Returns
    -------
    One row per section: ``n_spots``, ``n_positive``, ``auc``, ``ap``, ``f1``, ``sensitivity``, ``specificity``,
    ``threshold`` and ``undetermined`` (how ignored spots were treated, also in ``.attrs['undetermined']``).
    AUC and AP are NaN for a section with a single class.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score

    if undetermined not in ("exclude", "negative"):
        msg = f"Expected `undetermined` to be 'exclude' or 'negative', found {undetermined!r}."
        raise ValueError(msg)
    objs, _ = _as_list(adata)
    rows = []
    for o in objs:
        t = get_table(o, table_key)
        _check_labels(t, label_key, positive, ignore, where="the evaluated data")
        assert_key_in(score_key, t.obs.columns, where="obs", hint="Run `stfm.tl.detect_cancer_regions` first.")
        thr = threshold
        if thr is None:
            slot = score_key[: -len("_score")] if score_key.endswith("_score") else score_key
            thr = float(t.uns.get("stfm", {}).get(slot, {}).get("threshold", 0.5))
        for sec, idx in _split_sections(t, section_key):
            lab = t.obs[label_key].astype("object").iloc[idx]
            s = t.obs[score_key].to_numpy(dtype=np.float64)[idx]
            is_pos = lab.isin(list(positive)).to_numpy()
            is_ign = lab.isin(list(ignore)).to_numpy()
            keep = lab.notna().to_numpy() & np.isfinite(s)
            if undetermined == "exclude":
                keep &= ~is_ign
            y, s = is_pos[keep].astype(int), s[keep]
            pred = s >= thr
            tp, fp = int(np.sum(pred & (y == 1))), int(np.sum(pred & (y == 0)))
            fn, tn = int(np.sum(~pred & (y == 1))), int(np.sum(~pred & (y == 0)))
            two = np.unique(y).size == 2
            rows.append({
                "section": sec, "n_spots": int(y.size), "n_positive": int(y.sum()),
                "auc": float(roc_auc_score(y, s)) if two else np.nan,
                "ap": float(average_precision_score(y, s)) if two else np.nan,
                "f1": 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else np.nan,
                "sensitivity": tp / (tp + fn) if (tp + fn) else np.nan,
                "specificity": tn / (tn + fp) if (tn + fp) else np.nan,
                "threshold": float(thr), "undetermined": "excluded" if undetermined == "exclude" else "negative",
            })  # fmt: skip
    df = pd.DataFrame(rows).set_index("section")
    df.attrs["undetermined"] = "excluded" if undetermined == "exclude" else "negative"
    return df
