"""Expression from H&E: ``fit_expression`` (any registered method) and ``predict_expression`` (``layers['predicted']``)."""

from __future__ import annotations

import inspect
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import Key
from .._containers import get_table, is_spatialdata, prepare_output
from .._logging import logger
from .._provenance import record
from .._validation import check_copy_inplace, check_valid_key

__all__ = ["concat_sections", "fit_expression", "predict_expression", "select_genes"]


# --------------------------------------------------------------------------------------------------
# reference handling and gene panels
# --------------------------------------------------------------------------------------------------
def check_sections(
    reference: AnnData | Sequence[AnnData], *, section_key: str | None, purpose: str
) -> list[AnnData]:
    """Validate one AnnData or a non-empty list of them: no empty section, a section column when asked for.

    ``purpose`` completes the messages ("… remove it before {purpose}").
    """
    if isinstance(reference, AnnData):
        parts = [reference]
    elif isinstance(reference, Sequence) and not isinstance(reference, str) and len(reference) > 0:
        parts = list(reference)
    else:
        msg = f"Expected an AnnData or a non-empty list of AnnData, found {type(reference).__name__}."
        raise TypeError(msg)
    for i, a in enumerate(parts):
        if not isinstance(a, AnnData):
            msg = f"Expected AnnData objects, found {type(a).__name__} at position {i}."
            raise TypeError(msg)
        if a.n_obs == 0:
            msg = f"AnnData #{i} is an empty section (0 spots); remove it before {purpose}."
            raise ValueError(msg)
        if section_key is not None and section_key not in a.obs:
            msg = (
                f"`obs[{section_key!r}]` not found in AnnData #{i} (columns: {sorted(a.obs.columns)}). Pass "
                "`section_key=` naming the section column, or add one (e.g. `adata.obs['section'] = 'S1'`)."
            )
            raise KeyError(msg)
    return parts


def concat_sections(
    reference: AnnData | Sequence[AnnData],
    *,
    section_key: str | None = "section",
) -> AnnData:
    """One AnnData from one or several sections (genes shared by all, obsm kept, obs names made unique)."""
    import anndata as ad

    parts = check_sections(reference, section_key=section_key, purpose="training")
    if len(parts) == 1:
        return parts[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return ad.concat(parts, join="inner", index_unique="-", merge="same")


def _log1p_stats(adata: AnnData, layer: str | None = None, *, normalize: bool = False) -> tuple[np.ndarray, ...]:
    """Per gene: fraction of spots detected, mean and variance of ``log1p`` counts (per 10k with ``normalize``).

    Sparse counts stay sparse (``log1p`` keeps zeros at zero), so ranking every gene of a table never densifies it.
    """
    from scipy import sparse

    x = adata.X if layer is None else adata.layers[layer]
    x = sparse.csr_matrix(x, dtype=np.float64) if sparse.issparse(x) else sparse.csr_matrix(np.asarray(x, dtype=np.float64))
    if normalize:
        lib = np.asarray(x.sum(1)).ravel()
        x = sparse.diags(np.divide(1e4, lib, out=np.zeros_like(lib), where=lib > 0)) @ x
    x = x.tocsr()
    # read-only from here: x may share its arrays with the caller's matrix (no in-place eliminate_zeros / log1p)
    data = np.log1p(x.data)
    stored = data != 0
    cols, data = x.indices[stored], data[stored]
    n, g = max(1, x.shape[0]), x.shape[1]
    nnz = np.bincount(cols, minlength=g)
    mean = np.bincount(cols, weights=data, minlength=g) / n
    dev = data - mean[cols]  # two-pass variance over the stored values, the zeros added in closed form
    var = (np.bincount(cols, weights=dev * dev, minlength=g) + (n - nnz) * mean**2) / n
    return nnz / n, mean, var


def select_genes(
    adata: AnnData,
    n_top_genes: int = 50,
    *,
    flavor: Literal["variable", "expressed"] = "variable",
    layer: str | None = None,
    min_spot_fraction: float = 0.1,
    genes: Sequence[str] | None = None,
    normalize: bool = False,
) -> list[str]:
    """The ``n_top_genes`` most variable or most expressed genes of (training) spots.

    Both rank ``log1p`` counts, the scale the HEST probe predicts and every metric is computed on:
    ``'variable'`` by variance across spots, ``'expressed'`` by mean. ``normalize=True`` ranks ``log1p`` counts
    per 10k instead. Genes detected in fewer than ``min_spot_fraction`` of the spots are skipped; ``genes``
    restricts the candidates. Call it on training sections only.
    """
    cand = adata if genes is None else adata[:, [g for g in adata.var_names if g in set(genes)]]
    if cand.n_vars == 0:
        msg = "None of the candidate genes are in `adata.var_names`."
        raise ValueError(msg)
    frac, mean, var = _log1p_stats(cand, layer, normalize=normalize)
    detected = frac >= min_spot_fraction
    score = var if flavor == "variable" else mean
    score = np.where(detected, score, -np.inf)
    order = np.argsort(-score, kind="stable")[: min(n_top_genes, int(detected.sum()) or n_top_genes)]
    return [str(cand.var_names[i]) for i in order]


# --------------------------------------------------------------------------------------------------
# fitting
# --------------------------------------------------------------------------------------------------
def _accepted(cls: type, name: str) -> set[str]:
    """Keyword parameters of ``cls.<name>``, following ``**kwargs`` up the MRO (an override passing them on)."""
    out: set[str] = set()
    for klass in cls.__mro__:
        if name not in vars(klass):
            continue
        func = vars(klass)[name]
        params = inspect.signature(getattr(func, "__func__", func)).parameters
        out |= {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()) or klass.__module__.startswith("scvi"):
            break
    return out - {"self", "cls", "adata", "registry"}


def _dispatch(cls: type, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Route method-specific keyword arguments to ``setup_anndata``, the constructor or ``train`` by signature."""
    targets = {"setup": _accepted(cls, "setup_anndata"), "model": _accepted(cls, "__init__"), "train": _accepted(cls, "train")}
    out: dict[str, dict[str, Any]] = {"setup": {}, "model": {}, "train": {}}
    unknown = []
    for name, value in kwargs.items():
        where = next((t for t in ("setup", "model", "train") if name in targets[t]), None)
        if where is None:
            unknown.append(name)
        else:
            out[where][name] = value
    if unknown:
        accepted = sorted((targets["setup"] | targets["model"] | targets["train"]) - {"embedding_key", "layer", "section_key", "patient_key", "spatial_key"})
        msg = (
            f"Method {cls.method_key!r} ({cls.__name__}) does not take {sorted(unknown)}. Its settings: {accepted} "
            "(see `stfm.model.list_methods()` and the class docstring)."
        )
        raise TypeError(msg)
    return out["setup"], out["model"], out["train"]


def fit_expression(
    reference: AnnData | Sequence[AnnData],
    *,
    method: str = "zinb",
    embedding_key: str,
    genes: Sequence[str] | None = None,
    n_top_genes: int = 50,
    layer: str | None = None,
    section_key: str | None = "section",
    patient_key: str | None = "patient",
    spatial_key: str = "spatial",
    validation_sections: Sequence[str] | None = None,
    n_models: int = 1,
    seed: int = 0,
    setup_kwargs: Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Train an expression model on sections that have both H&E embeddings and spatial transcriptomics.

    Parameters
    ----------
    reference
        One AnnData holding one or more sections (``obs[section_key]``) or a list of per-section AnnData
        (concatenated on shared genes, ``obsm`` kept). Raw counts in ``X`` (or ``layer``).
    method
        A registered method key (:func:`stfm.model.list_methods`): ``'zinb'``, ``'ridge'``, ``'retrieval'``, …
    embedding_key
        obsm key of the embedding (e.g. ``'X_efficientnet_lite0'``).
    genes
        Gene panel; ``None`` takes the ``n_top_genes`` most variable genes of the reference (see
        :func:`select_genes`).
    n_top_genes
        Panel size when ``genes`` is ``None``.
    layer
        Layer with raw counts (``None``: ``X``).
    section_key, patient_key
        obs columns with section and patient labels.
    spatial_key
        obsm key of the spot centres (smoothing, neighbour pooling, positions).
    validation_sections
        Whole sections held out to choose epochs and settings (gradient-trained methods); ``None`` picks one
        (see :meth:`stfm.model.ExpressionModelBase.train`).
    n_models
        Train this many models and average their predictions (:class:`~stfm.model.ExpressionEnsemble`). Member
        ``i`` is trained with seed ``seed * n_models + i``, so ensembles fitted with different ``seed`` share no
        member (``n_models=1`` trains with ``seed`` itself).
    seed
        Random seed (scvi-tools ``settings.seed``), so a fit is reproducible.
    setup_kwargs, model_kwargs, train_kwargs
        Extra arguments for the method's ``setup_anndata``, constructor and ``train``.
    **kwargs
        Method settings, routed by name to ``setup_anndata`` (e.g. ``neighbor_pooling``), the constructor (e.g.
        ``n_hidden``, ``alpha``, ``k``) or ``train`` (e.g. ``max_epochs``, ``smoothing``, ``selection_metric``); a
        name the method does not take raises a :class:`TypeError` listing the ones it does.

    Returns
    -------
    The fitted model. ``model.gene_sets_`` holds ``'top_variable'`` and ``'top_expressed'`` (50 genes each, or
    fewer, chosen among the panel on the reference) for :func:`evaluate_expression`; ``model.training_sections_``
    lists the sections used; ``model.fit_time_s_`` the training wall time.
    """
    from ..model._checks import check_counts, check_embedding, recorded_encoder
    from ..model._registry import get_method

    spec = get_method(method)
    cls = spec.cls
    setup_kw, model_kw, train_kw = _dispatch(cls, kwargs)
    setup_kw.update(setup_kwargs or {})
    model_kw.update(model_kwargs or {})
    train_kw.update(train_kwargs or {})
    if validation_sections is not None:
        train_kw["validation_sections"] = validation_sections
    if int(n_models) < 1:
        msg = f"Expected `n_models` >= 1, found {n_models!r}."
        raise ValueError(msg)
    parts = [reference] if isinstance(reference, AnnData) else list(reference) if isinstance(reference, Sequence) else [reference]
    encoders = {recorded_encoder(a, embedding_key) for a in parts if isinstance(a, AnnData)} - {None}
    if len(encoders) > 1:
        msg = (
            f"The reference sections' `obsm[{embedding_key!r}]` were made with different encoders {sorted(encoders)}; "
            "extract every section's features with the same `stfm.pp.extract_features` model."
        )
        raise ValueError(msg)
    ref = concat_sections(reference, section_key=section_key)
    check_embedding(ref, embedding_key)
    if "counts" in spec.needs:
        check_counts(ref, layer)
    if genes is None:
        panel = select_genes(ref, n_top_genes, layer=layer)
    else:
        genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        missing = [g for g in genes if g not in ref.var_names]
        if missing:
            msg = f"{len(missing)} of the requested genes are not in the reference (e.g. {missing[:5]})."
            raise KeyError(msg)
        panel = list(dict.fromkeys(genes))
    train = ref[:, panel].copy()
    sections = sorted(train.obs[section_key].astype(str).unique()) if section_key and section_key in train.obs else []
    gene_sets = {
        "top_variable": select_genes(train, 50, flavor="variable", layer=layer, min_spot_fraction=0.0),
        "top_expressed": select_genes(train, 50, flavor="expressed", layer=layer, min_spot_fraction=0.0),
    }
    import scvi

    t0 = time.perf_counter()
    cls.setup_anndata(train, embedding_key=embedding_key, layer=layer, section_key=section_key,
                      patient_key=patient_key, spatial_key=spatial_key, **setup_kw)  # fmt: skip
    members = []
    for i in range(int(n_models)):
        scvi.settings.seed = seed * int(n_models) + i  # ensembles fitted with different seeds share no member
        m = cls(train, **model_kw)
        m.train(**train_kw)
        members.append(m)
    fit_time = time.perf_counter() - t0
    for m in members:
        m.gene_sets_ = gene_sets
        m.training_sections_ = sections
        m.fit_time_s_ = fit_time
        if encoders:
            m.encoder_ = next(iter(encoders))
    if len(members) == 1:
        model: Any = members[0]
    else:
        from ..model._ensemble import ExpressionEnsemble

        model = ExpressionEnsemble(members)
    logger.info("fit_expression(%s): %d genes, sections %s, %.1f s", method, len(panel), sections, fit_time)
    return model


# --------------------------------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------------------------------
def _model_name(model: Any) -> str:
    return type(model).__name__


def resolve_model(model: Any) -> tuple[Any, str | None]:
    """A fitted expression model from a model or a folder path, and the path (or ``None``)."""
    from ..model._ensemble import load_model

    if isinstance(model, str | os.PathLike):
        return load_model(model), os.fspath(model)
    if not hasattr(model, "predict") or not hasattr(model, "genes") or not hasattr(model, "method"):
        msg = (
            f"Expected a fitted stfm expression model (from `stfm.tl.fit_expression`) or a folder written by its "
            f"`save`, found {type(model).__name__}."
        )
        raise TypeError(msg)
    return model, None


def predict_expression(
    data: Any,
    model: Any,
    *,
    use_rep: str | None = None,
    table_key: str | None = None,
    genes: Sequence[str] | None = None,
    library_size: float | Literal["observed", "predicted"] = 1e4,
    smooth: int | None = None,
    return_std: bool = False,
    return_dist_params: bool = False,
    batch_size: int | None = None,
    device: Any = None,
    key_added: str = Key.PREDICTED,
    inplace: bool = True,
    copy: bool = False,
) -> Any:
    """Predict spatial gene expression from tile/spot embeddings with any registered method.

    Parameters
    ----------
    data
        AnnData, or SpatialData whose table ``table_key`` holds the embedding. The table may have counts for
        the model's genes, any subset of them, or no genes at all (an H&E-only tile table).
    model
        A model from :func:`fit_expression` (any method in :func:`stfm.model.list_methods`, or an ensemble), or a
        folder written by its ``save``.
    use_rep
        obsm key of the embedding (``None``: the key the model was trained on).
    table_key
        Table of a SpatialData object (``None``: its only table).
    genes
        Predict only these genes (all must be in :func:`stfm.get.model_genes`); ``None``: the model's panel.
    library_size
        A number (counts per ``library_size`` for every spot), ``'observed'`` (each spot's counts over the panel;
        needs counts in ``X``) or ``'predicted'`` (the library size each method predicts from the image).
    smooth
        Spatial neighbours each prediction is averaged with; ``None``: the number the model chose on its
        validation sections (``model.smoothing_``); ``0``: off.
    return_std
        Also write the predictive standard deviation (methods whose ``supports`` lists ``'std'``).
    return_dist_params
        Also write the zero-inflation probability and gene-wise ``theta`` (methods listing ``'dist_params'``).
    batch_size
        Inference batch size (default :attr:`stfm.settings.batch_size`).
    device
        Torch device (default :attr:`stfm.settings.device`).
    key_added
        Layer name (replaces ``'predicted'`` in every slot below).
    inplace
        Write into ``data``; ``False`` returns a new AnnData of predictions and leaves ``data`` untouched.
    copy
        Return a modified copy of ``data``.

    Returns
    -------
    `None` if `copy=False` and `inplace=True`; the updated copy if `copy=True`; a new
    :class:`~anndata.AnnData` if `inplace=False` (X = predictions, float32; `var_names` = predicted genes;
    `obs`, `obsm['spatial']` and `uns['spatial']` carried over so it plots with `squidpy.pl.spatial_scatter`).
    Sets the following fields (on `adata`, or on `sdata.tables[table_key]`):

    `.layers['predicted' | key_added]` : :class:`numpy.ndarray` (float32, `(n_obs, n_vars)`)
        Composition × `library_size` (for ZINB, the negative binomial mean `l · scale`; the zero-inflated
        mean is `(1 - zi_prob) · l · scale`). For a table without genes, the table is rebuilt with
        `var_names` = the panel and `X` = this layer, keeping obs, obsm, obsp, uns and `spatialdata_attrs`.
    `.layers[f'{key_added}_std']` : :class:`numpy.ndarray` (float32)
        Predictive standard deviation; only if `return_std=True`.
    `.layers[f'{key_added}_zi_prob']`, `.var[f'{key_added}_theta']`
        Zero-inflation probability and inverse dispersion; only if `return_dist_params=True`.
    `.uns['stfm']['predicted' | key_added]` : :class:`dict`
        Method, model class, embedding key, encoder, library size, smoothing, n_genes, likelihood, training
        sections.
    """
    from ..model._registry import get_method

    check_copy_inplace(copy=copy, inplace=inplace)
    check_valid_key(key_added)
    model, model_path = resolve_model(model)
    spec = get_method(model.method)
    if return_std and not getattr(model.module, "has_std", False):
        msg = (
            f"`return_std=True` needs a method with a predictive distribution; {model.method!r} has none. Methods "
            "supporting it are listed with 'std' in `stfm.model.list_methods()['supports']`."
        )
        raise ValueError(msg)
    if return_dist_params and "dist_params" not in spec.supports:
        msg = f"`return_dist_params=True` needs a ZINB method (e.g. method='zinb'); {model.method!r} has no zero-inflation."
        raise ValueError(msg)
    if device is not None:
        from .._settings import settings

        for m in getattr(model, "members", [model]):
            m.to_device(settings.resolve_device(device))
    adata = get_table(data, table_key)
    panel = list(model.genes)
    if genes is not None:
        genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        bad = [g for g in genes if g not in set(panel)]
        if bad:
            msg = (
                f"{len(bad)} requested genes are not predicted by {_model_name(model)} (e.g. {bad[:5]}). "
                f"It predicts {len(panel)} genes: see `stfm.get.model_genes(model)`."
            )
            raise ValueError(msg)
        out_genes = genes
    else:
        out_genes = panel
    has_genes = adata.n_vars > 0
    if inplace and has_genes:
        extra = [g for g in adata.var_names if g not in set(panel)]
        if extra:
            msg = (
                f"{len(extra)} genes are not predicted by {_model_name(model)} (e.g. {extra[:5]}). "
                "Subset with `adata[:, stfm.get.model_genes(model)]` or use `inplace=False`."
            )
            raise ValueError(msg)
        out_genes = [str(g) for g in adata.var_names if genes is None or g in set(out_genes)]
    kwargs: dict[str, Any] = {"library_size": library_size, "use_rep": use_rep, "batch_size": batch_size,
                              "return_std": return_std, "smooth": smooth}  # fmt: skip
    if return_dist_params:
        kwargs["return_dist_params"] = True
    res = model.predict(adata, **kwargs)
    res = res if isinstance(res, tuple) else (res,)
    idx = [panel.index(g) for g in out_genes]
    mean = np.ascontiguousarray(res[0][:, idx], dtype=np.float32)
    std = np.ascontiguousarray(res[1][:, idx], dtype=np.float32) if return_std else None
    zi = theta = None
    if return_dist_params:
        zi = np.ascontiguousarray(res[-2][:, idx], dtype=np.float32)
        theta = np.asarray(res[-1])[idx].astype(np.float32)

    members = getattr(model, "members", [model])
    used_smooth = [int(m.smoothing_ if smooth is None else smooth) for m in members]
    params = {
        "model": _model_name(model),
        "model_path": Path(model_path).name if model_path else None,
        "method": model.method,
        "likelihood": spec.likelihood,
        "use_rep": use_rep or members[0].embedding_key_,
        "encoder": getattr(members[0], "encoder_", None),
        "library_size": library_size,
        "smoothing_neighbors": used_smooth[0] if len(set(used_smooth)) == 1 else used_smooth,
        "n_genes": len(out_genes),
        "n_models": len(members),
        "training_sections": list(getattr(members[0], "training_sections_", [])),
        "layer_holds": "composition (sums to 1 over the panel) x library size",
    }

    if not inplace:
        new = AnnData(X=mean, obs=adata.obs.copy(), var=pd.DataFrame(index=pd.Index(out_genes)))
        if "spatial" in adata.obsm:
            new.obsm["spatial"] = np.asarray(adata.obsm["spatial"]).copy()
        if "spatial" in adata.uns:
            new.uns["spatial"] = _copy_uns(adata.uns["spatial"])
        _write(new, key_added, mean, std, zi, theta)
        record(new, key_added, "stfm.tl.predict_expression", **params)
        return new

    out = prepare_output(data, copy=copy)
    table = get_table(out, table_key)
    if not has_genes:
        table = _rebuild_with_panel(out, table, table_key, out_genes, mean)
    _write(table, key_added, mean, std, zi, theta)
    record(table, key_added, "stfm.tl.predict_expression", table_rebuilt=not has_genes, **params)
    return out if copy else None


def _copy_uns(value: Any) -> Any:
    import copy as _copy

    return _copy.deepcopy(value)


def _write(table: AnnData, key: str, mean, std, zi, theta) -> None:
    table.layers[key] = mean
    if std is not None:
        table.layers[Key.std(key)] = std
    if zi is not None:
        table.layers[f"{key}_zi_prob"] = zi
        table.var[f"{key}_theta"] = theta


def _rebuild_with_panel(data: Any, table: AnnData, table_key: str | None, genes: list[str], x: np.ndarray) -> AnnData:
    """Give a gene-less (H&E-only) table the model's panel as var_names and the predictions as X."""
    var = pd.DataFrame(index=pd.Index(genes))
    kwargs = {
        "X": x.copy(),
        "obs": table.obs,
        "var": var,
        "uns": dict(table.uns),
        "obsm": dict(table.obsm),
        "obsp": dict(table.obsp),
    }
    if is_spatialdata(data):
        name = table_key if table_key is not None else next(iter(data.tables.keys()))
        new = AnnData(**kwargs)
        data.tables[name] = new
        return data.tables[name]
    # an AnnData cannot change its number of variables in place; re-initialise it (as anndata's own in-place
    # subsetting does) so the caller's object gains the panel
    table._init_as_actual(**kwargs)
    return table
