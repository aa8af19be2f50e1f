"""``ExpressionPredictor`` (method ``'zinb'``): H&E embedding → ZINB over raw counts with a library size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from anndata import AnnData
from scvi.data._constants import _SETUP_ARGS_KEY

from .._constants import EXPR_KEYS, Key
from ..module._zinb import ExpressionModule
from ._base import ExpressionModelBase
from ._checks import pool_neighbors
from ._registry import register_expression_method

__all__ = ["ExpressionPredictor"]


@register_expression_method(
    "zinb",
    needs=("embedding", "counts"),
    supports=("std", "dist_params", "smoothing", "early_stopping", "ensemble"),
    after="SPAM's decoder, on raw counts",
    likelihood="ZINB on counts, library size predicted from the image",
    summary="MLP on the (optionally neighbour-pooled) embedding → ZINB(μ = l·scale, θ, π), + a composition term",
)
class ExpressionPredictor(ExpressionModelBase):
    """Predict spatial gene expression from an H&E embedding with a zero-inflated negative binomial.

    An MLP maps a spot's (optionally neighbour-pooled) foundation-model embedding to the ZINB's normalised mean,
    zero-inflation and a predicted library size (:class:`~stfm.module.ExpressionModule`). Training uses the
    observed library size and scvi-tools' :class:`~scvi.train.TrainingPlan` / ``TrainRunner``; early stopping
    watches whole validation sections (see :meth:`~stfm.model.ExpressionModelBase.train`).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (raw counts of the gene panel in ``X`` or ``layer``).
    registry
        Registry of a saved model (used by :meth:`load` without data).
    n_hidden, n_layers, dropout_rate, input_dropout
        The encoder MLP.
    library_loss_weight
        Weight of the log-library-size regression loss.
    composition_weight
        Weight of the composition term (squared error of log1p counts per 10k; 0 = likelihood only).

    Examples
    --------
    >>> stfm.model.ExpressionPredictor.setup_anndata(adata, embedding_key="X_efficientnet_lite0", section_key="section")
    >>> model = stfm.model.ExpressionPredictor(adata)
    >>> model.train(max_epochs=200)
    >>> pred = model.predict(query, library_size=1e4)
    """

    _module_cls = ExpressionModule

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        *,
        n_hidden: int = 256,
        n_layers: int = 1,
        dropout_rate: float = 0.2,
        input_dropout: float = 0.1,
        library_loss_weight: float = 1.0,
        composition_weight: float = 1.0,
    ) -> None:
        super().__init__(adata, registry=registry)
        n_input = int(self.summary_stats[f"n_{EXPR_KEYS.EMBEDDING_KEY}"])
        emb_mean = emb_std = None
        log_lib = 0.0
        if adata is not None:
            emb = np.asarray(self.adata_manager.get_from_registry(EXPR_KEYS.EMBEDDING_KEY), dtype=np.float64)
            x = self.adata_manager.get_from_registry(EXPR_KEYS.X_KEY)
            lib = np.asarray(x.sum(axis=1)).ravel()
            emb_mean, emb_std = emb.mean(0), emb.std(0)
            log_lib = float(np.log(np.clip(lib, 1, None)).mean())
        self.module = self._module_cls(
            n_input=n_input,
            n_genes=self.summary_stats.n_vars,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout_rate=dropout_rate,
            input_dropout=input_dropout,
            embedding_mean=emb_mean,
            embedding_std=emb_std,
            log_library_mean=log_lib,
            library_loss_weight=library_loss_weight,
            composition_weight=composition_weight,
        )
        self._model_summary_string = (
            f"ExpressionPredictor (ZINB) on `obsm[{self.embedding_key_!r}]` ({n_input} dims), "
            f"{self.summary_stats.n_vars} genes, n_hidden={n_hidden}, n_layers={n_layers}"
        )
        self.init_params_ = self._get_init_params(locals())

    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        *,
        embedding_key: str,
        layer: str | None = None,
        section_key: str | None = None,
        patient_key: str | None = None,
        spatial_key: str = "spatial",
        neighbor_pooling: int | Sequence[int] | None = None,
        embedding_standardize: Literal["none", "section"] = "none",
        **kwargs: Any,
    ) -> None:
        """Register an AnnData for :class:`ExpressionPredictor`.

        Parameters
        ----------
        adata
            Spots × genes with raw counts; ``obsm[embedding_key]`` holds the H&E embedding.
        embedding_key
            obsm key of the embedding (e.g. ``'X_efficientnet_lite0'`` from :func:`stfm.pp.extract_features`).
        layer
            Layer with raw counts (``None``: ``X``).
        section_key
            obs column naming each spot's section (neighbour pooling and validation sections).
        patient_key
            obs column naming each spot's patient.
        spatial_key
            obsm key of spot coordinates (needed for ``neighbor_pooling`` and smoothing).
        neighbor_pooling
            ``k`` (or several) nearest spots, within a section, whose mean embedding is concatenated to the spot's
            own; stored in ``obsm[f'{embedding_key}_nbr{k}']`` and recomputed for queries.
        embedding_standardize
            ``'section'``: the embedding centred and scaled within each section first (see
            :meth:`ExpressionModelBase.setup_anndata <stfm.model.ExpressionModelBase.setup_anndata>`).
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if neighbor_pooling is not None:
            ks = (neighbor_pooling,) if isinstance(neighbor_pooling, int | np.integer) else tuple(neighbor_pooling)
            if not ks or any(int(k) < 1 for k in ks):
                msg = f"Expected `neighbor_pooling` to be a positive int or a sequence of them, found {neighbor_pooling!r}."
                raise ValueError(msg)
            setup_method_args[_SETUP_ARGS_KEY]["neighbor_pooling"] = [int(k) for k in ks]
        cls._register(adata, setup_method_args, **kwargs)

    @classmethod
    def _prepare_anndata(cls, adata: AnnData, args: dict[str, Any]) -> str:
        ks = args.get("neighbor_pooling")
        if not ks:
            return args["embedding_key"]
        key = Key.pooled(args["embedding_key"], tuple(ks))
        adata.obsm[key] = pool_neighbors(adata, args["embedding_key"], tuple(ks), section_key=args.get("section_key"),
                                         spatial_key=args.get("spatial_key") or "spatial")  # fmt: skip
        return key

    def predict(self, adata: AnnData | None = None, *, return_dist_params: bool = False, **kwargs: Any):
        """:meth:`~stfm.model.ExpressionModelBase.predict`, plus ``return_dist_params=True`` for the ZINB's
        zero-inflation probability ``(n_obs, n_genes)`` and gene-wise ``theta`` ``(n_genes,)``, appended to the
        returned tuple. ``mean`` is the negative binomial mean ``l · scale`` (the zero-inflated mean is
        ``(1 − zi_prob) · mean``)."""
        if not return_dist_params:
            return super().predict(adata, **kwargs)
        self._check_if_trained(warn=True)
        arrays = self._training_arrays() if adata is None else self._query_arrays(adata, kwargs.get("use_rep"))
        smooth = self.smoothing_ if kwargs.get("smooth") is None else int(kwargs["smooth"])
        res = self._predict_arrays(arrays, library_size=kwargs.get("library_size", 1e4), smooth=smooth,
                                   return_std=True, batch_size=kwargs.get("batch_size"))  # fmt: skip
        mean, std, aux = res
        zi = (1.0 / (1.0 + np.exp(-aux["zi_logits"]))).astype(np.float32)
        theta = np.exp(self.module.log_theta.detach().cpu().numpy()).astype(np.float32)
        if kwargs.get("return_std"):
            return mean, std, zi, theta
        return mean, zi, theta
