"""``MultimodalPredictor`` (method ``'multimodal'``): image, spatial and gene encoders aligned by contrast, then
cross-attention fusion with expression retrieved from other sections and a ZINB decoder (after SPAM)."""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from anndata import AnnData

from .._constants import EXPR_KEYS
from .._rows import RowRef
from .._validation import assert_one_of, check_spatial
from ..module._components import ReferenceBank
from ..module._multimodal import MultimodalModule
from ._base import ExpressionModelBase
from ._graph_common import SectionGraphMixin
from ._persist import CheckpointError
from ._registry import register_expression_method
from ._training import input_statistics, module_device

__all__ = ["MultimodalPredictor"]

logger = logging.getLogger("stfm")


def _knn_edges(coords: np.ndarray, k: int) -> torch.Tensor:
    """kNN edges of one graph batch, neighbour → spot, as a ``(2, n·k)`` edge index."""
    from ..graph import knn_indices

    n = len(coords)
    if n < 2:
        return torch.zeros((2, 0), dtype=torch.long)
    nbr = knn_indices(coords, min(int(k), n - 1))
    dst = np.repeat(np.arange(n), nbr.shape[1])
    return torch.as_tensor(np.stack([nbr.ravel(), dst]), dtype=torch.long)


@register_expression_method(
    "multimodal",
    needs=("embedding", "counts", "spatial", "reference_bank"),
    supports=("std", "smoothing", "early_stopping", "ensemble"),
    after="SPAM",
    likelihood="ZINB on counts with library size (+ composition term); stage 1 InfoNCE between the three encoders",
    summary="image / spatial-GCN / gene encoders aligned by InfoNCE, cross-attention over neighbours, retrieved genes",
)
class MultimodalPredictor(SectionGraphMixin, ExpressionModelBase):
    """Predict expression of spots or cells from H&E with three aligned encoders and cross-attention (after SPAM).

    **Stage 1** aligns an image encoder (on the foundation-model embedding), a spatial encoder (two GCN layers over the
    kNN-``k_spatial`` graph of each section) and a gene encoder (on ``log1p`` counts per 10k) with symmetric InfoNCE
    between every pair (temperature ``temperature``; SPAM: 0.15). **Stage 2** fuses, per spot, its image and spatial
    embeddings with the gene encoder's embedding of the expression *retrieved* from the reference bank, attends over
    its neighbours' image tokens and decodes a ZINB on raw counts with library size
    (:class:`~stfm.module.MultimodalModule`). The epochs of both stages are chosen on validation sections of the
    training patients (stage 1 by the validation InfoNCE, stage 2 by the validation score).

    **What the gene branch reads.** SPAM trains its gene branch on the spot's true expression and feeds a mean
    expression vector at inference. Here the gene branch reads, in training *and* at inference, the
    similarity-weighted mean of the ``k_retrieve`` most similar bank spots of **other** sections: in training,
    other training sections (never the spot's own section, never a validation section); for validation, the
    training sections; for a new section, every bank section except a namesake of the query's own. Similarity is
    measured in the aligned space (``retrieval='aligned'``: the query's stage-1 image embedding against the bank's
    gene embeddings) or on the embeddings themselves (``'embedding'``).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (at least two sections, with coordinates).
    registry
        Registry of a saved model.
    n_latent, n_hidden, heads, dropout_rate
        Network sizes. The dropout (0.6) was chosen inside patient C of her2st (train C2–C5, score C6; see
        ``docs/benchmarks/expression.md``): full-section batches give few steps per epoch and overfit quickly.
    temperature
        InfoNCE temperature of stage 1 (SPAM: 0.15).
    k_spatial
        Neighbours of the spatial graph (SPAM: 12).
    k_retrieve, retrieval_temperature, retrieval
        Bank spots per query, the softmax temperature over their cosine similarities, and the retrieval space
        (default ``'embedding'``: it scored above ``'aligned'`` on the C6 validation section,
        ``docs/benchmarks/expression.md``).
    composition_weight
        Weight of the composition term added to the ZINB likelihood.
    block_size
        Largest number of spots in one graph batch (larger sections are cut into spatial blocks with halos).
    """

    _module_cls = MultimodalModule
    _resizable_buffers = (*ReferenceBank.bank_buffers, "bank_z")

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        *,
        n_latent: int = 128,
        n_hidden: int = 256,
        heads: int = 4,
        dropout_rate: float = 0.6,
        temperature: float = 0.15,
        k_spatial: int = 12,
        k_retrieve: int = 16,
        retrieval_temperature: float = 0.1,
        retrieval: Literal["aligned", "embedding"] = "embedding",
        composition_weight: float = 1.0,
        block_size: int = 4096,
    ) -> None:
        super().__init__(adata, registry=registry)
        assert_one_of(retrieval, ("aligned", "embedding"), name="retrieval")
        if int(k_spatial) < 1 or int(k_retrieve) < 1 or int(block_size) < 1 or not retrieval_temperature > 0:
            msg = (
                "Expected k_spatial >= 1, k_retrieve >= 1, block_size >= 1 and retrieval_temperature > 0; found "
                f"{k_spatial}, {k_retrieve}, {block_size}, {retrieval_temperature}."
            )
            raise ValueError(msg)
        self.k_spatial, self.k_retrieve = int(k_spatial), int(k_retrieve)
        self.retrieval_temperature, self.retrieval = float(retrieval_temperature), str(retrieval)
        self.block_size = int(block_size)
        # the receptive field is 2 GCN hops + 1 attention hop over kNN-k edges; a kNN-12 hop reaches ~2.3 pitches
        self.n_layers, self.pitches = 3, 0.8 * float(np.sqrt(self.k_spatial))
        n_input = int(self.summary_stats[f"n_{EXPR_KEYS.EMBEDDING_KEY}"])
        stats: dict[str, Any] = {}
        self.bank_sections_: list[str] = []
        if adata is not None:
            arrays = self._training_arrays()
            sections = list(dict.fromkeys(arrays["groups"]))
            if len(sections) < 2:
                msg = (
                    f"multimodal retrieves expression from *other* sections: it needs at least two training sections, "
                    f"found {sections}. Register several sections (`section_key=`) or use another method."
                )
                raise ValueError(msg)
            stats = input_statistics(arrays["counts"], arrays["embedding"])
            self.bank_sections_ = sections
        self.module = self._module_cls(
            n_input, int(self.summary_stats.n_vars), n_latent=n_latent, n_hidden=n_hidden, heads=heads,
            dropout_rate=dropout_rate, temperature=temperature, composition_weight=composition_weight, **stats,
        )  # fmt: skip
        if adata is not None:
            codes = np.asarray([self.bank_sections_.index(s) for s in arrays["groups"]])
            self.module.set_bank(arrays["embedding"], arrays["counts"], codes)
        self._allowed: list[str] = list(self.bank_sections_)
        self.best_epoch_pretrain_: int | None = None
        self._model_summary_string = (
            f"MultimodalPredictor on `obsm[{self.embedding_key_!r}]`, {self.summary_stats.n_vars} genes, "
            f"kNN-{self.k_spatial} graph, top-{self.k_retrieve} retrieval ({self.retrieval})"
        )
        self.init_params_ = self._get_init_params(locals())

    @classmethod
    def _prepare_anndata(cls, adata: AnnData, args: dict[str, Any]) -> str:
        check_spatial(adata, args.get("spatial_key") or "spatial", purpose="multimodal's spatial kNN graph")
        return args["embedding_key"]

    # -- retrieval -------------------------------------------------------------------------------------------
    def _retrieve(self, emb: np.ndarray, allowed: list[str]) -> tuple[RowRef, torch.Tensor]:
        """Similarity-weighted log composition (a :class:`~stfm._rows.RowRef` into the bank, summed when the batch is
        used) and log depth of the top-``k_retrieve`` bank spots of ``allowed``."""
        from ..graph import similarity_topk

        codes = [self.bank_sections_.index(s) for s in allowed if s in self.bank_sections_]
        rows = np.flatnonzero(np.isin(self.module.bank_section.cpu().numpy(), codes))
        if rows.size == 0:
            msg = "multimodal has no reference section to retrieve from (the bank is empty or every section was excluded)."
            raise ValueError(msg)
        dev = module_device(self.module)
        q = self.module.retrieval_keys(torch.as_tensor(emb, dtype=torch.float32, device=dev), self.retrieval)
        keys = self.module.bank_keys(self.retrieval)[torch.as_tensor(rows, device=dev)]
        idx, sim = similarity_topk(q, keys, min(self.k_retrieve, rows.size), normalize=False)
        w = torch.softmax(torch.as_tensor(sim) / self.retrieval_temperature, dim=1)
        bank_rows = rows[idx]
        comp = RowRef("bank", bank_rows, w.numpy())
        loglib = (w * self.module.bank_loglib.cpu()[torch.as_tensor(bank_rows)]).sum(1)
        return comp, loglib

    def _graph(self, emb: np.ndarray, coords: np.ndarray, count_rows: np.ndarray | None, core: np.ndarray,
               allowed: list[str] | None) -> dict[str, Any]:  # fmt: skip
        """One graph batch; ``count_rows``: the spots' rows in the registered data (training) or ``None`` (a query).
        Gene-wide entries are :class:`~stfm._rows.RowRef` s, densified when the batch is used."""
        n = len(emb)
        g = {
            "x": torch.as_tensor(emb, dtype=torch.float32),
            "counts": torch.zeros((n, self.module.n_genes)) if count_rows is None else RowRef("counts", count_rows),
            "core": torch.as_tensor(core.astype(np.float32)),
            "knn_index": _knn_edges(coords, self.k_spatial),
        }
        if allowed is not None:
            g["retrieved"], g["retrieved_loglib"] = self._retrieve(emb, allowed)
        return g

    def _graphs(self, idx: np.ndarray) -> list[dict]:
        arrays = self._training_arrays(idx)
        sections = list(dict.fromkeys(arrays["groups"]))
        fuse = self.module.stage == "fuse"
        graphs = []
        for sec in sections:
            rows = np.flatnonzero(arrays["groups"] == sec)
            coords = arrays["coords"][rows]
            # a spot never retrieves from its own section; validation sections are never retrieved from
            allowed = [s for s in self._allowed if s != sec] if fuse else None
            if fuse and not allowed:
                msg = "multimodal needs at least two training sections besides the validation sections."
                raise ValueError(msg)
            for core, members in self._blocks(coords):
                r = rows[members]
                graphs.append(self._graph(arrays["embedding"][r], coords[members], np.asarray(idx)[r],
                                          np.isin(members, core), allowed))  # fmt: skip
        return graphs

    _training_graphs = _graphs
    _validation_graphs = _graphs

    def _query_graph(self, emb: np.ndarray, coords: np.ndarray, section: str, core: np.ndarray, fields: dict) -> dict:
        """A query block; its gene branch reads expression retrieved from every allowed bank section except a
        namesake of the query's own section (its own expression is never read)."""
        return self._graph(emb, coords, None, core, [s for s in self._allowed if s != section])

    # -- training --------------------------------------------------------------------------------------------
    def _default_validation(self, sections: list[str]) -> list[str]:
        # a validation section needs two training sections beside it (a spot's section and one to retrieve from)
        return [sections[-1]] if len(sections) >= 3 else []

    def _on_train_start(self, train_idx: np.ndarray, val_idx: np.ndarray) -> None:
        groups = self._section_labels()
        self._allowed = list(dict.fromkeys(groups[train_idx]))  # validation sections are never retrieved from
        self._use_graph_batches()

    def _on_train_end(self, train_idx: np.ndarray, val_idx: np.ndarray, val_arrays: dict[str, Any] | None) -> None:
        self._allowed = list(self.bank_sections_)
        self._stop_graph_batches()

    def train(
        self,
        max_epochs: int = 200,
        *,
        pretrain_epochs: int = 200,
        pretrain_patience: int = 20,
        early_stopping_patience: int = 30,
        **kwargs: Any,
    ):
        """Stage 1 (contrastive pretraining), then stage 2 (fusion + ZINB), each with its epochs chosen on the
        validation sections.

        Parameters
        ----------
        max_epochs, early_stopping_patience
            Stage 2: at most this many epochs, the best by the validation score.
        pretrain_epochs, pretrain_patience
            Stage 1: at most this many epochs, the one with the lowest validation InfoNCE.
        **kwargs
            Passed to :meth:`ExpressionModelBase.train <stfm.model.ExpressionModelBase.train>` for both stages
            (``validation_sections``, ``lr``, ``accelerator``, …; ``smoothing`` applies to stage 2).
        """
        kwargs.pop("batch_size", None)  # a batch is a section graph
        smoothing = kwargs.pop("smoothing", (0, 4, 8))
        selection = kwargs.pop("selection_metric", "mean")
        self.module.stage = "pretrain"
        super().train(pretrain_epochs, early_stopping_monitor="elbo", early_stopping_patience=pretrain_patience,
                      smoothing=None, batch_size=1, **kwargs)  # fmt: skip
        self.best_epoch_pretrain_ = self.best_epoch_
        self.history_pretrain_ = self.history_
        self.module.freeze_retrieval()
        self.module.stage = "fuse"
        return super().train(max_epochs, early_stopping_patience=early_stopping_patience, smoothing=smoothing,
                             selection_metric=selection, batch_size=1, **kwargs)  # fmt: skip

    @classmethod
    def _check_state(cls, state: dict[str, Any], where: str) -> None:
        bank = state.get("bank_x")
        if bank is None or bank.shape[0] == 0:
            msg = (
                f"The multimodal model in {where!r} has no reference bank (the training spots it retrieves "
                "expression from). The folder is incomplete; save the trained model again."
            )
            raise CheckpointError(msg)

    def _check_loaded(self, where: str) -> None:
        self.module.stage = "fuse"
        self._allowed = list(self.bank_sections_)
