"""Region geometry: tumour / boundary / non-tumour calls from per-spot tumour flags, and tumour polygons."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from scipy import sparse

from .._constants import REGION_CATEGORIES
from ._geometry import radius_pairs, section_indices, spot_pitch

__all__ = ["call_regions", "tumour_shapes"]


def call_regions(
    coords: np.ndarray,
    tumour: np.ndarray,
    *,
    boundary_distance: float = 1.2,
    min_spots: int = 1,
    pitch: float | None = None,
    groups: np.ndarray | None = None,
) -> pd.Categorical:
    """Turn per-spot tumour calls into ``tumor`` / ``boundary`` / ``non-tumor``.

    Two spots are *adjacent* when their centres are at most ``boundary_distance × pitch`` apart (1.2 pitches
    by default: the 4 edge neighbours on a square grid such as legacy ST, the 6 nearest on Visium's hexagonal
    grid, with room for coordinate jitter; 1.5 also takes the diagonals of a square grid). Tumour components
    (connected through adjacency) smaller than ``min_spots`` are called non-tumour first. Then every spot with
    an adjacent spot of the other call — tumour spots touching non-tumour spots and vice versa — is ``boundary``;
    the remaining tumour spots are ``tumor`` and the rest ``non-tumor``. Adjacency never crosses sections
    (``groups``).
    """
    from scipy.sparse.csgraph import connected_components

    coords = np.asarray(coords, dtype=np.float64)[:, :2]
    tumour = np.asarray(tumour, dtype=bool).copy()
    n = tumour.size
    boundary = np.zeros(n, dtype=bool)
    for idx in section_indices(groups, n):
        if idx.size == 0:
            continue
        p = pitch if pitch is not None else (spot_pitch(coords[idx]) if idx.size > 1 else 1.0)
        pairs = radius_pairs(coords[idx], boundary_distance * p)
        t = tumour[idx]
        if min_spots > 1 and t.any():
            tp = pairs[t[pairs[:, 0]] & t[pairs[:, 1]]] if pairs.size else pairs
            adj = sparse.coo_matrix((np.ones(len(tp)), (tp[:, 0], tp[:, 1])), shape=(idx.size, idx.size)) if len(tp) else sparse.coo_matrix((idx.size, idx.size))
            _, comp = connected_components(adj, directed=False)
            sizes = np.bincount(comp[t], minlength=comp.max() + 1)
            t = t & (sizes[comp] >= min_spots)
            tumour[idx] = t
        if pairs.size:
            mixed = t[pairs[:, 0]] != t[pairs[:, 1]]
            b = np.zeros(idx.size, dtype=bool)
            b[pairs[mixed, 0]] = True
            b[pairs[mixed, 1]] = True
            boundary[idx] = b
    labels = np.where(boundary, "boundary", np.where(tumour, "tumor", "non-tumor"))
    return pd.Categorical(labels, categories=list(REGION_CATEGORIES))


def tumour_shapes(tumour: np.ndarray, coords: np.ndarray, pitch: float) -> Any:
    """Union of disks of radius 0.55 × pitch around tumour spots (so that adjacent spots merge), as polygons."""
    import geopandas as gpd
    import shapely

    pts = shapely.points(coords[tumour])
    if len(pts) == 0:
        return gpd.GeoDataFrame({"geometry": []}, geometry="geometry")
    merged = shapely.union_all(shapely.buffer(pts, 0.55 * pitch, quad_segs=8))
    polys = list(merged.geoms) if hasattr(merged, "geoms") else [merged]
    return gpd.GeoDataFrame({"n_spots": [int(shapely.contains(p, pts).sum()) for p in polys]}, geometry=polys,
                            index=pd.Index([f"tumor_{i}" for i in range(len(polys))]))  # fmt: skip
