"""``synthetic_st``: a small spatial transcriptomics data set with known structure, for tests and examples
(as scvi-tools' ``synthetic_iid``): counts and an 'H&E embedding' driven by one low-rank spatial field."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["synthetic_st"]

SYNTHETIC_EMBEDDING = "X_synthetic"


def _field(rng: np.random.Generator, xy: np.ndarray, n_latent: int, extent: float) -> np.ndarray:
    """A smooth random field per latent dimension: a sum of Gaussian bumps of width ~ extent / 4."""
    out = np.zeros((xy.shape[0], n_latent))
    for d in range(n_latent):
        for _ in range(4):
            centre = rng.uniform(0, extent, size=2)
            width = rng.uniform(0.15, 0.35) * extent
            out[:, d] += rng.normal() * np.exp(-((xy - centre) ** 2).sum(1) / (2 * width**2))
    return (out - out.mean(0)) / (out.std(0) + 1e-9)


def synthetic_st(
    *,
    n_sections: int = 4,
    n_patients: int = 2,
    n_genes: int = 60,
    grid: tuple[int, int] = (14, 12),
    n_latent: int = 4,
    embedding_dim: int = 48,
    embedding_noise: float = 0.5,
    depth: tuple[float, float] = (2000.0, 6000.0),
    theta: float = 8.0,
    pitch_px: float = 200.0,
    microns_per_pixel: float = 1.0,
    image: bool = False,
    as_spatialdata: bool = False,
    seed: int = 0,
) -> AnnData | SpatialData:
    """A synthetic spatial transcriptomics cohort whose expression is predictable from its 'H&E embedding'.

    Every section is a ``grid`` of spots (a square lattice with ``pitch_px`` pixels between centres, legacy-ST
    style, µm/px ``microns_per_pixel``). A smooth random field ``z`` (``n_latent`` dimensions) over each section
    drives both the embedding, ``z @ W_e`` plus Gaussian noise (``embedding_noise`` relative to signal), and the
    counts, NB(μ = depth · softmax(z @ W_g + b), θ): the same ``W_e``, ``W_g`` for every section, a patient-level
    offset in ``b`` and a per-section, spatially smooth sequencing depth drawn from ``depth``. So composition is
    predictable from the embedding, depth only partly, and patients differ.

    Parameters
    ----------
    n_sections, n_patients
        Sections (dealt round-robin to patients ``P0``, ``P1``, …).
    n_genes, n_latent, embedding_dim
        Panel size, rank of the field, embedding width.
    grid
        Spots per section (columns, rows).
    embedding_noise
        Standard deviation of the embedding noise relative to its signal.
    depth
        Range of the per-section median library size.
    theta
        NB inverse dispersion.
    pitch_px, microns_per_pixel
        Spot pitch in pixels and the image's µm/px (the pitch is 200 µm by default, as legacy ST).
    image
        Also render a small RGB picture per section, coloured by the field, in
        ``uns['spatial'][section]['images']['hires']`` (for plots; it is not an H&E).
    as_spatialdata
        Return a SpatialData object: one table ``'table'`` annotating one circle shapes element per section.
    seed
        Random seed.

    Returns
    -------
    AnnData (spots × genes, raw integer counts in ``X``, ``obs['section']`` / ``obs['patient']``,
    ``obsm['spatial']`` (x, y pixels), ``obsm['X_synthetic']`` with provenance ``uns['stfm']['X_synthetic']``,
    ``uns['spatial'][section]['scalefactors']``, the true composition in ``obsm['true_composition']``) or its
    SpatialData twin.
    """
    import anndata as ad
    from scipy import sparse

    if n_sections < 1 or n_patients < 1 or n_patients > n_sections:
        msg = f"Expected 1 <= n_patients <= n_sections, found n_sections={n_sections}, n_patients={n_patients}."
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    w_e = rng.normal(size=(n_latent, embedding_dim))
    w_g = rng.normal(scale=0.9, size=(n_latent, n_genes))
    b_g = rng.normal(scale=1.0, size=n_genes)
    patient_offset = {f"P{p}": rng.normal(scale=0.3, size=n_genes) for p in range(n_patients)}
    nx, ny = grid
    gx, gy = np.meshgrid(np.arange(nx), np.arange(ny))
    base_xy = np.stack([gx.ravel(), gy.ravel()], axis=1).astype(np.float64)
    parts = []
    for s in range(n_sections):
        name = f"S{s}"
        patient = f"P{s % n_patients}"
        xy_grid = base_xy + rng.normal(scale=0.02, size=base_xy.shape)
        z = _field(rng, xy_grid, n_latent, float(max(nx, ny)))
        signal = z @ w_e
        emb = signal + embedding_noise * signal.std() * rng.normal(size=signal.shape)
        logits = z @ w_g + b_g + patient_offset[patient]
        comp = np.exp(logits - logits.max(1, keepdims=True))
        comp /= comp.sum(1, keepdims=True)
        med = rng.uniform(*depth)
        depth_field = med * np.exp(0.4 * z[:, 0] + 0.15 * rng.normal(size=z.shape[0]))
        mu = depth_field[:, None] * comp
        counts = rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)
        xy_px = (xy_grid + 1.0) * pitch_px
        obs = pd.DataFrame({"section": name, "patient": patient},
                           index=[f"{name}_{i}" for i in range(xy_px.shape[0])])  # fmt: skip
        a = ad.AnnData(X=sparse.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=[f"G{g}" for g in range(n_genes)]))
        a.obsm["spatial"] = xy_px
        a.obsm[SYNTHETIC_EMBEDDING] = emb.astype(np.float32)
        a.obsm["true_composition"] = comp.astype(np.float32)
        sf = {"microns_per_pixel": float(microns_per_pixel), "spot_diameter_fullres": 0.5 * pitch_px,
              "tissue_hires_scalef": 0.1}  # fmt: skip
        entry: dict[str, Any] = {"scalefactors": sf, "metadata": {"platform": "synthetic", "spot_diameter_um": 0.5 * pitch_px * microns_per_pixel}}
        if image:
            entry["images"] = {"hires": _render(z, xy_px * 0.1, (int((ny + 2) * pitch_px * 0.1), int((nx + 2) * pitch_px * 0.1)))}
        a.uns["spatial"] = {name: entry}
        parts.append(a)
    adata = ad.concat(parts, merge="same", uns_merge="unique")
    adata.obs["section"] = pd.Categorical(adata.obs["section"])
    adata.obs["patient"] = pd.Categorical(adata.obs["patient"])
    adata.uns["stfm"] = {SYNTHETIC_EMBEDDING: {"function": "stfm.datasets.synthetic_st", "encoder": "synthetic",
                                               "embed_dim": int(embedding_dim), "seed": int(seed)}}  # fmt: skip
    if not as_spatialdata:
        return adata
    return _to_spatialdata(adata, pitch_px)


def _render(z: np.ndarray, xy: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An RGB image (uint8) whose colour around each spot follows the first three field dimensions."""
    from scipy.interpolate import griddata

    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.zeros((h, w, 3), dtype=np.float64)
    for c in range(3):
        v = z[:, c % z.shape[1]]
        rgb[..., c] = griddata(xy, v, (xx, yy), method="linear", fill_value=float(v.mean()))
    rgb = (rgb - rgb.min()) / (rgb.max() - rgb.min() + 1e-9)
    return (60 + 180 * rgb).astype(np.uint8)


def _to_spatialdata(adata: AnnData, pitch_px: float) -> SpatialData:
    import geopandas as gpd
    import shapely
    from spatialdata import SpatialData
    from spatialdata.models import ShapesModel, TableModel

    shapes = {}
    for sec in adata.obs["section"].cat.categories:
        m = (adata.obs["section"] == sec).to_numpy()
        xy = adata.obsm["spatial"][m]
        gdf = gpd.GeoDataFrame({"radius": np.full(m.sum(), 0.25 * pitch_px)}, geometry=shapely.points(xy),
                               index=pd.Index(adata.obs_names[m], name="spot_id"))  # fmt: skip
        shapes[str(sec)] = ShapesModel.parse(gdf)
    table = adata.copy()
    table.obs["region"] = pd.Categorical(table.obs["section"].astype(str))
    table.obs["spot_id"] = table.obs_names.to_numpy()
    table = TableModel.parse(table, region=list(shapes), region_key="region", instance_key="spot_id")
    return SpatialData(shapes=shapes, tables={"table": table})
