"""Leakage-free evaluation of expression prediction: per-section metrics and patient-level cross-validation."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._containers import get_table
from .._logging import logger
from .._validation import assert_key_in
from ._expression import check_sections

__all__ = ["cross_validate", "evaluate_expression", "panel_view", "pearson_per_gene"]

POOLED_COLUMN = "pearson_pooled_across_sections"
#: metric columns of :func:`cross_validate` repeated with the suffix ``_composition`` (counts per 10k on both sides)
COMPOSITION_COLUMNS = ("pearson_all", "pearson_top_variable", "pearson_top_expressed", "mse", "mae")


def panel_view(section: AnnData, genes: Sequence[str], embedding_key: str) -> tuple[AnnData, list[str]]:
    """A copy of ``section`` with exactly ``genes`` as columns (genes it lacks were not detected: zero counts),
    its embedding and coordinates; returns the copy and the genes that were missing."""
    missing = [g for g in genes if g not in section.var_names]
    test = section
    if missing:
        import anndata as ad

        pad = AnnData(X=sparse.csr_matrix((section.n_obs, len(missing)), dtype=np.float32), obs=section.obs[[]])
        pad.var_names = missing
        test = ad.concat([section, pad], axis=1, merge="first")
        test.obs = section.obs.copy()
    test = test[:, list(genes)].copy()
    test.obsm[embedding_key] = np.asarray(section.obsm[embedding_key])
    if "spatial" in section.obsm:
        test.obsm["spatial"] = np.asarray(section.obsm["spatial"])
    for k in ("stfm",):
        if k in section.uns:
            test.uns[k] = section.uns[k]
    return test, missing


def pearson_per_gene(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Pearson correlation across spots for each gene (column); ``NaN`` where either side is constant."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    p = p - p.mean(0)
    t = t - t.mean(0)
    den = np.sqrt((p * p).sum(0) * (t * t).sum(0))
    num = (p * t).sum(0)
    out = np.full(p.shape[1], np.nan)
    ok = den > 1e-12
    out[ok] = num[ok] / den[ok]
    return out


def _dense(x: Any) -> np.ndarray:
    return np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64)


def _nanmean(x: np.ndarray) -> float:
    return float(np.nanmean(x)) if np.isfinite(x).any() else float("nan")


def evaluate_expression(
    data: Any,
    *,
    layer: str = "predicted",
    measured_layer: str | None = None,
    genes: Sequence[str] | None = None,
    top_variable: Sequence[str] | None = None,
    top_expressed: Sequence[str] | None = None,
    model: Any = None,
    section_key: str | None = "section",
    table_key: str | None = None,
    normalize: bool = False,
) -> pd.DataFrame:
    """Per-section accuracy of predicted expression against measured counts.

    Both sides are compared on the ``log1p`` scale (HEST-Benchmark): ``log1p(layers[layer])`` against
    ``log1p(measured counts)``.

    Parameters
    ----------
    data
        AnnData (or SpatialData table) with predictions in ``layers[layer]`` and raw counts in ``X`` (or
        ``measured_layer``).
    layer
        Layer with predictions (from :func:`predict_expression`).
    measured_layer
        Layer with measured counts (``None``: ``X``).
    genes
        Genes to evaluate (``None``: all ``var_names``).
    top_variable, top_expressed
        The 50 most variable / most expressed genes, **chosen on training data** (``model.gene_sets_`` from
        :func:`fit_expression`); metrics over them get their own columns. Taken from ``model`` when not given.
    model
        Fitted model whose ``gene_sets_`` supply ``top_variable`` / ``top_expressed``.
    section_key
        obs column with the section of each spot (``None`` or absent: one section, ``'all'``).
    table_key
        Table of a SpatialData object.
    normalize
        Rescale predicted and measured values of each spot to 10⁴ over the evaluated genes before ``log1p``
        (compares composition only, e.g. for predictions at a fixed library size).

    Returns
    -------
    :class:`~pandas.DataFrame`, one row per section plus a ``'mean'`` row (average over sections), with columns
    ``n_spots``, ``n_genes``, ``n_genes_constant`` (genes with no variance in a section, left out of Pearson
    means), ``pearson_all`` (mean over genes of the per-gene Pearson across spots), ``pearson_top_variable``,
    ``pearson_top_expressed``, ``mse``, ``mae`` (over spots × genes, log1p scale), and
    ``pearson_pooled_across_sections`` (per-gene Pearson over the spots of all sections pooled together, then
    averaged over genes; the same value in every row, and not comparable with per-section numbers).
    """
    adata = get_table(data, table_key)
    assert_key_in(layer, adata.layers, where="adata.layers", hint="Run `stfm.tl.predict_expression(adata, model)` first.")
    if measured_layer is not None:
        assert_key_in(measured_layer, adata.layers, where="adata.layers")
    if model is not None:
        sets = getattr(model, "gene_sets_", {}) or getattr(getattr(model, "members", [None])[0], "gene_sets_", {})
        top_variable = top_variable if top_variable is not None else sets.get("top_variable")
        top_expressed = top_expressed if top_expressed is not None else sets.get("top_expressed")
    if genes is None:
        genes = [str(g) for g in adata.var_names]
    else:
        genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        bad = [g for g in genes if g not in adata.var_names]
        if bad:
            msg = f"{len(bad)} genes are not in `var_names` (e.g. {bad[:5]}); evaluate genes the table holds."
            raise KeyError(msg)
    sub = adata[:, genes]
    pred = _dense(sub.layers[layer])
    true = _dense(sub.X if measured_layer is None else sub.layers[measured_layer])
    if np.nanmin(true) < 0 or np.nanmin(pred) < 0:
        msg = (
            "Expected non-negative predictions and measured counts (they are compared on the log1p scale); "
            f"found a minimum of {min(np.nanmin(true), np.nanmin(pred)):.3g}. Pass raw counts (`measured_layer=`) "
            "and a layer from `stfm.tl.predict_expression`."
        )
        raise ValueError(msg)
    if normalize:
        for arr in (pred, true):
            tot = arr.sum(1, keepdims=True)
            np.divide(arr * 1e4, tot, out=arr, where=tot > 0)
    lp, lt = np.log1p(pred), np.log1p(true)
    if section_key is not None and section_key in adata.obs:
        labels = adata.obs[section_key].astype(str).to_numpy()
    else:
        labels = np.full(adata.n_obs, "all", dtype=object)
    gidx = {g: i for i, g in enumerate(genes)}

    def cols(names: Sequence[str] | None) -> np.ndarray | None:
        if names is None:
            return None
        return np.asarray([gidx[g] for g in names if g in gidx], dtype=int)

    iv, ie = cols(top_variable), cols(top_expressed)
    rows = {}
    for sec in pd.unique(labels):
        m = labels == sec
        r = pearson_per_gene(lp[m], lt[m])
        rows[sec] = {
            "n_spots": int(m.sum()),
            "n_genes": len(genes),
            "n_genes_constant": int(np.isnan(r).sum()),
            "pearson_all": _nanmean(r),
            "pearson_top_variable": _nanmean(r[iv]) if iv is not None and len(iv) else float("nan"),
            "pearson_top_expressed": _nanmean(r[ie]) if ie is not None and len(ie) else float("nan"),
            "mse": float(np.mean((lp[m] - lt[m]) ** 2)),
            "mae": float(np.mean(np.abs(lp[m] - lt[m]))),
        }
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "section"
    if len(df) > 1:
        mean = df.mean(numeric_only=True)
        mean[["n_spots", "n_genes_constant"]] = df[["n_spots", "n_genes_constant"]].sum()
        mean["n_genes"] = len(genes)
        df.loc["mean"] = mean
    df[POOLED_COLUMN] = _nanmean(pearson_per_gene(lp, lt))
    for c in ("n_spots", "n_genes", "n_genes_constant"):
        df[c] = df[c].astype(int)
    df.attrs["scale"] = "log1p" + (" of counts per 10k" if normalize else "")
    df.attrs["layer"] = layer
    return df


# --------------------------------------------------------------------------------------------------
# cross-validation
# --------------------------------------------------------------------------------------------------
def _split_sections(adatas: AnnData | Sequence[AnnData], section_key: str) -> dict[str, AnnData]:
    parts = check_sections(adatas, section_key=section_key, purpose="cross-validation")
    out: dict[str, AnnData] = {}
    for a in parts:
        labels = a.obs[section_key].astype(str)
        for sec in pd.unique(labels):
            if sec in out:
                msg = f"Section {sec!r} appears in more than one AnnData; section names must be unique."
                raise ValueError(msg)
            out[sec] = a[(labels == sec).to_numpy()].copy() if len(parts) > 1 or labels.nunique() > 1 else a
    return out


def cross_validate(
    adatas: AnnData | Sequence[AnnData],
    *,
    method: str = "zinb",
    split: Literal["patient", "section"] = "patient",
    embedding_key: str,
    section_key: str = "section",
    patient_key: str = "patient",
    test_sections: Sequence[str] | None = None,
    folds: Sequence[tuple[Sequence[str], Sequence[str]]] | None = None,
    n_top_genes: int = 50,
    library_size: float | Literal["predicted"] = "predicted",
    **fit_kwargs: Any,
) -> pd.DataFrame:
    """Leakage-free evaluation: train on some patients' sections, test on held-out ones, one row per test section.

    For each fold the gene panel (``n_top_genes`` most variable genes) and every scaling are fitted on the
    training sections only; epochs and method settings are chosen on whole validation sections drawn from the
    training patients (see :meth:`~stfm.model.ExpressionModelBase.train`); each test section is predicted once,
    from its H&E embedding alone, and scored with :func:`evaluate_expression` twice: on log1p counts (``raw``,
    rewards predicting depth) and on log1p counts per 10k over the panel (columns ending in ``_composition``).

    Parameters
    ----------
    adatas
        Per-section AnnData objects, or one AnnData with several sections; raw counts in ``X`` and the embedding
        in ``obsm[embedding_key]``.
    method
        A registered method key (:func:`stfm.model.list_methods`).
    split
        ``'patient'`` (default): each patient is held out in turn and training uses only other patients.
        ``'section'``: leave-one-section-out, which puts the test patient's other sections in training; rows
        are labelled ``leaky=True``.
    embedding_key
        obsm key of the embedding.
    section_key, patient_key
        obs columns with section and patient labels.
    test_sections
        Only report folds testing these sections (``None``: all).
    folds
        Explicit ``(train_sections, test_sections)`` pairs instead of the automatic folds. With
        ``split='patient'`` a fold that trains on a section of a test patient is refused.
    n_top_genes
        Panel size, chosen on each fold's training sections.
    library_size
        Passed to :func:`predict_expression`; ``'predicted'`` (default) uses no measurement of the test section.
    **fit_kwargs
        Passed to :func:`fit_expression` (e.g. ``max_epochs``, ``neighbor_pooling``, ``n_models``, ``seed``).

    Returns
    -------
    :class:`~pandas.DataFrame` with one row per test section: ``fold``, ``method``, ``split``, ``leaky``,
    ``train_sections``, ``train_patients``, ``validation_sections``, ``test_section``, ``test_patient``, the metrics
    of :func:`evaluate_expression` (raw), the same with the suffix ``_composition``, ``smoothing_neighbors``,
    ``fit_time_s`` and ``predict_time_s``. ``df.attrs['protocol']`` describes the protocol.
    """
    from ._expression import fit_expression, predict_expression

    if split not in ("patient", "section"):
        msg = f"Expected `split` to be 'patient' or 'section', found {split!r}."
        raise ValueError(msg)
    sections = _split_sections(adatas, section_key)
    patient_of: dict[str, str] = {}
    for sec, a in sections.items():
        if patient_key not in a.obs:
            msg = (
                f"`obs[{patient_key!r}]` not found for section {sec!r}; pass `patient_key=` naming the patient column."
            )
            raise KeyError(msg)
        pats = a.obs[patient_key].astype(str).unique()
        if len(pats) != 1:
            msg = f"Section {sec!r} has spots from several patients {list(pats)}; each section must belong to one patient."
            raise ValueError(msg)
        patient_of[sec] = str(pats[0])
    names = sorted(sections)
    if len(names) < 2:
        msg = (
            f"Cross-validation needs at least two sections; found a single section {names}. With "
            f"split={split!r} there is nothing to train on once it is held out: add sections from other patients."
        )
        raise ValueError(msg)

    if folds is None:
        if split == "patient":
            patients = sorted(set(patient_of.values()))
            if len(patients) < 2:
                msg = (
                    f"split='patient' needs sections from at least two patients, but all sections {names} come from "
                    f"patient {patients[0]!r}. Add another patient, or use split='section' (leave-one-section-out, "
                    "labelled leaky)."
                )
                raise ValueError(msg)
            folds = [
                ([s for s in names if patient_of[s] != p], [s for s in names if patient_of[s] == p]) for p in patients
            ]
        else:
            folds = [([s for s in names if s != t], [t]) for t in names]
    else:
        folds = [([str(s) for s in tr], [str(s) for s in te]) for tr, te in folds]
        for k, (tr, te) in enumerate(folds):
            unknown = [s for s in (*tr, *te) if s not in sections]
            if unknown:
                msg = f"Fold {k} names unknown sections {unknown}; available sections: {names}."
                raise KeyError(msg)
            if set(tr) & set(te):
                msg = f"Fold {k} tests on sections it trains on: {sorted(set(tr) & set(te))}."
                raise ValueError(msg)
            if not tr:
                msg = f"Fold {k} has no training section."
                raise ValueError(msg)
            test_pat = {patient_of[s] for s in te}
            leak = [s for s in tr if patient_of[s] in test_pat]
            if leak and split == "patient":
                msg = (
                    f"Fold {k} trains on sections {leak} of test patient(s) {sorted(test_pat)}: that leaks "
                    "patient-specific signal into the score. Remove them from training, or pass split='section' to "
                    "run it anyway (rows are then labelled leaky)."
                )
                raise ValueError(msg)
    if test_sections is not None:
        wanted = {str(s) for s in test_sections}
        unknown = sorted(wanted - set(names))
        if unknown:
            msg = f"`test_sections` {unknown} not found; available sections: {names}."
            raise KeyError(msg)
        folds = [(tr, [s for s in te if s in wanted]) for tr, te in folds]
        folds = [(tr, te) for tr, te in folds if te]

    rows = []
    for k, (tr, te) in enumerate(folds):
        t0 = time.perf_counter()
        model = fit_expression(
            [sections[s] for s in tr],
            method=method,
            embedding_key=embedding_key,
            n_top_genes=n_top_genes,
            section_key=section_key,
            patient_key=patient_key,
            **fit_kwargs,
        )
        fit_time = time.perf_counter() - t0
        members = getattr(model, "members", [model])
        val = sorted({v for m in members for v in getattr(m, "validation_sections_", [])})
        leaky = any(patient_of[s] in {patient_of[t] for t in te} for s in tr)
        for t in te:
            test, missing = panel_view(sections[t], model.genes, embedding_key)
            t1 = time.perf_counter()
            predict_expression(test, model, library_size=library_size)
            predict_time = time.perf_counter() - t1
            raw = evaluate_expression(test, model=model, section_key=section_key).iloc[0]
            comp = evaluate_expression(test, model=model, section_key=section_key, normalize=True).iloc[0]
            row = {
                "fold": k,
                "method": model.method,
                "split": split,
                "leaky": leaky,
                "train_sections": ",".join(tr),
                "train_patients": ",".join(sorted({patient_of[s] for s in tr})),
                "validation_sections": ",".join(val) if val else "none",
                "test_section": t,
                "test_patient": patient_of[t],
                **raw.drop(POOLED_COLUMN, errors="ignore").to_dict(),
                **{f"{c}_composition": comp[c] for c in COMPOSITION_COLUMNS},
                "n_genes_missing_in_test": len(missing),
                "smoothing_neighbors": int(getattr(members[0], "smoothing_", 0)),
                "fit_time_s": fit_time,
                "predict_time_s": predict_time,
            }
            rows.append(row)
            logger.info("cross_validate fold %d: %s → %s pearson_all=%.3f (composition %.3f)", k, tr, t,
                        row["pearson_all"], row["pearson_all_composition"])  # fmt: skip
    df = pd.DataFrame(rows)
    df.attrs["protocol"] = {
        "split": split,
        "leaky": split == "section",
        "gene_panel": f"{n_top_genes} most variable genes (variance of log1p counts) chosen on each fold's training sections",
        "validation": "whole training sections (epochs, method settings, smoothing); none when a single section trains",
        "test": "each test section predicted once; metrics per section on the log1p scale",
        "metrics": "raw: log1p(predicted) vs log1p(counts); composition: log1p counts per 10k over the panel, both sides",
        "library_size": library_size,
    }
    return df
