"""``stfm.pp.make_tiles``: tissue detection and a grid of tiles on an H&E-only slide, as SpatialData elements."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .._containers import is_spatialdata, prepare_output
from .._logging import logger
from .._provenance import record
from .._validation import assert_key_in, check_positive, check_unique_name, check_valid_key
from ._inputs import image_source

if TYPE_CHECKING:
    from spatialdata import SpatialData

    from ..data import ImageSource

__all__ = ["make_tiles"]

REGION_KEY = "region"
INSTANCE_KEY = "instance_id"


def make_tiles(
    data: SpatialData | str | os.PathLike[str] | np.ndarray | ImageSource,
    *,
    image_key: str | None = None,
    slide_mpp: float | None = None,
    tile_um: float | None = None,
    mpp: float = 0.5,
    tile_px: int = 224,
    stride_um: float | None = None,
    min_tissue_fraction: float = 0.5,
    max_px: int = 4096,
    shapes_key: str = "tiles",
    table_key: str | None = None,
    copy: bool = False,
) -> SpatialData | None:
    """Detect tissue on an H&E slide and cover it with a grid of square tiles at a physical size.

    The result is a shapes element (one square per tile) and a table annotating it, with zero genes, tile
    centres in ``obsm['spatial']`` and the slide's µm/px in ``uns['spatial']``, so that
    :func:`stfm.pp.extract_features` and later :func:`stfm.tl.predict_expression` work on slides that
    never had spatial transcriptomics.

    Parameters
    ----------
    data
        A SpatialData holding the H&E image, or the image itself (a path — JPEG/PNG, or a tiled pyramidal
        TIFF / zarr read lazily —, a numpy ``(height, width, 3)`` array, a PIL image or an
        :class:`~stfm.data.ImageSource`), from which a new SpatialData is built.
    image_key
        SpatialData input: the image element (default: the only image, or the only ``*_full_image``).
        Image input: the name given to the new image element (default ``'he_image'``).
    slide_mpp
        µm per pixel of the image. Default for SpatialData input: ``microns_per_pixel`` from the
        ``uns['spatial']`` entry of a table whose library owns the image; required for image input.
    tile_um
        Tile side in µm (default: ``mpp × tile_px``, the input of most pathology encoders: 112 µm).
    mpp
        µm per pixel of the encoder input (used only for the default ``tile_um``).
    tile_px
        Encoder input size in pixels (used only for the default ``tile_um``).
    stride_um
        Distance between neighbouring tiles (default: ``tile_um``, no overlap).
    min_tissue_fraction
        Keep a tile when at least this fraction of its area is tissue.
    max_px
        Upper bound on the longest side of the thumbnail on which tissue is detected (it is computed at
        about 8 µm per pixel, see :func:`stfm.data.detect_tissue`).
    shapes_key
        Name of the new shapes element.
    table_key
        Name of the new table (default: ``f'{shapes_key}_table'``).
    copy
        SpatialData input: return a modified copy instead of adding the elements to ``data``.

    Returns
    -------
    For SpatialData input, `None` (or the modified copy if `copy=True`); for image input, a new
    :class:`~spatialdata.SpatialData` with `images[image_key]`. Sets the following fields:

    `.shapes[shapes_key]` : :class:`geopandas.GeoDataFrame`
        One square polygon per tile, in image pixels (same transformations as the image), index
        `instance_id`, column `tissue_fraction`.
    `.tables[table_key]` : :class:`~anndata.AnnData` (`n_tiles × 0`)
        Annotates `shapes_key` (`obs['region']`, `obs['instance_id']`), with `obs['tissue_fraction']`,
        `obsm['spatial']` (tile centres, x then y, image pixels), `uns['spatial'][shapes_key]` with
        `scalefactors` (`microns_per_pixel`, `spot_diameter_fullres` = tile side) and `metadata`
        (`image_key`, `spot_diameter_um` = tile side in µm), and `uns['stfm'][shapes_key]` provenance.

    Examples
    --------
    >>> sdata = stfm.pp.make_tiles("slide.tif", slide_mpp=0.25)
    >>> stfm.pp.extract_features(sdata, "efficientnet_lite0", table_key="tiles_table")
    """
    from anndata import AnnData
    from shapely.geometry import box
    from spatialdata.models import ShapesModel, TableModel
    from spatialdata.transformations import get_transformation

    from ..data import detect_tissue, open_image, tile_grid

    check_valid_key(shapes_key, what="shapes_key")
    table_key = check_valid_key(table_key if table_key is not None else f"{shapes_key}_table", what="table_key")
    if table_key == shapes_key:
        msg = f"`table_key` and `shapes_key` are both {shapes_key!r}; SpatialData element names must be unique."
        raise ValueError(msg)
    check_positive(mpp, name="mpp")
    check_positive(tile_px, name="tile_px")
    if not 0 <= min_tissue_fraction <= 1:
        msg = f"Expected `min_tissue_fraction` to be in [0, 1], found {min_tissue_fraction!r}."
        raise ValueError(msg)
    tile_um = float(mpp) * int(tile_px) if tile_um is None else check_positive(tile_um, name="tile_um")
    stride_um = tile_um if stride_um is None else check_positive(stride_um, name="stride_um")

    if is_spatialdata(data):
        sdata = data
        image_key = _pick_image(sdata, image_key)
        element = sdata.images[image_key]
        source = image_source(element, image_key)
        slide_mpp = (
            _slide_mpp_of(sdata, image_key, element)
            if slide_mpp is None
            else check_positive(slide_mpp, name="slide_mpp")
        )
        existing = [*sdata.images, *sdata.labels, *sdata.points, *sdata.shapes, *sdata.tables]
        for name, what in ((shapes_key, "shapes_key"), (table_key, "table_key")):
            if name in existing:
                msg = f"`{what}`={name!r} already names an element of the SpatialData object; pass another `{what}=`."
                raise ValueError(msg)
            check_unique_name(name, existing, what=what)
        transformations = get_transformation(element, get_all=True)
    else:
        if copy:
            msg = "`copy=True` applies to SpatialData input; for an image a new SpatialData object is returned anyway."
            raise ValueError(msg)
        if slide_mpp is None:
            msg = (
                "The slide's µm per pixel is needed to cut tiles at a physical size: pass `slide_mpp=` (e.g. 0.25 for a "
                "40× scan, 0.5 for 20×)."
            )
            raise ValueError(msg)
        slide_mpp = check_positive(slide_mpp, name="slide_mpp")
        source = open_image(data)
        image_key = check_valid_key(image_key if image_key is not None else "he_image", what="image_key")
        if image_key in (shapes_key, table_key):
            msg = (
                f"`image_key`={image_key!r} equals the shapes or table name; SpatialData element names must be unique."
            )
            raise ValueError(msg)
        sdata = None
        transformations = None

    side_px = tile_um / slide_mpp
    mask, mask_ds = detect_tissue(source, slide_mpp=slide_mpp, max_px=max_px)
    xy, frac = tile_grid(
        mask,
        mask_ds,
        side_px,
        shape=source.shape,
        min_tissue_fraction=min_tissue_fraction,
        stride_px=stride_um / slide_mpp,
    )
    if len(xy) == 0:
        msg = (
            f"No tile of {tile_um:.0f} µm has ≥ {min_tissue_fraction:.0%} tissue (tissue covers {mask.mean():.1%} of the "
            "thumbnail). Lower `min_tissue_fraction`, or check the image and `slide_mpp`."
        )
        raise ValueError(msg)

    if sdata is None:
        from spatialdata import SpatialData
        from spatialdata.transformations import Identity

        transformations = {"global": Identity()}
        sdata = SpatialData(images={image_key: _image_element(source, transformations)})
        out = sdata
    else:
        out = prepare_output(sdata, copy=copy)

    cs = next(iter(transformations))
    affine = transformations[cs].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    cs_per_px = float(np.sqrt(abs(np.linalg.det(np.asarray(affine, dtype=float)[:2, :2]))))

    half = side_px / 2
    index = pd.Index(np.arange(len(xy)), name=INSTANCE_KEY)
    gdf = pd.DataFrame({"tissue_fraction": frac.astype(np.float32)}, index=index)
    import geopandas as gpd

    gdf = gpd.GeoDataFrame(gdf, geometry=[box(x - half, y - half, x + half, y + half) for x, y in xy])
    shapes = ShapesModel.parse(gdf, transformations=dict(transformations))

    obs = pd.DataFrame(
        {
            REGION_KEY: pd.Categorical([shapes_key] * len(xy)),
            INSTANCE_KEY: np.arange(len(xy)),
            "tissue_fraction": frac.astype(np.float32),
        },
        index=pd.Index([f"tile_{i}" for i in range(len(xy))]),
    )
    table = AnnData(X=np.zeros((len(xy), 0), dtype=np.float32), obs=obs)
    table.obsm["spatial"] = xy.astype(np.float64)
    table.uns["spatial"] = {
        shapes_key: {
            "scalefactors": {"microns_per_pixel": slide_mpp / cs_per_px, "spot_diameter_fullres": side_px * cs_per_px},
            "metadata": {
                "image_key": image_key,
                "spot_diameter_um": tile_um,
                "platform": "H&E tiles (stfm.pp.make_tiles)",
                "coordinate_system": cs,
            },
        }
    }
    record(
        table,
        shapes_key,
        "pp.make_tiles",
        image_key=image_key,
        slide_mpp=slide_mpp,
        tile_um=tile_um,
        stride_um=stride_um,
        tile_side_px=side_px,
        min_tissue_fraction=min_tissue_fraction,
        n_tiles=len(xy),
        tissue_fraction_of_slide=float(mask.mean()),
        thumbnail_downsample=mask_ds,
    )
    table = TableModel.parse(table, region=shapes_key, region_key=REGION_KEY, instance_key=INSTANCE_KEY)
    out.shapes[shapes_key] = shapes
    out.tables[table_key] = table
    logger.info("make_tiles: %d tiles of %.0f µm on %r (%.1f%% tissue)", len(xy), tile_um, image_key, 100 * mask.mean())
    if not is_spatialdata(data) or copy:
        return out
    return None


def _pick_image(sdata: SpatialData, image_key: str | None) -> str:
    images = list(sdata.images.keys())
    if image_key is not None:
        assert_key_in(image_key, sdata.images, where="sdata.images")
        return image_key
    full = [k for k in images if k.endswith("_full_image")]
    if len(images) == 1:
        return images[0]
    if len(full) == 1:
        return full[0]
    msg = (
        f"Unable to determine which image to tile: pass `image_key=` (one of {images})."
        if images
        else "The SpatialData object has no image element; add the H&E with `spatialdata.models.Image2DModel`."
    )
    raise ValueError(msg)


def _slide_mpp_of(sdata: SpatialData, image_key: str, element: Any) -> float:
    """µm per image pixel from a table's ``uns['spatial'][lib]`` whose library owns ``image_key``."""
    from spatialdata.transformations import get_transformation

    for table in sdata.tables.values():
        for lib, entry in table.uns.get("spatial", {}).items():
            owns = (
                image_key in (f"{lib}_full_image", f"{lib}_hires_image")
                or entry.get("metadata", {}).get("image_key") == image_key
            )
            mpp = entry.get("scalefactors", {}).get("microns_per_pixel")
            if owns and mpp is not None and np.isfinite(mpp):
                cs = get_transformation(element, get_all=True)
                t = cs.get(lib, next(iter(cs.values())))
                m = np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)
                return float(mpp) * float(np.sqrt(abs(np.linalg.det(m[:2, :2]))))
    msg = (
        f"The µm per pixel of image {image_key!r} is unknown (no table's `uns['spatial'][lib]['scalefactors']` "
        "records `microns_per_pixel` for it): pass `slide_mpp=`."
    )
    raise ValueError(msg)


def _image_element(source: Any, transformations: dict[str, Any]) -> Any:
    from spatialdata.models import Image2DModel

    from ..data import ArraySource, as_dask

    if isinstance(source, ArraySource):
        arr = np.moveaxis(source.array, -1, 0)
        scale_factors = [2, 2, 2] if max(arr.shape[1:]) > 4096 else None
        return Image2DModel.parse(
            arr, dims=("c", "y", "x"), c_coords=["r", "g", "b"], scale_factors=scale_factors,
            chunks=(3, 4096, 4096), transformations=transformations,
        )  # fmt: skip
    # Lazy source (tiled TIFF, zarr): a dask array that reads one chunk at a time, never the whole slide.
    return Image2DModel.parse(
        as_dask(source), dims=("c", "y", "x"), c_coords=["r", "g", "b"], transformations=transformations
    )
