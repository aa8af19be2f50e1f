"""Training helpers shared by the expression models: validation scores, the early-stopping monitor, devices."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from lightning.pytorch.callbacks import Callback
from scvi.train import TrainingPlan

from .. import _rows
from .._rows import ColumnPearson, as_count_rows, log_composition_csr

if TYPE_CHECKING:
    from ._base import ExpressionModelBase

__all__ = ["ExpressionTrainingPlan", "ValidationMonitor", "deterministic", "input_statistics", "module_device", "validation_scores"]


class ExpressionTrainingPlan(TrainingPlan):
    """scvi-tools' :class:`~scvi.train.TrainingPlan`, with the module's extra metrics logged outside inference mode.

    scvi-tools logs ``LossOutput.extra_metrics`` from inside ``torch.inference_mode()``, so Lightning's accumulators
    for them are inference tensors; with several processes (DDP) the epoch-end all-reduce updates them in place,
    which torch refuses. Logged here instead, after scvi-tools' own metrics, with the same options.
    """

    def compute_and_log_metrics(self, loss_output: Any, metrics: dict[str, Any], mode: str) -> None:
        extra = loss_output.extra_metrics
        loss_output.extra_metrics = {}
        try:
            super().compute_and_log_metrics(loss_output, metrics, mode)
        finally:
            loss_output.extra_metrics = extra
        for key, met in extra.items():
            if isinstance(met, torch.Tensor) and met.shape != torch.Size([]):
                continue  # (scvi-tools does not log non-scalar extra metrics either)
            self.log(f"{key}_{mode}", met.detach() if isinstance(met, torch.Tensor) else met, on_step=self.on_step,
                     on_epoch=self.on_epoch, batch_size=loss_output.n_obs_minibatch, sync_dist=self.use_sync_dist)  # fmt: skip


def validation_scores(mean: np.ndarray, counts: Any, groups: np.ndarray | None = None) -> dict[str, float]:
    """Mean per-gene Pearson of predictions against counts, per section then averaged over sections.

    ``'raw'``: ``log1p(mean)`` vs ``log1p(counts)`` (HEST convention, rewards depth); ``'composition'``: ``log1p``
    counts per 10k of both over the panel (depth removed). ``'mean'`` is their average. ``counts`` may be dense or
    sparse: it is read a block of rows at a time, so a wide panel is never densified whole.
    """
    truth = as_count_rows(counts)
    if truth.shape != np.shape(mean):
        msg = f"Expected predictions and counts of the same shape, found {np.shape(mean)} and {truth.shape}."
        raise ValueError(msg)
    labels = np.zeros(len(mean), dtype=int) if groups is None else pd.factorize(np.asarray(groups))[0]
    raw, comp = [], []
    for g in np.unique(labels):
        rows = np.flatnonzero(labels == g)
        r_acc, c_acc = ColumnPearson(), ColumnPearson()
        step = _rows.BLOCK_ROWS
        for a in range(0, len(rows), step):
            block = rows[a : a + step]
            p = np.asarray(mean[block], dtype=np.float64)
            t = truth[block].astype(np.float64)
            r_acc.add(np.log1p(p), np.log1p(t))
            ps = p.sum(1, keepdims=True)
            ts = t.sum(1, keepdims=True)
            pc = np.divide(p * 1e4, ps, out=np.zeros_like(p), where=ps > 0)
            tc = np.divide(t * 1e4, ts, out=np.zeros_like(t), where=ts > 0)
            c_acc.add(np.log1p(pc), np.log1p(tc))
        raw.append(r_acc.mean())
        comp.append(c_acc.mean())
    r, c = float(np.nanmean(raw)), float(np.nanmean(comp))
    return {"raw": r, "composition": c, "mean": 0.5 * (r + c)}


class ValidationMonitor(Callback):
    """Score every epoch on the validation sections; stop after ``patience`` epochs without improvement and
    restore the best epoch's weights at the end of training."""

    def __init__(self, model: ExpressionModelBase, arrays: dict[str, Any], *, metric: str, patience: int | None,
                 elbo: bool = False) -> None:  # fmt: skip
        self.model = model
        self.arrays = arrays
        self.metric = metric
        self.elbo = elbo
        self.patience = patience
        self.best = -np.inf
        self.best_epoch: int | None = None
        self.rows: list[dict[str, float]] = []
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        module = pl_module.module
        if self.elbo and not getattr(module, "predicts_in_stage", True):
            # a pretraining stage (no decoder trained yet): the likelihood alone decides, predictions mean nothing
            scores = {"raw": np.nan, "composition": np.nan, "mean": np.nan}
        else:
            was_training = module.training
            mean = self.model._predict_arrays(self.arrays, library_size="predicted", smooth=0)[0]
            module.train(was_training)
            scores = validation_scores(mean, self.arrays["counts"], self.arrays["groups"])
        epoch = int(trainer.current_epoch)
        if self.elbo:
            value = trainer.callback_metrics.get("elbo_validation")
            score = -float(value) if value is not None else -np.inf
        else:
            score = scores[self.metric]
        self.rows.append({"epoch": epoch, **scores, "score": score})
        if score > self.best:
            self.best, self.best_epoch = score, epoch
            self.state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        elif self.patience is not None and self.best_epoch is not None and epoch - self.best_epoch >= self.patience:
            trainer.should_stop = True

    _COLUMNS = ("epoch", "raw", "composition", "mean", "score")
    _KEY = "stfm_validation_rows"

    def on_train_end(self, trainer, pl_module) -> None:
        if self.state is not None:
            pl_module.module.load_state_dict(self.state)
        if self.rows:  # travels back to the main process with `callback_metrics` when training ran in spawned workers
            table = [[float(r.get(c, np.nan)) for c in self._COLUMNS] for r in self.rows]
            trainer.callback_metrics[self._KEY] = torch.tensor(table, dtype=torch.float64)

    def restore_from(self, trainer) -> None:
        """Rows and best epoch from ``trainer.callback_metrics``, when this process did not train (``ddp_spawn``)."""
        if self.best_epoch is not None or trainer is None or self._KEY not in trainer.callback_metrics:
            return
        table = trainer.callback_metrics[self._KEY].cpu().numpy()
        self.rows = [dict(zip(self._COLUMNS, (int(r[0]), *map(float, r[1:])), strict=True)) for r in table]
        scores = table[:, -1]
        if np.isfinite(scores).any():
            best = int(np.nanargmax(scores))  # the first of equal maxima, as during training
            self.best, self.best_epoch = float(scores[best]), int(table[best, 0])


def module_device(module: torch.nn.Module) -> torch.device:
    """Device of a module's first parameter or buffer (CPU for an empty module)."""
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def deterministic(module: torch.nn.Module) -> Iterator[None]:
    """Deterministic torch kernels while the block runs, when ``module`` is on the CPU (scatter / index_add
    accumulate in a fixed order): the same seed then gives the same model and predictions. On an accelerator the
    setting is left as it is (some deterministic GPU kernels are slow or missing)."""
    on_cpu = module_device(module).type == "cpu"
    before = torch.are_deterministic_algorithms_enabled()
    if on_cpu and not before:
        torch.use_deterministic_algorithms(mode=True, warn_only=True)
    try:
        yield
    finally:
        if on_cpu and not before:
            torch.use_deterministic_algorithms(mode=False)


def input_statistics(counts: Any, embedding: np.ndarray, *, library: bool = True) -> dict[str, Any]:
    """Standardisation statistics of the training spots that the expression modules take: mean and std of the
    embedding and of the log composition (log1p counts per 10k), and (``library=True``) the mean log library size.

    ``counts`` (dense or sparse) stays sparse: the composition keeps the zeros of the counts."""
    comp, lib = log_composition_csr(counts)
    n = max(comp.shape[0], 1)
    c_mean = np.asarray(comp.sum(0, dtype=np.float64)).ravel() / n
    sq = comp.astype(np.float64)
    sq.data **= 2
    c_sq = np.asarray(sq.sum(0)).ravel() / n
    emb = np.asarray(embedding, dtype=np.float64)
    stats: dict[str, Any] = {"embedding_mean": emb.mean(0), "embedding_std": emb.std(0),
                             "composition_mean": c_mean, "composition_std": np.sqrt(np.maximum(c_sq - c_mean**2, 0.0))}  # fmt: skip
    if library:
        stats["log_library_mean"] = float(np.log(lib).mean())
    return stats
