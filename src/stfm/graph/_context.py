"""Direction-binned, multi-scale neighbourhood pooling of per-spot features (numba).

For every spot ``i`` the neighbours ``j`` of the same section are assigned to a *scale* (a ring of radii
measured in units of the spot pitch) and an angular *sector*; the features of the neighbours that fall in
each (scale, sector) bin are averaged. The result is one *context token* per bin, plus a mask saying which
bins hold at least one neighbour. This is the spatial context of SpaCancer (neighbours in 4 directions at
several scales), computed from ``obsm['spatial']`` only, so it works the same way for legacy ST (200 µm
pitch), Visium (100 µm pitch) and regular tile grids.

Geometry (documented, and checked in the tests against :func:`pool_context_reference`):

- ``pitch`` = median distance from each spot to its nearest other spot (:func:`stfm.graph.spot_pitch`).
- Ring ``s`` holds neighbours at distance ``d`` with ``r[s-1] < d <= r[s]``, ``r[s] = (scales[s] + 0.5) × pitch``
  and ``r[-1] = 0`` (so ``scales=(1, 2, 4)`` gives rings up to 1.5, 2.5 and 4.5 pitches; on a square grid ring 0
  holds the 4 edge and 4 diagonal neighbours). The spot itself is never its own neighbour.
- Sector ``k`` of ``n_sectors`` is centred on the angle ``k × 2π / n_sectors`` measured in image coordinates
  (x to the right, y down): with 4 sectors, 0 = right (+x), 1 = down (+y), 2 = left, 3 = up. A neighbour at
  angle ``a = atan2(dy, dx)`` goes to ``floor(((a + π / n_sectors) mod 2π) / (2π / n_sectors))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numba
import numpy as np

from ._geometry import radius_pairs, section_indices, spot_pitch

__all__ = ["pool_context", "pool_context_reference", "ring_radii"]


def ring_radii(scales: Sequence[float], pitch: float) -> np.ndarray:
    """Outer radius of each ring: ``(scale + 0.5) × pitch`` (strictly increasing scales required)."""
    s = np.asarray(scales, dtype=np.float64)
    if s.ndim != 1 or s.size == 0 or np.any(s <= 0) or np.any(np.diff(s) <= 0):
        msg = f"Expected `scales` to be a non-empty, strictly increasing sequence of positive numbers, found {tuple(scales)!r}."
        raise ValueError(msg)
    return (s + 0.5) * float(pitch)


@numba.njit(cache=True)
def _bin_of(dx: float, dy: float, d: float, radii: np.ndarray, n_sectors: int) -> tuple[int, int]:
    s = -1
    for r in range(radii.shape[0]):
        if d <= radii[r]:
            s = r
            break
    if s < 0:
        return -1, -1
    width = 2.0 * math.pi / n_sectors
    a = math.atan2(dy, dx) + width / 2.0
    a = a % (2.0 * math.pi)
    k = int(math.floor(a / width))  # noqa: RUF046  (numba typing)
    if k >= n_sectors:
        k = n_sectors - 1
    return s, k


@numba.njit(cache=True)
def _pool_kernel(indptr, indices, coords, feats, radii, n_sectors, out, counts):
    n = indptr.shape[0] - 1
    d_feat = feats.shape[1]
    for i in range(n):
        xi = coords[i, 0]
        yi = coords[i, 1]
        for p in range(indptr[i], indptr[i + 1]):
            j = indices[p]
            if j == i:
                continue
            dx = coords[j, 0] - xi
            dy = coords[j, 1] - yi
            d = math.sqrt(dx * dx + dy * dy)
            s, k = _bin_of(dx, dy, d, radii, n_sectors)
            if s < 0:
                continue
            counts[i, s, k] += 1
            for f in range(d_feat):
                out[i, s, k, f] += feats[j, f]
    for i in range(n):
        for s in range(out.shape[1]):
            for k in range(out.shape[2]):
                c = counts[i, s, k]
                if c > 0:
                    for f in range(d_feat):
                        out[i, s, k, f] /= c


def _neighbour_csr(coords: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    n = coords.shape[0]
    pairs = radius_pairs(coords, radius)
    if pairs.size == 0:
        return np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    src = np.concatenate([pairs[:, 0], pairs[:, 1]])
    dst = np.concatenate([pairs[:, 1], pairs[:, 0]])
    order = np.lexsort((dst, src))
    src, dst = src[order], dst[order]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.add.at(indptr, src + 1, 1)
    return np.cumsum(indptr), dst.astype(np.int64)


def pool_context(
    coords: np.ndarray,
    features: np.ndarray,
    *,
    scales: Sequence[float] = (1.0, 2.0, 4.0),
    n_sectors: int = 4,
    pitch: float | None = None,
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean features of the neighbours in each (scale ring, angular sector) bin.

    Parameters
    ----------
    coords
        ``(n, 2)`` spot centres (x, y), e.g. ``obsm['spatial']``.
    features
        ``(n, d)`` per-spot features (an embedding).
    scales
        Ring sizes in units of the spot pitch (see the module docstring for the ring radii).
    n_sectors
        Number of angular sectors.
    pitch
        Centre-to-centre distance in coordinate units; derived per group with :func:`spot_pitch` when ``None``.
    groups
        Per-spot section labels: neighbours are searched only within the same group (one section never
        pools spots of another).

    Returns
    -------
    ``tokens`` of shape ``(n, len(scales) * n_sectors, d)`` (float32, bin ``s * n_sectors + k``) and ``mask``
    of shape ``(n, len(scales) * n_sectors)`` (bool, ``True`` where the bin holds at least one neighbour; the
    token is zero where it is ``False``).
    """
    coords = np.asarray(coords, dtype=np.float64)
    feats = np.ascontiguousarray(np.asarray(features, dtype=np.float32))
    if coords.ndim != 2 or coords.shape[1] < 2:
        msg = f"Expected spot coordinates of shape (n, 2), found {coords.shape}."
        raise ValueError(msg)
    coords = np.ascontiguousarray(coords[:, :2])
    if feats.ndim != 2 or feats.shape[0] != coords.shape[0]:
        msg = f"Expected features of shape ({coords.shape[0]}, d) to match the coordinates, found {feats.shape}."
        raise ValueError(msg)
    if int(n_sectors) < 1:
        msg = f"Expected `n_sectors` >= 1, found {n_sectors!r}."
        raise ValueError(msg)
    n, d = feats.shape
    n_scales = len(scales)
    out = np.zeros((n, n_scales, int(n_sectors), d), dtype=np.float32)
    counts = np.zeros((n, n_scales, int(n_sectors)), dtype=np.int64)
    for idx in section_indices(groups, n):
        if idx.size == 0:
            continue
        c = coords[idx]
        p = pitch if pitch is not None else (spot_pitch(c) if idx.size > 1 else 1.0)
        radii = ring_radii(scales, p)
        indptr, indices = _neighbour_csr(c, float(radii[-1]))
        o = np.zeros((idx.size, n_scales, int(n_sectors), d), dtype=np.float32)
        cnt = np.zeros((idx.size, n_scales, int(n_sectors)), dtype=np.int64)
        _pool_kernel(indptr, indices, c, np.ascontiguousarray(feats[idx]), radii, int(n_sectors), o, cnt)
        out[idx] = o
        counts[idx] = cnt
    return out.reshape(n, n_scales * int(n_sectors), d), (counts > 0).reshape(n, n_scales * int(n_sectors))


def pool_context_reference(
    coords: np.ndarray,
    features: np.ndarray,
    *,
    scales: Sequence[float] = (1.0, 2.0, 4.0),
    n_sectors: int = 4,
    pitch: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Slow pure-Python version of :func:`pool_context` (one group), written for checking the numba kernel."""
    coords = np.asarray(coords, dtype=np.float64)[:, :2]
    feats = np.asarray(features, dtype=np.float64)
    n, d = feats.shape
    p = spot_pitch(coords) if pitch is None else pitch
    radii = [(s + 0.5) * p for s in scales]
    width = 2 * math.pi / n_sectors
    sums = [[[np.zeros(d) for _ in range(n_sectors)] for _ in scales] for _ in range(n)]
    cnts = [[[0] * n_sectors for _ in scales] for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            dx, dy = coords[j, 0] - coords[i, 0], coords[j, 1] - coords[i, 1]
            dist = math.sqrt(dx * dx + dy * dy)
            ring = next((r for r, rad in enumerate(radii) if dist <= rad), None)
            if ring is None:
                continue
            k = min(math.floor(((math.atan2(dy, dx) + width / 2) % (2 * math.pi)) / width), n_sectors - 1)
            sums[i][ring][k] = sums[i][ring][k] + feats[j]
            cnts[i][ring][k] += 1
    tokens = np.zeros((n, len(scales) * n_sectors, d), dtype=np.float32)
    mask = np.zeros((n, len(scales) * n_sectors), dtype=bool)
    for i in range(n):
        for ring in range(len(scales)):
            for k in range(n_sectors):
                if cnts[i][ring][k]:
                    tokens[i, ring * n_sectors + k] = sums[i][ring][k] / cnts[i][ring][k]
                    mask[i, ring * n_sectors + k] = True
    return tokens, mask
