"""Shared machinery of the graph methods (``hetero_graph``, ``graph_ae``): graph batches per section or spatial
block, a Lightning data module over them, and prediction section by section."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader

from .._constants import EXPR_KEYS
from .._rows import CountRows, materialize
from ._training import module_device

__all__ = ["SectionGraphMixin"]


class _GraphSplitter(LightningDataModule):
    """A LightningDataModule of graph batches: one per training section (or spatial block), one per validation
    section (or block), built by the model (``model._training_graphs`` / ``model._validation_graphs``).

    A module-level class holding graphs only (not the model), so ``ddp_spawn`` can send it to its workers.
    """

    def __init__(self, adata_manager: Any, *, model: Any, external_indexing: Any, **kwargs: Any) -> None:
        super().__init__()
        train_idx, val_idx = np.asarray(external_indexing[0]), np.asarray(external_indexing[1])
        self.train_idx, self.val_idx, self.test_idx = train_idx, val_idx, np.array([], dtype=int)
        self.n_train, self.n_val = len(train_idx), len(val_idx)
        self.train_graphs = model._training_graphs(train_idx)
        self.val_graphs = model._validation_graphs(val_idx) if len(val_idx) else []
        #: the sparse matrices graph batches read their gene-wide rows from (counts, bank compositions)
        self.sources = model._graph_sources()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Graphs(self.train_graphs, self.sources), batch_size=None, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return DataLoader(_Graphs(self.val_graphs, self.sources), batch_size=None, shuffle=False) if self.val_graphs else []


class _Graphs(torch.utils.data.Dataset):
    """Graph batches whose :class:`~stfm._rows.RowRef` entries are densified when the batch is drawn (and freed
    after it), so only one batch of a wide panel is ever dense."""

    def __init__(self, items: list, sources: dict[str, CountRows]) -> None:
        self.items = items
        self.sources = sources

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return materialize(self.items[i], self.sources)




class SectionGraphMixin:
    """For expression models whose module reads a graph batch (a section or a block of one) instead of spot rows.

    The model implements ``_training_graphs(train_idx)``, ``_validation_graphs(val_idx)`` and
    ``_query_graph(embedding, coords, section, core)``; training then runs through scvi-tools' ``TrainRunner`` with
    :class:`_GraphSplitter` as the data splitter, and prediction goes section by section, block by block.
    """

    block_size: int
    n_layers: int
    pitches: float

    def _blocks(self, coords: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Spatial blocks of one section, with a halo covering ``n_layers`` hops of the spatial graph."""
        from ..graph import spatial_blocks, spot_pitch

        pitch = spot_pitch(coords) if len(coords) > 1 else 1.0
        return spatial_blocks(coords, self.block_size, self.n_layers * self.pitches * pitch)

    def _graph_sources(self, *, counts: bool = True) -> dict[str, CountRows]:
        """What :class:`~stfm._rows.RowRef` entries of this model's graphs read: ``'counts'`` (the registered
        counts, sparse) and, for a model with a reference bank, ``'bank'`` (its compositions, sparse)."""
        out: dict[str, CountRows] = {}
        if counts and getattr(self, "adata", None) is not None:
            out["counts"] = CountRows(self.adata_manager.get_from_registry(EXPR_KEYS.X_KEY))
        if hasattr(self.module, "bank_composition_rows"):
            out["bank"] = self.module.bank_composition_rows()
        return out

    def _use_graph_batches(self) -> None:
        self._data_splitter_cls = functools.partial(_GraphSplitter, model=self)

    def _stop_graph_batches(self) -> None:
        self.__dict__.pop("_data_splitter_cls", None)

    @torch.inference_mode()
    def _predict_parts(self, arrays: dict[str, Any], batch_size: int | None = None, *, need_aux: bool = False) -> dict[str, Any]:
        if arrays.get("coords") is None:
            spatial_key = self.setup_args.get("spatial_key") or "spatial"
            msg = (
                f"{self.method} builds a graph over the query's spots: it needs their coordinates in "
                f"`obsm[{spatial_key!r}]`."
            )
            raise KeyError(msg)
        was_training = self.module.training
        self.module.eval()
        dev = module_device(self.module)
        n = arrays["embedding"].shape[0]
        scale = np.zeros((n, self.module.n_genes), np.float32)
        logl = np.zeros(n)
        aux: dict[str, np.ndarray] = {}
        extra = {k: v for k, v in arrays.items() if k.startswith("field:")}
        sources = self._graph_sources(counts=False)  # a query graph never reads measured counts
        for sec in dict.fromkeys(arrays["groups"]):
            rows = np.flatnonzero(arrays["groups"] == sec)
            for core, members in self._blocks(arrays["coords"][rows]):
                is_core = np.isin(members, core)
                fields = {k: v[rows][members] for k, v in extra.items()}
                g = self._query_graph(arrays["embedding"][rows][members], arrays["coords"][rows][members], str(sec), is_core, fields)
                g = materialize(g, sources)
                out = self.module.predict_batch({k: v.to(dev) for k, v in g.items()})
                dest = rows[members[is_core]]
                scale[dest] = out["scale"].float().cpu().numpy()[is_core]
                logl[dest] = out["log_library"].float().cpu().numpy()[is_core]
                if need_aux:
                    for k, v in out["aux"].items():
                        aux.setdefault(k, np.zeros((n, v.shape[-1]), np.float32))[dest] = v.float().cpu().numpy()[is_core]
        self.module.train(was_training)
        return {"scale": scale, "log_library": logl, "aux": aux}
