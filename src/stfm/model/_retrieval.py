"""``RetrievalPredictor`` (method ``'retrieval'``): contrastive image ↔ expression retrieval, after STco / BLEEP."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from anndata import AnnData
from scvi.data.fields import ObsmField

from .._constants import EXPR_KEYS
from .._validation import assert_one_of, check_spatial
from ..module._components import ReferenceBank
from ..module._retrieval import RETRIEVAL_KEYS, RetrievalModule
from ._base import ExpressionModelBase
from ._persist import CheckpointError
from ._registry import register_expression_method
from ._training import input_statistics, validation_scores

__all__ = ["RetrievalPredictor"]

logger = logging.getLogger("stfm")
_POSITION_OBSM = "_stfm_relative_position"


def relative_position(adata: AnnData, spatial_key: str, section_key: str | None) -> np.ndarray:
    """Section-relative spot positions in units of the spot pitch: ``(xy − section minimum) / pitch``."""
    from ..graph import section_indices, spot_pitch

    xy = check_spatial(adata, spatial_key, purpose="the retrieval model's position encoding (or `use_position=False`)")
    groups = adata.obs[section_key].astype(str).to_numpy() if section_key is not None and section_key in adata.obs else None
    out = np.zeros_like(xy, dtype=np.float32)
    for idx in section_indices(groups, adata.n_obs):
        p = spot_pitch(xy[idx]) if idx.size > 1 else 1.0
        out[idx] = (xy[idx] - xy[idx].min(0)) / p
    return out


@register_expression_method(
    "retrieval",
    needs=("embedding", "counts", "reference_bank"),
    supports=("std", "smoothing", "early_stopping", "ensemble"),
    after="STco / BLEEP",
    likelihood="InfoNCE (image ↔ expression + position); weighted top-k of a reference bank",
    summary="image tower vs expression tower, L2-normalised, learned temperature; predicts from retrieved training spots",
)
class RetrievalPredictor(ExpressionModelBase):
    """Predict expression by retrieving the training spots whose expression looks like the query's histology.

    Two towers are trained with symmetric InfoNCE on L2-normalised embeddings and a learned temperature (STco uses
    τ = 1.0 on unnormalised embeddings): an image tower on the foundation-model embedding and an expression tower on
    ``log1p`` counts per 10k plus Fourier features of the section-relative position. A query spot's image embedding
    retrieves the ``k`` bank spots (the training spots, saved with the model) with the most similar expression
    embeddings; the prediction is their weighted mean ``log1p`` composition times their weighted mean library size,
    and the weighted spread of their compositions gives ``layers['predicted_std']``.

    ``k`` and the weighting (STco's ``1/d²`` or a softmax at the learned temperature) are chosen on the validation
    sections after training, among ``k_candidates`` × ``weightings``; the bank used while validating holds only the
    training rows, so a validation spot never retrieves itself.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Registry of a saved model (used by :meth:`load`).
    n_latent, n_hidden, dropout_rate
        Tower sizes and dropout.
    n_frequencies
        Fourier frequencies of the position encoding.
    use_position
        Feed the section-relative position to the expression tower (needs ``obsm[spatial_key]`` for training).
    temperature, learn_temperature
        Initial InfoNCE temperature and whether it is learned.
    k, weighting
        Retrieval settings used until the validation choice (and when there is no validation section).
    k_candidates, weightings
        Grid searched on the validation sections.
    """

    _module_cls = RetrievalModule
    _resizable_buffers = (*ReferenceBank.bank_buffers, "bank_position")

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        *,
        n_latent: int = 128,
        n_hidden: int = 256,
        dropout_rate: float = 0.2,
        n_frequencies: int = 8,
        use_position: bool = True,
        temperature: float = 0.5,
        learn_temperature: bool = True,
        k: int = 50,
        weighting: str = "inverse_square",
        k_candidates: Sequence[int] = (10, 25, 50, 100, 200),
        weightings: Sequence[str] = ("inverse_square", "softmax"),
    ) -> None:
        super().__init__(adata, registry=registry)
        for w in (weighting, *weightings):
            assert_one_of(w, ("inverse_square", "softmax"), name="weighting")
        if int(k) < 1 or any(int(c) < 1 for c in k_candidates):
            msg = f"Expected positive `k` and `k_candidates`, found k={k!r}, k_candidates={list(k_candidates)!r}."
            raise ValueError(msg)
        self.k_candidates = tuple(int(c) for c in k_candidates)
        self.weightings = tuple(weightings)
        n_input = int(self.summary_stats[f"n_{EXPR_KEYS.EMBEDDING_KEY}"])
        stats: dict[str, Any] = {}
        if adata is not None:
            emb = np.asarray(self.adata_manager.get_from_registry(EXPR_KEYS.EMBEDDING_KEY), dtype=np.float64)
            stats = input_statistics(self._training_arrays()["counts"], emb, library=False)
            if use_position and not np.any(self.adata.obsm[_POSITION_OBSM]):
                msg = (
                    "`use_position=True` needs spot coordinates in the training data "
                    f"(`obsm[{self.setup_args.get('spatial_key')!r}]`); add them or pass `use_position=False`."
                )
                raise ValueError(msg)
        self.module = self._module_cls(
            n_input, int(self.summary_stats.n_vars), n_latent=n_latent, n_hidden=n_hidden, dropout_rate=dropout_rate,
            n_frequencies=n_frequencies, use_position=use_position, temperature=temperature,
            learn_temperature=learn_temperature, k=k, weighting=weighting, **stats,
        )  # fmt: skip
        if adata is not None:
            self._set_bank(None)
        self.k_ = int(k)
        self.weighting_ = weighting
        self.retrieval_scores_: dict[str, float] = {}
        self._model_summary_string = (
            f"RetrievalPredictor on `obsm[{self.embedding_key_!r}]` ({n_input} dims), {self.summary_stats.n_vars} genes, "
            f"latent {n_latent}, k={k}"
        )
        self.init_params_ = self._get_init_params(locals())

    @classmethod
    def _extra_fields(cls, adata: AnnData, args: dict[str, Any]) -> list:
        spatial_key = args.get("spatial_key") or "spatial"
        if spatial_key in adata.obsm:
            adata.obsm[_POSITION_OBSM] = relative_position(adata, spatial_key, args.get("section_key"))
        else:
            adata.obsm[_POSITION_OBSM] = np.zeros((adata.n_obs, 2), np.float32)
        return [ObsmField(RETRIEVAL_KEYS.POSITION, _POSITION_OBSM)]

    def _set_bank(self, idx: np.ndarray | None) -> None:
        arrays = self._training_arrays(idx)
        pos = np.asarray(self.adata.obsm[_POSITION_OBSM], dtype=np.float32)
        self.module.set_bank(arrays["counts"], pos if idx is None else pos[idx])

    def _on_train_start(self, train_idx: np.ndarray, val_idx: np.ndarray) -> None:
        # while validating, the bank holds the training rows only: a validation spot never retrieves itself
        self._set_bank(train_idx)

    def _on_train_end(self, train_idx: np.ndarray, val_idx: np.ndarray, val_arrays: dict[str, Any] | None) -> None:
        if val_arrays is not None:
            scores = {}
            ks = [k for k in self.k_candidates if k <= self.module.bank_size] or [self.module.bank_size]
            for k in ks:
                for w in self.weightings:
                    self.module.k, self.module.weighting = k, w
                    mean = self._predict_arrays(val_arrays, library_size="predicted")[0]
                    scores[f"{k}|{w}"] = validation_scores(mean, val_arrays["counts"], val_arrays["groups"])[self.selection_metric_]
            best = max(scores, key=lambda s: scores[s])
            self.k_, self.weighting_ = int(best.split("|")[0]), best.split("|")[1]
            self.retrieval_scores_ = scores
            logger.info("retrieval chosen on validation sections: k=%d, %s weights", self.k_, self.weighting_)
        self.module.k, self.module.weighting = self.k_, self.weighting_
        # the final bank: every registered training spot
        self._set_bank(None)
        self.module.eval()

    def train(self, max_epochs: int = 100, *, batch_size: int = 256, early_stopping_patience: int = 20, **kwargs: Any):
        """:meth:`ExpressionModelBase.train <stfm.model.ExpressionModelBase.train>` with retrieval defaults
        (100 epochs, batches of 256 for InfoNCE, patience 20)."""
        return super().train(max_epochs, batch_size=batch_size, early_stopping_patience=early_stopping_patience, **kwargs)

    @classmethod
    def _check_state(cls, state: dict[str, Any], where: str) -> None:
        bank = state.get("bank_loglib")
        if bank is None or bank.shape[0] == 0 or "bank_comp_values" not in state:
            msg = (
                f"The retrieval model in {where!r} has no reference bank (the training spots it predicts from, "
                "`bank_comp_*` / `bank_loglib` in model.safetensors). The folder is incomplete; save the trained model again."
            )
            raise CheckpointError(msg)

    def _check_loaded(self, where: str) -> None:
        self.module.k, self.module.weighting = int(self.k_), self.weighting_
