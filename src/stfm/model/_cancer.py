"""``CancerClassifier``: tumour vs non-tumour per spot from image ⊕ expression ⊕ spatial context (scvi-tools)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi.data import AnnDataManager
from scvi.data.fields import NumericalObsField, ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from .._logging import logger
from .._validation import check_spatial
from ..graph._context import pool_context
from ..module._cancer import TENSOR_KEYS, CancerModule
from ._calibration import Calibration
from ._cancer_embedder import ExpressionEmbedder
from ._persist import SafeSaveLoadMixin
from ._training import ExpressionTrainingPlan

__all__ = ["CancerClassifier", "label_to_target"]

_PREPARED = "_stfm_cancer_tokens"
_K = {
    TENSOR_KEYS.IMAGE: "_stfm_cancer_image",
    TENSOR_KEYS.IMAGE_CTX: "_stfm_cancer_image_ctx",
    TENSOR_KEYS.IMAGE_MASK: "_stfm_cancer_image_ctx_mask",
    TENSOR_KEYS.HAS_IMAGE: "_stfm_cancer_has_image",
    TENSOR_KEYS.EXPR: "_stfm_cancer_expression",
    TENSOR_KEYS.EXPR_CTX: "_stfm_cancer_expression_ctx",
    TENSOR_KEYS.EXPR_MASK: "_stfm_cancer_expression_ctx_mask",
    TENSOR_KEYS.HAS_EXPR: "_stfm_cancer_has_expression",
    TENSOR_KEYS.LABEL: "_stfm_cancer_label",
}


def label_to_target(labels: pd.Series, positive: Sequence[str], ignore: Sequence[str]) -> np.ndarray:
    """1.0 for ``positive`` labels, NaN for ``ignore`` labels and missing values, 0.0 for every other label."""
    lab = labels.astype("object")
    y = np.where(lab.isin(list(positive)), 1.0, 0.0).astype(np.float32)
    y[(lab.isin(list(ignore)) | lab.isna()).to_numpy()] = np.nan
    return y


def _modality_tokens(
    adata: AnnData, key: str | None, n_dim: int | None, *, coords, groups, scales, n_sectors
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Own embedding (zero where missing), flattened context tokens, context mask, presence flag."""
    n = adata.n_obs
    n_ctx = len(scales) * n_sectors
    if key is None or key not in adata.obsm:
        d = int(n_dim or 0)
        return (np.zeros((n, d), np.float32), np.zeros((n, n_ctx * d), np.float32),
                np.zeros((n, n_ctx), np.float32), np.zeros(n, np.float32))  # fmt: skip
    x = np.asarray(adata.obsm[key], dtype=np.float32)
    present = np.isfinite(x).all(axis=1)
    x = np.where(present[:, None], x, 0.0).astype(np.float32)
    # pool [x, 1] over neighbours that have the embedding: mean over present neighbours = sum_x / sum_1
    aug = np.concatenate([x, present[:, None].astype(np.float32)], axis=1)
    tokens, _ = pool_context(coords, aug, scales=scales, n_sectors=n_sectors, groups=groups)
    frac = tokens[..., -1]
    ctx_mask = (frac > 0).astype(np.float32)
    ctx = np.where(frac[..., None] > 0, tokens[..., :-1] / np.maximum(frac[..., None], 1e-12), 0.0).astype(np.float32)
    return x, ctx.reshape(n, -1), ctx_mask, present.astype(np.float32)


class CancerClassifier(SafeSaveLoadMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Tumour / non-tumour classifier fusing a histology embedding, an expression embedding and their context.

    SpaCancer-style fusion on scvi-tools infrastructure (``AnnDataManager`` fields, ``TrainingPlan`` /
    ``TrainRunner``, ``save``/``load``); the network is :class:`stfm.module.CancerModule`. For every spot the
    model attends over real tokens: its own image and expression embeddings and, for each modality, one
    pooled context token per (scale ring × angular sector) of neighbours
    (:func:`stfm.graph.pool_context`). Either modality may be missing at inference.

    The decision threshold is not learnt from the training loss: :meth:`set_threshold` stores a calibration, the
    way it transfers to new sections (:mod:`stfm.model._calibration`) and a threshold chosen on validation scores
    (see :func:`stfm.tl.fit_cancer_model`, which computes them on whole reference sections held out in turn).
    A model fitted from counts also carries its expression embedding (:attr:`embedder`, :meth:`embed`). All of
    it is saved and loaded with the model (safetensors weights + JSON settings; nothing is unpickled).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Registry of a saved model (used by :meth:`load` without data).
    d_model, n_heads, n_layers, dropout, modality_dropout, contrastive_weight, learn_temperature, n_members
        Passed to :class:`~stfm.module.CancerModule` (``n_members > 1``: an ensemble of that many networks in one
        model, trained together, logits averaged).
    pos_weight
        Positive-class BCE weight; ``None`` = ``n_negative / n_positive`` of the registered labels.
    """

    _module_cls = CancerModule
    #: scvi-tools' plan with the extra metrics (InfoNCE) logged outside inference mode, so DDP can reduce them
    _training_plan_cls = ExpressionTrainingPlan

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        *,
        d_model: int = 32,
        n_heads: int = 4,
        n_layers: int = 2,
        dropout: float = 0.3,
        modality_dropout: float = 0.3,
        contrastive_weight: float = 0.1,
        learn_temperature: bool = True,
        pos_weight: float | None = None,
        n_members: int = 1,
    ) -> None:
        super().__init__(adata, registry=registry)
        stats = self.summary_stats
        n_image = int(stats.get(f"n_{TENSOR_KEYS.IMAGE}", 0))
        n_expr = int(stats.get(f"n_{TENSOR_KEYS.EXPR}", 0))
        n_ctx = int(stats.get(f"n_{TENSOR_KEYS.IMAGE_MASK}", stats.get(f"n_{TENSOR_KEYS.EXPR_MASK}", 0)))
        if pos_weight is None and adata is not None:
            y = np.asarray(adata.obs[_K[TENSOR_KEYS.LABEL]], dtype=np.float64)
            n_pos, n_neg = np.nansum(y == 1), np.nansum(y == 0)
            pos_weight = float(n_neg / n_pos) if n_pos > 0 and n_neg > 0 else 1.0
        self.module = self._module_cls(
            n_image, n_expr, n_ctx, d_model=d_model, n_heads=n_heads, n_layers=n_layers, dropout=dropout,
            modality_dropout=modality_dropout, contrastive_weight=contrastive_weight,
            pos_weight=1.0 if pos_weight is None else pos_weight, learn_temperature=learn_temperature,
            n_members=n_members,
        )  # fmt: skip
        if adata is not None:
            self.module.set_standardisation(
                image=self._stats(adata, TENSOR_KEYS.IMAGE, TENSOR_KEYS.HAS_IMAGE) if n_image else None,
                expression=self._stats(adata, TENSOR_KEYS.EXPR, TENSOR_KEYS.HAS_EXPR) if n_expr else None,
            )
        self.token_config_ = dict(self.registry_["setup_args"])
        self.n_image_, self.n_expression_ = n_image, n_expr
        self.threshold_: float = 0.5
        self.calibration_: dict[str, Any] = {"method": "none", "strategy": "platt", "a": 1.0, "b": 0.0}
        self.embedder_: dict[str, Any] | None = None
        self._model_summary_string = (
            f"CancerClassifier: image dim {n_image}, expression dim {n_expr}, {n_ctx} context tokens per modality, "
            f"d_model {d_model}, {n_layers} layers" + (f", ensemble of {n_members}" if n_members > 1 else "")
        )
        self.init_params_ = self._get_init_params(locals())

    @staticmethod
    def _stats(adata: AnnData, key: str, has_key: str) -> tuple[np.ndarray, np.ndarray]:
        x = np.asarray(adata.obsm[_K[key]], dtype=np.float64)
        has = np.asarray(adata.obs[_K[has_key]]) > 0.5
        x = x[has] if has.any() else x
        return x.mean(0), x.std(0) + 1e-6

    # -- data registration ---------------------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        *,
        image_key: str | None = None,
        expression_key: str | None = None,
        label_key: str | None = None,
        positive: Sequence[str] = ("invasive cancer", "cancer in situ"),
        ignore: Sequence[str] = ("undetermined",),
        section_key: str | None = None,
        spatial_key: str = "spatial",
        scales: Sequence[float] = (1.0, 2.0, 4.0),
        n_sectors: int = 4,
        image_dim: int | None = None,
        expression_dim: int | None = None,
        **kwargs: Any,
    ) -> None:
        """Compute the token arrays and register them.

        Writes private slots into ``adata`` (``obsm['_stfm_cancer_*']``, ``obs['_stfm_cancer_*']``): each
        modality's embedding (zero where a spot has none, with a presence flag), its context tokens flattened
        to ``(n_obs, n_scales * n_sectors * dim)`` and their mask, and the target (1 = ``positive``, 0 = any other
        label, NaN = ``ignore`` or missing; NaN targets carry no loss).

        Parameters
        ----------
        adata
            Spots of one or more sections.
        image_key, expression_key
            ``obsm`` keys of the image and expression embeddings (at least one).
        label_key
            ``obs`` column of annotations (``None`` for unlabelled data).
        positive, ignore
            Label names counted as tumour, and left out of the loss.
        section_key
            ``obs`` column naming each spot's section (context is pooled within a section); ``None`` = one section.
        spatial_key
            ``obsm`` key of spot coordinates.
        scales, n_sectors
            Context rings (in spot pitches) and angular sectors, see :func:`stfm.graph.pool_context`.
        image_dim, expression_dim
            Embedding dimension to use when the modality is absent from ``adata`` (set by the model on query data).
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if image_key is None and expression_key is None:
            msg = "Expected at least one of `image_key` and `expression_key`, found neither."
            raise ValueError(msg)
        config = {"image_key": image_key, "expression_key": expression_key, "scales": list(map(float, scales)),
                  "n_sectors": int(n_sectors)}  # fmt: skip
        if adata.uns.get(_PREPARED) != repr(config):
            cls._prepare(adata, image_key=image_key, expression_key=expression_key, label_key=label_key,
                         positive=positive, ignore=ignore, section_key=section_key, spatial_key=spatial_key,
                         scales=scales, n_sectors=n_sectors, image_dim=image_dim, expression_dim=expression_dim)  # fmt: skip
            adata.uns[_PREPARED] = repr(config)
        fields = []
        if image_key is not None:
            fields += [ObsmField(TENSOR_KEYS.IMAGE, _K[TENSOR_KEYS.IMAGE]),
                       ObsmField(TENSOR_KEYS.IMAGE_CTX, _K[TENSOR_KEYS.IMAGE_CTX]),
                       ObsmField(TENSOR_KEYS.IMAGE_MASK, _K[TENSOR_KEYS.IMAGE_MASK]),
                       NumericalObsField(TENSOR_KEYS.HAS_IMAGE, _K[TENSOR_KEYS.HAS_IMAGE])]  # fmt: skip
        if expression_key is not None:
            fields += [ObsmField(TENSOR_KEYS.EXPR, _K[TENSOR_KEYS.EXPR]),
                       ObsmField(TENSOR_KEYS.EXPR_CTX, _K[TENSOR_KEYS.EXPR_CTX]),
                       ObsmField(TENSOR_KEYS.EXPR_MASK, _K[TENSOR_KEYS.EXPR_MASK]),
                       NumericalObsField(TENSOR_KEYS.HAS_EXPR, _K[TENSOR_KEYS.HAS_EXPR])]  # fmt: skip
        fields.append(NumericalObsField(TENSOR_KEYS.LABEL, _K[TENSOR_KEYS.LABEL]))
        adata_manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    @staticmethod
    def _prepare(adata, *, image_key, expression_key, label_key, positive, ignore, section_key, spatial_key,
                 scales, n_sectors, image_dim, expression_dim) -> None:  # fmt: skip
        coords = check_spatial(adata, spatial_key, purpose="the spatial context")
        groups = None
        if section_key is not None and section_key in adata.obs:
            groups = adata.obs[section_key].astype(str).to_numpy()
        geo = {"coords": coords, "groups": groups, "scales": tuple(scales), "n_sectors": int(n_sectors)}
        for key, dim, names in (
            (image_key, image_dim, (TENSOR_KEYS.IMAGE, TENSOR_KEYS.IMAGE_CTX, TENSOR_KEYS.IMAGE_MASK, TENSOR_KEYS.HAS_IMAGE)),
            (expression_key, expression_dim, (TENSOR_KEYS.EXPR, TENSOR_KEYS.EXPR_CTX, TENSOR_KEYS.EXPR_MASK, TENSOR_KEYS.HAS_EXPR)),
        ):
            if key is None:
                continue
            own, ctx, mask, has = _modality_tokens(adata, key, dim, **geo)
            adata.obsm[_K[names[0]]] = own
            adata.obsm[_K[names[1]]] = ctx
            adata.obsm[_K[names[2]]] = mask
            adata.obs[_K[names[3]]] = has
        if label_key is not None and label_key in adata.obs:
            adata.obs[_K[TENSOR_KEYS.LABEL]] = label_to_target(adata.obs[label_key], positive, ignore)
        else:
            adata.obs[_K[TENSOR_KEYS.LABEL]] = np.full(adata.n_obs, np.nan, dtype=np.float32)

    # -- inference -------------------------------------------------------------------------------------
    def _query_tokens(self, adata: AnnData) -> AnnData:
        """A fresh token AnnData for ``adata`` (its spots, coordinates and embeddings; ``adata`` untouched)."""
        cfg = self.token_config_
        spatial_key = cfg.get("spatial_key", "spatial")
        section_key = cfg.get("section_key")
        tmp = AnnData(obs=pd.DataFrame(index=adata.obs_names.astype(str)))
        if section_key is not None and section_key in adata.obs:
            tmp.obs[section_key] = adata.obs[section_key].astype(str).to_numpy()
        if spatial_key in adata.obsm:
            tmp.obsm[spatial_key] = np.asarray(adata.obsm[spatial_key])
        for key, n_dim, what in ((cfg.get("image_key"), self.n_image_, "image"),
                                 (cfg.get("expression_key"), self.n_expression_, "expression")):  # fmt: skip
            if key is not None and key in adata.obsm:
                x = np.asarray(adata.obsm[key])
                if x.ndim != 2 or x.shape[1] != n_dim:
                    msg = (
                        f"`obsm[{key!r}]` has dimension {x.shape[1] if x.ndim == 2 else x.shape}, but the model's {what} "
                        f"embedding has dimension {n_dim}. Compute the query's {what} embedding the same way as the "
                        "reference's (same encoder / same expression embedding fit)."
                    )
                    raise ValueError(msg)
                tmp.obsm[key] = x
        self._prepare(
            tmp, image_key=cfg.get("image_key"), expression_key=cfg.get("expression_key"), label_key=None,
            positive=(), ignore=(), section_key=section_key, spatial_key=spatial_key, scales=cfg["scales"],
            n_sectors=cfg["n_sectors"], image_dim=self.n_image_, expression_dim=self.n_expression_,
        )  # fmt: skip
        tmp.uns[_PREPARED] = repr({"image_key": cfg.get("image_key"), "expression_key": cfg.get("expression_key"),
                                   "scales": list(map(float, cfg["scales"])), "n_sectors": int(cfg["n_sectors"])})  # fmt: skip
        return tmp

    @torch.inference_mode()
    def predict_logits(self, adata: AnnData | None = None, *, batch_size: int | None = None) -> np.ndarray:
        """Uncalibrated logits per spot of ``adata`` (default: the registered data), in ``adata.obs`` order."""
        if adata is None:
            adata = self.adata
        elif adata.uns.get(_PREPARED) is None:
            adata = self._query_tokens(adata)
        adata = self._validate_anndata(adata)
        loader = self._make_data_loader(adata=adata, batch_size=batch_size or 512, shuffle=False)
        self.module.eval()
        out = []
        for tensors in loader:
            inputs = self.module._get_inference_input(tensors)
            out.append(self.module.inference(**inputs)["logit"].float().cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    # -- the stored expression embedding ---------------------------------------------------------------
    @property
    def embedder(self) -> ExpressionEmbedder | None:
        """The expression embedding fitted with the model (``None`` when it was trained on a user's ``obsm`` key)."""
        return None if not self.embedder_ else ExpressionEmbedder.from_dict(self.embedder_)

    @property
    def embedder_genes(self) -> list[str]:
        """Genes the stored expression embedding reads (empty when there is none)."""
        return list(self.embedder_["genes"]) if self.embedder_ else []

    def embed(self, adata: AnnData, *, layer: str | None = None, section_key: str | None = None) -> np.ndarray:
        """The model's expression embedding of ``adata`` (counts in ``X`` or ``layers[layer]``), per section."""
        emb = self.embedder
        if emb is None:
            key = self.token_config_.get("expression_key")
            msg = (
                f"This model was trained on a precomputed expression embedding (`obsm[{key!r}]`) and stores no "
                "embedding of its own; compute the query's the same way, or refit with `fit_cancer_model(reference)` "
                "without `expr_rep`."
            )
            raise ValueError(msg)
        key = section_key or self.token_config_.get("section_key")
        groups = adata.obs[key].astype(str).to_numpy() if key is not None and key in adata.obs else None
        return emb.transform(adata, layer=layer, groups=groups)

    # -- calibration ----------------------------------------------------------------------------------
    @property
    def calibration(self) -> Calibration:
        """The stored calibration and threshold transfer as a :class:`~stfm.model._calibration.Calibration`."""
        return Calibration.from_dict({**self.calibration_, "threshold": self.threshold_})

    def calibrate(self, logits: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
        """Map logits to calibrated tumour scores with the stored calibration (e.g. Platt ``σ(a · logit + b)``).

        ``groups`` names each spot's section for the transfers that work per section (``'section'``,
        ``'prior'``, ``'quantile'``); ``None`` treats all spots as one section.
        """
        return self.calibration.apply(logits, groups).astype(np.float32)

    def predict(self, adata: AnnData | None = None, *, batch_size: int | None = None) -> np.ndarray:
        """Calibrated tumour score per spot (in [0, 1]); compare with :attr:`threshold_`."""
        data = self.adata if adata is None else adata
        key = self.token_config_.get("section_key")
        groups = data.obs[key].astype(str).to_numpy() if key is not None and key in data.obs else None
        return self.calibrate(self.predict_logits(adata, batch_size=batch_size), groups)

    def set_threshold(
        self,
        logits: np.ndarray,
        labels: np.ndarray,
        groups: np.ndarray | None = None,
        *,
        calibration: Literal["platt", "none"] = "platt",
        criterion: Literal["f1", "youden"] = "f1",
        strategy: Literal["platt", "section", "prior", "quantile"] = "platt",
    ) -> float:
        """Fit the calibration on validation logits and store the threshold that maximises ``criterion``.

        ``logits`` must come from spots the model (or the fold models that produced them) was not trained on,
        e.g. whole held-out reference sections (``groups`` names their sections). The threshold is on the
        calibrated score and ``strategy`` says how it transfers to a new section (see
        :mod:`stfm.model._calibration`); no query label is ever read.

        Returns
        -------
        The threshold (also stored in :attr:`threshold_`, with the calibration in :attr:`calibration_`).
        """
        if calibration not in ("platt", "none"):
            msg = f"Expected `calibration` to be 'platt' or 'none', found {calibration!r}."
            raise ValueError(msg)
        cal, best = Calibration.fit(logits, labels, groups, strategy=strategy, criterion=criterion, platt=calibration == "platt")
        if cal.method.startswith("none (platt"):
            logger.warning("Platt fit on validation logits has a slope <= 0; keeping uncalibrated probabilities.")
        self.threshold_ = float(cal.threshold)
        d = cal.to_dict()
        d.pop("threshold")
        labels = np.asarray(labels, dtype=np.float64).ravel()
        self.calibration_ = {**d, "criterion": criterion, "validation_score": float(best),
                             "n_validation": int(np.isfinite(labels).sum())}  # fmt: skip
        logger.info("cancer threshold %.3f (%s on %d validation spots, %s calibration, %s transfer)", self.threshold_,
                    criterion, self.calibration_["n_validation"], cal.method, strategy)  # fmt: skip
        return self.threshold_
