"""``ExpressionModelBase``: what every stfm expression model shares, on scvi-tools infrastructure.

A method is a subclass decorated with :func:`~stfm.model.register_expression_method` plus a torch module
fulfilling :class:`~stfm.module._base.ExpressionModuleBase`. The base owns the AnnData registration skeleton,
query checks, training with early stopping on whole validation sections, prediction (composition × a library
size, optional neighbour smoothing, predictive std) and safe, atomic save / load.
"""

from __future__ import annotations

import copy as _copy
import logging
import warnings
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scipy import sparse
from scvi.data import AnnDataManager
from scvi.data._constants import _SETUP_ARGS_KEY
from scvi.data.fields import BaseAnnDataField, CategoricalObsField, LayerField, ObsmField
from scvi.model.base import BaseModelClass, UnsupervisedTrainingMixin

from .._constants import EXPR_KEYS
from .._rows import CountRows
from .._settings import settings
from .._validation import assert_one_of, check_obs_key, check_positive
from . import _persist
from ._checks import check_counts, check_embedding, check_sections_have_counts, recorded_encoder, standardized_input
from ._training import ExpressionTrainingPlan, ValidationMonitor, deterministic, module_device, validation_scores

__all__ = ["ExpressionModelBase"]

logger = logging.getLogger("stfm")



class ExpressionModelBase(_persist.SafeSaveLoadMixin, UnsupervisedTrainingMixin, BaseModelClass):
    """Base class of stfm's expression models (scvi-tools ``BaseModelClass`` + ``UnsupervisedTrainingMixin``).

    Subclasses set ``_module_cls``, build ``self.module`` in ``__init__`` (then set ``self.init_params_``) and
    may override the hooks :meth:`_prepare_anndata` (derive the model input from the embedding, e.g. neighbour
    pooling), :meth:`_extra_fields` (more registered fields), :meth:`_on_train_start` / :meth:`_on_train_end`
    (e.g. a reference bank restricted to the training sections while validating) or :meth:`train` altogether
    (closed-form fits).

    Every model predicts ``composition × library size``: ``scale`` sums to 1 over the gene panel and the library
    size is the predicted one, the observed one or a number (see :meth:`predict`).
    """

    _training_plan_cls = ExpressionTrainingPlan  # scvi-tools' plan, DDP-safe extra metrics

    _module_cls: ClassVar[type]
    method_key: ClassVar[str] = ""
    method_needs: ClassVar[tuple[str, ...]] = ()
    method_supports: ClassVar[tuple[str, ...]] = ()

    def __init__(self, adata: AnnData | None = None, registry: dict | None = None) -> None:
        super().__init__(adata, registry=registry)
        setup = self.registry_[_SETUP_ARGS_KEY]
        self.embedding_key_: str = setup["embedding_key"]
        #: encoder recorded in the training embedding's provenance (``None`` when not recorded)
        self.encoder_: str | None = None if adata is None else recorded_encoder(adata, self.embedding_key_)
        #: width of the raw embedding (before any derived input such as neighbour pooling)
        self.n_embedding_: int = int(self.summary_stats.get("n_embedding_raw", self.summary_stats[f"n_{EXPR_KEYS.EMBEDDING_KEY}"]))
        if adata is not None:
            self.n_embedding_ = int(np.asarray(adata.obsm[self.embedding_key_]).shape[1])
        self.best_epoch_: int | None = None
        self.validation_sections_: list[str] = []
        self.validation_history_: pd.DataFrame | None = None
        self.selection_metric_: str = "mean"
        self.smoothing_: int = 0
        #: validation scores (raw, composition, mean) of each smoothing candidate
        self.smoothing_scores_: dict[str, dict[str, float]] = {}
        self.gene_sets_: dict[str, list[str]] = {}
        self.training_sections_: list[str] = []
        self.fit_time_s_: float = float("nan")

    # ------------------------------------------------------------------------------------------------
    # registration
    # ------------------------------------------------------------------------------------------------
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
        embedding_standardize: Literal["none", "section"] = "none",
        **kwargs: Any,
    ) -> None:
        """Register an AnnData: raw counts of the gene panel, the H&E embedding, section and patient labels.

        Parameters
        ----------
        adata
            Spots × genes with raw counts in ``X`` (or ``layer``); ``obsm[embedding_key]`` holds the embedding.
        embedding_key
            obsm key of the embedding (e.g. ``'X_efficientnet_lite0'`` from :func:`stfm.pp.extract_features`).
        layer
            Layer with raw counts (``None``: ``X``).
        section_key
            obs column naming each spot's section (validation sections, spatial neighbours).
        patient_key
            obs column naming each spot's patient.
        spatial_key
            obsm key of the spot centres (used by methods and options that need space).
        embedding_standardize
            ``'section'``: centre and scale every embedding dimension within each section with that section's own
            statistics before the model sees it (label-free; a query is standardised the same way, per query
            section, so it must be predicted whole). Removes section- and patient-level shifts of the image
            features (staining, scanner). Stored in ``obsm[f'{embedding_key}_section_z']``. ``'none'``: as given.
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        cls._register(adata, setup_method_args, **kwargs)

    @classmethod
    def _register(cls, adata: AnnData, setup_method_args: dict, **kwargs: Any) -> None:
        """The shared registration skeleton: checks, the :meth:`_prepare_anndata` hook, fields, manager."""
        args = setup_method_args[_SETUP_ARGS_KEY]
        is_query = kwargs.get("source_registry") is not None
        if adata.n_obs == 0:
            msg = "The AnnData has 0 spots; register at least one spot."
            raise ValueError(msg)
        if not is_query:
            check_counts(adata, args.get("layer"))
        check_embedding(adata, args["embedding_key"])
        for key in (args.get("section_key"), args.get("patient_key")):
            if key is not None:
                check_obs_key(adata, key, hint="Pass `section_key=` / `patient_key=` naming existing columns, or None.")
        if args.get("section_key") is not None and not is_query:
            check_sections_have_counts(adata, args["section_key"], args.get("layer"))
        input_key = cls._model_input(adata, args, where="the training data")
        fields: list[BaseAnnDataField] = [
            LayerField(EXPR_KEYS.X_KEY, args.get("layer"), is_count_data=True),
            ObsmField(EXPR_KEYS.EMBEDDING_KEY, input_key),
            CategoricalObsField(EXPR_KEYS.SECTION_KEY, args.get("section_key")),
            CategoricalObsField(EXPR_KEYS.PATIENT_KEY, args.get("patient_key")),
            *cls._extra_fields(adata, args),
        ]
        manager = AnnDataManager(fields=fields, setup_method_args=setup_method_args)
        scvi_log = logging.getLogger("scvi")
        level = scvi_log.level
        scvi_log.setLevel(max(level, logging.WARNING))  # scvi logs every field at info level ("column names …")
        try:
            manager.register_fields(adata, **kwargs)
        finally:
            scvi_log.setLevel(level)
        cls.register_manager(manager)

    @classmethod
    def _model_input(cls, adata: AnnData, args: dict[str, Any], *, where: str) -> str:
        """obsm key of the model input: the embedding, standardised per section when ``embedding_standardize`` asks
        for it, then passed through :meth:`_prepare_anndata`. The one path of training data and queries."""
        return cls._prepare_anndata(adata, standardized_input(adata, args, where=where))

    @classmethod
    def _prepare_anndata(cls, adata: AnnData, args: dict[str, Any]) -> str:
        """Hook: write derived inputs into ``adata`` and return the obsm key of the model input (default: the
        embedding itself). Called on training data and, through :meth:`_query_arrays`, on every query."""
        return args["embedding_key"]

    @classmethod
    def _query_obs(cls, args: dict[str, Any]) -> list[str]:
        """Hook: obs columns a query must carry into :meth:`_prepare_anndata` (default none)."""
        return []

    @classmethod
    def _extra_fields(cls, adata: AnnData, args: dict[str, Any]) -> list[BaseAnnDataField]:
        """Hook: additional scvi-tools fields (default none)."""
        return []

    # ------------------------------------------------------------------------------------------------
    # properties
    # ------------------------------------------------------------------------------------------------
    @property
    def genes(self) -> list[str]:
        """The gene panel, in output order."""
        names = self.registry_["field_registries"][EXPR_KEYS.X_KEY]["state_registry"]["column_names"]
        return [str(g) for g in names]

    @property
    def setup_args(self) -> dict[str, Any]:
        """Arguments given to :meth:`setup_anndata`."""
        return dict(self.registry_[_SETUP_ARGS_KEY])

    @property
    def method(self) -> str:
        """The registry key of this model's method."""
        return type(self).method_key

    def _require_data(self) -> AnnData:
        if self.adata is None:
            msg = f"This {type(self).__name__} was loaded without training data; pass a query AnnData."
            raise ValueError(msg)
        return self.adata

    # ------------------------------------------------------------------------------------------------
    # data access
    # ------------------------------------------------------------------------------------------------
    def _section_labels(self) -> np.ndarray:
        codes = np.asarray(self.adata_manager.get_from_registry(EXPR_KEYS.SECTION_KEY)).ravel().astype(int)
        cats = self.adata_manager.get_state_registry(EXPR_KEYS.SECTION_KEY).categorical_mapping
        return np.asarray([str(c) for c in cats], dtype=object)[codes]

    def _training_arrays(self, idx: np.ndarray | None = None) -> dict[str, Any]:
        """Registered counts, model input, section labels and coordinates of rows ``idx``.

        ``counts`` is a :class:`~stfm._rows.CountRows`: sparse, read dense a block of rows at a time."""
        adata = self._require_data()
        n = adata.n_obs
        idx = np.arange(n) if idx is None else np.asarray(idx)
        x = self.adata_manager.get_from_registry(EXPR_KEYS.X_KEY)
        x = sparse.csr_matrix(x)[idx]
        emb = np.asarray(self.adata_manager.get_from_registry(EXPR_KEYS.EMBEDDING_KEY), dtype=np.float32)[idx]
        spatial_key = self.setup_args.get("spatial_key") or "spatial"
        coords = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[idx, :2] if spatial_key in adata.obsm else None
        counts = CountRows(x)
        out = {"embedding": emb, "counts_sparse": counts.sparse, "counts": counts, "groups": self._section_labels()[idx],
               "coords": coords}  # fmt: skip
        out.update(self._extra_arrays(adata, idx))
        return out

    def _extra_arrays(self, adata: AnnData, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Hook: registered extra fields (by registry key) for rows ``idx``."""
        return {}

    def _query_arrays(self, adata: AnnData, use_rep: str | None = None) -> dict[str, Any]:
        """Checked inputs of a query: model input, counts of the panel (or ``None``), sections, coordinates."""
        if not isinstance(adata, AnnData):
            msg = f"Expected an AnnData query, found {type(adata).__name__}; pass `stfm.get.table(sdata, table_key)`."
            raise TypeError(msg)
        if adata.n_obs == 0:
            msg = "The query has 0 spots: nothing to predict. Check the subset or the tile table."
            raise ValueError(msg)
        setup = self.setup_args
        emb_key = use_rep or setup["embedding_key"]
        emb = check_embedding(adata, emb_key, n_dims=self.n_embedding_)
        enc = recorded_encoder(adata, emb_key)
        if enc is not None and self.encoder_ is not None and enc != self.encoder_:
            msg = (
                f"The query embedding `obsm[{emb_key!r}]` was made with encoder {enc!r}, but the model was trained on "
                f"{self.encoder_!r} embeddings. Run `stfm.pp.extract_features(adata, {self.encoder_!r})` on the query first."
            )
            raise ValueError(msg)
        genes = pd.Index(self.genes)
        layer = setup.get("layer")
        counts = None
        if adata.n_vars and genes.isin(adata.var_names).all():
            src = adata[:, genes].X if layer is None or layer not in adata.layers else adata[:, genes].layers[layer]
            try:
                check_counts(AnnData(X=src))
                counts = sparse.csr_matrix(src, dtype=np.float32)
            except ValueError:
                counts = None  # not counts (e.g. a normalised query): predictions do not need them
        sec_key = setup.get("section_key")
        groups = adata.obs[sec_key].astype(str).to_numpy() if sec_key is not None and sec_key in adata.obs else np.full(adata.n_obs, "query", dtype=object)
        spatial_key = setup.get("spatial_key") or "spatial"
        coords = None
        if spatial_key in adata.obsm:
            from .._validation import check_spatial

            coords = check_spatial(adata, spatial_key, purpose="the model's spatial inputs", where="query")
        q = AnnData(obs=pd.DataFrame(index=pd.RangeIndex(adata.n_obs).astype(str)))
        if sec_key is not None:
            q.obs[sec_key] = groups
        for col in type(self)._query_obs(setup):  # obs columns the method reads (e.g. nuclei counts)
            check_obs_key(adata, col, hint="The model was trained with it as an input; compute it for the query too.")
            q.obs[col] = adata.obs[col].to_numpy()
        q.obsm[setup["embedding_key"]] = emb
        if coords is not None:
            q.obsm[spatial_key] = coords
        input_key = type(self)._model_input(q, setup, where="the query")
        out = {"embedding": np.asarray(q.obsm[input_key], dtype=np.float32), "counts_sparse": counts,
               "groups": groups, "coords": coords}  # fmt: skip
        out.update(self._extra_arrays(q, np.arange(adata.n_obs)))
        return out

    # ------------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------------
    def _split_validation(self, validation_sections: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Training and validation row indices: whole sections are held out (default: the last section by name)."""
        labels = self._section_labels()
        present = sorted(pd.unique(labels))
        if validation_sections is None:
            validation_sections = self._default_validation(present)
        else:
            validation_sections = [validation_sections] if isinstance(validation_sections, str) else [str(s) for s in validation_sections]
            unknown = [s for s in validation_sections if s not in present]
            if unknown:
                msg = f"Validation section(s) {unknown} are not in the training data; its sections are {present}."
                raise ValueError(msg)
            if len(set(validation_sections)) >= len(present):
                msg = "`validation_sections` would leave no section to train on; keep at least one for training."
                raise ValueError(msg)
        val = np.isin(labels, list(validation_sections))
        return np.flatnonzero(~val), np.flatnonzero(val), list(validation_sections)

    def _default_validation(self, sections: list[str]) -> list[str]:
        """Hook: validation sections when none are given (default: the last section by name, if there are two)."""
        return [sections[-1]] if len(sections) >= 2 else []

    def _on_train_start(self, train_idx: np.ndarray, val_idx: np.ndarray) -> None:
        """Hook called before the epochs run (e.g. restrict a reference bank to the training rows)."""

    def _on_train_end(self, train_idx: np.ndarray, val_idx: np.ndarray, val_arrays: dict[str, Any] | None) -> None:
        """Hook called after the best epoch is restored, before smoothing is chosen (e.g. pick retrieval ``k``)."""

    def train(
        self,
        max_epochs: int = 300,
        *,
        validation_sections: Sequence[str] | None = None,
        early_stopping: bool = True,
        early_stopping_patience: int = 30,
        early_stopping_monitor: Literal["pearson", "elbo"] = "pearson",
        selection_metric: Literal["mean", "raw", "composition"] = "mean",
        smoothing: int | Sequence[int] | None = (0, 4, 8),
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
            Sections held out for early stopping and for choosing smoothing. ``None`` picks the last section (by
            name) when there are at least two; with a single section there is no validation split, training runs
            for ``max_epochs`` and smoothing stays off (with a warning).
        early_stopping
            Stop when the validation score has not improved for ``early_stopping_patience`` epochs; the weights of
            the best validation epoch are restored either way.
        early_stopping_patience
            Epochs without improvement before stopping.
        early_stopping_monitor
            ``'pearson'``: the validation score of ``selection_metric`` on predictions with the library size
            predicted from the image (as for an H&E-only section). ``'elbo'``: scvi's ``elbo_validation`` (the
            negative log-likelihood; lower is better).
        selection_metric
            What "better on validation" means for epochs and smoothing: ``'raw'`` (Pearson of log1p counts),
            ``'composition'`` (Pearson of log1p counts per 10k) or ``'mean'`` of the two (see
            :func:`validation_scores`).
        smoothing
            Candidate numbers of spatial neighbours to average each prediction with (0 = none); the best on the
            validation sections is stored in :attr:`smoothing_` and used by :meth:`predict`. An int fixes it.
        lr, weight_decay
            AdamW learning rate and weight decay (scvi :class:`~scvi.train.TrainingPlan`).
        batch_size
            Minibatch size.
        accelerator, devices
            Lightning device selection (``strategy=`` and other :class:`~scvi.train.Trainer` arguments go through
            ``**trainer_kwargs``).
        plan_kwargs
            Extra arguments for :class:`~scvi.train.TrainingPlan`.
        **trainer_kwargs
            Extra arguments for :class:`~scvi.train.Trainer`.
        """
        assert_one_of(early_stopping_monitor, ("pearson", "elbo"), name="early_stopping_monitor")
        self.selection_metric_ = assert_one_of(selection_metric, ("mean", "raw", "composition"), name="selection_metric")
        check_positive(max_epochs, name="max_epochs")
        train_idx, val_idx, val_secs = self._split_validation(validation_sections)
        if len(val_idx) == 0 and early_stopping:
            warnings.warn(
                "Too few sections for a validation section, so early stopping is off and training runs for "
                f"max_epochs={max_epochs}. Register more sections (`section_key=`) to choose epochs on held-out data.",
                UserWarning,
                stacklevel=2,
            )
            early_stopping = False
        self.validation_sections_ = val_secs
        self._on_train_start(train_idx, val_idx)
        val_arrays = self._training_arrays(val_idx) if len(val_idx) else None
        plan = {"lr": lr, "weight_decay": weight_decay, "optimizer": "AdamW", **(plan_kwargs or {})}
        callbacks = list(trainer_kwargs.pop("callbacks", []))
        monitor = None
        if val_arrays is not None:
            monitor = ValidationMonitor(self, val_arrays, metric=self.selection_metric_,
                                         patience=early_stopping_patience if early_stopping else None,
                                         elbo=early_stopping_monitor == "elbo")  # fmt: skip
            callbacks.append(monitor)
        trainer_kwargs.setdefault("enable_progress_bar", bool(settings.show_progress_bar))
        trainer_kwargs.setdefault("check_val_every_n_epoch", 1 if len(val_idx) else None)
        # scvi-tools leaves the module in eval mode after every fit: a second training stage (or a refit) would
        # otherwise run with dropout off and normalisation frozen
        self.module.train()
        with warnings.catch_warnings(), deterministic(self.module):
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*not contain raw count.*")
            # Lightning's notes on small data (a few batches per epoch; graph batches it cannot size) are not problems
            warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
            warnings.filterwarnings("ignore", message=".*infer the `batch_size` from an ambiguous collection.*")
            out = super().train(
                max_epochs=int(max_epochs),
                accelerator=accelerator,
                devices=devices,
                batch_size=batch_size,
                early_stopping=False,
                datasplitter_kwargs={"external_indexing": [train_idx, val_idx, np.array([], dtype=int)]},
                plan_kwargs=plan,
                callbacks=callbacks,
                **trainer_kwargs,
            )
        if monitor is not None:
            monitor.restore_from(getattr(self, "trainer", None))
        if monitor is not None and monitor.best_epoch is not None:
            self.best_epoch_ = monitor.best_epoch
            self.validation_history_ = pd.DataFrame(monitor.rows)
        else:
            self.best_epoch_ = int(self.history["train_loss"].index[-1]) if self.history else int(max_epochs) - 1
            self.validation_history_ = None
        self.module.eval()
        self._on_train_end(train_idx, val_idx, val_arrays)
        self._choose_smoothing(val_arrays, smoothing)
        return out

    def _choose_smoothing(
        self, val_arrays: dict[str, Any] | None, candidates: int | Sequence[int] | None, parts: dict[str, Any] | None = None
    ) -> None:
        """Store in :attr:`smoothing_` the neighbour count that scores best on the validation sections.

        ``parts`` (composition and log library of the validation rows) defaults to the current module's
        predictions; closed-form methods pass out-of-fold predictions instead.
        """
        if candidates is None:
            self.smoothing_ = 0
            return
        if isinstance(candidates, int | np.integer):
            if int(candidates) < 0:
                msg = f"Expected `smoothing` >= 0 neighbours, found {candidates}."
                raise ValueError(msg)
            self.smoothing_ = int(candidates)
            return
        cands = sorted({int(k) for k in candidates})
        if any(k < 0 for k in cands):
            msg = f"Expected `smoothing` candidates >= 0, found {cands}."
            raise ValueError(msg)
        if val_arrays is None or val_arrays.get("coords") is None or cands == [0]:
            if cands != [0] and val_arrays is None:
                logger.info("no validation section: neighbour smoothing stays off")
            self.smoothing_ = 0
            return
        parts = self._predict_parts(val_arrays) if parts is None else parts
        scores = {}
        for k in cands:
            mean = self._combine(parts, val_arrays, library_size="predicted", smooth=k, return_std=False)[0]
            scores[str(k)] = validation_scores(mean, val_arrays["counts"], val_arrays["groups"])
        self.smoothing_scores_ = scores
        self.smoothing_ = int(max(scores, key=lambda k: scores[k][self.selection_metric_]))
        logger.info("smoothing chosen on validation sections: k=%d (%s)", self.smoothing_, scores)

    # ------------------------------------------------------------------------------------------------
    # prediction
    # ------------------------------------------------------------------------------------------------
    def _batch_tensors(self, arrays: dict[str, Any], rows: slice) -> dict[str, torch.Tensor]:
        dev = module_device(self.module)
        t = {EXPR_KEYS.EMBEDDING_KEY: torch.as_tensor(arrays["embedding"][rows], device=dev)}
        for key, value in arrays.items():
            if key.startswith("field:"):
                t[key[len("field:"):]] = torch.as_tensor(np.asarray(value[rows], dtype=np.float32), device=dev)
        return t

    @torch.inference_mode()
    def _predict_parts(self, arrays: dict[str, Any], batch_size: int | None = None, *, need_aux: bool = False) -> dict[str, Any]:
        """Composition, log library and (optionally) auxiliary arrays of the module for every row of ``arrays``."""
        was_training = self.module.training
        self.module.eval()
        n = arrays["embedding"].shape[0]
        bs = int(batch_size or settings.batch_size)
        scales, logl, aux = [], [], {}
        for a in range(0, n, bs):
            out = self.module.predict_batch(self._batch_tensors(arrays, slice(a, a + bs)))
            scales.append(out["scale"].float().cpu().numpy())
            logl.append(out["log_library"].float().cpu().numpy().reshape(-1))
            if need_aux:
                for k, v in out.get("aux", {}).items():
                    aux.setdefault(k, []).append(v.float().cpu().numpy())
        self.module.train(was_training)
        return {"scale": np.concatenate(scales).astype(np.float32), "log_library": np.concatenate(logl),
                "aux": {k: np.concatenate(v) for k, v in aux.items()}}  # fmt: skip

    def _combine(self, parts: dict[str, Any], arrays: dict[str, Any], *, library_size: Any, smooth: int,
                 return_std: bool, batch_size: int | None = None) -> list[np.ndarray]:  # fmt: skip
        scale, logl, aux = parts["scale"], parts["log_library"], dict(parts["aux"])
        if smooth:
            from ..graph import smoothing_matrix

            if arrays.get("coords") is None:
                msg = (
                    f"Smoothing over {smooth} neighbours needs spot coordinates in the query's "
                    f"`obsm[{self.setup_args.get('spatial_key') or 'spatial'!r}]`; add them or pass `smooth=0`."
                )
                raise KeyError(msg)
            w = smoothing_matrix(arrays["coords"], smooth, groups=arrays["groups"])
            scale = np.asarray(w @ scale, dtype=np.float32)
            scale /= np.maximum(scale.sum(1, keepdims=True), 1e-12)
            logl = np.asarray(w @ logl)
            aux = {k: np.asarray(w @ v, dtype=np.float32) for k, v in aux.items()}
        n = scale.shape[0]
        if isinstance(library_size, str) and library_size == "predicted":
            lib = np.exp(logl)
        elif isinstance(library_size, str) and library_size == "observed":
            if arrays.get("counts_sparse") is None:
                msg = (
                    "`library_size='observed'` needs raw counts of the model's genes in the query; this table has none. "
                    "Pass a number (e.g. 1e4) or 'predicted'."
                )
                raise ValueError(msg)
            lib = np.asarray(arrays["counts_sparse"].sum(1)).ravel()
        else:
            lib = np.full(n, check_positive(library_size, name="library_size"))
        mean = (scale * lib[:, None].astype(np.float32)).astype(np.float32)
        out = [mean]
        if return_std:
            bs = int(batch_size or settings.batch_size)
            stds = []
            with torch.inference_mode():
                for a in range(0, n, bs):
                    m = torch.as_tensor(mean[a : a + bs])
                    stds.append(self.module.predictive_std(m, {k: torch.as_tensor(v[a : a + bs]) for k, v in aux.items()}).float().numpy())
            out.append(np.concatenate(stds).astype(np.float32))
        out.append(aux)
        return out

    def _predict_arrays(self, arrays: dict[str, Any], *, library_size: Any = 1e4, smooth: int = 0,
                        return_std: bool = False, batch_size: int | None = None) -> list[np.ndarray]:  # fmt: skip
        with deterministic(self.module):
            parts = self._predict_parts(arrays, batch_size, need_aux=return_std)
        return self._combine(parts, arrays, library_size=library_size, smooth=smooth, return_std=return_std, batch_size=batch_size)

    def predict(
        self,
        adata: AnnData | None = None,
        *,
        library_size: float | Literal["observed", "predicted"] = 1e4,
        return_std: bool = False,
        use_rep: str | None = None,
        batch_size: int | None = None,
        smooth: int | None = None,
    ) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
        """Predicted expression: composition × library size, float32 ``(n_obs, n_genes)``.

        Parameters
        ----------
        adata
            Query with the embedding in ``obsm`` (genes optional: an H&E-only table works). ``None``: the training
            data.
        library_size
            A number (the same for every spot; 1e4 gives counts per 10k), ``'observed'`` (sum of the query's counts
            over the panel; needs counts) or ``'predicted'`` (library size predicted from the image).
        return_std
            Also return the predictive standard deviation (same shape; methods listing ``'std'`` in ``supports``).
        use_rep
            obsm key of the query embedding when it differs from the training key.
        batch_size
            Minibatch size (default :attr:`stfm.settings.batch_size`).
        smooth
            Neighbours each spot's prediction is averaged with (composition and log library size, within a
            section); ``None``: :attr:`smoothing_`, the number chosen on validation sections; ``0``: off.

        Returns
        -------
        ``mean`` or ``(mean, std)``.
        """
        self._check_if_trained(warn=True)
        if return_std and not self.module.has_std:
            msg = f"`return_std=True` needs a method with a predictive distribution; {self.method!r} has none."
            raise ValueError(msg)
        arrays = self._training_arrays() if adata is None else self._query_arrays(adata, use_rep)
        k = self.smoothing_ if smooth is None else int(smooth)
        res = self._predict_arrays(arrays, library_size=library_size, smooth=k, return_std=return_std, batch_size=batch_size)
        return (res[0], res[1]) if return_std else res[0]

    def copy(self) -> ExpressionModelBase:
        """A deep copy of the model."""
        return _copy.deepcopy(self)

    def __repr__(self) -> str:
        state = "trained" if self.is_trained_ else "not trained"
        smooth = f", smoothing {self.smoothing_} neighbours" if self.smoothing_ else ""
        return (
            f"{type(self).__name__} (method {self.method!r}) on `obsm[{self.embedding_key_!r}]`, "
            f"{len(self.genes)} genes; {state}{smooth}"
        )
