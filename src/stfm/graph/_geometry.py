"""Neighbour searches on spot / tile centres, one implementation for every stfm method (no torch import).

Every function takes ``coords`` of shape ``(n, 2)`` (x, y) and optional per-spot ``groups`` (section labels):
with ``groups``, neighbours are searched within each group only, so one section never borrows from another.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import sparse

__all__ = [
    "knn_graph",
    "knn_indices",
    "radius_graph",
    "radius_pairs",
    "section_indices",
    "smoothing_matrix",
    "spatial_blocks",
    "spot_pitch",
]


def _coords(coords: np.ndarray) -> np.ndarray:
    xy = np.asarray(coords, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] < 2:
        msg = f"Expected spot coordinates of shape (n, 2) holding (x, y), found {xy.shape}."
        raise ValueError(msg)
    xy = np.ascontiguousarray(xy[:, :2])
    if not np.isfinite(xy).all():
        msg = f"Spot coordinates hold NaN or inf values in {int((~np.isfinite(xy).all(1)).sum())} rows; drop those spots first."
        raise ValueError(msg)
    return xy


def section_indices(groups: np.ndarray | None, n: int) -> list[np.ndarray]:
    """Integer indices of each group, in order of first appearance (one group of all ``n`` spots when ``None``)."""
    if groups is None:
        return [np.arange(n)]
    g = np.asarray(groups)
    if g.shape[0] != n:
        msg = f"Expected one group label per spot ({n}), found {g.shape[0]}."
        raise ValueError(msg)
    _, first, inverse = np.unique(g, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    return [np.flatnonzero(inverse == k) for k in order]


def spot_pitch(coords: np.ndarray) -> float:
    """Median distance from each spot to its nearest other spot (the centre-to-centre pitch)."""
    from scipy.spatial import cKDTree

    xy = _coords(coords)
    if xy.shape[0] < 2:
        msg = f"Need at least 2 spots to derive the spot pitch from coordinates, found {xy.shape[0]}."
        raise ValueError(msg)
    dist, _ = cKDTree(xy).query(xy, k=2)
    d = dist[:, 1]
    d = d[d > 0]
    if d.size == 0:
        msg = "All spot coordinates coincide; cannot derive a spot pitch from `obsm['spatial']`."
        raise ValueError(msg)
    return float(np.median(d))


def radius_pairs(coords: np.ndarray, radius: float) -> np.ndarray:
    """Unordered pairs ``(i, j)``, ``i < j``, of spots at most ``radius`` apart (int64 ``(m, 2)``)."""
    from scipy.spatial import cKDTree

    xy = _coords(coords)
    if xy.shape[0] < 2 or radius <= 0:
        return np.zeros((0, 2), dtype=np.int64)
    return cKDTree(xy).query_pairs(float(radius) * (1 + 1e-9), output_type="ndarray").astype(np.int64)


def knn_indices(coords: np.ndarray, k: int, *, groups: np.ndarray | None = None) -> np.ndarray:
    """Indices of each spot's ``k`` nearest other spots of the same group, nearest first, int64 ``(n, k)``.

    A group with fewer than ``k + 1`` spots repeats its farthest neighbour to fill the row (a lone spot lists
    itself), so every row has ``k`` valid indices.
    """
    from scipy.spatial import cKDTree

    xy = _coords(coords)
    n = xy.shape[0]
    k = int(k)
    if k < 1:
        msg = f"Expected `k` >= 1 neighbours, found {k}."
        raise ValueError(msg)
    out = np.empty((n, k), dtype=np.int64)
    for idx in section_indices(groups, n):
        if idx.size == 1:
            out[idx] = idx[0]
            continue
        kk = min(k, idx.size - 1)
        _, nbr = cKDTree(xy[idx]).query(xy[idx], k=kk + 1)
        nbr = np.asarray(nbr).reshape(idx.size, kk + 1)
        # drop the spot itself (not always the first hit when spots coincide), else the farthest hit
        keep_mask = nbr != np.arange(idx.size)[:, None]
        keep_mask[keep_mask.all(1), -1] = False
        keep = nbr[keep_mask].reshape(idx.size, kk)
        if kk < k:
            keep = np.concatenate([keep, np.repeat(keep[:, -1:], k - kk, axis=1)], axis=1)
        out[idx] = idx[keep]
    return out


def knn_graph(coords: np.ndarray, k: int, *, groups: np.ndarray | None = None) -> sparse.csr_matrix:
    """Directed kNN graph within groups: ``A[i, j]`` = distance from ``i`` to neighbour ``j`` (csr, ``(n, n)``)."""
    xy = _coords(coords)
    n = xy.shape[0]
    nbr = knn_indices(xy, k, groups=groups)
    rows = np.repeat(np.arange(n), nbr.shape[1])
    cols = nbr.ravel()
    keep = rows != cols
    d = np.linalg.norm(xy[rows[keep]] - xy[cols[keep]], axis=1)
    g = sparse.csr_matrix((np.maximum(d, 1e-12), (rows[keep], cols[keep])), shape=(n, n))
    g.sum_duplicates()
    return g


def radius_graph(
    coords: np.ndarray,
    radius: float | None = None,
    *,
    groups: np.ndarray | None = None,
    pitches: float = 1.5,
    fallback_k: int | None = 4,
) -> sparse.csr_matrix:
    """Symmetric radius graph within groups: ``A[i, j]`` = distance for spots at most ``radius`` apart.

    ``radius=None`` uses ``pitches`` × the group's :func:`spot_pitch` (1.5: the 8 neighbours of a square grid such as
    legacy ST, the 6 of Visium's hexagonal grid). Spots left with no neighbour (a sparse section) are linked to their
    ``fallback_k`` nearest spots instead, with a warning that counts them; ``fallback_k=None`` leaves them isolated.
    """
    xy = _coords(coords)
    n = xy.shape[0]
    rows, cols, dist = [], [], []
    n_isolated = 0
    for idx in section_indices(groups, n):
        if idx.size < 2:
            n_isolated += idx.size
            continue
        r = float(radius) if radius is not None else pitches * spot_pitch(xy[idx])
        pairs = radius_pairs(xy[idx], r)
        deg = np.bincount(pairs.ravel(), minlength=idx.size) if pairs.size else np.zeros(idx.size, int)
        lonely = np.flatnonzero(deg == 0)
        if lonely.size and fallback_k:
            nbr = knn_indices(xy[idx], fallback_k)[lonely]
            extra = np.stack([np.repeat(lonely, nbr.shape[1]), nbr.ravel()], axis=1)
            extra = extra[extra[:, 0] != extra[:, 1]]
            pairs = np.unique(np.concatenate([pairs.reshape(-1, 2), np.sort(extra, axis=1)]), axis=0)
        n_isolated += lonely.size
        if pairs.size:
            d = np.linalg.norm(xy[idx][pairs[:, 0]] - xy[idx][pairs[:, 1]], axis=1)
            rows += [idx[pairs[:, 0]], idx[pairs[:, 1]]]
            cols += [idx[pairs[:, 1]], idx[pairs[:, 0]]]
            dist += [d, d]
    if n_isolated:
        what = f"linked to their {fallback_k} nearest spots instead" if fallback_k else "left isolated"
        warnings.warn(
            f"{n_isolated} of {n} spots have no neighbour within the radius (a sparse section or a lone spot); {what}.",
            UserWarning,
            stacklevel=2,
        )
    if not rows:
        return sparse.csr_matrix((n, n))
    g = sparse.csr_matrix(
        (np.maximum(np.concatenate(dist), 1e-12), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n)
    )
    return g


def smoothing_matrix(coords: np.ndarray, k: int, *, groups: np.ndarray | None = None) -> sparse.csr_matrix:
    """Row-stochastic ``(n, n)`` matrix averaging each spot with its ``k`` nearest spots of the same group.

    ``W @ values`` gives, for every spot, the mean of its own value and its ``k`` neighbours' (equal weights
    ``1 / (k + 1)``); ``k=0`` is the identity.
    """
    xy = _coords(coords)
    n = xy.shape[0]
    if int(k) <= 0:
        return sparse.identity(n, format="csr", dtype=np.float64)
    nbr = knn_indices(xy, int(k), groups=groups)
    rows = np.repeat(np.arange(n), nbr.shape[1] + 1)
    cols = np.concatenate([np.arange(n)[:, None], nbr], axis=1).ravel()
    w = sparse.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n))
    w.sum_duplicates()
    deg = np.asarray(w.sum(1)).ravel()
    return sparse.diags(1.0 / deg) @ w


def spatial_blocks(coords: np.ndarray, block_size: int, halo: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Split spots into square spatial blocks of about ``block_size`` spots, each with a halo.

    Returns ``(core, members)`` index arrays per block: ``core`` are the spots the block is responsible for (every
    spot is in exactly one core), ``members`` the core plus every spot within ``halo`` (coordinate units) of the
    block's square, so a model with a receptive field of ``halo`` sees the same neighbourhood for the core spots as
    on the whole section. One block when there are at most ``block_size`` spots.
    """
    xy = _coords(coords)
    n = xy.shape[0]
    if n <= block_size:
        idx = np.arange(n)
        return [(idx, idx)]
    lo, hi = xy.min(0), xy.max(0)
    n_side = int(np.ceil(np.sqrt(n / max(block_size, 1))))
    edges_x = np.linspace(lo[0], hi[0], n_side + 1)
    edges_y = np.linspace(lo[1], hi[1], n_side + 1)
    bx = np.clip(np.searchsorted(edges_x, xy[:, 0], side="right") - 1, 0, n_side - 1)
    by = np.clip(np.searchsorted(edges_y, xy[:, 1], side="right") - 1, 0, n_side - 1)
    out = []
    for i in range(n_side):
        for j in range(n_side):
            core = np.flatnonzero((bx == i) & (by == j))
            if core.size == 0:
                continue
            x0, x1 = edges_x[i] - halo, edges_x[i + 1] + halo
            y0, y1 = edges_y[j] - halo, edges_y[j + 1] + halo
            inside = (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
            members = np.union1d(core, np.flatnonzero(inside))
            out.append((core, members))
    return out
