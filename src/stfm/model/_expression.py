"""``ExpressionPredictor``: H&E embedding → ZINB over raw counts, on scvi-tools infrastructure."""

from __future__ import annotations

import copy as _copy
import logging
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from lightning.pytorch.callbacks import Callback
from scipy import sparse
from scvi.data import AnnDataManager
from scvi.data._constants import _SETUP_ARGS_KEY
from scvi.data.fields import CategoricalObsField, LayerField, ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from .._constants import EXPR_KEYS, Key
from .._settings import settings
from ..module._expression import ExpressionModule
from ._checks import check_counts, check_embedding, pool_neighbors
from ._checks import recorded_encoder as _recorded_encoder

__all__ = ["ExpressionPredictor", "check_counts", "check_embedding", "pool_neighbors"]

logger = logging.getLogger("stfm")


class _ValidationMonitor(Callback):
    """Score every epoch on the validation sections, stop after ``patience`` epochs without improvement and
    restore the weights of the best epoch at the end.

    ``monitor='pearson'``: mean over genes of the Pearson correlation across validation spots between
    ``log1p`` of the prediction (library size predicted from the image, as for an H&E-only section) and
    ``log1p`` of the counts; higher is better. ``monitor='elbo'``: scvi's ``elbo_validation`` (ZINB negative
    log-likelihood per spot); lower is better.
    """

    def __init__(self, x: np.ndarray, emb: np.ndarray, *, monitor: str, patience: int | None) -> None:
        self.x = torch.as_tensor(np.log1p(x), dtype=torch.float32)
        self.emb = torch.as_tensor(emb, dtype=torch.float32)
        self.monitor = monitor
        self.patience = patience
        self.best = -np.inf
        self.best_epoch: int | None = None
        self.scores: list[float] = []
        self.state: dict[str, torch.Tensor] | None = None

    def _score(self, trainer, pl_module) -> float | None:
        if self.monitor == "elbo":
            value = trainer.callback_metrics.get("elbo_validation")
            return None if value is None else -float(value)
        module = pl_module.module
        was_training = module.training
        module.eval()
        with torch.no_grad():
            dev = module.embedding_mean.device
            h = module.inference(self.emb.to(dev))["h"]
            mu = module.generative(h=h, library=None)["px"].mu
            p = torch.log1p(mu).cpu().double()
        module.train(was_training)
        t = self.x.double()
        p, t = p - p.mean(0), t - t.mean(0)
        den = torch.sqrt((p * p).sum(0) * (t * t).sum(0))
        ok = den > 1e-12
        return float(((p * t).sum(0)[ok] / den[ok]).mean()) if bool(ok.any()) else None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        score = self._score(trainer, pl_module)
        if score is None:
            return
        self.scores.append(score if self.monitor == "pearson" else -score)
        epoch = int(trainer.current_epoch)
        if score > self.best:
            self.best, self.best_epoch = score, epoch
            self.state = {k: v.detach().clone() for k, v in pl_module.module.state_dict().items()}
        elif self.patience is not None and self.best_epoch is not None and epoch - self.best_epoch >= self.patience:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        if self.state is not None:
            pl_module.module.load_state_dict(self.state)


class ExpressionPredictor(UnsupervisedTrainingMixin, BaseModelClass):
    """Predict spatial gene expression from an H&E embedding with a zero-inflated negative binomial.

    An MLP maps a spot's (optionally neighbour-pooled) foundation-model embedding to the ZINB's normalised
    mean, zero-inflation and a predicted library size (:class:`~stfm.module.ExpressionModule`). Training uses
    the observed library size and scvi-tools' :class:`~scvi.train.TrainingPlan` / ``TrainRunner``; early
    stopping watches whole validation sections (see :meth:`train`).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (raw counts of the gene panel in ``X`` or ``layer``).
    n_hidden
        Width of the hidden layers.
    n_layers
        Number of hidden layers.
    dropout_rate
        Dropout after each hidden layer.
    input_dropout
        Dropout on the standardised embedding.
    library_loss_weight
        Weight of the log-library-size regression loss.

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
        *,
        registry: dict | None = None,
        n_hidden: int = 256,
        n_layers: int = 1,
        dropout_rate: float = 0.2,
        input_dropout: float = 0.1,
        library_loss_weight: float = 1.0,
    ) -> None:
        super().__init__(adata, registry=registry)
        n_input = int(self.summary_stats[f"n_{EXPR_KEYS.EMBEDDING_KEY}"])
        emb_mean = emb_std = None
        log_lib = 0.0
        if adata is not None:
            # standardisation statistics of the training embedding (buffers: restored by `load` otherwise)
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
        )
        setup = self.registry_[_SETUP_ARGS_KEY]
        self.embedding_key_: str = setup["embedding_key"]
        #: encoder recorded in the training embedding's provenance (``None`` when not recorded)
        self.encoder_: str | None = None if adata is None else _recorded_encoder(adata, self.embedding_key_)
        self.best_epoch_: int | None = None
        self.validation_sections_: list[str] = []
        self._model_summary_string = (
            f"ExpressionPredictor (ZINB) on `obsm[{self.embedding_key_!r}]` ({n_input} dims), "
            f"{self.summary_stats.n_vars} genes, n_hidden={n_hidden}, n_layers={n_layers}"
        )
        self.init_params_ = self._get_init_params(locals())

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def setup_anndata(
        cls,
        adata: AnnData,
        *,
        embedding_key: str,
        layer: str | None = None,
        section_key: str | None = None,
        patient_key: str | None = None,
        neighbor_pooling: int | Sequence[int] | None = None,
        spatial_key: str = "spatial",
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
            obs column naming each spot's section (used for neighbour pooling and validation sections).
        patient_key
            obs column naming each spot's patient.
        neighbor_pooling
            ``k`` (or several) nearest spots, within a section, whose mean embedding is concatenated to the
            spot's own; stored in ``obsm[f'{embedding_key}_nbr{k}']`` and recomputed for queries.
        spatial_key
            obsm key of spot coordinates (needed for ``neighbor_pooling``).
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if neighbor_pooling is not None:
            ks = (neighbor_pooling,) if isinstance(neighbor_pooling, int | np.integer) else tuple(neighbor_pooling)
            if not ks or any(int(k) < 1 for k in ks):
                msg = f"Expected `neighbor_pooling` to be a positive int or a sequence of them, found {neighbor_pooling!r}."
                raise ValueError(msg)
            ks = tuple(int(k) for k in ks)
            setup_method_args[_SETUP_ARGS_KEY]["neighbor_pooling"] = list(ks)
        check_counts(adata, layer)
        check_embedding(adata, embedding_key)
        for key in (section_key, patient_key):
            if key is not None and key not in adata.obs:
                msg = f"`adata.obs[{key!r}]` not found. Available columns: {sorted(adata.obs.columns)}."
                raise KeyError(msg)
        if section_key is not None and kwargs.get("source_registry") is None:
            x = adata.X if layer is None else adata.layers[layer]
            lib = np.asarray(x.sum(axis=1)).ravel()
            labels = adata.obs[section_key].astype(str).to_numpy()
            empty = [s for s in pd.unique(labels) if lib[labels == s].sum() == 0]
            if empty:
                msg = (
                    f"Section(s) {empty} have no counts in the registered genes. Drop them (e.g. "
                    f"`adata = adata[~adata.obs[{section_key!r}].isin({empty})]`) or check the gene panel."
                )
                raise ValueError(msg)
        input_key = embedding_key
        if neighbor_pooling is not None:
            input_key = Key.pooled(embedding_key, ks)
            adata.obsm[input_key] = pool_neighbors(
                adata, embedding_key, ks, section_key=section_key, spatial_key=spatial_key
            )
        anndata_fields = [
            LayerField(EXPR_KEYS.X_KEY, layer, is_count_data=True),
            ObsmField(EXPR_KEYS.EMBEDDING_KEY, input_key),
            CategoricalObsField(EXPR_KEYS.SECTION_KEY, section_key),
            CategoricalObsField(EXPR_KEYS.PATIENT_KEY, patient_key),
        ]
        adata_manager = AnnDataManager(fields=anndata_fields, setup_method_args=setup_method_args)
        adata_manager.register_fields(adata, **kwargs)
        cls.register_manager(adata_manager)

    # ----------------------------------------------------------------------------------------------
    @property
    def genes(self) -> list[str]:
        """The gene panel, in output order."""
        return [str(g) for g in self.registry_["field_registries"][EXPR_KEYS.X_KEY]["state_registry"]["column_names"]]

    @property
    def setup_args(self) -> dict[str, Any]:
        """Arguments given to :meth:`setup_anndata`."""
        return dict(self.registry_[_SETUP_ARGS_KEY])

    def _section_codes(self) -> tuple[np.ndarray, list[str]]:
        reg = self.adata_manager.get_state_registry(EXPR_KEYS.SECTION_KEY)
        codes = np.asarray(self.adata_manager.get_from_registry(EXPR_KEYS.SECTION_KEY)).ravel().astype(int)
        return codes, [str(c) for c in reg.categorical_mapping]

    def train(
        self,
        max_epochs: int = 300,
        *,
        validation_sections: Sequence[str] | None = None,
        early_stopping: bool = True,
        early_stopping_patience: int = 30,
        early_stopping_monitor: Literal["pearson", "elbo"] = "pearson",
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 128,
        accelerator: str = "auto",
        devices: int | str = "auto",
        plan_kwargs: dict[str, Any] | None = None,
        **trainer_kwargs: Any,
    ):
        """Train with early stopping on whole validation sections from the training patients.

        Parameters
        ----------
        max_epochs
            Maximum number of epochs.
        validation_sections
            Sections held out for early stopping. ``None`` picks the last section (sorted by name) when the
            registered data has at least two sections; with a single section there is no validation split and
            training runs for ``max_epochs`` (early stopping is turned off, with a warning).
        early_stopping
            Stop when the validation score has not improved for ``early_stopping_patience`` epochs; the weights
            of the best validation epoch are restored either way.
        early_stopping_patience
            Epochs without improvement before stopping.
        early_stopping_monitor
            ``'pearson'``: mean per-gene Pearson correlation on the validation sections between ``log1p`` of the
            prediction (with the predicted library size, as for an H&E-only section) and ``log1p`` counts.
            ``'elbo'``: the ZINB negative log-likelihood (``elbo_validation``).
        lr, weight_decay
            AdamW learning rate and weight decay (scvi :class:`~scvi.train.TrainingPlan`).
        batch_size
            Minibatch size.
        accelerator, devices
            Lightning device selection.
        plan_kwargs
            Extra arguments for :class:`~scvi.train.TrainingPlan`.
        **trainer_kwargs
            Extra arguments for :class:`~scvi.train.Trainer`.
        """
        codes, cats = self._section_codes()
        present = [cats[c] for c in np.unique(codes)]
        if validation_sections is None:
            validation_sections = [sorted(present)[-1]] if len(present) >= 2 else []
        else:
            validation_sections = [str(s) for s in validation_sections]
            unknown = [s for s in validation_sections if s not in present]
            if unknown:
                msg = f"Validation section(s) {unknown} are not in the training data; its sections are {present}."
                raise ValueError(msg)
            if len(validation_sections) >= len(present):
                msg = "`validation_sections` would leave no section to train on; keep at least one for training."
                raise ValueError(msg)
        val_mask = np.isin(np.asarray(cats, dtype=object)[codes], validation_sections)
        train_idx, val_idx = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
        if len(val_idx) == 0 and early_stopping:
            warnings.warn(
                "Only one section to train on: no validation section, so early stopping is off and training runs "
                f"for max_epochs={max_epochs}. Register more sections (`section_key=`) to choose epochs on held-out data.",
                UserWarning,
                stacklevel=2,
            )
            early_stopping = False
        self.validation_sections_ = list(validation_sections)
        plan = {"lr": lr, "weight_decay": weight_decay, "optimizer": "AdamW", **(plan_kwargs or {})}
        callbacks = list(trainer_kwargs.pop("callbacks", []))
        monitor = None
        if len(val_idx):
            if early_stopping_monitor not in ("pearson", "elbo"):
                msg = f"Expected `early_stopping_monitor` to be 'pearson' or 'elbo', found {early_stopping_monitor!r}."
                raise ValueError(msg)
            x = self.adata_manager.get_from_registry(EXPR_KEYS.X_KEY)
            x = x[val_idx]
            x = np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float32)
            emb = np.asarray(self.adata_manager.get_from_registry(EXPR_KEYS.EMBEDDING_KEY))[val_idx]
            monitor = _ValidationMonitor(
                x, emb, monitor=early_stopping_monitor, patience=early_stopping_patience if early_stopping else None
            )
            callbacks.append(monitor)
        trainer_kwargs.setdefault("enable_progress_bar", bool(settings.show_progress_bar))
        trainer_kwargs.setdefault("check_val_every_n_epoch", 1 if len(val_idx) else None)
        out = super().train(
            max_epochs=max_epochs,
            accelerator=accelerator,
            devices=devices,
            batch_size=batch_size,
            early_stopping=False,
            datasplitter_kwargs={"external_indexing": [train_idx, val_idx, np.array([], dtype=int)]},
            plan_kwargs=plan,
            callbacks=callbacks,
            **trainer_kwargs,
        )
        if monitor is not None and monitor.best_epoch is not None:
            self.best_epoch_ = monitor.best_epoch
            self.validation_scores_ = monitor.scores
        else:
            self.best_epoch_ = int(self.history["train_loss"].index[-1]) if self.history else max_epochs - 1
            self.validation_scores_ = []
        self.module.eval()
        return out

    # ----------------------------------------------------------------------------------------------
    def _query_anndata(self, adata: AnnData, use_rep: str | None = None) -> AnnData:
        """Internal AnnData for inference: the panel's counts (zero-padded if absent) + the model input embedding."""
        setup = self.setup_args
        emb_key = use_rep or setup["embedding_key"]
        n_raw = self.module.n_input // (1 + len(setup.get("neighbor_pooling") or []))
        emb = check_embedding(adata, emb_key, n_dims=n_raw)
        enc = _recorded_encoder(adata, emb_key)
        trained_enc = getattr(self, "encoder_", None)
        if enc is not None and trained_enc is not None and enc != trained_enc:
            msg = (
                f"The query embedding `obsm[{emb_key!r}]` was made with encoder {enc!r}, but the model was "
                f"trained on {trained_enc!r} embeddings. Run `stfm.pp.extract_features(adata, {trained_enc!r})` on "
                "the query first."
            )
            raise ValueError(msg)
        genes = pd.Index(self.genes)
        layer = setup.get("layer")
        n = adata.n_obs
        src = None
        if adata.n_vars and genes.isin(adata.var_names).all():
            src = adata[:, genes].X if layer is None or layer not in adata.layers else adata[:, genes].layers[layer]
            try:
                check_counts(AnnData(X=src))
            except ValueError:
                src = None  # not counts (e.g. a normalised query): predictions do not need them
        x = (
            sparse.csr_matrix(src, dtype=np.float32)
            if src is not None
            else sparse.csr_matrix((n, len(genes)), dtype=np.float32)
        )
        sec_key, pat_key = setup.get("section_key"), setup.get("patient_key")
        obs = pd.DataFrame(index=pd.Index(np.arange(n).astype(str)))
        for key in (sec_key, pat_key):
            if key is not None:
                obs[key] = adata.obs[key].astype(str).to_numpy() if key in adata.obs else "query"
        q = AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes))
        if layer is not None:
            q.layers[layer] = x
        q.obsm[setup["embedding_key"]] = emb
        spatial_key = setup.get("spatial_key", "spatial")
        if spatial_key in adata.obsm:
            q.obsm[spatial_key] = np.asarray(adata.obsm[spatial_key])
        ks = setup.get("neighbor_pooling")
        if ks:
            q.obsm[Key.pooled(setup["embedding_key"], tuple(ks))] = pool_neighbors(
                q, setup["embedding_key"], tuple(ks), section_key=sec_key, spatial_key=spatial_key
            )
        q.uns["_stfm_has_counts"] = src is not None
        if self.adata_manager is None:
            type(self).setup_anndata(
                q,
                source_registry=self.registry_,
                extend_categories=True,
                **{k: v for k, v in setup.items() if k != "neighbor_pooling"},
                neighbor_pooling=tuple(ks) if ks else None,
            )
            self._adata = q
            self._adata_manager = self._get_most_recent_anndata_manager(q, required=True)
            self._register_manager_for_instance(self._adata_manager)
        else:
            self._register_manager_for_instance(self.adata_manager.transfer_fields(q, extend_categories=True))
        return q

    @torch.inference_mode()
    def predict(
        self,
        adata: AnnData | None = None,
        *,
        library_size: float | Literal["observed", "predicted"] = 1e4,
        return_std: bool = False,
        return_dist_params: bool = False,
        use_rep: str | None = None,
        batch_size: int | None = None,
    ) -> np.ndarray | tuple[np.ndarray, ...]:
        """Predicted expression: normalised mean (``scale``) × library size, float32 ``(n_obs, n_genes)``.

        Parameters
        ----------
        adata
            Query with the embedding in ``obsm`` (genes optional: an H&E-only table works). ``None``: the
            training data.
        library_size
            A number (the same for every spot; 1e4 gives counts per 10k), ``'observed'`` (sum of the query's
            counts over the panel; needs counts) or ``'predicted'`` (library size predicted from the image).
        return_std
            Also return the ZINB standard deviation (same shape).
        return_dist_params
            Also return the zero-inflation probability ``(n_obs, n_genes)`` and the gene-wise ``theta``.
        use_rep
            obsm key of the query embedding when it differs from the training key.
        batch_size
            Minibatch size (default :attr:`stfm.settings.batch_size`).

        Returns
        -------
        ``mean`` or ``(mean, std)``, ``(mean, zi_prob, theta)``, ``(mean, std, zi_prob, theta)``. ``mean`` is the
        negative binomial mean ``l · scale`` (the zero-inflated mean is ``(1 - zi_prob) · mean``).
        """
        self._check_if_trained(warn=True)
        source = self.adata if adata is None else adata
        q = self._query_anndata(source, use_rep=use_rep)
        if library_size == "observed" and not q.uns["_stfm_has_counts"]:
            msg = (
                "`library_size='observed'` needs raw counts of the model's genes in the query; this table has none. "
                "Pass a number (e.g. 1e4) or 'predicted'."
            )
            raise ValueError(msg)
        if not (isinstance(library_size, str) and library_size in {"observed", "predicted"}):
            from .._validation import check_positive

            check_positive(library_size, name="library_size")
        self.module.eval()
        loader = self._make_data_loader(adata=q, batch_size=batch_size or settings.batch_size, shuffle=False)
        means, stds, zis = [], [], []
        for tensors in loader:
            inf = self.module.inference(**self.module._get_inference_input(tensors))
            if library_size == "observed":
                lib = tensors[EXPR_KEYS.X_KEY].sum(-1, keepdim=True)
            elif library_size == "predicted":
                lib = None
            else:
                lib = torch.full((inf["h"].shape[0], 1), float(library_size), device=inf["h"].device)
            gen = self.module.generative(h=inf["h"], library=lib)
            px = gen["px"]
            means.append(px.mu.float().cpu().numpy())
            if return_std:
                stds.append(np.sqrt(px.variance.float().cpu().numpy()))
            if return_dist_params:
                zis.append(torch.sigmoid(px.zi_logits).float().cpu().numpy())
        out: list[np.ndarray] = [np.concatenate(means).astype(np.float32)]
        if return_std:
            out.append(np.concatenate(stds).astype(np.float32))
        if return_dist_params:
            out.append(np.concatenate(zis).astype(np.float32))
            out.append(torch.exp(self.module.log_theta).detach().cpu().numpy().astype(np.float32))
        return out[0] if len(out) == 1 else tuple(out)

    @classmethod
    def load(cls, dir_path: str, adata: AnnData | None = None, **kwargs: Any) -> ExpressionPredictor:
        """Load a model written by :meth:`save`; ``adata`` (optional) must have exactly the model's genes, in order.

        Without ``adata`` the model keeps only its registry: :meth:`predict` then works on any query holding the
        embedding (counts optional).
        """
        model = super().load(dir_path, adata=None, **kwargs)
        if adata is None:
            return model
        names = [str(g) for g in adata.var_names]
        if names != model.genes:
            n_missing = len(set(model.genes) - set(names))
            msg = (
                f"`adata.var_names` do not match the model's {len(model.genes)} genes ({n_missing} missing, "
                f"{adata.n_vars} given, order must match). Subset first: `adata[:, stfm.get.model_genes(model)]`."
            )
            raise ValueError(msg)
        return super().load(dir_path, adata=adata, **kwargs)

    def copy(self) -> ExpressionPredictor:
        """A deep copy of the model."""
        return _copy.deepcopy(self)
