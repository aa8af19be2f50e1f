"""The expression embedding a :class:`~stfm.model.CancerClassifier` carries, so a new section needs no user step.

PCA of log-normalised counts on genes chosen on the reference, with the loadings stored in the model (as plain
lists, saved in the model's JSON). A query section is embedded with the stored loadings: from its counts in ``X``
or from a layer such as ``layers['predicted']`` (expression predicted from H&E), so the same classifier maps
measured and histology-only sections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from anndata import AnnData

from .._rows import log_normalise

__all__ = ["ExpressionEmbedder"]

#: fraction of the embedder's genes a query must have (the others take the reference mean)
MIN_GENE_FRACTION = 0.8
#: rows embedded at a time
_BLOCK = 8192


def _columns(var_names: Sequence[str], genes: Sequence[str]) -> np.ndarray:
    """Column of each of ``genes`` in ``var_names`` (first occurrence; -1 where absent)."""
    first: dict[str, int] = {}
    for i, g in enumerate(map(str, var_names)):
        first.setdefault(g, i)
    return np.asarray([first.get(str(g), -1) for g in genes], dtype=np.int64)


@dataclass
class ExpressionEmbedder:
    """PCA loadings fitted on reference counts; :meth:`transform` embeds any section with them.

    Library size is the row sum over the embedder's genes, so a query with another panel (a predicted layer, a
    Visium panel) is normalised over the same genes as the reference. ``standardize='section'`` centres and
    scales every component within each section with that section's own statistics (label-free), which removes
    section- and patient-level offsets.
    """

    genes: list[str]
    mean: np.ndarray
    scale: np.ndarray
    components: np.ndarray
    standardize: Literal["none", "section"] = "section"

    @classmethod
    def fit(
        cls,
        sections: Sequence[AnnData],
        *,
        genes: Sequence[str] | None = None,
        n_comps: int = 16,
        n_top_genes: int = 2000,
        standardize: Literal["none", "section"] = "section",
        seed: int = 0,
    ) -> ExpressionEmbedder:
        """Fit on the counts in ``X`` of reference sections (genes shared by all; HVGs by log-variance)."""
        from sklearn.decomposition import PCA

        if standardize not in ("none", "section"):
            msg = f"Expected `standardize` to be 'none' or 'section'; found {standardize!r}."
            raise ValueError(msg)
        shared = sections[0].var_names
        for t in sections[1:]:
            shared = shared.intersection(t.var_names, sort=False)
        if genes is not None:
            shared = shared.intersection([str(g) for g in genes], sort=False)
        shared = shared[~shared.duplicated()]
        if len(shared) < 2:
            msg = (
                f"The reference sections share {len(shared)} gene names"
                + (" among `genes`" if genes is not None else "")
                + "; the expression embedding needs at least 2 (and works best with hundreds)."
            )
            raise ValueError(msg)
        for i, t in enumerate(sections):
            if t.X is None:
                msg = f"Reference section {i} has no counts in `X`; the stored expression embedding is fitted on measured counts."
                raise ValueError(msg)
        # gene variances of the log-normalised values, accumulated per section without densifying the panel
        n, s1, s2 = 0, np.zeros(len(shared)), np.zeros(len(shared))
        for t in sections:
            lg = log_normalise(t.X[:, _columns(t.var_names, shared)], sparse_output=True, check=True)
            n += lg.shape[0]
            s1 += np.asarray(lg.sum(0)).ravel()
            s2 += np.asarray(lg.multiply(lg).sum(0)).ravel()
        var = s2 / max(n, 1) - (s1 / max(n, 1)) ** 2
        order = np.argsort(-var, kind="stable")[: int(min(n_top_genes, len(shared)))]
        order = np.sort(order)
        chosen = [str(g) for g in shared[order]]
        # the HVG rows are re-normalised over the chosen genes (the embedder's own library size)
        x = np.vstack([log_normalise(t.X[:, _columns(t.var_names, chosen)], check=True) for t in sections])
        mean, scale = x.mean(0), x.std(0) + 1e-6
        n_pc = int(min(n_comps, len(chosen), x.shape[0] - 1))
        if n_pc < 1:
            msg = f"Too few spots ({x.shape[0]}) in the reference to fit an expression embedding."
            raise ValueError(msg)
        pca = PCA(n_components=n_pc, random_state=seed, svd_solver="full").fit((x - mean) / scale)
        return cls(genes=chosen, mean=mean, scale=scale, components=pca.components_.astype(np.float64), standardize=standardize)

    @property
    def n_comps(self) -> int:
        return int(self.components.shape[0])

    def check_genes(self, var_names: Sequence[str], *, where: str = "the query") -> np.ndarray:
        """Column of every embedder gene in ``var_names`` (-1 where absent); raises when too few are shared."""
        idx = _columns(var_names, self.genes)
        n_have = int((idx >= 0).sum())
        if n_have < MIN_GENE_FRACTION * len(self.genes):
            missing = [g for g, i in zip(self.genes, idx) if i < 0]
            shown = ", ".join(missing[:20]) + (f", … ({len(missing) - 20} more)" if len(missing) > 20 else "")
            msg = (
                f"{where} shares {n_have} of the {len(self.genes)} genes the cancer model's expression embedding needs "
                f"(at least {int(np.ceil(MIN_GENE_FRACTION * len(self.genes)))} required). Missing: {shown}. "
                "The full list is `model.embedder_genes`; predict them with `stfm.tl.predict_expression`, or fit the "
                "model on shared genes: `fit_cancer_model(reference, genes=query.var_names)`."
            )
            raise ValueError(msg)
        return idx

    def transform(self, adata: AnnData, *, layer: str | None = None, groups: np.ndarray | None = None) -> np.ndarray:
        """Embedding ``(n_obs, n_comps)`` of ``adata``'s counts (``X``) or ``layers[layer]``; float32.

        Genes the query lacks (at most 20 % of the embedder's) take the reference mean. ``groups`` (one label per
        spot) are the sections for ``standardize='section'``; ``None`` = one section.
        """
        if layer is not None:
            if layer not in adata.layers:
                msg = f"`layers[{layer!r}]` not found. Available layers: {sorted(adata.layers)}. Run `stfm.tl.predict_expression` first or pass `layer=None` for the counts in `X`."
                raise KeyError(msg)
            x = adata.layers[layer]
        else:
            x = adata.X
            if x is None or adata.n_vars == 0:
                msg = "The query has no counts in `X` and no `layer` was given. For an H&E-only section, predict expression first (`stfm.tl.predict_expression`) and pass `layer='predicted'`."
                raise ValueError(msg)
        idx = self.check_genes(adata.var_names)
        have = idx >= 0
        z = np.empty((adata.n_obs, self.n_comps))
        for start in range(0, adata.n_obs, _BLOCK):  # blocks of rows: memory O(block × genes)
            rows = slice(start, min(start + _BLOCK, adata.n_obs))
            logs = np.empty((rows.stop - rows.start, len(self.genes)))
            logs[:, have] = log_normalise(x[rows][:, idx[have]], check=True)
            logs[:, ~have] = self.mean[~have]
            z[rows] = ((logs - self.mean) / self.scale) @ self.components.T
        if self.standardize == "section":
            labels = np.zeros(adata.n_obs, dtype=int) if groups is None else np.asarray(groups)
            for g in np.unique(labels):
                m = labels == g
                if m.sum() >= 2:
                    mu, sd = z[m].mean(0), z[m].std(0)
                    z[m] = (z[m] - mu) / np.where(sd > 1e-8, sd, 1.0)
        return z.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return {"genes": list(self.genes), "mean": self.mean.tolist(), "scale": self.scale.tolist(),
                "components": self.components.tolist(), "standardize": self.standardize}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ExpressionEmbedder:
        return cls(genes=[str(g) for g in d["genes"]], mean=np.asarray(d["mean"], dtype=np.float64),
                   scale=np.asarray(d["scale"], dtype=np.float64),
                   components=np.asarray(d["components"], dtype=np.float64), standardize=d.get("standardize", "section"))  # fmt: skip

