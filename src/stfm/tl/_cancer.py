"""Cancer-region detection: expression embeddings, CancerClassifier training, detection, evaluation."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._containers import get_table, is_spatialdata, prepare_output
from .._logging import added, logger
from .._provenance import record
from .._validation import check_copy_inplace, check_positive, check_valid_key
from ._context import spot_pitch

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..model._cancer import CancerClassifier

__all__ = [
    "CANCER_MARKERS",
    "REGION_CATEGORIES",
    "REGION_COLORS",
    "detect_cancer_regions",
    "evaluate_cancer_regions",
    "expression_embedding",
    "fit_cancer_model",
]

#: Marker genes of the ``method='signature'`` score: epithelial / luminal breast carcinoma and HER2 amplicon genes
#: (ERBB2 and its co-amplified neighbours GRB7, PGAP3, STARD3), keratins and adhesion molecules of carcinoma cells.
CANCER_MARKERS: tuple[str, ...] = (
    "ERBB2", "GRB7", "PGAP3", "STARD3", "KRT19", "KRT18", "KRT8", "KRT7", "EPCAM", "CD24", "MUC1", "CDH1",
    "CLDN4", "TACSTD2", "SPINT2", "AGR2",
)  # fmt: skip
REGION_CATEGORIES: tuple[str, ...] = ("tumor", "boundary", "non-tumor")
REGION_COLORS: tuple[str, ...] = ("#d62728", "#ff9f1c", "#4c78a8")
_DEFAULT_POSITIVE = ("invasive cancer", "cancer in situ")
_DEFAULT_IGNORE = ("undetermined",)


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
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


def _log_normalise(x: Any, target_sum: float = 1e4) -> np.ndarray:
    """log1p(counts / row sum × ``target_sum``) as a dense float32 array (rows with no counts stay zero)."""
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    x = x.astype(np.float64)
    lib = x.sum(1, keepdims=True)
    lib[lib == 0] = 1.0
    return np.log1p(x / lib * target_sum).astype(np.float32)


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


# ---------------------------------------------------------------------------------------------------------
# expression embedding
# ---------------------------------------------------------------------------------------------------------
def expression_embedding(
    adatas_or_adata: AnnData | Sequence[AnnData] | Mapping[str, AnnData],
    *,
    method: Literal["scvi", "pca", "predicted"] = "scvi",
    reference: Sequence[int] | Sequence[str] | None = None,
    n_comps: int = 16,
    n_top_genes: int = 2000,
    layer: str | None = None,
    max_epochs: int = 100,
    seed: int = 0,
    section_key: str = "section",
    standardize: Literal["none", "section"] = "none",
    key_added: str | None = None,
) -> None:
    """Per-spot expression embedding that transfers across sections and batches.

    Genes are the intersection over all sections; highly variable genes are chosen on the *reference*
    sections only. Methods:

    ``'scvi'``
        :class:`scvi.model.SCVI` latent mean (``n_comps`` dimensions) trained on reference **and** query sections
        together, ``batch`` = section, on raw counts of the reference HVGs (``seurat_v3``). Unsupervised: no label
        is read.
    ``'pca'``
        PCA of log-normalised counts (``log1p`` of counts per 10,000) of the reference HVGs, standardised with the
        reference mean / std; fitted on the reference, applied to every section.
    ``'predicted'``
        As ``'pca'`` but on ``layers[layer or 'predicted']`` (expression predicted from H&E by
        :func:`stfm.tl.predict_expression`) wherever a section has that layer, and on the counts in ``X`` for sections
        without it (e.g. a measured reference and an H&E-only query). Giving the reference the same layer
        (out-of-fold predictions) keeps reference and query embeddings from the same kind of data.

    Parameters
    ----------
    adatas_or_adata
        One AnnData (sections in ``obs[section_key]``), or a list / dict of AnnData (one per section).
    method
        See above.
    reference
        Positions (list) or keys (dict) of the reference sections; ``None`` = all.
    n_comps
        Embedding dimension (scVI ``n_latent`` or number of principal components).
    n_top_genes
        Number of highly variable genes (fewer if fewer genes are shared).
    layer
        Count layer (``None`` = ``X``); for ``'predicted'`` the predicted layer (default ``'predicted'``).
    max_epochs
        scVI training epochs.
    seed
        Random seed (scVI initialisation and minibatches, PCA solver).
    section_key
        ``obs`` column naming sections when a single AnnData holds several.
    standardize
        ``'section'``: centre and scale every embedding dimension within each section (its own mean and standard
        deviation over its spots), which removes section- and patient-level offsets; a query section is
        standardised with its own statistics, so no label is read. ``'none'``: keep the embedding as computed.
    key_added
        ``obsm`` key; default ``'X_scvi_expr'``, ``'X_pca_expr'`` or ``'X_predicted_expr'``.

    Returns
    -------
    Nothing; every AnnData gets

    `.obsm['X_<method>_expr' | key_added]` : :class:`numpy.ndarray` (float32, ``(n_obs, n_comps)``)
    `.uns['stfm']['X_<method>_expr' | key_added]` : method, genes used, reference sections, seed.
    """
    if method not in ("scvi", "pca", "predicted"):
        msg = f"Expected `method` to be one of 'scvi', 'pca', 'predicted'; found {method!r}."
        raise ValueError(msg)
    if standardize not in ("none", "section"):
        msg = f"Expected `standardize` to be 'none' or 'section'; found {standardize!r}."
        raise ValueError(msg)
    key = check_valid_key(key_added or {"scvi": "X_scvi_expr", "pca": "X_pca_expr", "predicted": "X_predicted_expr"}[method])
    objs, names = _as_list(adatas_or_adata)
    tables = [get_table(o) for o in objs]
    # split a multi-section AnnData into views so that HVGs and batches follow sections
    parts: list[tuple[int, str, np.ndarray]] = []
    for t_i, t in enumerate(tables):
        for sec, idx in _split_sections(t, section_key):
            parts.append((t_i, sec, idx))
    if reference is None:
        ref_tables = set(range(len(tables)))
    else:
        lookup = {n: i for i, n in enumerate(names)} if names else {}
        ref_tables = set()
        for r in reference:
            if isinstance(r, str):
                if r not in lookup:
                    msg = f"Reference {r!r} not found; available keys: {names}."
                    raise KeyError(msg)
                ref_tables.add(lookup[r])
            else:
                ref_tables.add(int(r))
    src_layer = (layer or "predicted") if method == "predicted" else layer
    if method == "predicted":
        if not any(src_layer in t.layers for t in tables):
            msg = f"`layers[{src_layer!r}]` not found in any section. Available layers: {sorted(tables[0].layers)}. Run `stfm.tl.predict_expression` first."
            raise KeyError(msg)
    else:
        for t in tables:
            if src_layer is not None and src_layer not in t.layers:
                msg = f"`layers[{src_layer!r}]` not found. Available layers: {sorted(t.layers)}."
                raise KeyError(msg)
    genes = tables[0].var_names
    for t in tables[1:]:
        genes = genes.intersection(t.var_names, sort=False)
    genes = genes[~genes.duplicated()]
    if len(genes) < 2:
        msg = f"The sections share {len(genes)} gene names; an expression embedding needs shared genes."
        raise ValueError(msg)

    def matrix(t_i: int, idx: np.ndarray) -> Any:
        t = tables[t_i]
        cols = t.var_names.get_indexer(genes)
        # 'predicted': sections without the predicted layer (measured ST only) use their counts in X
        x = t.X if src_layer is None or src_layer not in t.layers else t.layers[src_layer]
        return x[idx][:, cols]

    ref_parts = [p for p in parts if p[0] in ref_tables]
    if not ref_parts:
        msg = "No reference section selected: `reference` must name at least one section."
        raise ValueError(msg)
    n_top = int(min(n_top_genes, len(genes)))

    if method == "scvi":
        import scanpy as sc
        import scvi

        def counts(t_i, idx):
            m = matrix(t_i, idx)
            return sparse.csr_matrix(m, dtype=np.float32)

        ref = AnnData(sparse.vstack([counts(t, i) for t, _, i in ref_parts]).tocsr())
        ref.var_names = np.asarray(genes)
        ref.obs["batch"] = np.concatenate([[f"{t}:{s}"] * len(i) for t, s, i in ref_parts])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.pp.highly_variable_genes(ref, n_top_genes=n_top, flavor="seurat_v3", subset=False,
                                        batch_key="batch" if len(ref_parts) > 1 else None)  # fmt: skip
        hvg = ref.var_names[ref.var["highly_variable"].to_numpy()]
        cols = genes.get_indexer(hvg)
        full = AnnData(sparse.vstack([counts(t, i)[:, cols] for t, _, i in parts]).tocsr())
        full.var_names = np.asarray(hvg)
        full.obs_names = [f"{k}" for k in range(full.n_obs)]
        full.obs["batch"] = pd.Categorical(np.concatenate([[f"{t}:{s}"] * len(i) for t, s, i in parts]))
        empty = np.asarray(full.X.sum(1)).ravel() == 0
        if empty.any():
            logger.warning(
                "%d spots have no counts over the %d selected genes; their scVI embedding is NaN (treated as missing).",
                int(empty.sum()), len(hvg),
            )
        fit = full[~empty].copy()
        scvi.settings.seed = seed
        scvi.model.SCVI.setup_anndata(fit, batch_key="batch")
        vae = scvi.model.SCVI(fit, n_latent=n_comps)
        vae.train(max_epochs=max_epochs, train_size=1.0, batch_size=128, enable_progress_bar=False,
                  accelerator="cpu", logger=False, enable_model_summary=False)  # fmt: skip
        z = np.full((full.n_obs, n_comps), np.nan, dtype=np.float32)
        z[~empty] = vae.get_latent_representation().astype(np.float32)
        genes_used = list(hvg)
    else:
        from sklearn.decomposition import PCA

        ref_x = np.vstack([_log_normalise(matrix(t, i)) for t, _, i in ref_parts])
        disp = ref_x.var(0)
        cols = np.argsort(-disp, kind="stable")[:n_top]
        mean, std = ref_x[:, cols].mean(0), ref_x[:, cols].std(0) + 1e-6
        n_pc = int(min(n_comps, len(cols), ref_x.shape[0]))
        pca = PCA(n_components=n_pc, random_state=seed, svd_solver="full").fit((ref_x[:, cols] - mean) / std)
        z = np.vstack([pca.transform((_log_normalise(matrix(t, i))[:, cols] - mean) / std) for t, _, i in parts]).astype(np.float32)
        genes_used = list(genes[cols])
    start = 0
    out = {t_i: np.zeros((tables[t_i].n_obs, z.shape[1]), np.float32) for t_i in range(len(tables))}
    for t_i, _, idx in parts:
        block = z[start : start + len(idx)]
        if standardize == "section":
            ok = np.isfinite(block).all(1)
            if ok.sum() >= 2:
                mu, sd = block[ok].mean(0), block[ok].std(0)
                block = (block - mu) / np.where(sd > 1e-8, sd, 1.0)
        out[t_i][idx] = block
        start += len(idx)
    ref_names = sorted({s for t, s, _ in ref_parts})
    for t_i, t in enumerate(tables):
        t.obsm[key] = out[t_i]
        record(t, key, "expression_embedding", method=method, n_comps=int(z.shape[1]), n_genes=len(genes_used),
               reference_sections=ref_names, layer=src_layer, seed=seed, max_epochs=max_epochs if method == "scvi" else "None",
               standardize=standardize)  # fmt: skip
        added(f"obsm[{key!r}]", out[t_i].shape)


# ---------------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------------
def _token_table(
    sections: list[tuple[str, AnnData]],
    *,
    use_rep: str | None,
    expr_rep: str | None,
    label_key: str | None,
    section_key: str,
    spatial_key: str,
) -> AnnData:
    """A fresh AnnData (no X) with the columns the classifier reads; inputs untouched."""
    obs, obsm = [], {k: [] for k in ("spatial", use_rep, expr_rep) if k is not None}
    dims: dict[str, int] = {}
    for name, t in sections:
        if spatial_key not in t.obsm:
            msg = (
                f"`obsm[{spatial_key!r}]` not found in section {name!r}: spot coordinates are needed for the spatial "
                f"context. Available obsm keys: {sorted(t.obsm)}. Read sections with `stfm.datasets.her2st` or "
                "`squidpy.read.visium`."
            )
            raise KeyError(msg)
        o = pd.DataFrame({section_key: name}, index=[f"{name}:{i}" for i in t.obs_names])
        if label_key is not None:
            o[label_key] = t.obs[label_key].astype("object").to_numpy()
        obs.append(o)
        obsm["spatial"].append(np.asarray(t.obsm[spatial_key], dtype=np.float64)[:, :2])
        for k in (use_rep, expr_rep):
            if k is None:
                continue
            if k in t.obsm:
                x = np.asarray(t.obsm[k], dtype=np.float32)
                if k in dims and dims[k] != x.shape[1]:
                    msg = f"`obsm[{k!r}]` has dimension {x.shape[1]} in section {name!r} but {dims[k]} in another section; all sections need the same embedding."
                    raise ValueError(msg)
                dims[k] = x.shape[1]
                obsm[k].append(x)
            else:
                obsm[k].append(None)
    tok = AnnData(obs=pd.concat(obs))
    tok.obsm["spatial"] = np.vstack(obsm["spatial"])
    for k in (use_rep, expr_rep):
        if k is None:
            continue
        blocks = [b if b is not None else np.full((len(o), dims[k]), np.nan, np.float32) for b, o in zip(obsm[k], obs)]
        tok.obsm[k] = np.vstack(blocks)
    if label_key is not None:
        tok.obs[label_key] = tok.obs[label_key].astype("category")
    return tok


def _train_one(tok: AnnData, *, use_rep, expr_rep, label_key, positive, ignore, section_key, scales, n_sectors,
               model_kwargs, max_epochs, batch_size, lr, seed) -> CancerClassifier:  # fmt: skip
    import scvi

    from ..model._cancer import CancerClassifier

    scvi.settings.seed = seed
    CancerClassifier.setup_anndata(
        tok, image_key=use_rep, expression_key=expr_rep, label_key=label_key, positive=tuple(positive),
        ignore=tuple(ignore), section_key=section_key, spatial_key="spatial", scales=tuple(scales), n_sectors=n_sectors,
    )  # fmt: skip
    model = CancerClassifier(tok, **(model_kwargs or {}))
    model.train(
        max_epochs=max_epochs, batch_size=batch_size, train_size=1.0, accelerator="cpu", devices=1,
        plan_kwargs={"lr": lr, "weight_decay": 1e-4}, enable_progress_bar=False, logger=False,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    return model


def fit_cancer_model(
    reference: AnnData | Sequence[AnnData] | Mapping[str, AnnData],
    *,
    label_key: str = "pathologist_label",
    positive: Sequence[str] = _DEFAULT_POSITIVE,
    ignore: Sequence[str] = _DEFAULT_IGNORE,
    use_rep: str | None = None,
    expr_rep: str | None = None,
    section_key: str = "section",
    spatial_key: str = "spatial",
    scales: Sequence[float] = (1.0, 2.0, 4.0),
    n_sectors: int = 4,
    validation: Literal["sections", "none"] = "sections",
    threshold_criterion: Literal["f1", "youden"] = "f1",
    max_epochs: int = 30,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
) -> CancerClassifier:
    """Train a :class:`~stfm.model.CancerClassifier` on annotated reference sections and fix its threshold.

    Threshold without test labels: with ``validation='sections'`` every reference section is held out in turn,
    a model with the same settings is trained on the other sections and scores it; the pooled out-of-section
    logits are Platt-calibrated (``σ(a · logit + b)``) and the threshold that maximises ``threshold_criterion``
    on the calibrated validation scores is stored in the final model (trained on all reference sections), with
    the calibration. Detection then applies that calibration and threshold to any query section; no query label
    is read. A single reference section falls back to a random 25 % of its spots for validation (with a
    warning), and ``validation='none'`` keeps threshold 0.5 on uncalibrated probabilities.

    Parameters
    ----------
    reference
        Annotated sections: one AnnData (sections in ``obs[section_key]``), a list, or a dict name → AnnData.
    label_key
        ``obs`` column of annotations.
    positive
        Label names counted as tumour.
    ignore
        Label names left out of training and validation (e.g. ``'undetermined'``).
    use_rep
        ``obsm`` key of the image embedding (e.g. ``'X_efficientnet_lite0'``); sections without it train the
        expression side only.
    expr_rep
        ``obsm`` key of the expression embedding (e.g. ``'X_scvi_expr'`` from :func:`expression_embedding`).
    section_key
        ``obs`` column naming sections (for one AnnData holding several).
    spatial_key
        ``obsm`` key of spot centres.
    scales, n_sectors
        Spatial context rings (in spot pitches) and angular sectors.
    validation
        ``'sections'`` (held-out whole sections, see above) or ``'none'``.
    threshold_criterion
        ``'f1'`` (maximise F1) or ``'youden'`` (maximise sensitivity + specificity − 1) on validation.
    max_epochs, batch_size, lr
        Training schedule (fixed; never chosen on query data).
    seed
        Random seed: two calls with the same seed and data give the same model.
    model_kwargs
        Passed to :class:`~stfm.model.CancerClassifier` (``d_model``, ``n_layers``, ``modality_dropout``, …).

    Returns
    -------
    The trained classifier, with ``threshold_``, ``calibration_`` and ``validation_`` (per held-out section
    AUC and counts) set.
    """
    from sklearn.metrics import roc_auc_score

    from ..model._cancer import label_to_target

    if use_rep is None and expr_rep is None:
        msg = "Neither `use_rep` (image embedding) nor `expr_rep` (expression embedding) was given. Run `stfm.pp.extract_features` and/or `stfm.tl.expression_embedding` and pass their obsm keys."
        raise ValueError(msg)
    check_positive(max_epochs, name="max_epochs")
    objs, names = _as_list(reference)
    sections: list[tuple[str, AnnData]] = []
    for i, o in enumerate(objs):
        t = get_table(o)
        for sec, idx in _split_sections(t, section_key):
            name = sec if len(objs) == 1 or names is None else (names[i] if len(_split_sections(t, section_key)) == 1 else f"{names[i]}:{sec}")
            sections.append((name, t[idx]))
    seen = [s for s, _ in sections]
    if len(set(seen)) != len(seen):
        sections = [(f"{i}:{s}", t) for i, (s, t) in enumerate(sections)]
    for name, t in sections:
        _check_labels(t, label_key, positive, ignore, where=f"reference section {name!r}", names=False)
        present = [k for k in (use_rep, expr_rep) if k is not None and k in t.obsm]
        if not present:
            msg = (
                f"Reference section {name!r} has neither embedding: `obsm[{use_rep!r}]` / `obsm[{expr_rep!r}]` not found. "
                f"Available obsm keys: {sorted(t.obsm)}. Run `stfm.pp.extract_features` or `stfm.tl.expression_embedding` first."
            )
            raise KeyError(msg)
    all_labels = pd.concat([pd.Series(t.obs[label_key].astype("object").to_numpy()) for _, t in sections])
    found = set(all_labels.dropna().astype(str))
    y_all = label_to_target(all_labels, positive, ignore)
    if np.nansum(y_all == 1) == 0:
        msg = f"No positive spots in the reference: none of `obs[{label_key!r}]` is in positive={list(positive)}. Labels present: {sorted(found)}."
        raise ValueError(msg)
    # names of the her2st defaults may be absent from a reference (B1 has no 'cancer in situ'); user names may not
    defaults = {*_DEFAULT_POSITIVE, *_DEFAULT_IGNORE}
    unknown = [lab for lab in (*positive, *ignore) if lab not in found and lab not in defaults]
    if unknown:
        msg = f"Unknown label names {unknown} in `obs[{label_key!r}]`. Labels present in the reference: {sorted(found)}."
        raise ValueError(msg)
    if np.nansum(y_all == 0) == 0:
        msg = f"No negative spots in the reference: every labelled spot of `obs[{label_key!r}]` is in positive={list(positive)}."
        raise ValueError(msg)
    for k in (use_rep, expr_rep):
        if k is not None and not any(k in t.obsm for _, t in sections):
            msg = f"`obsm[{k!r}]` is not in any reference section. Available obsm keys: {sorted(sections[0][1].obsm)}."
            raise KeyError(msg)
    use_rep = use_rep if use_rep is not None and any(use_rep in t.obsm for _, t in sections) else None
    train_kw = {"use_rep": use_rep, "expr_rep": expr_rep, "label_key": label_key, "positive": positive, "ignore": ignore,
                "section_key": section_key, "scales": scales, "n_sectors": n_sectors, "model_kwargs": model_kwargs,
                "max_epochs": int(max_epochs), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed)}  # fmt: skip
    tok_kw = {"use_rep": use_rep, "expr_rep": expr_rep, "label_key": label_key, "section_key": section_key, "spatial_key": spatial_key}

    val_logits, val_labels, per_section = [], [], {}
    if validation == "sections" and len(sections) >= 2:
        for v, (vname, vt) in enumerate(sections):
            train_secs = [s for i, s in enumerate(sections) if i != v]
            ytr = label_to_target(pd.concat([pd.Series(t.obs[label_key].astype("object").to_numpy()) for _, t in train_secs]), positive, ignore)
            if np.nansum(ytr == 1) == 0 or np.nansum(ytr == 0) == 0:
                logger.warning("skipping validation fold %s: the other sections lack one class", vname)
                continue
            fold = _train_one(_token_table(train_secs, **tok_kw), **train_kw)
            vtok = _token_table([(vname, vt)], **tok_kw)
            logits = fold.predict_logits(vtok)
            y = label_to_target(vt.obs[label_key], positive, ignore)
            val_logits.append(logits)
            val_labels.append(y)
            keep = np.isfinite(y)
            auc = float(roc_auc_score(y[keep], logits[keep])) if np.unique(y[keep]).size == 2 else float("nan")
            per_section[vname] = {"auc": auc, "n_spots": int(keep.sum()), "n_positive": int(np.nansum(y == 1))}
    elif validation == "sections":
        warnings.warn(
            "Only one reference section: the threshold is chosen on a random 25% of its spots (not a held-out section); "
            "thresholds transfer better with two or more reference sections.", UserWarning, stacklevel=2,
        )  # fmt: skip
        name, t = sections[0]
        rng = np.random.default_rng(seed)
        hold = rng.random(t.n_obs) < 0.25
        tok = _token_table([(name, t)], **tok_kw)
        tok.obs[label_key] = tok.obs[label_key].astype("object").where(~hold, None).astype("category")
        fold = _train_one(tok, **train_kw)
        logits = fold.predict_logits(_token_table([(name, t)], **tok_kw))
        y = label_to_target(t.obs[label_key], positive, ignore)
        val_logits.append(logits[hold])
        val_labels.append(y[hold])
    elif validation != "none":
        msg = f"Expected `validation` to be 'sections' or 'none', found {validation!r}."
        raise ValueError(msg)

    model = _train_one(_token_table(sections, **tok_kw), **train_kw)
    if val_logits:
        model.set_threshold(np.concatenate(val_logits), np.concatenate(val_labels), criterion=threshold_criterion)
    model.validation_ = {"method": validation if val_logits else "none", "sections": per_section}
    model.fit_params_ = {"label_key": label_key, "positive": list(positive), "ignore": list(ignore),
                         "reference_sections": [s for s, _ in sections], "max_epochs": int(max_epochs), "seed": int(seed)}  # fmt: skip
    return model


# ---------------------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------------------
def _signature_scores(adata: AnnData, genes: Sequence[str], layer: str | None, seed: int) -> np.ndarray:
    import scanpy as sc

    present = [g for g in genes if g in adata.var_names]
    if len(present) < 2:
        msg = f"Only {len(present)} of the signature genes {list(genes)} are in `var_names`; pass `gene_list=` with genes the data has."
        raise ValueError(msg)
    logged = _log_normalise(adata.layers[layer] if layer is not None else adata.X)
    tmp = AnnData(sparse.csr_matrix(logged), obs=pd.DataFrame(index=adata.obs_names.astype(str)))
    tmp.var_names = adata.var_names.astype(str)
    tmp = tmp[:, ~tmp.var_names.duplicated()].copy()
    sc.tl.score_genes(tmp, present, score_name="_sig", random_state=seed, use_raw=False)
    raw = tmp.obs["_sig"].to_numpy(dtype=np.float64)
    # label-free cut: Otsu's two-class split of the raw score; the [0, 1] score is a logistic around it
    t = _otsu(raw)
    scale = max(np.std(raw), 1e-6) / 4
    return 1.0 / (1.0 + np.exp(-(raw - t) / scale))


def _otsu(x: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(x, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = ((hist * centres).sum() - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    return float(centres[int(np.argmax(between))])


def _neighbour_pairs(coords: np.ndarray, radius: float) -> np.ndarray:
    from scipy.spatial import cKDTree

    return cKDTree(coords).query_pairs(radius, output_type="ndarray")


def call_regions(
    coords: np.ndarray,
    tumour: np.ndarray,
    *,
    boundary_distance: float = 1.2,
    min_spots: int = 1,
    pitch: float | None = None,
    groups: np.ndarray | None = None,
) -> pd.Categorical:
    """Turn per-spot tumour calls into ``tumor`` / ``boundary`` / ``non-tumor``.

    Two spots are *adjacent* when their centres are at most ``boundary_distance × pitch`` apart (1.2 pitches
    by default: the 4 edge neighbours on a square grid such as legacy ST, the 6 nearest on Visium's hexagonal
    grid, with room for coordinate jitter; 1.5 also takes the diagonals of a square grid). Tumour components
    (connected through adjacency) smaller than ``min_spots`` are called non-tumour first. Then every spot with
    an adjacent spot of the other call — tumour spots touching non-tumour spots and vice versa — is ``boundary``;
    the remaining tumour spots are ``tumor`` and the rest ``non-tumor``. Adjacency never crosses sections
    (``groups``).
    """
    from scipy.sparse.csgraph import connected_components

    coords = np.asarray(coords, dtype=np.float64)[:, :2]
    tumour = np.asarray(tumour, dtype=bool).copy()
    n = tumour.size
    boundary = np.zeros(n, dtype=bool)
    parts = [np.arange(n)] if groups is None else [np.flatnonzero(groups == g) for g in pd.unique(groups)]
    for idx in parts:
        if idx.size == 0:
            continue
        p = pitch if pitch is not None else (spot_pitch(coords[idx]) if idx.size > 1 else 1.0)
        pairs = _neighbour_pairs(coords[idx], boundary_distance * p * (1 + 1e-9))
        t = tumour[idx]
        if min_spots > 1 and t.any():
            tp = pairs[t[pairs[:, 0]] & t[pairs[:, 1]]] if pairs.size else pairs
            adj = sparse.coo_matrix((np.ones(len(tp)), (tp[:, 0], tp[:, 1])), shape=(idx.size, idx.size)) if len(tp) else sparse.coo_matrix((idx.size, idx.size))
            _, comp = connected_components(adj, directed=False)
            sizes = np.bincount(comp[t], minlength=comp.max() + 1)
            t = t & (sizes[comp] >= min_spots)
            tumour[idx] = t
        if pairs.size:
            mixed = t[pairs[:, 0]] != t[pairs[:, 1]]
            b = np.zeros(idx.size, dtype=bool)
            b[pairs[mixed, 0]] = True
            b[pairs[mixed, 1]] = True
            boundary[idx] = b
    labels = np.where(boundary, "boundary", np.where(tumour, "tumor", "non-tumor"))
    return pd.Categorical(labels, categories=list(REGION_CATEGORIES))


def _tumour_shapes(table: AnnData, tumour: np.ndarray, coords: np.ndarray, pitch: float) -> Any:
    """Union of disks of radius 0.55 × pitch around tumour spots (so that adjacent spots merge), as polygons."""
    import geopandas as gpd
    import shapely

    pts = shapely.points(coords[tumour])
    if len(pts) == 0:
        return gpd.GeoDataFrame({"geometry": []}, geometry="geometry")
    merged = shapely.union_all(shapely.buffer(pts, 0.55 * pitch, quad_segs=8))
    polys = list(merged.geoms) if hasattr(merged, "geoms") else [merged]
    return gpd.GeoDataFrame({"n_spots": [int(shapely.contains(p, pts).sum()) for p in polys]}, geometry=polys,
                            index=pd.Index([f"tumor_{i}" for i in range(len(polys))]))  # fmt: skip


def detect_cancer_regions(
    data: AnnData | SpatialData,
    model: str | os.PathLike[str] | CancerClassifier | None = None,
    *,
    method: Literal["classifier", "signature"] = "classifier",
    use_rep: str | None = None,
    expr_rep: str | None = None,
    layer: str | None = None,
    gene_list: Sequence[str] | None = None,
    table_key: str | None = None,
    threshold: float | None = None,
    smooth: bool = False,
    connectivity_key: str = "spatial_connectivities",
    boundary_distance: float = 1.2,
    min_spots: int = 1,
    label_key: str | None = None,
    positive: Sequence[str] = _DEFAULT_POSITIVE,
    ignore: Sequence[str] = _DEFAULT_IGNORE,
    section_key: str = "section",
    spatial_key: str = "spatial",
    shapes_added: str | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    key_added: str = "cancer_region",
    inplace: bool = True,
    copy: bool = False,
) -> AnnData | SpatialData | pd.DataFrame | None:
    """Score each spot/tile for tumour and call tumour, boundary and non-tumour regions.

    Parameters
    ----------
    data
        Query spots (AnnData, or SpatialData with ``table_key``).
    model
        A trained :class:`~stfm.model.CancerClassifier` or the directory it was saved to (``method='classifier'``).
    method
        ``'classifier'``: the model's calibrated probability; ``'signature'``: a marker-gene score needing no
        annotated reference (:data:`CANCER_MARKERS`, scored like :func:`scanpy.tl.score_genes` on log-normalised
        expression against expression-matched control genes, then mapped to [0, 1] by a logistic centred on the
        section's Otsu threshold, so 0.5 is a label-free cut).
    use_rep, expr_rep
        ``obsm`` keys of the image / expression embeddings; default: those the model was trained with. A query may
        have only one of them.
    layer
        Expression layer for ``'signature'`` (``None`` = counts in ``X``; ``'predicted'`` for H&E-only sections).
    gene_list
        Signature genes (default :data:`CANCER_MARKERS`).
    table_key
        Table of a SpatialData input.
    threshold
        Tumour call threshold on the score; default: the model's stored threshold (``'classifier'``) or 0.5.
    smooth
        Average scores over ``obsp[connectivity_key]`` (spot and its neighbours) before thresholding. Off by
        default: the classifier already pools spatial context, and the stored threshold was chosen on unsmoothed
        validation scores.
    connectivity_key
        ``obsp`` key of the spatial graph (``squidpy.gr.spatial_neighbors``) used when ``smooth=True``.
    boundary_distance
        Adjacency distance in spot pitches for boundary calls and components (see :func:`call_regions`).
    min_spots
        Tumour components smaller than this become non-tumour.
    label_key
        Annotation column; when given, ``obs['cancer_high_risk']`` lists spots annotated non-cancer (not in
        ``positive`` nor ``ignore``) whose score is at or above the threshold.
    positive, ignore
        Label names used for ``cancer_high_risk``.
    section_key
        ``obs`` column of sections (boundaries and smoothing stay within a section).
    spatial_key
        ``obsm`` key of spot centres.
    shapes_added
        SpatialData only: name of a new shapes element holding the tumour polygons (union of disks of radius
        0.55 pitch around tumour and boundary-tumour spots), in the table's coordinate system.
    batch_size
        Inference batch size.
    seed
        Seed of the signature's control-gene draw.
    key_added
        Name of the calls column; the score goes to ``f'{key_added}_score'``.
    inplace
        Write into ``data``; ``False`` returns a DataFrame and leaves ``data`` untouched.
    copy
        Return a modified copy.

    Returns
    -------
    `None` / the updated copy / a :class:`~pandas.DataFrame` with columns ``[f'{key_added}_score', key_added]``
    (plus ``'cancer_high_risk'`` when ``label_key`` is given) indexed by ``obs_names`` (``inplace=False``).
    Sets the following fields:

    `.obs['cancer_region' | key_added]` : categorical ``['tumor', 'boundary', 'non-tumor']``
    `.obs['cancer_region_score' | f'{key_added}_score']` : float32 in ``[0, 1]``
    `.obs['cancer_high_risk']` : bool (only when ``label_key`` is given)
    `.uns['cancer_region_colors' | f'{key_added}_colors']` : list of colours (tumour red, boundary orange, non-tumour blue)
    `.uns['stfm']['cancer_region' | key_added]` : method, threshold, calibration, model settings, counts
    `sdata.shapes[shapes_added]` : tumour polygons (SpatialData and ``shapes_added`` only)
    """
    check_copy_inplace(copy=copy, inplace=inplace)
    check_valid_key(key_added)
    score_key = check_valid_key(f"{key_added}_score")
    if shapes_added is not None:
        check_valid_key(shapes_added, what="shapes_added")
        if not is_spatialdata(data):
            msg = "`shapes_added` needs a SpatialData input (polygons are stored as a shapes element); convert with `stfm.io.to_spatialdata(adata)` or drop `shapes_added`."
            raise ValueError(msg)
    check_positive(boundary_distance, name="boundary_distance")
    table = get_table(data, table_key)
    if spatial_key not in table.obsm:
        msg = (
            f"`obsm[{spatial_key!r}]` not found: spot coordinates are needed for context and boundaries. Available "
            f"obsm keys: {sorted(table.obsm)}. Read the section with `stfm.datasets.her2st` / `squidpy.read.visium`, "
            "or set `obsm['spatial']`."
        )
        raise KeyError(msg)
    if smooth and connectivity_key not in table.obsp:
        msg = f"`obsp[{connectivity_key!r}]` not found. Run `squidpy.gr.spatial_neighbors(adata)` first or pass `smooth=False`."
        raise KeyError(msg)
    if label_key is not None:
        _check_labels(table, label_key, positive, ignore, where="the query")

    params: dict[str, Any] = {"method": method}
    if method == "classifier":
        from ..model._cancer import CancerClassifier

        if model is None:
            msg = "`method='classifier'` needs a trained model: `model = stfm.tl.fit_cancer_model(reference, ...)`, or use `method='signature'`."
            raise ValueError(msg)
        if not isinstance(model, CancerClassifier):
            model = CancerClassifier.load(model)
        cfg = model.token_config_
        img_key = use_rep if use_rep is not None else cfg.get("image_key")
        exp_key = expr_rep if expr_rep is not None else cfg.get("expression_key")
        have = [k for k in (img_key, exp_key) if k is not None and k in table.obsm]
        if not have:
            wanted = [k for k in (img_key, exp_key) if k is not None]
            msg = (
                f"The query has neither embedding the model uses: {['obsm[' + repr(k) + ']' for k in wanted]} not found. "
                f"Available obsm keys: {sorted(table.obsm)}. Run `stfm.pp.extract_features` (image) and/or "
                "`stfm.tl.expression_embedding` (expression) on the query first."
            )
            raise KeyError(msg)
        q = AnnData(obs=pd.DataFrame(index=table.obs_names.astype(str)))
        if section_key in table.obs:
            q.obs[cfg.get("section_key") or section_key] = table.obs[section_key].astype(str).to_numpy()
        q.obsm[cfg.get("spatial_key") or "spatial"] = np.asarray(table.obsm[spatial_key])
        for mine, theirs in ((img_key, cfg.get("image_key")), (exp_key, cfg.get("expression_key"))):
            if mine is not None and theirs is not None and mine in table.obsm:
                q.obsm[theirs] = np.asarray(table.obsm[mine])
        score = model.predict(q, batch_size=batch_size)
        thr = float(model.threshold_ if threshold is None else threshold)
        params.update({"image_key": img_key if img_key in table.obsm else "None",
                       "expression_key": exp_key if exp_key in table.obsm else "None",
                       "calibration": dict(model.calibration_), "model_threshold": float(model.threshold_),
                       "model": dict(model.fit_params_) if hasattr(model, "fit_params_") else "None",
                       "scales": list(cfg["scales"]), "n_sectors": int(cfg["n_sectors"])})  # fmt: skip
    elif method == "signature":
        genes = list(gene_list) if gene_list is not None else list(CANCER_MARKERS)
        if layer is not None and layer not in table.layers:
            msg = f"`layers[{layer!r}]` not found. Available layers: {sorted(table.layers)}. Run `stfm.tl.predict_expression` first or pass `layer=None`."
            raise KeyError(msg)
        score = np.zeros(table.n_obs)
        for _, idx in _split_sections(table, section_key):
            score[idx] = _signature_scores(table[idx], genes, layer, seed)
        thr = 0.5 if threshold is None else float(threshold)
        params.update({"genes": [g for g in genes if g in table.var_names], "layer": layer, "cut": "Otsu per section"})
    else:
        msg = f"Expected `method` to be 'classifier' or 'signature', found {method!r}."
        raise ValueError(msg)

    score = np.clip(np.asarray(score, dtype=np.float64), 0.0, 1.0)
    if smooth:
        g = sparse.csr_matrix(table.obsp[connectivity_key])
        g = g + sparse.identity(g.shape[0], format="csr")
        deg = np.asarray(g.sum(1)).ravel()
        score = np.asarray(g @ score).ravel() / np.maximum(deg, 1e-12)
    score = score.astype(np.float32)
    coords = np.asarray(table.obsm[spatial_key], dtype=np.float64)[:, :2]
    groups = table.obs[section_key].astype(str).to_numpy() if section_key in table.obs else None
    tumour = score >= thr
    calls = call_regions(coords, tumour, boundary_distance=boundary_distance, min_spots=min_spots, groups=groups)
    high_risk = None
    if label_key is not None:
        lab = table.obs[label_key].astype("object")
        annotated_non = (~lab.isin(list(positive)) & ~lab.isin(list(ignore)) & lab.notna()).to_numpy()
        high_risk = annotated_non & (score >= thr)

    result = pd.DataFrame({score_key: score, key_added: calls}, index=table.obs_names)
    if high_risk is not None:
        result["cancer_high_risk"] = high_risk
    if not inplace:
        return result

    out = prepare_output(data, copy=copy)
    t = get_table(out, table_key)
    shapes = None
    if shapes_added is not None:
        pitch = spot_pitch(coords)
        final_tumour = np.asarray(calls) != "non-tumor"
        final_tumour &= tumour
        shapes = _tumour_shapes(t, final_tumour, coords, pitch)
    t.obs[score_key] = score
    t.obs[key_added] = calls
    t.uns[f"{key_added}_colors"] = list(REGION_COLORS)
    if high_risk is not None:
        t.obs["cancer_high_risk"] = high_risk
    counts = {c: int((calls == c).sum()) for c in REGION_CATEGORIES}
    record(t, key_added, "detect_cancer_regions", threshold=thr, smooth=smooth, boundary_distance=boundary_distance,
           min_spots=min_spots, counts=counts, n_high_risk=int(high_risk.sum()) if high_risk is not None else "None",
           shapes_added=shapes_added, **params)  # fmt: skip
    if shapes is not None:
        from spatialdata.models import ShapesModel, get_table_keys
        from spatialdata.transformations import Identity, get_transformation

        try:
            region = get_table_keys(t)[0]
            region = region if isinstance(region, str) else region[0]
            transformations = get_transformation(out.shapes[region], get_all=True) if region in out.shapes else {"global": Identity()}
        except (KeyError, ValueError, TypeError):
            transformations = {"global": Identity()}
        out.shapes[shapes_added] = ShapesModel.parse(shapes, transformations=transformations)
        added(f"shapes[{shapes_added!r}]", (len(shapes),))
    added(f"obs[{key_added!r}], obs[{score_key!r}]", (t.n_obs,))
    return out if copy else None


# ---------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------
def evaluate_cancer_regions(
    adata: AnnData | SpatialData | Sequence[AnnData],
    *,
    label_key: str = "pathologist_label",
    score_key: str = "cancer_region_score",
    positive: Sequence[str] = _DEFAULT_POSITIVE,
    ignore: Sequence[str] = _DEFAULT_IGNORE,
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
        if score_key not in t.obs:
            msg = f"`obs[{score_key!r}]` not found. Available obs columns: {sorted(map(str, t.obs))}. Run `stfm.tl.detect_cancer_regions` first."
            raise KeyError(msg)
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
