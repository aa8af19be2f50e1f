"""``RidgeProbe`` (method ``'ridge'``): the HEST-Benchmark linear probe, with its penalty chosen on training sections."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from anndata import AnnData
from scipy import sparse

from .. import _rows
from .._constants import EXPR_KEYS
from .._rows import ColumnPearson, as_count_rows, log_normalise
from .._validation import assert_one_of, check_positive
from ..module._ridge import RidgeModule
from ._base import ExpressionModelBase
from ._registry import register_expression_method
from ._training import validation_scores

__all__ = ["RidgeProbe"]

#: penalties compared by leave-one-section-out when ``alpha=None``
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-2, 6, 17))


def _hest_alpha(n_components: int, n_genes: int) -> float:
    return 100.0 / (n_components * n_genes)


def _centered_cross(z: np.ndarray, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(zᵀ(y − ȳ), ȳ)`` for a dense or sparse target ``y`` (a sparse one is never densified)."""
    mean = np.asarray(y.mean(0)).ravel()
    zty = np.asarray(y.T @ z).T if sparse.issparse(y) else z.T @ np.asarray(y)
    return zty - np.outer(z.sum(0), mean), mean


class _Fold:
    """One leave-one-section-out fold: PCA fitted on the training rows, sufficient statistics of the ridge."""

    def __init__(self, emb_tr: np.ndarray, emb_te: np.ndarray, targets: dict[str, Any], n_components: int) -> None:
        self.params = _fit_projection(emb_tr, n_components)
        z_tr = _project(self.params, emb_tr)
        self.z_te = _project(self.params, emb_te)
        self.norms = (z_tr * z_tr).sum(0)
        self.zty, self.means = {}, {}
        for k, y in targets.items():
            self.zty[k], self.means[k] = _centered_cross(z_tr, y)

    def predict(self, head: str, alpha: float, rows: slice | None = None) -> np.ndarray:
        w = self.zty[head] / (self.norms + alpha)[:, None]
        z = self.z_te if rows is None else self.z_te[rows]
        return z @ w + self.means[head]

    def score(self, head: str, alpha: float, truth: Any) -> float:
        """Mean per-gene Pearson of this fold's predictions against ``truth`` (its test rows), a block at a time."""
        acc = ColumnPearson()
        step = _rows.BLOCK_ROWS
        for a in range(0, self.z_te.shape[0], step):
            s = slice(a, min(a + step, self.z_te.shape[0]))
            t = truth[s]
            acc.add(self.predict(head, alpha, s), t.toarray() if sparse.issparse(t) else t)
        return acc.mean()


def _fit_projection(emb: np.ndarray, n_components: int) -> dict[str, np.ndarray]:
    from sklearn.decomposition import PCA

    mean = emb.mean(0)
    scale = emb.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (emb - mean) / scale
    n = int(min(n_components, emb.shape[0] - 1, emb.shape[1]))
    pca = PCA(n_components=max(n, 1), random_state=0).fit(z)
    return {"scaler_mean": mean, "scaler_scale": scale, "pca_mean": pca.mean_, "components": pca.components_}


def _project(params: dict[str, np.ndarray], emb: np.ndarray) -> np.ndarray:
    return ((emb - params["scaler_mean"]) / params["scaler_scale"] - params["pca_mean"]) @ params["components"].T


def _compose(y: np.ndarray, log_lib: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(scale, log library) from a head on the log1p scale (and a library head, for the composition target)."""
    counts = np.expm1(np.clip(y, 0, None))
    total = counts.sum(1, keepdims=True)
    scale = np.divide(counts, total, out=np.full_like(counts, 1.0 / counts.shape[1]), where=total > 0)
    if log_lib is None:
        log_lib = np.log(np.maximum(total.ravel(), 1e-12))
    return scale.astype(np.float32), np.asarray(log_lib, dtype=np.float64).ravel()


@register_expression_method(
    "ridge",
    needs=("embedding", "counts"),
    supports=("smoothing",),
    after="HEST-Benchmark probe",
    likelihood="ridge on log1p counts per 10k (composition) + ridge on log library size",
    summary="StandardScaler + PCA-256 + ridge, penalty chosen by leave-one-section-out over the training sections",
)
class RidgeProbe(ExpressionModelBase):
    """Linear probe from an H&E embedding to expression, after HEST-Benchmark, with the penalty chosen honestly.

    Fitted on training spots only: standardisation, PCA to ``n_components`` (256), then ridge heads. With the
    default ``target='composition'`` one head predicts ``log1p`` counts per 10k over the panel and another the log
    library size, so composition and depth are predicted separately (:meth:`predict` multiplies them); with
    ``target='log1p'`` a single head predicts ``log1p`` raw counts, exactly HEST's probe.

    The penalty of each head is chosen by leave-one-section-out over the training sections (the PCA is refitted in
    every fold): the composition head on the composition Pearson, the library head on the Pearson of the log
    library size, the ``log1p`` head on the raw Pearson. The out-of-fold predictions then choose the neighbour
    smoothing. ``alpha='hest'`` uses HEST's fixed ``100 / (n_components · n_genes)``; a number fixes it.

    Nothing is trained by gradient descent; the fitted projection and heads are buffers of a
    :class:`~stfm.module.RidgeModule`, saved and loaded like every stfm model.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    registry
        Registry of a saved model (used by :meth:`load`).
    n_components
        PCA dimensions (capped at the number of training spots − 1 and the embedding width).
    alpha
        ``None``: chosen by leave-one-section-out from ``alphas``; ``'hest'``: HEST's fixed penalty; a number: fixed.
    alphas
        Candidate penalties (default ``logspace(-2, 6, 17)``).
    target
        ``'composition'`` (composition and depth heads) or ``'log1p'`` (HEST's single head on log1p counts).
    """

    _module_cls = RidgeModule
    _resizable_buffers = ("scaler_mean", "scaler_scale", "pca_mean", "components", "coef", "offset", "lib_coef", "lib_offset")

    def __init__(
        self,
        adata: AnnData | None = None,
        registry: dict | None = None,
        *,
        n_components: int = 256,
        alpha: float | Literal["hest"] | None = None,
        alphas: Sequence[float] | None = None,
        target: Literal["composition", "log1p"] = "composition",
    ) -> None:
        super().__init__(adata, registry=registry)
        assert_one_of(target, ("composition", "log1p"), name="target")
        if alpha is not None and alpha != "hest":
            check_positive(alpha, name="alpha")
        if alphas is not None and (len(alphas) == 0 or any(not np.isfinite(a) or a <= 0 for a in alphas)):
            msg = f"Expected `alphas` to be a non-empty list of positive numbers, found {alphas!r}."
            raise ValueError(msg)
        self.n_components = int(n_components)
        self.alpha = alpha
        self.alphas = tuple(float(a) for a in (alphas or DEFAULT_ALPHAS))
        self.target = target
        n_input = int(self.summary_stats[f"n_{EXPR_KEYS.EMBEDDING_KEY}"])
        self.module = self._module_cls(n_input, int(self.summary_stats.n_vars), self.n_components, target=target)
        self.alpha_: dict[str, float] = {}
        self.alpha_scores_: dict[str, dict[str, float]] = {}
        self.n_components_: int | None = None
        self._model_summary_string = f"RidgeProbe ({target}) on `obsm[{self.embedding_key_!r}]`, {self.summary_stats.n_vars} genes"
        self.init_params_ = self._get_init_params(locals())

    def _targets(self, counts: Any) -> dict[str, Any]:
        """The heads' targets: sparse (CSR, float64) over the genes, since ``log1p`` keeps the zeros of the counts."""
        csr = as_count_rows(counts).sparse.astype(np.float64)
        if self.target == "log1p":
            csr.data = np.log1p(csr.data)
            return {"log1p": csr}
        lib = np.asarray(csr.sum(1)).ravel()
        return {"composition": log_normalise(csr, sparse_output=True), "library": np.log(np.maximum(lib, 1.0))[:, None]}

    def train(
        self,
        *,
        smoothing: int | Sequence[int] | None = (0, 4, 8),
        selection_metric: Literal["mean", "raw", "composition"] = "mean",
    ) -> RidgeProbe:
        """Fit the probe; choose each head's penalty and the smoothing by leave-one-section-out.

        Parameters
        ----------
        smoothing
            Candidate neighbour counts for smoothing (chosen on the out-of-fold predictions), or a fixed int.
        selection_metric
            Validation metric for the smoothing (see :func:`~stfm.model.validation_scores`).
        """
        self.selection_metric_ = assert_one_of(selection_metric, ("mean", "raw", "composition"), name="selection_metric")
        t0 = time.perf_counter()
        arrays = self._training_arrays()
        emb = arrays["embedding"].astype(np.float64)
        counts = arrays["counts"]
        groups = arrays["groups"]
        targets = self._targets(counts)
        sections = list(dict.fromkeys(groups))
        heads = list(targets)
        n_comp = int(min(self.n_components, emb.shape[0] - 1, emb.shape[1]))
        fixed = None
        if self.alpha == "hest":
            fixed = _hest_alpha(n_comp, counts.shape[1])
        elif self.alpha is not None:
            fixed = float(self.alpha)
        oof = None
        if len(sections) < 2:
            if fixed is None:
                warnings.warn(
                    "RidgeProbe: one training section, so the penalty cannot be chosen by leave-one-section-out; using "
                    "HEST's fixed alpha and no smoothing. Register more sections to choose them on held-out data.",
                    UserWarning,
                    stacklevel=2,
                )
                fixed = _hest_alpha(n_comp, counts.shape[1])
            self.alpha_ = dict.fromkeys(heads, fixed)
            self.validation_sections_ = []
        else:
            folds = []
            for s in sections:
                te = groups == s
                folds.append((te, _Fold(emb[~te], emb[te], {h: y[~te] for h, y in targets.items()}, n_comp)))
            cands = (fixed,) if fixed is not None else self.alphas
            self.alpha_scores_ = {}
            for h in heads:
                scores = {}
                for a in cands:
                    per = [fold.score(h, a, targets[h][te]) for te, fold in folds]
                    scores[f"{a:.4g}"] = float(np.nanmean(per))
                self.alpha_scores_[h] = scores
                best = max(scores, key=lambda k: scores[k])
                self.alpha_[h] = float(cands[[f"{a:.4g}" for a in cands].index(best)])
            # out-of-fold predictions at the chosen penalties (every section predicted by a model not trained on it)
            scale = np.zeros(counts.shape, np.float32)
            logl = np.zeros(counts.shape[0])
            for te, fold in folds:
                if self.target == "log1p":
                    scale[te], logl[te] = _compose(fold.predict("log1p", self.alpha_["log1p"]), None)
                else:
                    scale[te], logl[te] = _compose(fold.predict("composition", self.alpha_["composition"]),
                                                   fold.predict("library", self.alpha_["library"]))  # fmt: skip
            oof = {"scale": scale, "log_library": logl, "aux": {}}
            self.validation_sections_ = sections
            oof_mean = scale * np.exp(logl)[:, None]
            self.validation_history_ = None
            self.oof_scores_ = validation_scores(oof_mean, counts, groups)
        # final fit on every training section
        params = _fit_projection(emb, n_comp)
        z = _project(params, emb)
        norms = (z * z).sum(0)

        def head(name: str) -> tuple[np.ndarray, np.ndarray]:
            zty, mean = _centered_cross(z, targets[name])
            return (zty / (norms + self.alpha_[name])[:, None]).T, mean

        main = "log1p" if self.target == "log1p" else "composition"
        coef, offset = head(main)
        lib_coef, lib_offset = head("library") if self.target == "composition" else (np.zeros((1, z.shape[1])), np.zeros(1))
        self.module.set_params(**params, coef=coef, offset=offset, lib_coef=lib_coef.reshape(1, -1), lib_offset=np.reshape(lib_offset, 1))
        self.n_components_ = int(z.shape[1])
        self.is_trained_ = True
        self.module.eval()
        self._choose_smoothing(arrays if oof is not None else None, smoothing, parts=oof)
        self.fit_time_s_ = time.perf_counter() - t0
        return self

    def __repr__(self) -> str:
        base = super().__repr__()
        if self.alpha_:
            base += "; alpha " + ", ".join(f"{k} {v:.3g}" for k, v in self.alpha_.items())
        return base
