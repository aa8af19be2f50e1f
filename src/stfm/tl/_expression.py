"""Expression from H&E: ``fit_expression`` (ZINB or ridge) and ``predict_expression`` (writes ``layers['predicted']``)."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from .._constants import Key
from .._containers import get_table, is_spatialdata, prepare_output
from .._logging import logger
from .._provenance import record
from .._validation import check_copy_inplace, check_valid_key

if TYPE_CHECKING:
    from ..model._expression import ExpressionPredictor
    from ..model._ridge import RidgeProbe

__all__ = ["concat_sections", "fit_expression", "load_model", "predict_expression", "select_genes"]

Method = Literal["zinb", "ridge"]


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


def _log1p_counts(adata: AnnData, layer: str | None = None, *, normalize: bool = False) -> np.ndarray:
    from scipy import sparse

    x = adata.X if layer is None else adata.layers[layer]
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    x = x.astype(np.float64)
    if normalize:
        lib = x.sum(1, keepdims=True)
        x = np.divide(x * 1e4, lib, out=np.zeros_like(x), where=lib > 0)
    return np.log1p(x)


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
    y = _log1p_counts(cand, layer, normalize=normalize)
    detected = (y > 0).mean(0) >= min_spot_fraction
    score = y.var(0) if flavor == "variable" else y.mean(0)
    score = np.where(detected, score, -np.inf)
    order = np.argsort(-score, kind="stable")[: min(n_top_genes, int(detected.sum()) or n_top_genes)]
    return [str(cand.var_names[i]) for i in order]


# --------------------------------------------------------------------------------------------------
# fitting
# --------------------------------------------------------------------------------------------------
def fit_expression(
    reference: AnnData | Sequence[AnnData],
    *,
    method: Method = "zinb",
    embedding_key: str,
    genes: Sequence[str] | None = None,
    n_top_genes: int = 50,
    layer: str | None = None,
    section_key: str | None = "section",
    patient_key: str | None = "patient",
    validation_sections: Sequence[str] | None = None,
    neighbor_pooling: int | Sequence[int] | None = None,
    max_epochs: int = 300,
    early_stopping_patience: int = 30,
    n_models: int = 1,
    seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    n_components: int = 256,
    alpha: float | None = None,
) -> ExpressionPredictor | RidgeProbe | ExpressionEnsemble:
    """Train an expression predictor on sections that have both H&E embeddings and spatial transcriptomics.

    Parameters
    ----------
    reference
        One AnnData holding one or more sections (``obs[section_key]``) or a list of per-section AnnData
        (concatenated on shared genes, ``obsm`` kept). Raw counts in ``X`` (or ``layer``).
    method
        ``'zinb'``: :class:`~stfm.model.ExpressionPredictor` (scvi-tools, ZINB on counts). ``'ridge'``:
        :class:`~stfm.model.RidgeProbe` (HEST probe, PCA-256 + ridge on ``log1p`` counts).
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
    validation_sections
        Whole sections held out for early stopping (``'zinb'``); ``None`` picks one (see
        :meth:`~stfm.model.ExpressionPredictor.train`).
    neighbor_pooling
        ``k`` nearest spots (or several ``k``) whose mean embedding is appended to a spot's own (``'zinb'``).
    max_epochs, early_stopping_patience
        Training length and patience (``'zinb'``).
    n_models
        ``'zinb'``: train this many models with seeds ``seed, seed+1, …`` and average their predictions.
    seed
        Random seed (scvi-tools ``settings.seed``), so a fit is reproducible.
    model_kwargs, train_kwargs
        Extra arguments for the model constructor and ``train``.
    n_components, alpha
        PCA size and ridge penalty (``'ridge'``; ``alpha=None`` is HEST's ``100 / (n_components · n_genes)``).

    Returns
    -------
    The fitted model. ``model.gene_sets_`` holds ``'top_variable'`` and ``'top_expressed'`` (50 genes each, or
    fewer, chosen among the panel on the reference) for :func:`evaluate_expression`; ``model.training_sections_``
    lists the sections used; ``model.fit_time_s_`` the training wall time.
    """
    from ..model._checks import check_counts, check_embedding
    from ..model._checks import recorded_encoder as _recorded_encoder
    from ..model._ridge import RidgeProbe

    if method not in ("zinb", "ridge"):
        msg = f"Expected `method` to be 'zinb' or 'ridge', found {method!r}."
        raise ValueError(msg)
    parts = [reference] if isinstance(reference, AnnData) else list(reference)
    encoders = {_recorded_encoder(a, embedding_key) for a in parts if isinstance(a, AnnData)} - {None}
    if len(encoders) > 1:
        msg = (
            f"The reference sections' `obsm[{embedding_key!r}]` were made with different encoders {sorted(encoders)}; "
            "extract every section's features with the same `stfm.pp.extract_features` model."
        )
        raise ValueError(msg)
    ref = concat_sections(reference, section_key=section_key)
    check_embedding(ref, embedding_key)
    check_counts(ref, layer) if method == "zinb" else None
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
    sections = sorted(train.obs[section_key].astype(str).unique()) if section_key else []
    gene_sets = {
        "top_variable": select_genes(train, 50, flavor="variable", layer=layer, min_spot_fraction=0.0),
        "top_expressed": select_genes(train, 50, flavor="expressed", layer=layer, min_spot_fraction=0.0),
    }
    t0 = time.perf_counter()
    if method == "ridge":
        model: Any = RidgeProbe(train, embedding_key=embedding_key, layer=layer, n_components=n_components, alpha=alpha)
        model.train()
    else:
        import scvi

        from ..model._expression import ExpressionPredictor

        ExpressionPredictor.setup_anndata(
            train,
            embedding_key=embedding_key,
            layer=layer,
            section_key=section_key,
            patient_key=patient_key,
            neighbor_pooling=neighbor_pooling,
        )
        members = []
        for i in range(max(1, int(n_models))):
            scvi.settings.seed = seed + i
            m = ExpressionPredictor(train, **dict(model_kwargs or {}))
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*does not have many workers.*")
                warnings.filterwarnings("ignore", message=".*not contain raw count.*")
                m.train(
                    max_epochs=max_epochs,
                    validation_sections=validation_sections,
                    early_stopping_patience=early_stopping_patience,
                    **dict(train_kwargs or {}),
                )
            members.append(m)
        model = members[0] if len(members) == 1 else ExpressionEnsemble(members)
    fit_time = time.perf_counter() - t0
    for obj in [model, *getattr(model, "members", [])]:
        obj.gene_sets_ = gene_sets
        obj.training_sections_ = sections
        obj.fit_time_s_ = fit_time
        obj.method_ = method
        obj.encoder_ = next(iter(encoders)) if encoders else None
    logger.info("fit_expression(%s): %d genes, sections %s, %.1f s", method, len(panel), sections, fit_time)
    return model


class ExpressionEnsemble:
    """Average of several :class:`~stfm.model.ExpressionPredictor` trained with different seeds.

    Predictions are the mean of the members' predictions (and the root mean of their variances for the std).
    """

    def __init__(self, members: Sequence[ExpressionPredictor]) -> None:
        self.members = list(members)
        genes = self.members[0].genes
        if any(m.genes != genes for m in self.members):
            msg = "All ensemble members must predict the same genes in the same order."
            raise ValueError(msg)

    @property
    def genes(self) -> list[str]:
        """The gene panel, in output order."""
        return self.members[0].genes

    @property
    def embedding_key_(self) -> str:
        """obsm key of the training embedding."""
        return self.members[0].embedding_key_

    @property
    def is_trained_(self) -> bool:
        """Whether every member is trained."""
        return all(m.is_trained_ for m in self.members)

    def predict(self, adata: AnnData | None = None, **kwargs: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        """Mean of the members' :meth:`~stfm.model.ExpressionPredictor.predict` outputs."""
        outs = [m.predict(adata, **kwargs) for m in self.members]
        if isinstance(outs[0], tuple):
            res = []
            for j in range(len(outs[0])):
                arrs = np.stack([o[j] for o in outs])
                is_std = kwargs.get("return_std") and j == 1
                res.append(np.sqrt((arrs**2).mean(0)) if is_std else arrs.mean(0))
            return tuple(r.astype(np.float32) for r in res)
        return np.mean(outs, axis=0).astype(np.float32)

    def save(self, dir_path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Save each member to ``dir_path/member_<i>``."""
        dir_path = Path(dir_path)
        for i, m in enumerate(self.members):
            m.save(dir_path / f"member_{i}", overwrite=overwrite)

    def __repr__(self) -> str:
        return f"ExpressionEnsemble({len(self.members)} × ExpressionPredictor, {len(self.genes)} genes)"


def load_model(path: str | os.PathLike[str]) -> ExpressionPredictor | RidgeProbe | ExpressionEnsemble:
    """Load a model folder written by ``ExpressionPredictor.save``, ``RidgeProbe.save`` or an ensemble's ``save``."""
    path = Path(path)
    if (path / "ridge_probe.npz").is_file():
        from ..model._ridge import RidgeProbe

        return RidgeProbe.load(path)
    if (path / "model.pt").is_file():
        from ..model._expression import ExpressionPredictor

        return ExpressionPredictor.load(str(path))
    members = sorted(path.glob("member_*"))
    if members:
        from ..model._expression import ExpressionPredictor

        return ExpressionEnsemble([ExpressionPredictor.load(str(p)) for p in members])
    msg = (
        f"No stfm expression model found at {str(path)!r}: expected `model.pt` (ExpressionPredictor.save), "
        "`ridge_probe.npz` (RidgeProbe.save) or `member_*` folders. Train one with `stfm.tl.fit_expression`."
    )
    raise FileNotFoundError(msg)


# --------------------------------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------------------------------
def _model_name(model: Any) -> str:
    return type(model).__name__


def predict_expression(
    data: Any,
    model: str | os.PathLike[str] | ExpressionPredictor | RidgeProbe | ExpressionEnsemble,
    *,
    use_rep: str | None = None,
    table_key: str | None = None,
    genes: Sequence[str] | None = None,
    library_size: float | Literal["observed", "predicted"] = 1e4,
    return_std: bool = False,
    return_dist_params: bool = False,
    batch_size: int | None = None,
    device: Any = None,
    key_added: str = Key.PREDICTED,
    inplace: bool = True,
    copy: bool = False,
) -> Any:
    """Predict spatial gene expression from tile/spot embeddings.

    Parameters
    ----------
    data
        AnnData, or SpatialData whose table ``table_key`` holds the embedding. The table may have counts for
        the model's genes, any subset of them, or no genes at all (an H&E-only tile table).
    model
        A fitted :class:`~stfm.model.ExpressionPredictor`, :class:`~stfm.model.RidgeProbe`, an ensemble from
        :func:`fit_expression`, or a folder written by their ``save``.
    use_rep
        obsm key of the embedding (``None``: the key the model was trained on).
    table_key
        Table of a SpatialData object (``None``: its only table).
    genes
        Predict only these genes (all must be in :func:`stfm.get.model_genes`); ``None``: the model's panel.
    library_size
        A number (counts per ``library_size`` for every spot), ``'observed'`` (each spot's counts over the panel;
        needs counts in ``X``) or ``'predicted'`` (library size predicted from the image; for ridge, the
        un-normalised ``expm1`` of the predicted ``log1p`` counts).
    return_std
        Also write the ZINB standard deviation (``'zinb'`` only).
    return_dist_params
        Also write the zero-inflation probability and gene-wise ``theta`` (``'zinb'`` only).
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
        Normalised mean × `library_size` (for ZINB, the negative binomial mean `l · scale`; the zero-inflated
        mean is `(1 - zi_prob) · l · scale`). For a table without genes, the table is rebuilt with
        `var_names` = the panel and `X` = this layer, keeping obs, obsm, obsp, uns and `spatialdata_attrs`.
    `.layers[f'{key_added}_std']` : :class:`numpy.ndarray` (float32)
        ZINB standard deviation; only if `return_std=True`.
    `.layers[f'{key_added}_zi_prob']`, `.var[f'{key_added}_theta']`
        Zero-inflation probability and inverse dispersion; only if `return_dist_params=True`.
    `.uns['stfm']['predicted' | key_added]` : :class:`dict`
        Model class, method, embedding key, encoder, library_size, n_genes, likelihood, training sections.
    """
    check_copy_inplace(copy=copy, inplace=inplace)
    check_valid_key(key_added)
    if isinstance(model, str | os.PathLike):
        model_path = os.fspath(model)
        model = load_model(model)
    else:
        model_path = None
    if not hasattr(model, "predict") or not hasattr(model, "genes"):
        msg = f"Expected a fitted stfm expression model or a path to one, found {type(model).__name__}."
        raise TypeError(msg)
    is_ridge = _model_name(model) == "RidgeProbe"
    if is_ridge and (return_std or return_dist_params):
        msg = "`return_std` / `return_dist_params` need a ZINB model (method='zinb'); the ridge probe has no distribution."
        raise ValueError(msg)
    if device is not None and not is_ridge:
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
    kwargs: dict[str, Any] = {"library_size": library_size, "use_rep": use_rep}
    if not is_ridge:
        kwargs.update(return_std=return_std, return_dist_params=return_dist_params, batch_size=batch_size)
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
    params = {
        "model": _model_name(model),
        "model_path": model_path,
        "method": "ridge" if is_ridge else "zinb",
        "likelihood": "log1p-ridge" if is_ridge else "zinb",
        "use_rep": use_rep or model.embedding_key_,
        "encoder": getattr(members[0], "encoder_", None),
        "library_size": library_size,
        "n_genes": len(out_genes),
        "n_models": len(members),
        "training_sections": list(getattr(members[0], "training_sections_", [])),
        "layer_holds": "NB mean l*scale (normalised mean x library size)"
        if not is_ridge
        else "expm1(predicted log1p counts), rescaled to library_size",
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
