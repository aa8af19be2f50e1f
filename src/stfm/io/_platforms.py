"""Cell-level platform readers: 10x Xenium, Vizgen MERSCOPE, NanoString CosMx.

spatialdata-io does the reading; stfm puts the cells in the pixel grid of the images (``obsm['spatial']`` and a
circles element the table annotates), takes the µm/px from the transformation the SpatialData object carries, checks
that the cells land on the image, and records platform, cell size and element names (see
:mod:`stfm.io._platform_core` and ``docs/platforms.md``). Visium HD is in :mod:`stfm.io._visium_hd`.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._validation import check_positive, check_valid_key
from ._platform_core import (
    affine_to,
    annotate,
    apply_affine,
    cell_circles,
    check_folder,
    finish,
    override_um_to_cs,
    pick_image,
    scale_of,
    set_um_transform,
    warn,
)

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["COSMX_PIXEL_SIZE_UM", "read_cosmx", "read_merscope", "read_xenium"]

#: µm per pixel of CosMx SMI images and ``*_px`` coordinates (NanoString); the flat files do not carry it.
COSMX_PIXEL_SIZE_UM = 0.12028

_XENIUM_ALWAYS = ("experiment.xenium", "cells.zarr.zip", "cell_feature_matrix.h5", "cells.parquet")
#: Files spatialdata-io reads only when an element is requested: (file, reader argument that skips it).
_XENIUM_OPTIONAL = (
    ("cell_boundaries.parquet", "cells_boundaries"),
    ("nucleus_boundaries.parquet", "nucleus_boundaries"),
    ("transcripts.parquet", "transcripts"),
)


def read_xenium(
    path: str | os.PathLike[str],
    *,
    image_key: str | None = None,
    image_mpp: float | None = None,
    image_origin_um: Sequence[float] | None = None,
    check_placement: bool = True,
    **kwargs: Any,
) -> SpatialData:
    """Read a 10x Xenium Onboard Analysis output folder with the cells placed on the morphology image.

    Reading is delegated to :func:`spatialdata_io.xenium` (with ``cells_as_circles=True``). Its ``'global'``
    coordinate system is the pixel grid of the morphology images (they are Identity in it), and the cells,
    boundaries and transcripts, stored in µm, are mapped into it by ``Scale(1 / pixel_size)`` from
    ``experiment.xenium``. stfm reads the µm/px back from that transformation, puts the cell centres in
    ``'global'`` pixels, and checks that they land on the image. A morphology image that was downsampled or cropped
    after the run no longer matches ``pixel_size``: pass ``image_mpp`` / ``image_origin_um`` to say where it lies;
    the µm → pixel transformation of every points and shapes element is then rebuilt from them.

    Parameters
    ----------
    path
        Xenium output folder (``outs/``), holding ``experiment.xenium``, ``cells.zarr.zip``, ``cells.parquet``,
        ``cell_feature_matrix.h5`` and, for the elements requested, boundaries, transcripts and morphology images.
    image_key
        Image the cells are placed on and :func:`stfm.pp.extract_features` should use (default: the aligned H&E
        ``'he_image'`` when present, else ``'morphology_focus'``, else ``'morphology_mip'``).
    image_mpp
        µm per pixel of the morphology images, overriding ``pixel_size`` (e.g. ``400 / 237`` for a 237-px image
        of a 400-µm crop).
    image_origin_um
        (x, y) position in µm of the morphology images' top-left pixel corner (default ``(0, 0)``, the Xenium
        frame), e.g. the corner of a crop.
    check_placement
        Raise when fewer than half of the cell centres fall inside ``image_key`` (a wrong µm/px or origin).
    **kwargs
        Passed to :func:`spatialdata_io.xenium` (``cells_labels``, ``nucleus_labels``, ``transcripts``,
        ``cells_boundaries``, …).

    Returns
    -------
    The spatialdata-io :class:`~spatialdata.SpatialData`, with these fields set:

    `.shapes['cell_circles']` : :class:`~geopandas.GeoDataFrame`
        One circle per cell in ``'global'`` pixels (Identity), radius ``sqrt(cell_area / π)`` µm in pixels;
        annotated by ``tables['table']`` through ``obs['cell_id']``.
    `.tables['table'].obsm['spatial']` : :class:`numpy.ndarray` (float64, `(n_cells, 2)`)
        Cell centres (x, y) in pixels of the morphology images (``'global'``); ``obsm['spatial_um']`` in µm.
    `.tables['table'].uns['spatial']['cell_circles']` : :class:`dict`
        ``scalefactors`` (``microns_per_pixel``, ``spot_diameter_fullres``: median cell diameter in pixels) and
        ``metadata`` (``platform='xenium'``, ``spot_diameter_um``, ``image_key``, ``shapes_key``, ``table_key``,
        ``coordinate_system``, ``image_mpp`` per image, ``mpp_source``, ``nominal_microns_per_pixel``).
    `.tables['table'].uns['stfm']['spatial']` : :class:`dict`
        Provenance (reader, spatialdata-io version, µm/px and where it came from, cells inside the image).
    """
    path = check_folder(
        path, platform="Xenium", reader="stfm.io.read_xenium", holds="experiment.xenium, cells.parquet, …"
    )
    _check_xenium_files(path, kwargs)
    specs = json.loads((path / "experiment.xenium").read_text())
    pixel_size = specs.get("pixel_size")
    if not isinstance(pixel_size, int | float) or not math.isfinite(pixel_size) or pixel_size <= 0:
        msg = (
            f"{str(path / 'experiment.xenium')!r} gives no usable 'pixel_size' (µm per morphology-image pixel): found "
            f'{pixel_size!r}. Without it the images cannot be placed under the cells. Add `"pixel_size": <µm/px>` '
            "to experiment.xenium (0.2125 for images as the Xenium instrument writes them); if the images were "
            "resampled since, also pass `image_mpp=` and `image_origin_um=`."
        )
        raise ValueError(msg)
    import spatialdata_io

    if kwargs.get("cells_as_circles") is False:
        msg = "`cells_as_circles=False` is not supported: stfm places the cells as circles (`shapes['cell_circles']`)."
        raise ValueError(msg)
    kwargs["cells_as_circles"] = True
    sdata = spatialdata_io.xenium(path, **kwargs)
    cs, table_key, shapes_key = "global", "table", "cell_circles"
    table = sdata.tables[table_key]
    reported = affine_to(sdata.shapes[shapes_key], cs)  # µm -> morphology pixels, as spatialdata-io set it
    um_to_cs, overridden = override_um_to_cs(reported, image_mpp=image_mpp, image_origin_um=image_origin_um)
    moved = set_um_transform(sdata, um_to_cs, cs) if overridden else []
    um_per_px = 1.0 / scale_of(um_to_cs)
    xy_um = np.asarray(table.obsm["spatial"], dtype=np.float64)
    xy = apply_affine(um_to_cs, xy_um)
    radius_um = np.sqrt(np.asarray(table.obs["cell_area"], dtype=np.float64) / np.pi)
    instance_key = "cell_id"
    sdata.shapes[shapes_key] = cell_circles(xy, radius_um / um_per_px, table.obs[instance_key].to_numpy(), cs)
    image_key = pick_image(sdata, image_key, ("he_image", "morphology_focus", "morphology_mip"))
    source = (
        "image_mpp / image_origin_um arguments (spatialdata-io's Scale(1 / pixel_size) replaced)"
        if overridden
        else "spatialdata-io transformation of the cells into 'global' (Scale(1 / pixel_size), experiment.xenium)"
    )
    return finish(
        sdata,
        platform="xenium",
        function="io.read_xenium",
        table_key=table_key,
        shapes_key=shapes_key,
        instance_key=instance_key,
        cs=cs,
        um_per_unit=um_per_px,
        xy=xy,
        diameter_um=2 * radius_um,
        image_key=image_key,
        xy_um=xy_um,
        mpp_source=source,
        nominal_mpp=float(pixel_size),
        fix="Pass `image_mpp=` (µm per morphology pixel) and `image_origin_um=` (µm of its top-left corner).",
        check_placement=check_placement,
        suggest_override=True,
        metadata={"analysis_sw_version": str(specs.get("analysis_sw_version", "unknown"))},
        params={
            "path": path.name,
            "image_mpp_override": image_mpp,
            "image_origin_um": None if image_origin_um is None else [float(v) for v in image_origin_um],
            "retransformed": moved,
        },
    )


def _check_xenium_files(path: Path, kwargs: dict[str, Any]) -> None:
    """Name every file spatialdata-io will need and does not find, and how to skip the optional ones."""
    missing = [f for f in _XENIUM_ALWAYS if not (path / f).exists()]
    skip = []
    for file, arg in _XENIUM_OPTIONAL:
        if kwargs.get(arg, True) and not (path / file).exists():
            missing.append(file)
            skip.append(f"`{arg}=False` skips {file}")
    if kwargs.get("morphology_focus", True) and not any(
        (path / f).exists() for f in ("morphology_focus.ome.tif", "morphology_focus")
    ):
        missing.append("morphology_focus.ome.tif (or morphology_focus/)")
        skip.append("`morphology_focus=False` skips it")
    if kwargs.get("morphology_mip", True) and _xoa_major(path) < 2 and not (path / "morphology_mip.ome.tif").exists():
        missing.append("morphology_mip.ome.tif")  # written by Xenium Onboard Analysis < 2.0 only
        skip.append("`morphology_mip=False` skips morphology_mip.ome.tif")
    if not missing:
        return
    found = sorted(p.name for p in path.iterdir())
    msg = (
        f"{str(path)!r} lacks files that spatialdata_io.xenium needs: {missing}. Found: {found[:20]}"
        f"{' …' if len(found) > 20 else ''}. Pass the Xenium Onboard Analysis output folder (`outs/`)"
        + (f"; {', '.join(skip)}." if skip else ".")
    )
    raise FileNotFoundError(msg)


def _xoa_major(path: Path) -> int:
    """Major Xenium Onboard Analysis version from ``experiment.xenium`` (1 when unreadable, as spatialdata-io)."""
    try:
        version = str(json.loads((path / "experiment.xenium").read_text()).get("analysis_sw_version", ""))
    except (OSError, ValueError):
        return 1
    found = re.search(r"(\d+)\.\d+", version)
    return int(found.group(1)) if found else 1


def read_merscope(
    path: str | os.PathLike[str],
    *,
    image_key: str | None = None,
    image_mpp: float | None = None,
    image_origin_um: Sequence[float] | None = None,
    check_placement: bool = True,
    **kwargs: Any,
) -> SpatialData:
    """Read a Vizgen MERSCOPE region folder with the cells placed on the mosaic images.

    Reading is delegated to :func:`spatialdata_io.merscope`. Its ``'global'`` coordinate system is the mosaics'
    pixel grid; transcripts and boundaries, in µm, are mapped into it by the affine of
    ``images/micron_to_mosaic_pixel_transform.csv``. stfm takes the µm/px from that transformation — never from
    ``images/manifest.json``'s ``microns_per_pixel``, which can be stale (a warning says when the two disagree) —,
    adds one circle per cell (``cell_metadata.csv`` centre, radius half the mean bounding-box side) in mosaic
    pixels, points the table at them and checks that they land on the mosaic.

    Parameters
    ----------
    path
        MERSCOPE region folder, holding ``cell_by_gene.csv``, ``cell_metadata.csv``, ``detected_transcripts.csv``
        and ``images/`` (mosaics and ``micron_to_mosaic_pixel_transform.csv``).
    image_key
        Mosaic the cells are placed on and :func:`stfm.pp.extract_features` should use (default: the first z-layer
        read, ``f'{dataset_id}_z{z}'``).
    image_mpp
        µm per mosaic pixel, overriding the transform file (use when the mosaics were resampled after the run).
    image_origin_um
        (x, y) µm position of the mosaics' top-left pixel corner, overriding the transform file's offset.
    check_placement
        Raise when fewer than half of the cell centres fall inside ``image_key``.
    **kwargs
        Passed to :func:`spatialdata_io.merscope` (``z_layers``, ``cells_boundaries``, ``transcripts``,
        ``region_name``, ``slide_name``, ``vpt_outputs``, …).

    Returns
    -------
    The spatialdata-io :class:`~spatialdata.SpatialData` (``dataset_id`` = ``f'{slide_name}_{region_name}'``), with
    these fields set:

    `.shapes[f'{dataset_id}_cell_circles']` : :class:`~geopandas.GeoDataFrame`
        One circle per cell in mosaic pixels (Identity to ``'global'``), annotated by ``tables['table']`` through
        ``obs['EntityID']`` (spatialdata-io points the table at the polygons; they stay, in µm).
    `.tables['table'].obsm['spatial']` : :class:`numpy.ndarray` (float64, `(n_cells, 2)`)
        Cell centres (x, y) in mosaic pixels; ``obsm['spatial_um']`` in µm.
    `.tables['table'].uns['spatial'][f'{dataset_id}_cell_circles']` : :class:`dict`
        ``scalefactors`` (``microns_per_pixel``, ``spot_diameter_fullres``) and ``metadata``
        (``platform='merscope'``, ``spot_diameter_um``, element names, ``image_mpp`` per mosaic, ``mpp_source``,
        ``nominal_microns_per_pixel`` from manifest.json).
    `.tables['table'].uns['stfm']['spatial']` : :class:`dict`
        Provenance.
    """
    path = check_folder(
        path, platform="MERSCOPE", reader="stfm.io.read_merscope", holds="cell_by_gene.csv, cell_metadata.csv, images/"
    )
    transform_file = path / "images" / "micron_to_mosaic_pixel_transform.csv"
    if not transform_file.is_file():
        msg = (
            f"{str(transform_file)!r} not found: it is the µm → mosaic-pixel affine, without which the mosaics have "
            "no pixel size and the cells cannot be placed on them. Copy it from the run's images/ folder. stfm does "
            "not fall back to manifest.json's 'microns_per_pixel': it describes the full-resolution mosaics and goes "
            "stale when they are resampled."
        )
        raise FileNotFoundError(msg)
    import spatialdata_io
    from spatialdata.models import get_table_keys

    sdata = spatialdata_io.merscope(path, **kwargs)
    cs, table_key = "global", "table"
    if table_key not in sdata.tables:
        msg = f"spatialdata_io.merscope read no cell table from {str(path)!r} (cell_by_gene.csv, cell_metadata.csv)."
        raise FileNotFoundError(msg)
    table = sdata.tables[table_key]
    region, _, instance_key = get_table_keys(table)
    region = region if isinstance(region, str) else region[0]
    dataset_id = region.removesuffix("_polygons")
    reported = next(
        (
            m
            for kind in ("points", "shapes")
            for e in getattr(sdata, kind).values()
            if (m := affine_to(e, cs)) is not None
        ),
        None,
    )
    if reported is None:  # neither transcripts nor boundaries read: the same file spatialdata-io would have used
        reported = np.genfromtxt(transform_file)
    um_to_cs, overridden = override_um_to_cs(reported, image_mpp=image_mpp, image_origin_um=image_origin_um)
    moved = set_um_transform(sdata, um_to_cs, cs) if overridden else []
    um_per_px = 1.0 / scale_of(um_to_cs)
    obs = table.obs
    xy_um = np.asarray(table.obsm["spatial"], dtype=np.float64)
    if all(c in obs for c in ("min_x", "max_x", "min_y", "max_y")):
        diameter_um = ((obs["max_x"] - obs["min_x"]) + (obs["max_y"] - obs["min_y"])).to_numpy(dtype=np.float64) / 2
    else:
        msg = f"cell_metadata.csv has no min_x/max_x/min_y/max_y columns to size the cells; found {list(obs.columns)}."
        raise KeyError(msg)
    shapes_key = check_valid_key(f"{dataset_id}_cell_circles", what="shapes name")
    xy = apply_affine(um_to_cs, xy_um)
    sdata.shapes[shapes_key] = cell_circles(xy, diameter_um / 2 / um_per_px, obs[instance_key].to_numpy(), cs)
    annotate(sdata, table_key, shapes_key, instance_key)
    images = [k for k in sdata.images if k.startswith(f"{dataset_id}_z")]
    image_key = pick_image(sdata, image_key, images[:1])
    nominal = _manifest_mpp(path / "images" / "manifest.json")
    if nominal is not None and not overridden and abs(nominal * scale_of(um_to_cs) - 1) > 0.1:
        warn(
            f"images/manifest.json says {nominal:.4g} µm/px, but the µm → mosaic transform "
            f"(micron_to_mosaic_pixel_transform.csv) gives {um_per_px:.4g} µm/px: the manifest is stale (mosaics "
            f"resampled after the run?). Using {um_per_px:.4g}, which is how the data are placed."
        )
    return finish(
        sdata,
        platform="merscope",
        function="io.read_merscope",
        table_key=table_key,
        shapes_key=shapes_key,
        instance_key=instance_key,
        cs=cs,
        um_per_unit=um_per_px,
        xy=xy,
        diameter_um=diameter_um,
        image_key=image_key,
        xy_um=xy_um,
        mpp_source=(
            "image_mpp / image_origin_um arguments"
            if overridden
            else "spatialdata-io transformation µm → mosaic pixels (images/micron_to_mosaic_pixel_transform.csv)"
        ),
        nominal_mpp=nominal,
        fix="Check images/micron_to_mosaic_pixel_transform.csv, or pass `image_mpp=` and `image_origin_um=`.",
        check_placement=check_placement,
        suggest_override=True,
        metadata={"dataset_id": dataset_id},
        params={"path": path.name, "image_mpp_override": image_mpp, "retransformed": moved},
    )


def _manifest_mpp(file: Path) -> float | None:
    try:
        value = json.loads(file.read_text()).get("microns_per_pixel")
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, int | float) and value > 0 else None


def read_cosmx(
    path: str | os.PathLike[str],
    *,
    dataset_id: str | None = None,
    pixel_size_um: float = COSMX_PIXEL_SIZE_UM,
    image_key: str | None = None,
    check_placement: bool = True,
    **kwargs: Any,
) -> SpatialData:
    """Read NanoString CosMx flat files, with the cells as circles in global pixels.

    Reading is delegated to :func:`spatialdata_io.cosmx`, which reads the counts, the cell metadata, and one
    ``CellComposite`` image and ``CellLabels`` mask per FOV (Identity in the FOV's coordinate system, an affine into
    ``'global'`` pixels). Its table annotates the label masks; stfm adds one circle per cell at
    ``CenterX/Y_global_px`` (radius ``sqrt(Area / π)``) in ``'global'`` pixels and points the table at them, so cells
    of every FOV are in one element. CosMx files give positions in pixels only: µm need the camera's pixel size,
    ``pixel_size_um``.

    Parameters
    ----------
    path
        Folder holding ``<dataset_id>_exprMat_file.csv``, ``_metadata_file.csv``, ``_fov_positions_file.csv`` and the
        ``CellComposite/`` and ``CellLabels/`` folders (they may be empty).
    dataset_id
        File prefix (default: inferred from the single ``*_exprMat_file.csv``); also prefixes the shapes name.
    pixel_size_um
        µm per CosMx pixel (default 0.12028, the CosMx SMI camera; check your instrument's documentation: older
        runs may differ).
    image_key
        FOV image :func:`stfm.pp.extract_features` should use (default: the only one; none with several FOVs,
        as each FOV has its own image).
    check_placement
        Raise when fewer than half of the cell centres fall inside ``image_key``.
    **kwargs
        Passed to :func:`spatialdata_io.cosmx` (``transcripts`` — ``False`` when there is no ``_tx_file.csv`` —,
        ``imread_kwargs``, …).

    Returns
    -------
    The spatialdata-io :class:`~spatialdata.SpatialData`, with these fields set:

    `.shapes[f'{dataset_id}_cell_circles']` : :class:`~geopandas.GeoDataFrame`
        One circle per cell in global pixels (Identity to ``'global'``), annotated by ``tables['table']`` through
        ``obs['instance_id']`` (``'<cell_ID>_<fov>'``, the table's ``obs_names``).
    `.tables['table'].obsm['spatial']` : :class:`numpy.ndarray` (float64, `(n_cells, 2)`)
        Cell centres (x, y) in global pixels (spatialdata-io's FOV-local pixels move to ``obsm['spatial_fov']``);
        ``obsm['spatial_um']`` in µm.
    `.tables['table'].uns['spatial'][f'{dataset_id}_cell_circles']` : :class:`dict`
        ``scalefactors`` (``microns_per_pixel`` = ``pixel_size_um``, ``spot_diameter_fullres``) and ``metadata``
        (``platform='cosmx'``, ``spot_diameter_um``, element names, ``image_mpp`` per FOV image, ``mpp_source``).
    `.tables['table'].uns['stfm']['spatial']` : :class:`dict`
        Provenance.
    """
    path = check_folder(
        path,
        platform="CosMx",
        reader="stfm.io.read_cosmx",
        holds="<dataset_id>_exprMat_file.csv, _metadata_file.csv, …",
    )
    pixel_size_um = check_positive(pixel_size_um, name="pixel_size_um")
    if dataset_id is None:
        found = sorted(p.name.removesuffix("_exprMat_file.csv") for p in path.glob("*_exprMat_file.csv"))
        if len(found) != 1:
            msg = (
                f"Cannot infer `dataset_id` in {str(path)!r}: expected one '<dataset_id>_exprMat_file.csv', found "
                f"{[f + '_exprMat_file.csv' for f in found]}. Pass `dataset_id=`."
            )
            raise FileNotFoundError(msg)
        dataset_id = found[0]
    check_valid_key(dataset_id, what="dataset_id")
    import spatialdata_io

    sdata = spatialdata_io.cosmx(path, dataset_id=dataset_id, **kwargs)
    cs, table_key = "global", "table"
    table = sdata.tables[table_key]
    xy = np.asarray(table.obsm["global"], dtype=np.float64)
    table.obsm["spatial_fov"] = np.asarray(table.obsm["spatial"], dtype=np.float64)
    diameter_px = 2 * np.sqrt(np.asarray(table.obs["Area"], dtype=np.float64) / np.pi)
    shapes_key = check_valid_key(f"{dataset_id}_cell_circles", what="shapes name")
    instance_key = "instance_id"
    table.obs[instance_key] = table.obs_names.astype(str)
    sdata.shapes[shapes_key] = cell_circles(xy, diameter_px / 2, table.obs[instance_key].to_numpy(), cs)
    annotate(sdata, table_key, shapes_key, instance_key)
    image_key = pick_image(sdata, image_key, ())
    return finish(
        sdata,
        platform="cosmx",
        function="io.read_cosmx",
        table_key=table_key,
        shapes_key=shapes_key,
        instance_key=instance_key,
        cs=cs,
        um_per_unit=pixel_size_um,
        xy=xy,
        diameter_um=diameter_px * pixel_size_um,
        image_key=image_key,
        mpp_source="pixel_size_um argument (CosMx files give pixels only); FOV images scaled by their affine",
        fix="Check `pixel_size_um` and that the CellComposite images belong to these cells.",
        check_placement=check_placement,
        metadata={"dataset_id": dataset_id, "n_fov": int(table.obs["fov"].nunique())},
        params={"path": path.name, "pixel_size_um": pixel_size_um},
    )
