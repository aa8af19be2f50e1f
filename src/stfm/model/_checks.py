"""Input checks and neighbour pooling shared by the expression models and tools (no torch / scvi import)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from .._validation import assert_key_in

__all__ = [
    "check_counts", "check_embedding", "check_sections_have_counts", "pool_neighbors", "recorded_encoder",
    "standardize_by_section", "standardized_input",
]  # fmt: skip

#: sections with fewer spots than this get a warning from :func:`standardize_by_section` (noisy statistics)
MIN_SECTION_SPOTS = 30


# --------------------------------------------------------------------------------------------------
# input checks shared with the tools
# --------------------------------------------------------------------------------------------------
def _encoder_from_key(embedding_key: str) -> str:
    """The encoder key an embedding key names (``'X_uni2_h'`` → ``'uni2_h'``), or the closest registered one, or a
    placeholder when none is close: never a name that is no encoder."""
    from ..encoders._cards import _REGISTRY, closest_card

    name = embedding_key[2:] if embedding_key.startswith("X_") else embedding_key
    if name in _REGISTRY:
        return name
    return closest_card(name) or "<encoder key, see stfm.encoders.list_encoders()>"


def recorded_encoder(adata: AnnData, embedding_key: str) -> str | None:
    """Encoder named in ``uns['stfm'][embedding_key]`` (written by :func:`stfm.pp.extract_features`), if any."""
    store = adata.uns.get("stfm", {})
    prov = store.get(embedding_key, {}) if hasattr(store, "get") else {}
    if not hasattr(prov, "get"):
        return None
    enc = prov.get("encoder", prov.get("model"))
    return None if enc is None else str(enc)


def check_embedding(adata: AnnData, embedding_key: str, *, n_dims: int | None = None) -> np.ndarray:
    """Return ``obsm[embedding_key]`` as float32 after checking it exists, is 2-D, finite and of the expected width."""
    if embedding_key not in adata.obsm:
        enc = _encoder_from_key(embedding_key)
        writes_it = embedding_key == f"X_{enc}"
        msg = (
            f"`adata.obsm[{embedding_key!r}]` not found (available: {sorted(adata.obsm.keys())}). Compute the "
            f"embedding first with `stfm.pp.extract_features(adata, {enc!r}"
            + (f")` (it writes `obsm[{embedding_key!r}]`)." if writes_it else f", key_added={embedding_key!r})`.")
        )
        raise KeyError(msg)
    emb = adata.obsm[embedding_key]
    emb = np.asarray(emb.values if isinstance(emb, pd.DataFrame) else emb)
    if emb.ndim != 2:
        msg = f"Expected `obsm[{embedding_key!r}]` to be a 2-D array (n_obs, n_dims), found shape {emb.shape}."
        raise ValueError(msg)
    if not np.issubdtype(emb.dtype, np.number):
        msg = f"Expected a numeric embedding in `obsm[{embedding_key!r}]`, found dtype {emb.dtype}."
        raise TypeError(msg)
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        ex = list(adata.obs_names[bad][:3])
        msg = (
            f"`obsm[{embedding_key!r}]` has NaN or inf values in {int(bad.sum())} of {adata.n_obs} rows (e.g. {ex}). "
            "Re-run `stfm.pp.extract_features` for these spots or drop them (`adata = adata[mask]`) first."
        )
        raise ValueError(msg)
    if n_dims is not None and emb.shape[1] != n_dims:
        msg = (
            f"The embedding `obsm[{embedding_key!r}]` has {emb.shape[1]} dimensions but the model was trained on "
            f"{n_dims}-dimensional embeddings. Extract the query features with the same encoder as the training data."
        )
        raise ValueError(msg)
    return emb.astype(np.float32, copy=False)


def check_counts(adata: AnnData, layer: str | None = None) -> None:
    """Raise unless ``X`` / ``layers[layer]`` holds non-negative integer counts."""
    where = "X" if layer is None else f"layers[{layer!r}]"
    if layer is not None:
        assert_key_in(layer, adata.layers, where="adata.layers")
    x = adata.X if layer is None else adata.layers[layer]
    if x is None:
        msg = f"`adata.{where}` is empty; the ZINB model needs raw counts there."
        raise ValueError(msg)
    values = x.data if sparse.issparse(x) else np.asarray(x)
    if values.size == 0:
        return
    if not np.isfinite(values).all():
        msg = f"`adata.{where}` has NaN or inf values; the ZINB model needs raw, non-negative integer counts."
        raise ValueError(msg)
    if values.min() < 0:
        msg = (
            f"`adata.{where}` has negative values (min {values.min():.3g}); the ZINB model needs raw, non-negative "
            "integer counts. Pass `layer=` naming a layer of raw counts (e.g. `adata.layers['counts']`)."
        )
        raise ValueError(msg)
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.mod(values, 1) == 0):
        msg = (
            f"`adata.{where}` holds non-integer values (e.g. {values[np.mod(values, 1) != 0][0]:.4g}), as after "
            "`normalize_total`/`log1p`; the ZINB model needs raw integer counts. Pass `layer=` naming a layer of raw "
            "counts, or use `method='ridge'`."
        )
        raise ValueError(msg)


def pool_neighbors(
    adata: AnnData,
    embedding_key: str,
    n_neighbors: Sequence[int],
    *,
    section_key: str | None = None,
    spatial_key: str = "spatial",
) -> np.ndarray:
    """Concatenate the embedding with its mean over the ``k`` nearest spots, for each ``k``, within each section.

    Returns an array of shape ``(n_obs, n_dims * (1 + len(n_neighbors)))``; neighbours never cross sections.
    """
    from .._validation import check_obs_key, check_spatial
    from ..graph import knn_indices

    emb = check_embedding(adata, embedding_key)
    xy = check_spatial(adata, spatial_key, purpose="neighbour pooling (pass `neighbor_pooling=None` to go without)")
    groups = None
    if section_key is not None:
        check_obs_key(adata, section_key, what="sections")
        groups = adata.obs[section_key].astype(str).to_numpy()
    nbr = knn_indices(xy, max(n_neighbors), groups=groups)
    out = [emb] + [emb[nbr[:, :k]].mean(axis=1) for k in n_neighbors]
    return np.concatenate(out, axis=1).astype(np.float32)


def standardize_by_section(embedding: np.ndarray, groups: np.ndarray | None, *, where: str = "the data") -> np.ndarray:
    """Centre and scale every embedding dimension within each section, with that section's own statistics.

    Label-free and computed from the section's image features alone, so it is the same at training and at
    inference: it removes section-level shifts of the features (staining, scanner, patient) before a model sees
    them. A dimension nearly constant in a section is scaled by a floor (1 % of the section's median spread) so it
    is not blown up. ``groups``: each row's section (``None``: one section). Returns float32.
    """
    import warnings

    x = np.asarray(embedding, dtype=np.float64)
    g = np.full(x.shape[0], "all spots", dtype=object) if groups is None else np.asarray(groups).astype(str)
    out = np.empty_like(x)
    small = []
    for s in pd.unique(g):
        m = g == s
        n = int(m.sum())
        if n < 2:
            msg = (
                f"Section {s!r} of {where} has {n} spot: per-section standardisation of the embedding "
                "(`embedding_standardize='section'`) needs every section whole. Predict whole sections, or pass the "
                "section column so that spots of one section are grouped."
            )
            raise ValueError(msg)
        if n < MIN_SECTION_SPOTS:
            small.append(f"{s!r} ({n})")
        v = x[m]
        mu, sd = v.mean(0), v.std(0)
        positive = sd[sd > 0]
        floor = 0.01 * float(np.median(positive)) if positive.size else 1.0
        out[m] = (v - mu) / np.maximum(sd, floor)
    if small:
        warnings.warn(
            f"Per-section standardisation of the embedding uses each section's own statistics; section(s) "
            f"{', '.join(small)} of {where} have fewer than {MIN_SECTION_SPOTS} spots, so their statistics are noisy.",
            UserWarning,
            stacklevel=3,
        )
    return out.astype(np.float32)


def standardized_input(adata: AnnData, args: dict, *, where: str) -> dict:
    """Setup ``args`` naming the model's embedding: for ``embedding_standardize='section'`` the embedding
    standardised within each section (:func:`standardize_by_section`, written to ``obsm``), else as given."""
    from .._constants import Key
    from .._validation import assert_one_of

    mode = args.get("embedding_standardize") or "none"
    assert_one_of(mode, ("none", "section"), name="embedding_standardize")
    if mode == "none":
        return args
    sec = args.get("section_key")
    groups = adata.obs[sec].astype(str).to_numpy() if sec is not None and sec in adata.obs else None
    key = Key.section_standardized(args["embedding_key"])
    adata.obsm[key] = standardize_by_section(np.asarray(adata.obsm[args["embedding_key"]]), groups, where=where)
    return {**args, "embedding_key": key}


def check_sections_have_counts(adata: AnnData, section_key: str, layer: str | None) -> None:
    """Refuse sections with no counts in the registered genes (naming them and how to drop them)."""
    x = adata.X if layer is None else adata.layers[layer]
    lib = np.asarray(x.sum(axis=1)).ravel()
    labels = adata.obs[section_key].astype(str).to_numpy()
    empty = [s for s in pd.unique(labels) if lib[labels == s].sum() == 0]
    if empty:
        msg = (
            f"Section(s) {empty} have no counts in the registered genes. Drop them (e.g. "
            f"`adata = adata[~adata.obs[{section_key!r}].isin({empty})]`) or check the gene panel."
        )
        raise ValueError(msg)
