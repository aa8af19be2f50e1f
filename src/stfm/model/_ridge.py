"""``RidgeProbe``: the HEST-Benchmark linear probe (StandardScaler + PCA-256 + ridge on log1p counts)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._validation import check_positive

__all__ = ["RidgeProbe"]

_FILE = "ridge_probe.npz"


class RidgeProbe:
    """Linear probe from an H&E embedding to ``log1p`` counts, as in HEST-Benchmark.

    Fitted on training spots only: :class:`~sklearn.preprocessing.StandardScaler`, then
    :class:`~sklearn.decomposition.PCA` to ``n_components`` (256), then
    :class:`~sklearn.linear_model.Ridge` with ``alpha = 100 / (n_components · n_genes)``, ``solver='lsqr'`` and no
    intercept, on ``log1p`` raw counts. Because the PCA scores are centred on the training spots, the ridge
    coefficients equal those of a fit with an unpenalised intercept; the probe adds the training mean of each
    target back, so per-gene Pearson correlations are exactly HEST's and MSE/MAE are meaningful.

    This is **not** an scvi-tools model (there is nothing to train by gradient descent); it mirrors the
    :class:`~stfm.model.ExpressionPredictor` surface where that makes sense: construct on a training AnnData,
    :meth:`train`, :meth:`predict` with a library size, :meth:`save` / :meth:`load`, :attr:`genes`.

    Parameters
    ----------
    adata
        Training spots × genes with raw counts in ``X`` (or ``layer``) and the embedding in ``obsm``.
    embedding_key
        obsm key of the embedding.
    layer
        Layer with raw counts (``None``: ``X``).
    n_components
        PCA dimensions (capped at the number of training spots and embedding dimensions).
    alpha
        Ridge penalty; ``None`` uses HEST's ``100 / (n_components · n_genes)``.
    """

    def __init__(
        self,
        adata: AnnData,
        *,
        embedding_key: str,
        layer: str | None = None,
        n_components: int = 256,
        alpha: float | None = None,
    ) -> None:
        from ._checks import check_counts, check_embedding
        from ._checks import recorded_encoder as _recorded_encoder

        check_embedding(adata, embedding_key)
        check_counts(adata, layer)
        if alpha is not None:
            check_positive(alpha, name="alpha")
        self.adata = adata
        self.embedding_key_ = embedding_key
        self.layer = layer
        self.n_components = int(n_components)
        self.alpha = alpha
        self.is_trained_ = False
        #: encoder recorded in the training embedding's provenance (``None`` when not recorded)
        self.encoder_: str | None = _recorded_encoder(adata, embedding_key)
        self._genes = [str(g) for g in adata.var_names]
        self.params_: dict[str, np.ndarray] = {}

    @property
    def genes(self) -> list[str]:
        """The gene panel, in output order."""
        return list(self._genes)

    def train(self) -> RidgeProbe:
        """Fit scaler, PCA and ridge on the training AnnData; returns ``self``."""
        from sklearn.decomposition import PCA
        from sklearn.linear_model import Ridge
        from sklearn.preprocessing import StandardScaler

        from ._checks import check_embedding

        emb = check_embedding(self.adata, self.embedding_key_).astype(np.float64)
        x = self.adata.X if self.layer is None else self.adata.layers[self.layer]
        y = np.log1p(np.asarray(x.toarray() if sparse.issparse(x) else x, dtype=np.float64))
        scaler = StandardScaler().fit(emb)
        n_comp = min(self.n_components, emb.shape[0], emb.shape[1])
        pca = PCA(n_components=n_comp, random_state=0).fit(scaler.transform(emb))
        z = pca.transform(scaler.transform(emb))
        alpha = self.alpha if self.alpha is not None else 100.0 / (n_comp * y.shape[1])
        reg = Ridge(alpha=alpha, solver="lsqr", fit_intercept=False, random_state=0, max_iter=1000).fit(z, y)
        self.params_ = {
            "scaler_mean": scaler.mean_,
            "scaler_scale": scaler.scale_,
            "pca_mean": pca.mean_,
            "pca_components": pca.components_,
            "coef": reg.coef_,
            "offset": y.mean(0),
        }
        self.alpha_ = float(alpha)
        self.n_components_ = int(n_comp)
        self.is_trained_ = True
        return self

    def _check_trained(self) -> None:
        if not self.is_trained_:
            msg = "This RidgeProbe is not trained yet; call `.train()` (or use `stfm.tl.fit_expression(..., method='ridge')`)."
            raise RuntimeError(msg)

    def predict_log1p(self, adata: AnnData | None = None, *, use_rep: str | None = None) -> np.ndarray:
        """Predicted ``log1p`` counts, float64 ``(n_obs, n_genes)`` (unclipped; what HEST correlates)."""
        from ._checks import check_embedding
        from ._checks import recorded_encoder as _recorded_encoder

        self._check_trained()
        adata = self.adata if adata is None else adata
        p = self.params_
        key = use_rep or self.embedding_key_
        emb = check_embedding(adata, key, n_dims=len(p["scaler_mean"])).astype(np.float64)
        enc = _recorded_encoder(adata, key)
        if enc is not None and self.encoder_ is not None and enc != self.encoder_:
            msg = (
                f"The query embedding `obsm[{key!r}]` was made with encoder {enc!r}, but the probe was trained on "
                f"{self.encoder_!r} embeddings. Run `stfm.pp.extract_features(adata, {self.encoder_!r})` on the query first."
            )
            raise ValueError(msg)
        z = ((emb - p["scaler_mean"]) / p["scaler_scale"] - p["pca_mean"]) @ p["pca_components"].T
        return z @ p["coef"].T + p["offset"]

    def predict(
        self,
        adata: AnnData | None = None,
        *,
        library_size: float | Literal["observed", "predicted"] = 1e4,
        use_rep: str | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Predicted expression, float32 ``(n_obs, n_genes)``.

        ``expm1`` of the predicted ``log1p`` counts, clipped at 0 (``library_size='predicted'``), or those counts
        rescaled so each spot sums to ``library_size`` over the panel (a number), or to the query's observed
        panel counts (``'observed'``).
        """
        counts = np.expm1(np.clip(self.predict_log1p(adata, use_rep=use_rep), 0, None))
        if isinstance(library_size, str) and library_size == "predicted":
            return counts.astype(np.float32)
        if isinstance(library_size, str) and library_size == "observed":
            src = self.adata if adata is None else adata
            if not pd.Index(self._genes).isin(src.var_names).all():
                msg = (
                    "`library_size='observed'` needs raw counts of the model's genes in the query; this table lacks "
                    "some of them. Pass a number (e.g. 1e4) or 'predicted'."
                )
                raise ValueError(msg)
            x = (
                src[:, self._genes].X
                if self.layer is None or self.layer not in src.layers
                else src[:, self._genes].layers[self.layer]
            )
            target = np.asarray(x.sum(axis=1)).ravel()
        else:
            target = check_positive(library_size, name="library_size")
        total = counts.sum(1)
        scale = np.divide(target, total, out=np.zeros_like(total), where=total > 0)
        return (counts * np.reshape(scale, (-1, 1))).astype(np.float32)

    # -- persistence ------------------------------------------------------------------------------
    def save(self, dir_path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the fitted probe to ``dir_path/ridge_probe.npz`` (numpy arrays only; loaded without pickle)."""
        self._check_trained()
        dir_path = Path(dir_path)
        if dir_path.exists() and any(dir_path.iterdir()) and not overwrite:
            msg = f"{dir_path} already exists and is not empty; pass `overwrite=True` to replace it."
            raise ValueError(msg)
        meta = {
            "embedding_key": self.embedding_key_,
            "layer": self.layer,
            "n_components": self.n_components,
            "alpha": self.alpha,
            "alpha_": self.alpha_,
            "n_components_": self.n_components_,
            "encoder": self.encoder_,
        }
        dir_path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=dir_path) as tmp:
            tmp_file = Path(tmp) / _FILE
            np.savez(
                tmp_file,
                genes=np.asarray(self._genes, dtype=str),
                meta=np.asarray(json.dumps(meta)),
                **self.params_,
            )
            shutil.move(str(tmp_file), dir_path / _FILE)

    @classmethod
    def load(cls, dir_path: str | os.PathLike[str], adata: AnnData | None = None) -> RidgeProbe:
        """Load a probe saved with :meth:`save`; ``adata`` (optional) must hold the same genes."""
        path = Path(dir_path) / _FILE
        if not path.is_file():
            msg = f"No RidgeProbe found at {path}; expected a folder written by `RidgeProbe.save`."
            raise FileNotFoundError(msg)
        with np.load(path, allow_pickle=False) as f:
            genes = [str(g) for g in f["genes"]]
            meta = json.loads(str(f["meta"]))
            params = {k: f[k] for k in f.files if k not in {"genes", "meta"}}
        if adata is not None and list(map(str, adata.var_names)) != genes:
            msg = (
                f"`adata.var_names` ({adata.n_vars} genes) differ from the {len(genes)} genes the probe was trained on; "
                "subset with `adata[:, stfm.get.model_genes(model)]`."
            )
            raise ValueError(msg)
        obj = cls.__new__(cls)
        obj.adata = adata
        obj.embedding_key_ = meta["embedding_key"]
        obj.layer = meta["layer"]
        obj.n_components = meta["n_components"]
        obj.alpha = meta["alpha"]
        obj.alpha_ = meta["alpha_"]
        obj.n_components_ = meta["n_components_"]
        obj.encoder_ = meta.get("encoder")
        obj._genes = genes
        obj.params_ = params
        obj.is_trained_ = True
        return obj

    def __repr__(self) -> str:
        state = f"trained, alpha={self.alpha_:.3g}, {self.n_components_} PCs" if self.is_trained_ else "not trained"
        return f"RidgeProbe(`obsm[{self.embedding_key_!r}]` → {len(self._genes)} genes, log1p; {state})"
