"""10x Visium HD reader: one bin size, bins as squares of their true size, placed on the H&E."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._validation import check_valid_key
from ._platform_core import check_folder, finish, pick_image, warn

if TYPE_CHECKING:
    from spatialdata import SpatialData

__all__ = ["read_visium_hd", "visium_hd_bin_sizes"]

_BIN_DIR = re.compile(r"^square_(\d{3})um$")


def visium_hd_bin_sizes(path: str | os.PathLike[str]) -> dict[int, Path]:
    """Bin sizes (µm) of a Visium HD run and their ``binned_outputs/square_XXXum`` folders."""
    path = Path(path)
    root = path / "binned_outputs" if (path / "binned_outputs").is_dir() else path
    return {int(m.group(1)): p for p in sorted(root.iterdir()) if p.is_dir() and (m := _BIN_DIR.match(p.name))}


def read_visium_hd(
    path: str | os.PathLike[str],
    bin_size: int = 8,
    *,
    dataset_id: str | None = None,
    fullres_image_file: str | os.PathLike[str] | None = None,
    image_key: str | None = None,
    check_placement: bool = True,
    **kwargs: Any,
) -> SpatialData:
    """Read one bin size of a 10x Visium HD (Space Ranger) output folder.

    Reading is delegated to :func:`spatialdata_io.visium_hd` with ``bin_size``, ``bins_as_squares=True`` and
    ``load_segmentations_only=False``. Its coordinate system ``dataset_id`` is the full-resolution microscope
    image's pixel grid (``tissue_positions`` coordinates); the hires and lowres PNGs are Identity in their own
    systems and scaled into it by ``1 / tissue_*_scalef``. stfm takes the µm/px from ``scalefactors_json.json``
    (the number spatialdata-io sizes the squares with), checks it against the bin grid itself (pixel distance
    between bins over their array distance × ``bin_size``; a warning when they disagree by more than 2 %), and checks
    that the bins land on the image.

    Parameters
    ----------
    path
        Space Ranger ``outs/`` folder, holding ``binned_outputs/square_XXXum/`` and ``feature_slice.h5``.
    bin_size
        Bin side in µm; Space Ranger writes 2, 8 and 16. One the run does not have raises a :class:`ValueError`
        listing those it has (spatialdata-io would warn and read every bin size).
    dataset_id
        Prefix of the element names and name of the full-resolution coordinate system (default: the prefix of
        ``<dataset_id>_feature_slice.h5``, else the folder's name).
    fullres_image_file
        The full-resolution H&E (default: spatialdata-io looks in ``microscope_image/``). Without it
        :func:`stfm.pp.extract_features` has only the hires or lowres PNG, too coarse for most encoders.
    image_key
        Image :func:`stfm.pp.extract_features` should use (default: the finest of ``f'{dataset_id}_full_image'``,
        ``_hires_image``, ``_lowres_image``).
    check_placement
        Raise when fewer than half of the bin centres fall inside ``image_key``.
    **kwargs
        Passed to :func:`spatialdata_io.visium_hd` (``filtered_counts_file``, ``load_all_images``, …).

    Returns
    -------
    The spatialdata-io :class:`~spatialdata.SpatialData`, with these fields set (``b`` = ``f'{bin_size:03d}'``):

    `.shapes[f'{dataset_id}_square_{b}um']` : :class:`~geopandas.GeoDataFrame`
        One axis-aligned square per bin, side ``bin_size / microns_per_pixel`` full-resolution pixels (spatialdata-io),
        annotated by ``tables[f'square_{b}um']`` through ``obs['location_id']``.
    `.tables[f'square_{b}um'].obsm['spatial']` : :class:`numpy.ndarray` (float64, `(n_bins, 2)`)
        Bin centres (x, y) in full-resolution pixels (the frame of ``tissue_positions``, and of
        ``images[f'{dataset_id}_full_image']``; other images map into it by their transformation);
        ``obsm['spatial_um']`` in µm.
    `.tables[f'square_{b}um'].uns['spatial'][f'{dataset_id}_square_{b}um']` : :class:`dict`
        ``scalefactors`` (Space Ranger's, with ``microns_per_pixel`` and ``spot_diameter_fullres`` = bin side in
        pixels) and ``metadata`` (``platform='visium_hd'``, ``bin_size_um``, ``spot_diameter_um`` = bin side,
        ``image_key``, ``shapes_key``, ``table_key``, ``coordinate_system``, ``image_mpp`` per image,
        ``grid_microns_per_pixel``, ``mpp_source``).
    `.tables[f'square_{b}um'].uns['stfm']['spatial']` : :class:`dict`
        Provenance.
    """
    path = check_folder(
        path, platform="Visium HD", reader="stfm.io.read_visium_hd", holds="binned_outputs/ and feature_slice.h5"
    )
    if isinstance(bin_size, float) and bin_size.is_integer():
        bin_size = int(bin_size)
    available = visium_hd_bin_sizes(path)
    if not isinstance(bin_size, int) or isinstance(bin_size, bool) or bin_size not in available:
        where = path / "binned_outputs" if (path / "binned_outputs").is_dir() else path
        has = (
            f"it has {', '.join(f'{b} µm ({p.name})' for b, p in available.items())}. Pass `bin_size=` one of "
            f"{sorted(available)}."
            if available
            else "it has no square_XXXum folder at all: pass the Space Ranger `outs/` folder."
        )
        msg = f"`bin_size`={bin_size!r} µm is not among the bins of this Visium HD run ({str(where)!r}): {has}"
        raise ValueError(msg)
    if dataset_id is None and not list(path.glob("*_feature_slice.h5")):
        dataset_id = re.sub(r"[^A-Za-z0-9_.\-]", "_", path.resolve().name).lstrip("_") or "visium_hd"
    if dataset_id is not None:
        check_valid_key(dataset_id, what="dataset_id")
    import spatialdata_io

    for fixed in ("bin_size", "bins_as_squares", "load_segmentations_only", "annotate_table_by_labels"):
        if fixed in kwargs:
            msg = f"`{fixed}` is set by `stfm.io.read_visium_hd`; do not pass it."
            raise TypeError(msg)
    sdata = spatialdata_io.visium_hd(
        path,
        dataset_id=dataset_id,
        bin_size=bin_size,
        bins_as_squares=True,
        load_segmentations_only=False,
        annotate_table_by_labels=False,
        fullres_image_file=fullres_image_file,
        **kwargs,
    )
    name = f"square_{bin_size:03d}um"
    table_key = name
    table = sdata.tables[table_key]
    from spatialdata.models import get_table_keys

    shapes_key, _, instance_key = get_table_keys(table)
    dataset_id = shapes_key.removesuffix(f"_{name}")
    sf = json.loads((available[bin_size] / "spatial" / "scalefactors_json.json").read_text())
    mpp = float(sf["microns_per_pixel"])
    xy = np.asarray(table.obsm["spatial"], dtype=np.float64)
    grid_mpp = _grid_mpp(table, xy, bin_size)
    if grid_mpp is not None and abs(grid_mpp / mpp - 1) > 0.02:
        warn(
            f"scalefactors_json.json gives {mpp:.5g} µm/px, but the bin grid gives {grid_mpp:.5g} µm/px (pixel "
            f"distance between bins over their array distance × {bin_size} µm): the scale factors may belong to "
            "another image. Using the scale factors."
        )
    cs = dataset_id
    image_key = pick_image(sdata, image_key, [f"{dataset_id}_{r}_image" for r in ("full", "hires", "lowres")])
    return finish(
        sdata,
        platform="visium_hd",
        function="io.read_visium_hd",
        table_key=table_key,
        shapes_key=shapes_key,
        instance_key=instance_key,
        cs=cs,
        um_per_unit=mpp,
        xy=xy,
        diameter_um=float(bin_size),
        image_key=image_key,
        mpp_source=(
            "scalefactors_json.json microns_per_pixel (full-resolution pixels; spatialdata-io sizes the squares with "
            "it), checked against the bin grid; images scaled by their transformation into the full-resolution grid"
        ),
        nominal_mpp=mpp,
        what="bin",
        fix="Pass `fullres_image_file=` the H&E that tissue_positions refer to.",
        check_placement=check_placement,
        scalefactors={k: v for k, v in sf.items() if isinstance(v, int | float)},
        metadata={
            "bin_size_um": float(bin_size),
            "dataset_id": dataset_id,
            **({"grid_microns_per_pixel": grid_mpp} if grid_mpp is not None else {}),
        },
        params={"path": path.name, "bin_size": bin_size, "bins": sorted(available)},
    )


def _grid_mpp(table: Any, xy: np.ndarray, bin_size: int) -> float | None:
    """µm/px from the bin grid: fit pixel position = A · (array_col, array_row) + b; one bin step is ``bin_size``."""
    if not {"array_row", "array_col"} <= set(table.obs.columns) or len(xy) < 3:
        return None
    design = np.c_[table.obs["array_col"].to_numpy(float), table.obs["array_row"].to_numpy(float), np.ones(len(xy))]
    if np.linalg.matrix_rank(design) < 3:
        return None
    coef, *_ = np.linalg.lstsq(design, xy, rcond=None)
    px_per_bin = float(np.sqrt(abs(np.linalg.det(coef[:2, :2]))))
    return bin_size / px_per_bin if px_per_bin > 0 else None
