"""``HeteroGraphPredictor`` (method ``'hetero_graph'``): a target section linked to the most similar spots of other
sections, which carry their measured expression, in one heterogeneous graph (after SpaHGC)."""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
from anndata import AnnData

from .._constants import EXPR_KEYS
from .._rows import RowRef
from .._validation import check_spatial
from ..module._components import ReferenceBank
from ..module._hetero_graph import HeteroGraphModule
from ._base import ExpressionModelBase
from ._graph_common import SectionGraphMixin
from ._persist import CheckpointError
from ._registry import register_expression_method
from ._training import input_statistics

__all__ = ["HeteroGraphPredictor"]

logger = logging.getLogger("stfm")


@register_expression_method(
    "hetero_graph",
    needs=("embedding", "counts", "spatial", "reference_bank"),
    supports=("std", "smoothing", "early_stopping", "ensemble"),
    after="SpaHGC",
    likelihood="ZINB on counts with library size (SpaHGC's MSE + 0.5 (1 - PCC) as an option)",
    summary="target spots + the top-k similar spots of every other section (carrying expression) in one graph",
)
class HeteroGraphPredictor(SectionGraphMixin, ExpressionModelBase):
    """Predict a section's expression from H&E through the most similar spots of other sections (after SpaHGC).

    For every target spot, the ``k_reference`` most similar spots (cosine of the embeddings) of **each** reference
    section become reference nodes carrying their measured expression. The heterogeneous graph
    (:func:`stfm.graph.reference_graph`) has target → target spatial edges (radius ``pitches`` × pitch, kNN for
    isolated spots), reference → reference similarity edges (``k_reference_knn``) and target ↔ reference links; a
    :class:`~stfm.module.HeteroGraphModule` passes messages over it and decodes each target spot.

    **No leakage.** In training every training section is in turn the target, with the *other* training sections
    (validation sections excluded) as references, so a target's own expression is never reachable; epochs are
    chosen on validation sections predicted from the training sections. A new section is predicted with every
    training section as reference (the bank is saved with the model); a query section named like a bank section
    never links to that section.

    **Scale.** Sections with more than ``block_size`` spots are cut into spatial blocks whose halo covers the
    ``n_layers``-hop receptive field (:func:`stfm.graph.spatial_blocks`), so prediction memory follows the block, not
    the section; similarity search runs in chunks. Training builds the block graphs of every training section once
    and keeps them for all epochs: a 100,000-spot training section peaks at about 7 GB
    (``docs/benchmarks/hetero_graph_scale.md``).

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata` (at least two sections, with coordinates).
    registry
        Registry of a saved model.
    n_hidden, n_layers, heads, dropout_rate
        Network sizes (SpaHGC: 4 layers).
    k_reference
        Most similar spots taken from each reference section per target spot (SpaHGC: 6–7).
    k_reference_knn
        Similarity neighbours among reference nodes (SpaHGC: 3).
    pitches
        Target–target radius in spot pitches.
    loss
        ``'zinb'`` (counts, library size) or ``'mse_pcc'`` (SpaHGC's loss on log1p counts per 10k).
    composition_weight
        Weight of the composition term added to the ZINB likelihood (as in ``'zinb'``).
    contrastive_weight, mask_target, mask_reference
        The masked-view contrastive term.
    block_size
        Largest number of target spots in one graph batch.
    """

    _module_cls = HeteroGraphModule
    _resizable_buffers = ReferenceBank.bank_buffers

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        *,
        n_hidden: int = 256,
        n_layers: int = 4,
        heads: int = 4,
        dropout_rate: float = 0.2,
        k_reference: int = 6,
        k_reference_knn: int = 3,
        pitches: float = 1.5,
        loss: Literal["zinb", "mse_pcc"] = "zinb",
        composition_weight: float = 1.0,
        contrastive_weight: float = 0.1,
        mask_target: float = 0.2,
        mask_reference: float = 0.5,
        block_size: int = 2048,
    ) -> None:
        super().__init__(adata, registry=registry)
        if int(k_reference) < 1 or int(k_reference_knn) < 0 or int(block_size) < 1:
            msg = f"Expected k_reference >= 1, k_reference_knn >= 0, block_size >= 1; found {k_reference}, {k_reference_knn}, {block_size}."
            raise ValueError(msg)
        self.k_reference, self.k_reference_knn = int(k_reference), int(k_reference_knn)
        self.pitches, self.block_size, self.n_layers = float(pitches), int(block_size), int(n_layers)
        n_input = int(self.summary_stats[f"n_{EXPR_KEYS.EMBEDDING_KEY}"])
        stats: dict[str, Any] = {}
        self.bank_sections_: list[str] = []
        if adata is not None:
            arrays = self._training_arrays()
            sections = list(dict.fromkeys(arrays["groups"]))
            if len(sections) < 2:
                msg = (
                    f"hetero_graph links each training section to *other* sections: it needs at least two training "
                    f"sections, found {sections}. Register several sections (`section_key=`) or use another method."
                )
                raise ValueError(msg)
            stats = input_statistics(arrays["counts"], arrays["embedding"])
            self.bank_sections_ = sections
        self.module = self._module_cls(
            n_input, int(self.summary_stats.n_vars), n_hidden=n_hidden, n_layers=n_layers, heads=heads,
            dropout_rate=dropout_rate, loss=loss, composition_weight=composition_weight,
            contrastive_weight=contrastive_weight, mask_target=mask_target,
            mask_reference=mask_reference, **stats,
        )  # fmt: skip
        if adata is not None:
            codes = np.asarray([self.bank_sections_.index(s) for s in arrays["groups"]])
            self.module.set_bank(arrays["embedding"], arrays["counts"], codes)
        #: bank sections predictions may link to (all of them, except while validating)
        self._allowed: list[str] = list(self.bank_sections_)
        self._model_summary_string = (
            f"HeteroGraphPredictor on `obsm[{self.embedding_key_!r}]`, {self.summary_stats.n_vars} genes, "
            f"{n_layers} layers, top-{k_reference} per reference section"
        )
        self.init_params_ = self._get_init_params(locals())

    @classmethod
    def _prepare_anndata(cls, adata: AnnData, args: dict[str, Any]) -> str:
        check_spatial(adata, args.get("spatial_key") or "spatial", purpose="hetero_graph's target–target graph")
        return args["embedding_key"]

    # -- graphs ----------------------------------------------------------------------------------------------
    def _graph(self, target_x: np.ndarray, coords: np.ndarray, count_rows: np.ndarray | None, allowed: list[str],
               core: np.ndarray) -> dict[str, Any]:  # fmt: skip
        """One graph batch (see :mod:`stfm.module._hetero_graph`) linking these target spots to ``allowed`` sections.

        The gene-wide entries (the targets' counts, rows ``count_rows`` of the registered data, and the references'
        compositions) are :class:`~stfm._rows.RowRef` s, filled in when the batch is used."""
        from ..graph import reference_graph

        bank_sec = self.module.bank_section.cpu().numpy()
        bank_x = self.module.bank_x.cpu().numpy()
        refs, rows = {}, {}
        for name in allowed:
            r = np.flatnonzero(bank_sec == self.bank_sections_.index(name))
            if r.size == 0:
                continue
            refs[name], rows[name] = (bank_x[r], None), r
        if not refs:
            msg = "hetero_graph has no reference section to link to (the bank is empty or every section was excluded)."
            raise ValueError(msg)
        with np.errstate(all="ignore"):
            h = reference_graph(coords, target_x, refs, k_reference=self.k_reference, k_reference_knn=self.k_reference_knn,
                                pitches=self.pitches)  # fmt: skip
        names = list(refs)
        sec = h["reference"].section.numpy()
        src = h["reference"].source_index.numpy()
        bank_rows = np.asarray([rows[names[s]][i] for s, i in zip(sec, src, strict=True)], dtype=np.int64)
        n_t = target_x.shape[0]
        empty = torch.zeros((2, 0), dtype=torch.long)
        has_rr = ("reference", "similar", "reference") in h.edge_types
        rr = h["reference", "similar", "reference"].edge_index if has_rr else empty
        target_counts = torch.zeros((n_t, self.module.n_genes)) if count_rows is None else RowRef("counts", count_rows)
        return {
            "target_x": torch.as_tensor(target_x, dtype=torch.float32),
            "target_counts": target_counts,
            "target_core": torch.as_tensor(core.astype(np.float32)),
            "ref_x": torch.as_tensor(bank_x[bank_rows]),
            "ref_logcomp": RowRef("bank", bank_rows),
            "ref_loglib": self.module.bank_loglib.cpu()[torch.as_tensor(bank_rows)],
            "tt_index": h["target", "near", "target"].edge_index,
            "rr_index": rr,
            "rt_index": h["reference", "linked_by", "target"].edge_index,
            "rt_sim": h["reference", "linked_by", "target"].edge_attr,
            "ref_section": self.module.bank_section.cpu()[torch.as_tensor(bank_rows)],
        }

    def _section_graphs(self, emb: np.ndarray, coords: np.ndarray, count_rows: np.ndarray | None, allowed: list[str]) -> list[tuple[np.ndarray, dict]]:
        """Graph batches of one section: (core rows, graph) per spatial block; ``count_rows``: the section's rows in
        the registered data (training) or ``None`` (a query)."""
        out = []
        for core, members in self._blocks(coords):
            is_core = np.isin(members, core)
            g = self._graph(emb[members], coords[members], None if count_rows is None else count_rows[members], allowed, is_core)
            out.append((members[is_core], g))
        return out

    def _training_graphs(self, train_idx: np.ndarray) -> list[dict]:
        arrays = self._training_arrays(train_idx)
        train_sections = list(dict.fromkeys(arrays["groups"]))
        graphs = []
        for t in train_sections:
            m = arrays["groups"] == t
            others = [s for s in train_sections if s != t]  # a target never reaches its own expression
            if not others:
                msg = "hetero_graph needs at least two training sections besides the validation sections."
                raise ValueError(msg)
            graphs += [g for _, g in self._section_graphs(arrays["embedding"][m], arrays["coords"][m], train_idx[m], others)]
        return graphs

    def _validation_graphs(self, val_idx: np.ndarray) -> list[dict]:
        arrays = self._training_arrays(val_idx)
        graphs = []
        for v in dict.fromkeys(arrays["groups"]):
            m = arrays["groups"] == v
            refs = [s for s in self._allowed if s != v]
            graphs += [g for _, g in self._section_graphs(arrays["embedding"][m], arrays["coords"][m], val_idx[m], refs)]
        return graphs

    # -- training hooks --------------------------------------------------------------------------------------
    def _default_validation(self, sections: list[str]) -> list[str]:
        # a validation section needs two training sections beside it (a target and its references)
        return [sections[-1]] if len(sections) >= 3 else []

    def _on_train_start(self, train_idx: np.ndarray, val_idx: np.ndarray) -> None:
        groups = self._section_labels()
        self._allowed = list(dict.fromkeys(groups[train_idx]))  # validation sections are never references
        self._use_graph_batches()

    def _on_train_end(self, train_idx: np.ndarray, val_idx: np.ndarray, val_arrays: dict[str, Any] | None) -> None:
        self._allowed = list(self.bank_sections_)
        self._stop_graph_batches()

    def train(self, max_epochs: int = 200, *, lr: float = 1e-3, early_stopping_patience: int = 30, **kwargs: Any):
        """:meth:`ExpressionModelBase.train <stfm.model.ExpressionModelBase.train>` over graph batches (one per
        training section or spatial block), with epochs chosen on the validation sections."""
        kwargs.pop("batch_size", None)  # a batch is a section graph
        return super().train(max_epochs, lr=lr, early_stopping_patience=early_stopping_patience, batch_size=1, **kwargs)

    # -- prediction ------------------------------------------------------------------------------------------
    def _query_graph(self, emb: np.ndarray, coords: np.ndarray, section: str, core: np.ndarray, fields: dict) -> dict:
        """A query block linked to every allowed bank section except a namesake of the query's own section."""
        return self._graph(emb, coords, None, [s for s in self._allowed if s != section], core)

    @classmethod
    def _check_state(cls, state: dict[str, Any], where: str) -> None:
        bank = state.get("bank_x")
        if bank is None or bank.shape[0] == 0:
            msg = (
                f"The hetero_graph model in {where!r} has no reference bank (the training spots new sections are linked "
                "to). The folder is incomplete; save the trained model again."
            )
            raise CheckpointError(msg)

    def _check_loaded(self, where: str) -> None:
        self._allowed = list(self.bank_sections_)
