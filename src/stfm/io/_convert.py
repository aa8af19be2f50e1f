"""AnnData ↔ SpatialData conversion that keeps every stfm slot."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd

from .._containers import get_library_id, get_table
from .._validation import check_spatial, check_unique_name, check_valid_key
from ._images import downsample, read_image

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["to_anndata", "to_spatialdata"]

REGION_KEY = "region"
INSTANCE_KEY = "spot_id"


def to_spatialdata(
    adata: AnnData,
    *,
    library_id: str | None = None,
    fullres_image: np.ndarray | Literal[False] | None = None,
    table_key: str = "table",
    spatial_key: str = "spatial",
) -> SpatialData:
    """Wrap a spot-level AnnData as a :class:`~spatialdata.SpatialData`, in spatialdata-io's Visium layout.

    Elements (``lib`` = ``library_id``, also the name of the full-resolution coordinate system):

    - ``images[f'{lib}_full_image']``: multiscale full-resolution image: ``fullres_image`` (``(height, width, 3)``
      uint8) or, when it is ``None``, the file named by ``uns['spatial'][lib]['metadata']['source_image_path']``
      if it exists (so an AnnData read back from h5ad keeps its image); ``False`` leaves it out;
    - ``images[f'{lib}_hires_image']``: ``uns['spatial'][lib]['images']['hires']``, scaled into ``lib``;
    - ``shapes[lib]``: spot circles at ``obsm[spatial_key]`` with radius ``spot_diameter_fullres / 2``;
    - ``tables[table_key]``: ``adata`` itself (``X``, ``layers``, ``obs``, ``obsm``, ``uns['stfm']`` … kept),
      annotating ``shapes[lib]`` through ``obs['region']`` and ``obs['spot_id']``. ``uns['spatial']`` keeps
      scale factors and metadata; its images move to image elements.
    """
    from spatialdata import SpatialData
    from spatialdata.models import Image2DModel, ShapesModel, TableModel
    from spatialdata.transformations import Identity, Scale

    if library_id is not None:
        check_valid_key(library_id, what="library_id")
    check_valid_key(table_key, what="table_key")
    if library_id is not None and not adata.uns.get("spatial"):
        lib = library_id  # no image metadata yet: the name only labels the new elements
    else:
        lib = get_library_id(adata, library_id) or "library"
    check_spatial(adata, spatial_key, purpose="building the spot shapes")
    if table_key == lib:
        msg = f"`table_key` {table_key!r} equals the shapes name; SpatialData element names must be unique."
        raise ValueError(msg)
    check_unique_name(table_key, [lib, f"{lib}_full_image", f"{lib}_hires_image"], what="table_key")

    table = adata.copy()
    spatial = table.uns.get("spatial", {}).get(lib, {})
    images_uns = spatial.get("images", {})
    sf = dict(spatial.get("scalefactors", {}))
    xy = np.asarray(table.obsm[spatial_key], dtype=np.float64)[:, :2]
    diameter = float(sf.get("spot_diameter_fullres", 1.0))

    images = {}
    source = spatial.get("metadata", {}).get("source_image_path")
    if fullres_image is None and source is not None and Path(str(source)).is_file():
        fullres_image = read_image(source)
    if fullres_image is not None and fullres_image is not False:
        images[f"{lib}_full_image"] = Image2DModel.parse(
            np.moveaxis(np.asarray(fullres_image), -1, 0),
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            scale_factors=[2, 2, 2, 2],
            chunks=(3, 4096, 4096),
            transformations={lib: Identity()},
        )
    if "hires" in images_uns:
        s = float(sf.get("tissue_hires_scalef", 1.0))
        images[f"{lib}_hires_image"] = Image2DModel.parse(
            np.moveaxis(np.asarray(images_uns["hires"])[..., :3], -1, 0),
            dims=("c", "y", "x"),
            c_coords=["r", "g", "b"],
            transformations={lib: Scale([1 / s, 1 / s], axes=("y", "x")), f"{lib}_downscaled_hires": Identity()},
        )
    shapes = {
        lib: ShapesModel.parse(
            xy,
            geometry=0,
            radius=np.full(len(xy), diameter / 2),
            index=pd.Index(np.arange(len(xy)), name=INSTANCE_KEY),
            transformations={lib: Identity()},
        )
    }
    if table.obs.index.name in (REGION_KEY, INSTANCE_KEY):
        table.obs.index.name = None
    table.obs[REGION_KEY] = pd.Categorical([lib] * table.n_obs)
    table.obs[INSTANCE_KEY] = np.arange(table.n_obs)
    table.uns["spatial"] = {lib: {k: v for k, v in spatial.items() if k != "images"}}
    table.uns.pop("spatialdata_attrs", None)
    table = TableModel.parse(table, region=lib, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    return SpatialData(images=images, shapes=shapes, tables={table_key: table})


def to_anndata(
    sdata: SpatialData,
    *,
    table_key: str | None = None,
    image_key: str | None = None,
    hires_max_px: int = 2000,
) -> AnnData:
    """The observation table of ``sdata`` as a squidpy/scanpy-ready AnnData.

    ``obsm['spatial']`` is kept, or taken from the centres of the annotated shapes; ``uns['spatial'][lib]``
    gets ``images['hires']`` from ``images[f'{lib}_hires_image']`` (or a downsampled full image, or
    ``image_key``) with a matching ``tissue_hires_scalef``. Every other slot is copied unchanged.
    """
    from spatialdata import get_element_annotators  # noqa: F401  (import check: spatialdata installed)
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import get_transformation

    table = get_table(sdata, table_key)
    region, _, instance_key = get_table_keys(table)
    lib = region if isinstance(region, str) else (region[0] if len(region) == 1 else None)
    if lib is None:
        msg = f"The table annotates several regions {list(region)}; convert one region at a time."
        raise ValueError(msg)
    adata = table.copy()
    if "spatial" not in adata.obsm:
        shapes = sdata.shapes.get(lib)
        if shapes is None:
            msg = f"The table has no `obsm['spatial']` and no shapes element {lib!r} to take coordinates from."
            raise KeyError(msg)
        centres = shapes.geometry.centroid
        xy = pd.DataFrame({"x": centres.x.to_numpy(), "y": centres.y.to_numpy()}, index=shapes.index)
        adata.obsm["spatial"] = xy.loc[adata.obs[instance_key].to_numpy()].to_numpy()

    spatial = dict(adata.uns.get("spatial", {}).get(lib, {}))
    sf = dict(spatial.get("scalefactors", {}))
    key = image_key or next((k for k in (f"{lib}_hires_image", f"{lib}_full_image") if k in sdata.images), None)
    images = {}
    if key is not None:
        element = sdata.images[key]
        if hasattr(element, "keys") and not hasattr(element, "dims"):  # multiscale DataTree: finest scale
            element = next(iter(element.values()))["image"]
        arr = np.moveaxis(np.asarray(element.transpose("c", "y", "x").data), 0, -1)[..., :3]
        transform = get_transformation(sdata.images[key], to_coordinate_system=lib) if lib in _cs(sdata, key) else None
        scale = 1.0
        if transform is not None:
            matrix = transform.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
            scale = 1.0 / float(matrix[0, 0])
        arr, extra = downsample(np.asarray(arr), hires_max_px)
        images["hires"] = arr
        sf["tissue_hires_scalef"] = scale * extra
    spatial["images"] = images
    spatial["scalefactors"] = sf
    adata.uns["spatial"] = {lib: spatial}
    return adata


def _cs(sdata: SpatialData, key: str) -> list[str]:
    from spatialdata.transformations import get_transformation

    return list(get_transformation(sdata.images[key], get_all=True).keys())
