"""Input resolution of ``extract_features`` (and ``make_tiles``): which image, where to crop, at what µm/px."""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._containers import get_library_id, get_table, known_spot_um, mpp_from_scalefactors
from .._validation import assert_key_in, check_spatial, check_valid_key

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..data import ImageSource

__all__ = [
    "DEFAULT_MPP",
    "Inputs",
    "check_inside",
    "check_orientation",
    "image_source",
    "inputs_anndata",
    "inputs_spatialdata",
    "resolve_table",
    "warn",
]

DEFAULT_MPP = 0.5


def _user_stacklevel() -> int:
    """Stack level of the first frame outside stfm, so warnings point at the user's call."""
    frame = sys._getframe(1)
    level = 1
    pkg = str(Path(__file__).resolve().parents[1])
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(pkg):
        frame = frame.f_back
        level += 1
    return level


def warn(msg: str) -> None:
    warnings.warn(msg, UserWarning, stacklevel=_user_stacklevel())


@dataclass
class Inputs:
    """Everything extract_features needs about the data: where to crop and at what scale."""

    source: ImageSource
    xy: np.ndarray  # (n, 2) crop centres in image level-0 pixels
    slide_mpp: float  # µm per image level-0 pixel
    spot_diameter_px: float | None  # spot diameter in image level-0 pixels, when known
    library_id: str | None
    image: str
    extra: dict[str, Any] = field(default_factory=dict)
    masks: list[np.ndarray] | None = None  # (m, 2) outline per observation in image level-0 pixels, when asked for


def _check_mpp(sf: dict[str, Any], meta: dict[str, Any], mpp_used: float, *, user: bool, where: str) -> None:
    """Warn when the µm/px in use disagrees with the stored one or with the platform's spot diameter."""
    stored = sf.get("microns_per_pixel")
    if user and stored is not None and np.isfinite(stored) and abs(mpp_used / float(stored) - 1) > 0.1:
        warn(
            f"`slide_mpp`={mpp_used:.4g} µm/px differs from {where}['scalefactors']['microns_per_pixel']={float(stored):.4g}; "
            f"tiles are cut with {mpp_used:.4g}."
        )
    known = known_spot_um(sf, meta)
    if known is not None and "spot_diameter_fullres" in sf:
        implied = float(sf["spot_diameter_fullres"]) * mpp_used
        if abs(implied / known[0] - 1) > 0.15:
            warn(
                f"µm/px {mpp_used:.4g} is inconsistent with the spot diameter: {float(sf['spot_diameter_fullres']):.1f} px "
                f"× {mpp_used:.4g} µm/px = {implied:.1f} µm, but {known[1]} spots are {known[0]:.0f} µm. Tiles will have "
                "the wrong physical size; check `microns_per_pixel` / `slide_mpp`."
            )


def inputs_anndata(
    adata: AnnData,
    *,
    img: Any,
    library_id: str | None,
    spatial_key: str,
    slide_mpp: float | None,
    mpp: float | None,
    tile_px: int | None = None,
) -> Inputs:
    from ..data import ArraySource, open_image

    xy = check_spatial(adata, spatial_key, purpose="cutting tiles (x, y in full-resolution pixels)")
    lib = get_library_id(adata, library_id)
    lib_uns = adata.uns["spatial"][lib] if lib is not None else {}
    sf = dict(lib_uns.get("scalefactors", {}))
    meta = dict(lib_uns.get("metadata", {}))
    where = f"uns['spatial'][{lib!r}]"

    full_mpp = float(slide_mpp) if slide_mpp is not None else mpp_from_scalefactors(sf, meta)
    if full_mpp is None:
        msg = (
            "The slide's µm per pixel is unknown: "
            + (
                f"{where}['scalefactors'] has neither 'microns_per_pixel' nor 'spot_diameter_fullres'"
                if lib
                else "`uns['spatial']` is missing"
            )
            + ". Pass `slide_mpp=` (µm per full-resolution pixel, e.g. 0.5 for a 20× scan) or set "
            "`scalefactors['microns_per_pixel']`."
        )
        raise ValueError(msg)
    _check_mpp(sf, meta, full_mpp, user=slide_mpp is not None, where=where)
    spot_px = float(sf["spot_diameter_fullres"]) if "spot_diameter_fullres" in sf else None

    if img is not None:
        source = open_image(img)
        return Inputs(source, xy, full_mpp, spot_px, lib, source.description)
    path = meta.get("source_image_path")
    if path is not None and Path(str(path)).is_file():
        source = open_image(str(path))
        return Inputs(source, xy, full_mpp, spot_px, lib, source.description)
    missing = f" (`metadata['source_image_path']` = {str(path)!r} does not exist)" if path is not None else ""
    hires = lib_uns.get("images", {}).get("hires") if lib is not None else None
    target = float(mpp) if mpp is not None else DEFAULT_MPP
    if hires is not None and "tissue_hires_scalef" in sf:
        scalef = float(sf["tissue_hires_scalef"])
        hires_mpp = full_mpp / scalef
        if hires_mpp <= target * 1.05:
            warn(
                f"No full-resolution image for library {lib!r}{missing}; using the hires image, which at "
                f"{hires_mpp:.3g} µm/px is fine enough for tiles at {target:.3g} µm/px."
            )
            spot = spot_px * scalef if spot_px is not None else None
            return Inputs(
                ArraySource(hires, description=f"{where}['images']['hires']"),
                xy * scalef,
                hires_mpp,
                spot,
                lib,
                "hires",
            )
        tile_um = target * (tile_px or 224)  # the encoder's tile: most foundation models take 224 px
        msg = (
            f"No full-resolution image for library {lib!r}{missing}, and the hires image ({hires_mpp:.2f} µm/px) is too "
            f"coarse for tiles at {target:.2f} µm/px. Pass the full-resolution H&E as `img=` (array, PIL image or path), "
            f"or set {where}['metadata']['source_image_path']. To embed the hires image anyway, at the same physical "
            f"tile size ({tile_um:.0f} µm) and its own resolution: `extract_features(adata, model, "
            f"mpp={hires_mpp:.4g}, tile_px={max(1, round(tile_um / hires_mpp))})` (a fully convolutional encoder accepts "
            "small tiles; the features describe a far coarser image than the encoder was trained on)."
        )
        raise ValueError(msg)
    msg = (
        f"No image found for library {lib!r}{missing}: pass the full-resolution H&E as `img=` (array, PIL image or "
        f"path) or set {where}['metadata']['source_image_path']."
    )
    raise ValueError(msg)


def resolve_table(sdata: SpatialData, table_key: str | None, shapes_key: str | None) -> tuple[AnnData, str, bool]:
    """The observation table, its name, and whether it is new (built from ``shapes_key`` for H&E-only data)."""
    from spatialdata.models import get_table_keys

    tables = list(sdata.tables.keys())
    if table_key is None and shapes_key is not None:
        matching = []
        for name in tables:
            region = get_table_keys(sdata.tables[name])[0]
            regions = [region] if isinstance(region, str) else list(region)
            if shapes_key in regions:
                matching.append(name)
        if len(matching) == 1:
            table_key = matching[0]
        elif not matching and shapes_key in sdata.shapes:
            return _table_from_shapes(sdata, shapes_key), f"{shapes_key}_table", True
        elif matching:
            msg = f"{len(matching)} tables annotate shapes {shapes_key!r} ({matching}); pass `table_key=` (one of {tables})."
            raise ValueError(msg)
        else:
            assert_key_in(shapes_key, sdata.shapes, where="sdata.shapes")
    if not tables and table_key is None:
        msg = (
            "The SpatialData object has no table: pass `shapes_key=` (the spots/cells/tiles to embed; a table "
            f"'<shapes_key>_table' is created) or tile the slide first with `stfm.pp.make_tiles(sdata)`. Shapes: "
            f"{list(sdata.shapes.keys())}."
        )
        raise ValueError(msg)
    table = get_table(sdata, table_key)
    name = table_key if table_key is not None else tables[0]
    return table, name, False


def _table_from_shapes(sdata: SpatialData, shapes_key: str) -> AnnData:
    """A zero-gene table annotating ``shapes[shapes_key]``, named ``'{shapes_key}_table'`` (squidpy's naming)."""
    import pandas as pd
    from anndata import AnnData
    from spatialdata.models import TableModel

    name = check_valid_key(f"{shapes_key}_table", what="table name")
    if name in sdata.tables or any(
        name.lower() == k.lower() for k in [*sdata.images, *sdata.labels, *sdata.points, *sdata.shapes]
    ):
        msg = f"Cannot create table {name!r} for shapes {shapes_key!r}: the name is taken. Pass `table_key=`."
        raise ValueError(msg)
    shapes = sdata.shapes[shapes_key]
    n = len(shapes)
    obs = pd.DataFrame(
        {"region": pd.Categorical([shapes_key] * n), "instance_id": shapes.index.to_numpy()},
        index=pd.Index([str(i) for i in shapes.index]),
    )
    table = AnnData(X=np.zeros((n, 0), dtype=np.float32), obs=obs)
    return TableModel.parse(table, region=shapes_key, region_key="region", instance_key="instance_id")


def _affine_xy(element: Any, cs: str) -> np.ndarray:
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=np.float64)


def inputs_spatialdata(
    sdata: SpatialData,
    table: AnnData,
    *,
    image_key: str | None,
    shapes_key: str | None,
    spatial_key: str,
    slide_mpp: float | None,
    mask_key: str | None = None,
) -> Inputs:
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import get_transformation

    region, region_key, instance_key = get_table_keys(table)
    regions = [region] if isinstance(region, str) else list(region)
    if shapes_key is None:
        if len(regions) != 1:
            msg = f"The table annotates several regions {regions}; pass `shapes_key=` (one of them)."
            raise ValueError(msg)
        shapes_key = regions[0]
    if shapes_key not in regions:
        msg = f"The table does not annotate `shapes_key`={shapes_key!r}; it annotates {regions}."
        raise KeyError(msg)
    rows = np.asarray(table.obs[region_key].astype(str) == shapes_key)
    if not rows.all():
        msg = (
            f"The table mixes rows of several regions ({regions}); extract_features needs one table per shapes element. "
            f"Subset it first, e.g. `sdata.tables['t'] = table[table.obs[{region_key!r}] == {shapes_key!r}].copy()`."
        )
        raise ValueError(msg)
    shapes = sdata.shapes.get(shapes_key)

    # image element
    images = list(sdata.images.keys())
    lib_uns = table.uns.get("spatial", {}).get(shapes_key, {})
    if image_key is None:
        candidates = [lib_uns.get("metadata", {}).get("image_key"), f"{shapes_key}_full_image"]
        image_key = next((c for c in candidates if c is not None and c in sdata.images), None)
        if image_key is None:
            if len(images) != 1:
                msg = f"No image found for shapes {shapes_key!r}: " + (
                    f"pass `image_key=` (one of {images})."
                    if images
                    else "the SpatialData object has no image element; add the H&E with `spatialdata.models.Image2DModel`."
                )
                raise ValueError(msg)
            image_key = images[0]
    assert_key_in(image_key, sdata.images, where="sdata.images")
    element = sdata.images[image_key]
    source = image_source(element, image_key)

    # coordinates, in a coordinate system shared by the image and the shapes
    img_cs = list(get_transformation(element, get_all=True).keys())
    if shapes is not None:
        shp_cs = list(get_transformation(shapes, get_all=True).keys())
        common = [c for c in shp_cs if c in img_cs]
        if not common:
            msg = f"Image {image_key!r} ({img_cs}) and shapes {shapes_key!r} ({shp_cs}) share no coordinate system."
            raise ValueError(msg)
        cs = shapes_key if shapes_key in common else common[0]
        to_cs = _affine_xy(shapes, cs)
    else:
        cs = shapes_key if shapes_key in img_cs else img_cs[0]
        to_cs = np.eye(3)
    if spatial_key in table.obsm:
        xy = np.asarray(table.obsm[spatial_key], dtype=np.float64)[:, :2]
    elif shapes is not None:
        centres = shapes.geometry.centroid
        by_id = dict(zip(shapes.index, zip(centres.x.to_numpy(), centres.y.to_numpy(), strict=True), strict=True))
        ids = table.obs[instance_key].to_numpy()
        missing = [i for i in ids[:5] if i not in by_id]
        if missing:
            msg = f"Table rows refer to instances {missing} not present in shapes {shapes_key!r}."
            raise KeyError(msg)
        xy = np.asarray([by_id[i] for i in ids], dtype=np.float64)
    else:
        msg = (
            f"No coordinates: the table has no `obsm[{spatial_key!r}]` and `sdata.shapes[{shapes_key!r}]` does not exist. "
            f"Available shapes: {list(sdata.shapes.keys())}."
        )
        raise KeyError(msg)
    img_to_cs = _affine_xy(element, cs)
    to_px = np.linalg.inv(img_to_cs) @ to_cs
    xy_px = xy @ to_px[:2, :2].T + to_px[:2, 2]
    cs_per_px = float(np.sqrt(abs(np.linalg.det(img_to_cs[:2, :2]))))
    shape_scale = float(np.sqrt(abs(np.linalg.det(to_cs[:2, :2]))))

    sf = dict(lib_uns.get("scalefactors", {}))
    meta = dict(lib_uns.get("metadata", {}))
    where = f"table.uns['spatial'][{shapes_key!r}]"
    if slide_mpp is not None:
        px_mpp = float(slide_mpp)
    else:
        cs_mpp = mpp_from_scalefactors(sf, meta)
        if cs_mpp is None:
            msg = (
                f"The slide's µm per pixel is unknown: {where}['scalefactors'] has neither 'microns_per_pixel' nor "
                "'spot_diameter_fullres'. Pass `slide_mpp=` (µm per pixel of the full-resolution image) or create the "
                "table with `stfm.pp.make_tiles(..., slide_mpp=...)`."
            )
            raise ValueError(msg)
        px_mpp = cs_mpp * cs_per_px
    _check_mpp(sf, meta, px_mpp / cs_per_px, user=slide_mpp is not None, where=where)
    spot_px = float(sf["spot_diameter_fullres"]) * shape_scale / cs_per_px if "spot_diameter_fullres" in sf else None
    out = Inputs(
        source, xy_px, px_mpp, spot_px, shapes_key, image_key, extra={"image_key": image_key, "shapes_key": shapes_key}
    )
    if mask_key is not None:
        out.masks = _outlines(sdata, table, mask_key, instance_key, cs, np.linalg.inv(img_to_cs))
        out.extra["mask_key"] = mask_key
    return out


def _outlines(
    sdata: SpatialData, table: AnnData, mask_key: str, instance_key: str, cs: str, cs_to_px: np.ndarray
) -> list[np.ndarray]:
    """One outline per table row from ``shapes[mask_key]`` (polygons, or circles with a ``radius``), in image pixels."""
    from spatialdata.transformations import get_transformation

    if mask_key not in sdata.shapes:
        msg = (
            f"`mask={mask_key!r}` names no shapes element; the masks come from cell or nucleus boundaries (Xenium, read "
            f"with `cells_boundaries=True`: 'cell_boundaries', 'nucleus_boundaries'). Shapes: {list(sdata.shapes.keys())}."
        )
        raise KeyError(msg)
    shapes = sdata.shapes[mask_key]
    if cs not in get_transformation(shapes, get_all=True):
        msg = f"The boundaries {mask_key!r} have no transformation to the coordinate system {cs!r} of the image and cells."
        raise ValueError(msg)
    m = cs_to_px @ _affine_xy(shapes, cs)
    geom = shapes.geometry
    if "radius" in shapes.columns and (geom.geom_type == "Point").all():
        geom = geom.buffer(shapes["radius"].to_numpy(dtype=np.float64), resolution=8)
    ids = table.obs[instance_key].to_numpy()
    present = shapes.index.get_indexer(ids)
    lacking = ids[present < 0]
    if lacking.size:
        msg = (
            f"{lacking.size} of {len(ids)} cells have no boundary in `shapes[{mask_key!r}]` (e.g. {list(lacking[:3])}); "
            "a mask needs an outline per cell. Subset the table to the cells with boundaries, or leave `mask=None`."
        )
        raise ValueError(msg)
    out = []
    for g in geom.iloc[present]:
        if g is None or g.is_empty:
            msg = f"`shapes[{mask_key!r}]` holds an empty outline for some cells; a mask needs an outline per cell."
            raise ValueError(msg)
        if g.geom_type == "MultiPolygon":
            g = max(g.geoms, key=lambda p: p.area)
        if g.geom_type != "Polygon":
            msg = f"`shapes[{mask_key!r}]` must hold polygons (or circles with a radius), found {g.geom_type}."
            raise ValueError(msg)
        xy = np.asarray(g.exterior.coords, dtype=np.float64)[:, :2]
        out.append(xy @ m[:2, :2].T + m[:2, 2])
    return out


def image_source(element: Any, name: str) -> ImageSource:
    """A lazy :class:`~stfm.data.LazyArraySource` over a SpatialData image element (all pyramid levels, finest first)."""
    from ..data import LazyArraySource
    from ..data._unwrap import source_of

    if type(element).__name__ == "DataArray":
        if (src := source_of(element)) is not None:  # made by make_tiles from a file: read the file (and its pyramid)
            return src
        levels = [element]
    else:  # multiscale DataTree: scale0 (finest), scale1, ...
        names = sorted(element.keys(), key=lambda k: int("".join(c for c in str(k) if c.isdigit()) or 0))
        levels = [element[k]["image"] if "image" in element[k] else next(iter(element[k].values())) for k in names]
    return LazyArraySource([lvl.transpose("c", "y", "x") for lvl in levels], axes="cyx", description=name)


def check_orientation(inputs: Inputs, *, what: str = "obsm['spatial']") -> float | None:
    """Warn when the spots would sit on tissue far more often with x and y swapped (a transposed ``obsm['spatial']``).

    Detectable only when both placements fall inside the image: the tissue mask (:func:`stfm.data.detect_tissue` on
    a thumbnail) is read at each spot centre, as given and transposed. Returns the fraction of spots on tissue as
    given (``None`` when the check could not run).
    """
    from ..data import detect_tissue

    h, w = inputs.source.shape
    xy = inputs.xy
    if len(xy) < 10 or not np.isfinite(xy).all():
        return None
    sw = xy[:, ::-1]
    if (sw[:, 0] < 0).any() or (sw[:, 1] < 0).any() or (sw[:, 0] >= w).any() or (sw[:, 1] >= h).any():
        return None  # the transposed placement leaves the image: nothing to compare
    try:
        mask, ds = detect_tissue(inputs.source, slide_mpp=inputs.slide_mpp, max_px=1024)
    except (ValueError, RuntimeError):
        return None

    def on_tissue(p: np.ndarray) -> float:
        r = np.clip((p[:, 1] / ds).astype(int), 0, mask.shape[0] - 1)
        c = np.clip((p[:, 0] / ds).astype(int), 0, mask.shape[1] - 1)
        return float(mask[r, c].mean())

    given, swapped = on_tissue(xy), on_tissue(sw)
    if given < 0.5 and swapped - given > 0.3:
        warn(
            f"Only {given:.0%} of the spots sit on tissue in {inputs.image!r}, but {swapped:.0%} would with x and y "
            f"swapped: {what} may hold (y, x). It must hold (x, y) in image pixels; swap the columns with "
            "`adata.obsm['spatial'] = adata.obsm['spatial'][:, ::-1]` if so."
        )
    return given


def check_inside(inputs: Inputs) -> None:
    h, w = inputs.source.shape
    xy = inputs.xy
    outside = ~np.isfinite(xy).all(axis=1) | (xy[:, 0] < 0) | (xy[:, 1] < 0) | (xy[:, 0] >= w) | (xy[:, 1] >= h)
    if outside.any():
        ext = f"x ∈ [{np.nanmin(xy[:, 0]):.0f}, {np.nanmax(xy[:, 0]):.0f}], y ∈ [{np.nanmin(xy[:, 1]):.0f}, {np.nanmax(xy[:, 1]):.0f}]"
        msg = (
            f"{int(outside.sum())} of {len(xy)} spots lie outside the image {inputs.image!r} ({w} × {h} px; spots span "
            f"{ext}). The coordinates must be pixels of this image: pass the full-resolution image the coordinates refer "
            "to, or fix `obsm['spatial']`."
        )
        raise ValueError(msg)
