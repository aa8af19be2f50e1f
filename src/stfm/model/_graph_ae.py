"""``GraphAEPredictor`` (method ``'graph_ae'``): a graph-attention autoencoder's latent, an image encoder aligned to
it and a GraphSAGE decoder (after HESpotEx)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from anndata import AnnData
from scvi.data._constants import _SETUP_ARGS_KEY

from .._constants import EXPR_KEYS
from .._rows import RowRef
from .._validation import check_obs_key, check_spatial
from ..module._graph_ae import GraphAEModule
from ._base import ExpressionModelBase
from ._graph_common import SectionGraphMixin
from ._registry import register_expression_method
from ._training import input_statistics, module_device

__all__ = ["GraphAEPredictor"]

logger = logging.getLogger("stfm")


def _edges(coords: np.ndarray, pitches: float) -> torch.Tensor:
    from ..graph import spatial_data

    return spatial_data(coords, np.zeros((len(coords), 1), np.float32), pitches=pitches).edge_index


@register_expression_method(
    "graph_ae",
    needs=("embedding", "counts", "spatial"),
    supports=("std", "smoothing", "early_stopping", "ensemble"),
    after="HESpotEx",
    likelihood="ZINB on counts with library size; stage 1 reconstruction MSE, stage 2 alignment 1 - Pearson",
    summary="graph-attention autoencoder latent of expression, image encoder aligned to it, GraphSAGE + LSTM decoder",
)
class GraphAEPredictor(SectionGraphMixin, ExpressionModelBase):
    """Predict expression from H&E through a spatial latent of expression (after HESpotEx).

    Stage 1 fits a STAGATE-style graph-attention autoencoder on the training sections' expression over their
    spatial graphs (``n_latent``-dimensional latent). Stage 2 freezes it and trains an image encoder (on the
    embedding, optionally ⊕ nuclei features such as ``obs['n_nuclei']`` from :func:`stfm.pp.count_nuclei`) to
    predict that latent (``1 − Pearson``), and a decoder of parallel GraphSAGE layers with LSTM jumping knowledge
    to a ZINB on counts with library size (:class:`~stfm.module.GraphAEModule`). The epochs of **both** stages are
    chosen on validation sections of the training patients (HESpotEx picks them on the test slide, and trains its
    autoencoder on data that includes it). At inference only the image path runs: any section or H&E-only slide
    with an embedding and coordinates can be predicted.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Registry of a saved model.
    n_latent, n_hidden_ae
        Autoencoder latent (HESpotEx: 64) and hidden widths.
    n_hidden, n_decoder, dropout_rate
        Image-side widths, number of parallel GraphSAGE layers (HESpotEx: 4), dropout.
    align_weight, composition_weight
        Weights of the alignment and composition terms of stage 2.
    pitches
        Radius of the spatial graph in spot pitches.
    block_size
        Largest number of spots in one graph batch (larger sections are cut into blocks with halos).
    """

    _module_cls = GraphAEModule

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        *,
        n_latent: int = 64,
        n_hidden_ae: int = 512,
        n_hidden: int = 256,
        n_decoder: int = 4,
        dropout_rate: float = 0.2,
        align_weight: float = 1.0,
        composition_weight: float = 1.0,
        pitches: float = 1.5,
        block_size: int = 4096,
    ) -> None:
        super().__init__(adata, registry=registry)
        self.pitches, self.block_size = float(pitches), int(block_size)
        self.n_layers = 4  # the autoencoder's receptive field (2 + 2 GAT layers) sets the blocks' halo
        n_input = int(self.summary_stats[f"n_{EXPR_KEYS.EMBEDDING_KEY}"])
        stats: dict[str, Any] = {}
        if adata is not None:
            arrays = self._training_arrays()
            stats = input_statistics(arrays["counts"], arrays["embedding"])
        self.module = self._module_cls(
            n_input, int(self.summary_stats.n_vars), n_latent=n_latent, n_hidden_ae=n_hidden_ae, n_hidden=n_hidden,
            n_decoder=n_decoder, dropout_rate=dropout_rate, align_weight=align_weight,
            composition_weight=composition_weight, **stats,
        )  # fmt: skip
        self.best_epoch_autoencoder_: int | None = None
        self._latent: np.ndarray | None = None
        self._model_summary_string = (
            f"GraphAEPredictor on `obsm[{self.embedding_key_!r}]`, {self.summary_stats.n_vars} genes, latent {n_latent}"
        )
        self.init_params_ = self._get_init_params(locals())

    # -- registration ----------------------------------------------------------------------------------------
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
        nuclei_keys: Sequence[str] | None = None,
        embedding_standardize: Literal["none", "section"] = "none",
        **kwargs: Any,
    ) -> None:
        """Register an AnnData (see :meth:`ExpressionModelBase.setup_anndata <stfm.model.ExpressionModelBase.setup_anndata>`).

        Parameters
        ----------
        nuclei_keys
            obs columns appended (``log1p``) to the embedding as image inputs, e.g. ``['n_nuclei',
            'nucleus_area_um2']`` from :func:`stfm.pp.count_nuclei`; queries must carry them too.
        embedding_standardize
            ``'section'``: the embedding centred and scaled within each section first (nuclei columns are appended
            after it, unscaled).
        """
        setup_method_args = cls._get_setup_method_args(**locals())
        if nuclei_keys is not None:
            keys = [nuclei_keys] if isinstance(nuclei_keys, str) else [str(k) for k in nuclei_keys]
            setup_method_args[_SETUP_ARGS_KEY]["nuclei_keys"] = keys
        cls._register(adata, setup_method_args, **kwargs)

    @classmethod
    def _query_obs(cls, args: dict[str, Any]) -> list[str]:
        return list(args.get("nuclei_keys") or [])

    @classmethod
    def _prepare_anndata(cls, adata: AnnData, args: dict[str, Any]) -> str:
        check_spatial(adata, args.get("spatial_key") or "spatial", purpose="graph_ae's spatial graph")
        keys = args.get("nuclei_keys")
        if not keys:
            return args["embedding_key"]
        cols = []
        for k in keys:
            check_obs_key(adata, k, what="nuclei feature", hint="Run `stfm.pp.count_nuclei(adata)` first.")
            v = pd.to_numeric(adata.obs[k], errors="coerce").to_numpy(dtype=np.float64)
            if not np.isfinite(v).all() or (v < 0).any():
                msg = f"`obs[{k!r}]` must hold finite, non-negative numbers (nuclei counts or areas); found NaN or negatives."
                raise ValueError(msg)
            cols.append(np.log1p(v))
        key = f"{args['embedding_key']}_nuclei"
        adata.obsm[key] = np.concatenate([np.asarray(adata.obsm[args["embedding_key"]], dtype=np.float32),
                                          np.stack(cols, axis=1).astype(np.float32)], axis=1)  # fmt: skip
        return key

    # -- graphs ----------------------------------------------------------------------------------------------
    def _graphs(self, idx: np.ndarray) -> list[dict]:
        arrays = self._training_arrays(idx)
        graphs = []
        for sec in dict.fromkeys(arrays["groups"]):
            rows = np.flatnonzero(arrays["groups"] == sec)
            coords = arrays["coords"][rows]
            for core, members in self._blocks(coords):
                r = rows[members]
                g = {
                    "x": torch.as_tensor(arrays["embedding"][r]),
                    "counts": RowRef("counts", np.asarray(idx)[r]),  # densified when the batch is drawn
                    "core": torch.as_tensor(np.isin(members, core).astype(np.float32)),
                    "edge_index": _edges(coords[members], self.pitches),
                }
                if self.module.stage == "image" and self._latent is not None:
                    g["latent"] = torch.as_tensor(self._latent[idx[r]])
                graphs.append(g)
        return graphs

    _training_graphs = _graphs
    _validation_graphs = _graphs

    def _query_graph(self, emb: np.ndarray, coords: np.ndarray, section: str, core: np.ndarray, fields: dict) -> dict:
        return {"x": torch.as_tensor(emb), "counts": torch.zeros(len(emb), self.module.n_genes),
                "core": torch.as_tensor(core.astype(np.float32)), "edge_index": _edges(coords, self.pitches)}  # fmt: skip

    @torch.inference_mode()
    def _autoencoder_latent(self) -> np.ndarray:
        """The stage-1 latent of every registered spot, section by section (each from its own spatial graph)."""
        self.module.eval()
        dev = module_device(self.module)
        arrays = self._training_arrays()
        out = np.zeros((len(arrays["groups"]), self.module.enc2.out_channels), np.float32)
        for sec in dict.fromkeys(arrays["groups"]):
            rows = np.flatnonzero(arrays["groups"] == sec)
            for core, members in self._blocks(arrays["coords"][rows]):
                z, _, _ = self.module.autoencode(torch.as_tensor(arrays["counts"][rows[members]], device=dev),
                                                 _edges(arrays["coords"][rows][members], self.pitches).to(dev))  # fmt: skip
                keep = np.isin(members, core)
                out[rows[members[keep]]] = z.cpu().numpy()[keep]
        return out

    # -- training --------------------------------------------------------------------------------------------
    def _on_train_start(self, train_idx: np.ndarray, val_idx: np.ndarray) -> None:
        self._use_graph_batches()

    def _on_train_end(self, train_idx: np.ndarray, val_idx: np.ndarray, val_arrays: dict[str, Any] | None) -> None:
        self._stop_graph_batches()

    def train(
        self,
        max_epochs: int = 200,
        *,
        autoencoder_epochs: int = 300,
        autoencoder_patience: int = 30,
        early_stopping_patience: int = 30,
        **kwargs: Any,
    ):
        """Stage 1, then stage 2, each with its epochs chosen on the validation sections.

        Parameters
        ----------
        max_epochs, early_stopping_patience
            Stage 2 (image encoder and decoder): at most this many epochs, the best by the validation score.
        autoencoder_epochs, autoencoder_patience
            Stage 1 (autoencoder): at most this many epochs, the one with the lowest validation reconstruction error.
        **kwargs
            Passed to :meth:`ExpressionModelBase.train <stfm.model.ExpressionModelBase.train>` for both stages
            (``validation_sections``, ``lr``, ``accelerator``, …; ``smoothing`` applies to stage 2).
        """
        kwargs.pop("batch_size", None)
        smoothing = kwargs.pop("smoothing", (0, 4, 8))
        selection = kwargs.pop("selection_metric", "mean")
        self.module.stage = "autoencoder"
        for p in self.module.autoencoder_parameters():
            p.requires_grad_(requires_grad=True)
        super().train(autoencoder_epochs, early_stopping_monitor="elbo", early_stopping_patience=autoencoder_patience,
                      smoothing=None, batch_size=1, **kwargs)  # fmt: skip
        self.best_epoch_autoencoder_ = self.best_epoch_
        self.history_autoencoder_ = self.history_
        self._latent = self._autoencoder_latent()
        for p in self.module.autoencoder_parameters():
            p.requires_grad_(requires_grad=False)
        self.module.stage = "image"
        try:
            out = super().train(max_epochs, early_stopping_patience=early_stopping_patience, smoothing=smoothing,
                                selection_metric=selection, batch_size=1, **kwargs)  # fmt: skip
        finally:
            self._latent = None
        return out

    def _check_loaded(self, where: str) -> None:
        self.module.stage = "image"
