"""``expression_embedding``: a per-spot expression embedding (scVI, PCA or predicted expression) for cancer maps."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._containers import get_table
from .._logging import added, logger
from .._provenance import record
from .._rows import log_normalise
from .._validation import assert_key_in, check_valid_key
from ._cancer_common import _as_list, _split_sections

__all__ = ["expression_embedding"]


def expression_embedding(
    adatas_or_adata: AnnData | Sequence[AnnData] | Mapping[str, AnnData],
    *,
    method: Literal["scvi", "pca", "predicted"] = "scvi",
    reference: Sequence[int] | Sequence[str] | None = None,
    n_comps: int = 16,
    n_top_genes: int = 2000,
    layer: str | None = None,
    max_epochs: int = 100,
    seed: int = 0,
    section_key: str = "section",
    standardize: Literal["none", "section"] = "none",
    key_added: str | None = None,
) -> None:
    """Per-spot expression embedding that transfers across sections and batches.

    Genes are the intersection over all sections; highly variable genes are chosen on the *reference*
    sections only. Methods:

    ``'scvi'``
        :class:`scvi.model.SCVI` latent mean (``n_comps`` dimensions) trained on reference **and** query sections
        together, ``batch`` = section, on raw counts of the reference HVGs (``seurat_v3``). Unsupervised: no label
        is read.
    ``'pca'``
        PCA of log-normalised counts (``log1p`` of counts per 10,000) of the reference HVGs, standardised with the
        reference mean / std; fitted on the reference, applied to every section.
    ``'predicted'``
        As ``'pca'`` but on ``layers[layer or 'predicted']`` (expression predicted from H&E by
        :func:`stfm.tl.predict_expression`) wherever a section has that layer, and on the counts in ``X`` for sections
        without it (e.g. a measured reference and an H&E-only query). Giving the reference the same layer
        (out-of-fold predictions) keeps reference and query embeddings from the same kind of data.

    Parameters
    ----------
    adatas_or_adata
        One AnnData (sections in ``obs[section_key]``), or a list / dict of AnnData (one per section).
    method
        See above.
    reference
        Positions (list) or keys (dict) of the reference sections; ``None`` = all.
    n_comps
        Embedding dimension (scVI ``n_latent`` or number of principal components).
    n_top_genes
        Number of highly variable genes (fewer if fewer genes are shared).
    layer
        Count layer (``None`` = ``X``); for ``'predicted'`` the predicted layer (default ``'predicted'``).
    max_epochs
        scVI training epochs.
    seed
        Random seed (scVI initialisation and minibatches, PCA solver).
    section_key
        ``obs`` column naming sections when a single AnnData holds several.
    standardize
        ``'section'``: centre and scale every embedding dimension within each section (its own mean and standard
        deviation over its spots), which removes section- and patient-level offsets; a query section is
        standardised with its own statistics, so no label is read. ``'none'``: keep the embedding as computed.
    key_added
        ``obsm`` key; default ``'X_scvi_expr'``, ``'X_pca_expr'`` or ``'X_predicted_expr'``.

    Returns
    -------
    Nothing; every AnnData gets

    `.obsm['X_<method>_expr' | key_added]` : :class:`numpy.ndarray` (float32, ``(n_obs, n_comps)``)
    `.uns['stfm']['X_<method>_expr' | key_added]` : method, genes used, reference sections, seed.
    """
    if method not in ("scvi", "pca", "predicted"):
        msg = f"Expected `method` to be one of 'scvi', 'pca', 'predicted'; found {method!r}."
        raise ValueError(msg)
    if standardize not in ("none", "section"):
        msg = f"Expected `standardize` to be 'none' or 'section'; found {standardize!r}."
        raise ValueError(msg)
    key = check_valid_key(key_added or {"scvi": "X_scvi_expr", "pca": "X_pca_expr", "predicted": "X_predicted_expr"}[method])
    objs, names = _as_list(adatas_or_adata)
    tables = [get_table(o) for o in objs]
    # split a multi-section AnnData into views so that HVGs and batches follow sections
    parts: list[tuple[int, str, np.ndarray]] = []
    for t_i, t in enumerate(tables):
        for sec, idx in _split_sections(t, section_key):
            parts.append((t_i, sec, idx))
    if reference is None:
        ref_tables = set(range(len(tables)))
    else:
        lookup = {n: i for i, n in enumerate(names)} if names else {}
        ref_tables = set()
        for r in reference:
            if isinstance(r, str):
                if r not in lookup:
                    msg = f"Reference {r!r} not found; available keys: {names}."
                    raise KeyError(msg)
                ref_tables.add(lookup[r])
            else:
                ref_tables.add(int(r))
    src_layer = (layer or "predicted") if method == "predicted" else layer
    if method == "predicted":
        if not any(src_layer in t.layers for t in tables):
            msg = f"`layers[{src_layer!r}]` not found in any section. Available layers: {sorted(tables[0].layers)}. Run `stfm.tl.predict_expression` first."
            raise KeyError(msg)
    else:
        for t in tables:
            if src_layer is not None:
                assert_key_in(src_layer, t.layers, where="layers")
    genes = tables[0].var_names
    for t in tables[1:]:
        genes = genes.intersection(t.var_names, sort=False)
    genes = genes[~genes.duplicated()]
    if len(genes) < 2:
        msg = f"The sections share {len(genes)} gene names; an expression embedding needs shared genes."
        raise ValueError(msg)

    def matrix(t_i: int, idx: np.ndarray) -> Any:
        t = tables[t_i]
        cols = t.var_names.get_indexer(genes)
        # 'predicted': sections without the predicted layer (measured ST only) use their counts in X
        x = t.X if src_layer is None or src_layer not in t.layers else t.layers[src_layer]
        return x[idx][:, cols]

    ref_parts = [p for p in parts if p[0] in ref_tables]
    if not ref_parts:
        msg = "No reference section selected: `reference` must name at least one section."
        raise ValueError(msg)
    n_top = int(min(n_top_genes, len(genes)))

    if method == "scvi":
        import scanpy as sc
        import scvi

        def counts(t_i, idx):
            m = matrix(t_i, idx)
            return sparse.csr_matrix(m, dtype=np.float32)

        ref = AnnData(sparse.vstack([counts(t, i) for t, _, i in ref_parts]).tocsr())
        ref.var_names = np.asarray(genes)
        ref.obs["batch"] = np.concatenate([[f"{t}:{s}"] * len(i) for t, s, i in ref_parts])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sc.pp.highly_variable_genes(ref, n_top_genes=n_top, flavor="seurat_v3", subset=False,
                                        batch_key="batch" if len(ref_parts) > 1 else None)  # fmt: skip
        hvg = ref.var_names[ref.var["highly_variable"].to_numpy()]
        cols = genes.get_indexer(hvg)
        full = AnnData(sparse.vstack([counts(t, i)[:, cols] for t, _, i in parts]).tocsr())
        full.var_names = np.asarray(hvg)
        full.obs_names = [f"{k}" for k in range(full.n_obs)]
        full.obs["batch"] = pd.Categorical(np.concatenate([[f"{t}:{s}"] * len(i) for t, s, i in parts]))
        empty = np.asarray(full.X.sum(1)).ravel() == 0
        if empty.any():
            logger.warning(
                "%d spots have no counts over the %d selected genes; their scVI embedding is NaN (treated as missing).",
                int(empty.sum()), len(hvg),
            )
        fit = full[~empty].copy()
        scvi.settings.seed = seed
        scvi.model.SCVI.setup_anndata(fit, batch_key="batch")
        vae = scvi.model.SCVI(fit, n_latent=n_comps)
        vae.train(max_epochs=max_epochs, train_size=1.0, batch_size=128, enable_progress_bar=False,
                  accelerator="cpu", logger=False, enable_model_summary=False)  # fmt: skip
        z = np.full((full.n_obs, n_comps), np.nan, dtype=np.float32)
        z[~empty] = vae.get_latent_representation().astype(np.float32)
        genes_used = list(hvg)
    else:
        from sklearn.decomposition import PCA

        ref_x = np.vstack([log_normalise(matrix(t, i), dtype=np.float32) for t, _, i in ref_parts])
        disp = ref_x.var(0)
        cols = np.argsort(-disp, kind="stable")[:n_top]
        mean, std = ref_x[:, cols].mean(0), ref_x[:, cols].std(0) + 1e-6
        n_pc = int(min(n_comps, len(cols), ref_x.shape[0]))
        pca = PCA(n_components=n_pc, random_state=seed, svd_solver="full").fit((ref_x[:, cols] - mean) / std)
        z = np.vstack([pca.transform((log_normalise(matrix(t, i), dtype=np.float32)[:, cols] - mean) / std) for t, _, i in parts]).astype(np.float32)
        genes_used = list(genes[cols])
    start = 0
    out = {t_i: np.zeros((tables[t_i].n_obs, z.shape[1]), np.float32) for t_i in range(len(tables))}
    for t_i, _, idx in parts:
        block = z[start : start + len(idx)]
        if standardize == "section":
            ok = np.isfinite(block).all(1)
            if ok.sum() >= 2:
                mu, sd = block[ok].mean(0), block[ok].std(0)
                block = (block - mu) / np.where(sd > 1e-8, sd, 1.0)
        out[t_i][idx] = block
        start += len(idx)
    ref_names = sorted({s for t, s, _ in ref_parts})
    for t_i, t in enumerate(tables):
        t.obsm[key] = out[t_i]
        record(t, key, "expression_embedding", method=method, n_comps=int(z.shape[1]), n_genes=len(genes_used),
               reference_sections=ref_names, layer=src_layer, seed=seed, max_epochs=max_epochs if method == "scvi" else "None",
               standardize=standardize)  # fmt: skip
        added(f"obsm[{key!r}]", out[t_i].shape)
