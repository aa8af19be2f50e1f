"""10x Visium reader: squidpy (AnnData) and spatialdata-io (SpatialData) do the reading; stfm adds scale."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._logging import logger
from ._images import check_spots_in_image

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["read_visium"]

#: Visium spot diameter in µm (centre-to-centre pitch 100 µm).
VISIUM_SPOT_DIAMETER_UM = 55.0


def read_visium(
    path: str | os.PathLike[str],
    *,
    counts_file: str | None = "filtered_feature_bc_matrix.h5",
    fullres_image: str | os.PathLike[str] | None = None,
    library_id: str | None = None,
    as_spatialdata: bool = False,
) -> AnnData | SpatialData:
    """Read Space Ranger output, with the physical scale stfm needs.

    The reading itself is delegated to :func:`squidpy.read.visium` (AnnData) or :func:`spatialdata_io.visium`
    (SpatialData). stfm adds ``scalefactors['microns_per_pixel']`` (55 µm / ``spot_diameter_fullres``) and, when
    ``fullres_image`` is given, records it as ``metadata['source_image_path']`` after checking that every spot
    lies inside it (the hires image, at about 0.15× scale, is too coarse for foundation models).

    Parameters
    ----------
    path
        Space Ranger ``outs/`` folder, holding ``spatial/`` and the counts file.
    counts_file
        Counts matrix inside ``path``. ``None`` reads spots under tissue without counts (zero genes): an
        H&E-only table for feature extraction and expression prediction.
    fullres_image
        Full-resolution H&E (TIFF/JPEG) that ``tissue_positions`` refer to.
    library_id
        Library key in ``uns['spatial']`` (SpatialData: the dataset id and coordinate-system name).
    as_spatialdata
        Return a :class:`~spatialdata.SpatialData`; its table carries the same ``uns['spatial'][lib]['scalefactors']``.

    Returns
    -------
    AnnData with ``obsm['spatial']`` (x, y full-resolution pixels), ``obs['in_tissue' | 'array_row' | 'array_col']``
    and ``uns['spatial'][library_id]`` (``images``, ``scalefactors`` incl. ``microns_per_pixel``, ``metadata``);
    or the spatialdata-io SpatialData with that scale information added to its table.
    """
    path = Path(path)
    spatial_dir = path / "spatial"
    if not spatial_dir.is_dir():
        msg = f"{str(path)!r} has no 'spatial/' folder; expected a Space Ranger 'outs/' directory."
        raise FileNotFoundError(msg)
    if counts_file is not None and not (path / counts_file).exists():
        msg = (
            f"Counts file {str(path / counts_file)!r} not found. Pass `counts_file=` with the matrix's name, or "
            "`counts_file=None` to read spot positions without counts."
        )
        raise FileNotFoundError(msg)
    image_shape = _image_shape(fullres_image) if fullres_image is not None else None

    if as_spatialdata:
        if counts_file is None:
            from ._convert import to_spatialdata

            return to_spatialdata(read_visium(path, counts_file=None, fullres_image=fullres_image, library_id=library_id))
        import spatialdata_io

        sdata = spatialdata_io.visium(path, dataset_id=library_id, counts_file=counts_file, fullres_image_file=fullres_image)
        table = sdata.tables["table"]
        region = table.uns["spatialdata_attrs"]["region"]
        lib = region if isinstance(region, str) else region[0]
        sf = _read_scalefactors(spatial_dir)
        _check_image(table.obsm["spatial"], image_shape, fullres_image)
        table.uns["spatial"] = {lib: {"scalefactors": sf, "metadata": _metadata(fullres_image)}}
        return sdata

    if counts_file is None:
        adata = _positions_only(spatial_dir, library_id or path.name)
    else:
        import squidpy as sq

        adata = sq.read.visium(path, counts_file=counts_file, library_id=library_id)
        adata.var_names_make_unique()
    lib = next(iter(adata.uns["spatial"]))
    adata.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    entry = adata.uns["spatial"][lib]
    entry["scalefactors"] = {**entry.get("scalefactors", {}), **_read_scalefactors(spatial_dir)}
    entry.setdefault("metadata", {}).update(_metadata(fullres_image))
    _check_image(adata.obsm["spatial"], image_shape, fullres_image)
    logger.info("read Visium %s: %d spots × %d genes", lib, adata.n_obs, adata.n_vars)
    return adata


def _read_scalefactors(spatial_dir: Path) -> dict:
    file = spatial_dir / "scalefactors_json.json"
    if not file.is_file():
        msg = f"{str(file)!r} not found; it gives the spot diameter needed for the physical scale."
        raise FileNotFoundError(msg)
    sf = json.loads(file.read_text())
    sf["microns_per_pixel"] = VISIUM_SPOT_DIAMETER_UM / float(sf["spot_diameter_fullres"])
    return sf


def _metadata(fullres_image: str | os.PathLike[str] | None) -> dict:
    return {} if fullres_image is None else {"source_image_path": str(Path(fullres_image).resolve())}


def _image_shape(image: str | os.PathLike[str]) -> tuple[int, int]:
    image = Path(image)
    if not image.is_file():
        msg = f"Full-resolution image {str(image)!r} does not exist."
        raise FileNotFoundError(msg)
    if image.suffix.lower() in {".tif", ".tiff", ".btf"}:
        import tifffile

        with tifffile.TiffFile(image) as tif:
            shape = tif.series[0].levels[0].shape
        return (shape[0], shape[1]) if shape[-1] in (3, 4) else (shape[-2], shape[-1])
    from PIL import Image

    with Image.open(image) as im:
        return im.size[1], im.size[0]


def _check_image(xy: np.ndarray, shape: tuple[int, int] | None, image) -> None:
    if shape is not None:
        check_spots_in_image(np.asarray(xy, dtype=float), shape, what=str(image))


def _positions_only(spatial_dir: Path, library_id: str) -> AnnData:
    from anndata import AnnData

    for name, header in (("tissue_positions.csv", 0), ("tissue_positions_list.csv", None)):
        file = spatial_dir / name
        if file.is_file():
            table = pd.read_csv(file, header=header, index_col=0)
            break
    else:
        msg = f"No tissue_positions(.csv|_list.csv) in {str(spatial_dir)!r}."
        raise FileNotFoundError(msg)
    table.columns = ["in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]
    table.index = table.index.astype(str).rename(None)
    table = table[table["in_tissue"] == 1]
    if table.empty:
        msg = f"No spot is under tissue in {str(spatial_dir)!r}."
        raise ValueError(msg)
    adata = AnnData(obs=table[["in_tissue", "array_row", "array_col"]].copy(), var=pd.DataFrame(index=pd.Index([], dtype=str)))
    adata.obsm["spatial"] = table[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)
    images = {}
    from ._images import read_image

    for res in ("hires", "lowres"):
        file = spatial_dir / f"tissue_{res}_image.png"
        if file.is_file():
            images[res] = read_image(file)
    adata.uns["spatial"] = {library_id: {"images": images, "scalefactors": {}, "metadata": {}}}
    return adata
