"""``detect_cancer_regions``: score spots for tumour (classifier or marker signature) and call regions."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._containers import get_table, is_spatialdata, prepare_output
from .._logging import added
from .._provenance import record
from .._rows import log_normalise
from .._validation import assert_key_in, check_copy_inplace, check_positive, check_spatial, check_valid_key
from ..graph._geometry import spot_pitch
from ..graph._regions import call_regions, tumour_shapes
from ._cancer_common import (
    CANCER_MARKERS,
    DEFAULT_IGNORE,
    DEFAULT_POSITIVE,
    REGION_CATEGORIES,
    REGION_COLORS,
    _check_labels,
    _provenance_kind,
    _split_sections,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..model._cancer import CancerClassifier

__all__ = ["detect_cancer_regions"]


def _signature_scores(adata: AnnData, genes: Sequence[str], layer: str | None, seed: int) -> np.ndarray:
    import scanpy as sc

    present = [g for g in genes if g in adata.var_names]
    if len(present) < 2:
        msg = f"Only {len(present)} of the signature genes {list(genes)} are in `var_names`; pass `gene_list=` with genes the data has."
        raise ValueError(msg)
    logged = log_normalise(adata.layers[layer] if layer is not None else adata.X, dtype=np.float32)
    tmp = AnnData(sparse.csr_matrix(logged), obs=pd.DataFrame(index=adata.obs_names.astype(str)))
    tmp.var_names = adata.var_names.astype(str)
    tmp = tmp[:, ~tmp.var_names.duplicated()].copy()
    n_other = tmp.n_vars - len(set(present))
    if n_other < 2 * len(set(present)):
        msg = (
            f"The signature score compares {len(set(present))} signature genes with expression-matched control genes "
            f"(as scanpy.tl.score_genes), but the panel has only {n_other} other genes. Use a panel with at least "
            f"{2 * len(set(present))} genes besides the signature (the full measured or predicted transcriptome is "
            "best), or a shorter `gene_list`."
        )
        raise ValueError(msg)
    try:
        sc.tl.score_genes(tmp, present, score_name="_sig", random_state=seed, use_raw=False)
    except RuntimeError as err:  # scanpy: "No control genes found in any cut"
        msg = (
            f"The signature score found no expression-matched control genes among the panel's {n_other} other genes "
            f"({err}). Use a larger panel (the full transcriptome is best) or a shorter `gene_list`."
        )
        raise ValueError(msg) from err
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


def _check_shapes_name(sdata: Any, table: AnnData, name: str, key_added: str) -> None:
    """Refuse a ``shapes_added`` that would replace another element or clash with one by case (SpatialData rule).

    Only tumour polygons this function wrote before (recorded in the table's provenance) may be replaced.
    """
    from spatialdata.models import get_table_keys

    elements = {**{k: "images" for k in sdata.images}, **{k: "labels" for k in sdata.labels},
                **{k: "points" for k in sdata.points}, **{k: "shapes" for k in sdata.shapes},
                **{k: "tables" for k in sdata.tables}}  # fmt: skip
    case = [k for k in elements if k.lower() == name.lower() and k != name]
    if case:
        msg = (
            f"`shapes_added`={name!r} differs only in case from the existing {elements[case[0]]} element {case[0]!r}; "
            "SpatialData element names must be unique regardless of case. Pick another name (e.g. "
            f"'{name}_tumor')."
        )
        raise ValueError(msg)
    if name not in elements:
        return
    try:
        region = get_table_keys(table)[0]
    except (KeyError, ValueError, TypeError):
        region = None
    annotated = [region] if isinstance(region, str) else list(region or [])
    ours = str(table.uns.get("stfm", {}).get(key_added, {}).get("shapes_added", "")) == name
    if name in annotated or elements[name] != "shapes" or not ours:
        what = "the spots the table annotates" if name in annotated else f"an existing {elements[name]} element"
        msg = (
            f"`shapes_added`={name!r} would replace {what} ({elements[name]}[{name!r}]). Pick a new name for the tumour "
            f"polygons, e.g. '{name}_tumor'."
        )
        raise ValueError(msg)


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
    positive: Sequence[str] = DEFAULT_POSITIVE,
    ignore: Sequence[str] = DEFAULT_IGNORE,
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
        have only one of them. A model fitted with its own expression embedding (``fit_cancer_model``'s default)
        embeds the query's counts (or ``layer``) itself and refuses ``expr_rep``.
    layer
        Expression the stored embedding (``'classifier'``) or the signature reads: ``None`` = counts in ``X``;
        ``'predicted'`` for H&E-only sections (after :func:`stfm.tl.predict_expression`).
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
    if shapes_added is not None:
        _check_shapes_name(data, table, shapes_added, key_added)
    check_spatial(table, spatial_key, purpose="context and boundaries", where="query")
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
        if getattr(model, "embedder_", None) and expr_rep is not None:
            msg = (
                f"The model embeds expression itself (its stored PCA embedding of counts); it was not fitted on "
                f"`obsm[{expr_rep!r}]`, so that embedding cannot stand in for it. Drop `expr_rep` (the model embeds the "
                "query's `X`, or `layer=`), or refit with `fit_cancer_model(reference, expr_rep=...)`."
            )
            raise ValueError(msg)
        stored = bool(getattr(model, "embedder_", None))
        img_key = use_rep if use_rep is not None else cfg.get("image_key")
        exp_key = expr_rep if expr_rep is not None else (None if stored else cfg.get("expression_key"))
        kinds = dict(getattr(model, "embedding_kinds_", None) or {})
        for mine, theirs in ((img_key, cfg.get("image_key")), (exp_key, cfg.get("expression_key"))):
            if mine is None or theirs is None or mine not in table.obsm or theirs not in kinds:
                continue
            found = _provenance_kind(table, mine)
            if found is not None and found != kinds[theirs]:
                msg = (
                    f"The model was fitted on `obsm[{theirs!r}]` made by {kinds[theirs]!r}, but the query's "
                    f"`obsm[{mine!r}]` was made by {found!r}. Embed the query the same way as the reference (same "
                    "encoder, same expression embedding method)" + (", or let the model embed the query's counts (no `expr_rep`)." if model.embedder_ else ".")
                )
                raise ValueError(msg)
        expression = None
        if stored:
            has_counts = layer is not None or (table.X is not None and table.n_vars > 0)
            if has_counts:
                expression = model.embed(table, layer=layer, section_key=section_key if section_key in table.obs else None)
            elif img_key is None or img_key not in table.obsm:
                msg = (
                    "The query has no counts in `X` and no `layer` was given, and the model's expression embedding needs "
                    "one of them. For an H&E-only section: `stfm.tl.predict_expression(query, expr_model)` and then "
                    "`detect_cancer_regions(query, model, layer='predicted')`"
                    + (f", or give the image embedding `obsm[{img_key!r}]`." if img_key else ".")
                )
                raise ValueError(msg)
        have = [k for k in (img_key, exp_key) if k is not None and k in table.obsm] + (["stored"] if expression is not None else [])
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
        if expression is not None:
            q.obsm[cfg["expression_key"]] = expression
        score = model.predict(q, batch_size=batch_size)
        thr = float(model.threshold_ if threshold is None else threshold)
        params.update({"image_key": img_key if img_key in table.obsm else "None",
                       "expression_key": ("stored embedding of " + (f"layers[{layer!r}]" if layer else "X")) if expression is not None
                       else (exp_key if exp_key in table.obsm else "None"),
                       "calibration": dict(model.calibration_), "model_threshold": float(model.threshold_),
                       "model": dict(model.fit_params_) if hasattr(model, "fit_params_") else "None",
                       "scales": list(cfg["scales"]), "n_sectors": int(cfg["n_sectors"])})  # fmt: skip
    elif method == "signature":
        genes = list(gene_list) if gene_list is not None else list(CANCER_MARKERS)
        if layer is not None:
            assert_key_in(layer, table.layers, where="layers", hint="Run `stfm.tl.predict_expression` first or pass `layer=None`.")
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
        shapes = tumour_shapes(final_tumour, coords, pitch)
        if len(shapes) == 0:
            # SpatialData cannot hold an empty shapes element: write none, and drop polygons of an earlier call
            warnings.warn(
                f"No spot was called tumour, so no tumour polygons were written (`shapes_added={shapes_added!r}`)"
                + (" and the earlier polygons of that name were removed." if shapes_added in out.shapes else "."),
                UserWarning, stacklevel=2,
            )  # fmt: skip
            if shapes_added in out.shapes:
                del out.shapes[shapes_added]
            shapes, shapes_added = None, f"None (no tumour spots; {shapes_added!r} not written)"
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
