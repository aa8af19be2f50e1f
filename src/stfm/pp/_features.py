"""``stfm.pp.extract_features``: embed the H&E tile around every spot/cell/tile with a foundation model."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._containers import get_library_id, get_table, is_spatialdata, prepare_output
from .._logging import logger
from .._provenance import record
from .._settings import settings
from .._validation import check_copy_inplace, check_positive, check_valid_key

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..data import ImageSource, TileDataset
    from ..encoders import ImageEncoder

__all__ = ["extract_features"]

#: Bump when the crop/resample algorithm changes, so stale cache entries are never reused.
_CACHE_VERSION = "tiles-v2"  # v2: torch antialiased bicubic on the device (v1: PIL in the workers)
#: Physical spot diameters (µm) of platforms whose spots stfm can check the slide's µm/px against.
_KNOWN_SPOT_UM = {"visium": 55.0, "st": 100.0}
_DEFAULT_MPP = 0.5


def _user_stacklevel() -> int:
    """Stack level of the first frame outside stfm, so warnings point at the user's call."""
    frame = sys._getframe(1)
    level = 1
    pkg = str(Path(__file__).resolve().parents[1])
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(pkg):
        frame = frame.f_back
        level += 1
    return level


def _warn(msg: str) -> None:
    warnings.warn(msg, UserWarning, stacklevel=_user_stacklevel())


@dataclass
class _Inputs:
    """Everything extract_features needs about the data: where to crop and at what scale."""

    source: ImageSource
    xy: np.ndarray  # (n, 2) crop centres in image level-0 pixels
    slide_mpp: float  # µm per image level-0 pixel
    spot_diameter_px: float | None  # spot diameter in image level-0 pixels, when known
    library_id: str | None
    image: str
    extra: dict[str, Any] = field(default_factory=dict)


def extract_features(
    data: AnnData | SpatialData,
    model: str | ImageEncoder | torch.nn.Module,
    *,
    img: Any = None,
    library_id: str | None = None,
    spatial_key: str = "spatial",
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    spot_scale: float | None = None,
    tile_px: int | None = None,
    mpp: float | None = None,
    slide_mpp: float | None = None,
    model_path: str | os.PathLike[str] | None = None,
    revision: str | None = None,
    batch_size: int | None = None,
    num_workers: int | None = None,
    device: str | torch.device | None = None,
    amp: bool | None = None,
    show_progress_bar: bool | None = None,
    cache: bool = True,
    key_added: str | None = None,
    inplace: bool = True,
    copy: bool = False,
) -> AnnData | SpatialData | np.ndarray | None:
    """Embed the H&E tile around each spot, cell or tile with a pathology foundation model.

    Tiles are cut at a physical size: by default a square of ``mpp × tile_px`` µm (the encoder's scale,
    e.g. 0.5 µm/px × 224 px = 112 µm) centred on each observation, cut at the slide's own µm/px and
    resampled (antialiased) to ``tile_px`` pixels. Tiles that reach past the image border are padded with
    white and counted (``n_tiles_padded`` in the provenance, plus a warning). Results are cached on disk
    (see ``cache``), so a repeated call costs no forward pass.

    Parameters
    ----------
    data
        An AnnData with ``obsm[spatial_key]`` (full-resolution pixel coordinates, x then y) and
        ``uns['spatial'][library_id]``, or a SpatialData whose table annotates spots/tiles shapes and
        whose images hold the H&E (``images[image_key]``, multiscale images are read lazily).
    model
        Encoder key (``'efficientnet_lite0'``, ``'uni'``, … see :func:`stfm.encoders.list_encoders`), a timm
        model name, an :class:`~stfm.encoders.ImageEncoder`, or a module wrapped with
        :func:`stfm.encoders.load_encoder`.
    img
        AnnData only: the full-resolution H&E in the frame of ``obsm[spatial_key]``, as a numpy array, PIL
        image, path (JPEG/PNG; a tiled pyramidal TIFF or a zarr folder is read lazily, region by region) or
        :class:`~stfm.data.ImageSource`. Default: ``uns['spatial'][library_id]['metadata']['source_image_path']``;
        the ``hires`` image is used only when it is at least as fine as the encoder's µm/px (with a warning).
    library_id
        AnnData only: key of ``uns['spatial']`` (default: the only one).
    spatial_key
        Key of the coordinates in ``obsm``.
    image_key
        SpatialData only: image element (default: ``'{library_id}_full_image'``, or the only image).
    shapes_key
        SpatialData only: shapes element the table annotates (default: the table's only region). When no
        table annotates it (H&E-only data), a zero-gene table ``f'{shapes_key}_table'`` is created.
    table_key
        SpatialData only: the observation table (default: the only table, or the one annotating ``shapes_key``).
    spot_scale
        Crop side in spot diameters (squidpy's convention) instead of the encoder's physical scale; the crop
        is still resampled to ``tile_px``. ``None`` uses ``mpp × tile_px`` µm.
    tile_px
        Encoder input size in pixels (default: the encoder's).
    mpp
        µm per pixel of the encoder input (default: the encoder card's, 0.5 when the encoder has none).
    slide_mpp
        µm per full-resolution pixel of the slide (default: ``scalefactors['microns_per_pixel']``, else derived
        from ``spot_diameter_fullres``).
    model_path
        Local weights file for ``model`` (see :func:`stfm.encoders.load_encoder`).
    revision
        Hub revision of the weights (default: the card's pinned one).
    batch_size
        Tiles per forward pass (default: :attr:`stfm.settings.batch_size`).
    num_workers
        DataLoader worker processes cutting tiles (default: :meth:`stfm.settings.resolve_num_workers` — on the
        CPU only the cores torch's threads leave free, often 0; on an accelerator :attr:`stfm.settings.num_workers`).
    device
        Torch device (default: :attr:`stfm.settings.device`).
    amp
        bf16 autocast (default: :attr:`stfm.settings.amp`, i.e. on for CUDA, off on CPU).
    show_progress_bar
        Show a progress bar (default: :attr:`stfm.settings.show_progress_bar`).
    cache
        Read and write features under ``stfm.settings.cache_dir / 'features'``, keyed by image content,
        coordinates, encoder (key, source, revision, weights), µm/px, tile px and crop size.
    key_added
        Replaces the default key ``'X_<encoder key>'``.
    inplace
        Write into ``data``; ``False`` returns the features and leaves ``data`` untouched.
    copy
        Return a modified copy of ``data`` instead of writing into it.

    Returns
    -------
    `None` if `copy=False` and `inplace=True`; the updated copy if `copy=True`; the feature matrix
    (:class:`numpy.ndarray`, float32, `(n_obs, embed_dim)`) if `inplace=False`. Sets the following fields
    (on `adata`, or on `sdata.tables[table_key]`):

    `.obsm['X_<encoder key>' | key_added]` : :class:`numpy.ndarray` (float32, `(n_obs, embed_dim)`)
        Tile embeddings, rows aligned with `obs_names`.
    `.tables[f'{shapes_key}_table']` : :class:`~anndata.AnnData` (`n_shapes × 0`)
        SpatialData only, created when no table annotates `shapes_key` (`obs['region']`, `obs['instance_id']`).
    `.uns['stfm']['X_<encoder key>' | key_added]` : :class:`dict`
        Encoder provenance (key, source, revision, embed_dim, pooling, licence) plus `tile_px`, `mpp`
        (µm/px of the tiles), `encoder_mpp`, `slide_mpp`, `spot_scale`, `tile_um`, `crop_px`, `level`,
        `image`, `image_key`, `library_id`, `n_tiles`, `n_tiles_padded`, `cache_hit`, `cache_key` (`None` with
        `cache=False`),
        `device`, `amp`, `malloc_tuned`.

    Examples
    --------
    >>> adata = stfm.datasets.her2st("B4")
    >>> stfm.pp.extract_features(adata, "efficientnet_lite0")
    >>> adata.obsm["X_efficientnet_lite0"].shape
    (283, 1280)
    """
    check_copy_inplace(copy=copy, inplace=inplace)
    if key_added is not None:
        check_valid_key(key_added)
    if tile_px is not None and (not isinstance(tile_px, int | np.integer) or tile_px < 1):
        msg = f"Expected `tile_px` to be a positive integer, found {tile_px!r}."
        raise ValueError(msg)
    for name, value in (("mpp", mpp), ("slide_mpp", slide_mpp), ("spot_scale", spot_scale)):
        if value is not None:
            check_positive(value, name=name)
    batch_size = settings.batch_size if batch_size is None else int(check_positive(batch_size, name="batch_size"))
    if num_workers is not None:  # None: resolved for the device in `_embed`
        num_workers = int(check_positive(num_workers, name="num_workers", allow_zero=True))
    progress = settings.show_progress_bar if show_progress_bar is None else bool(show_progress_bar)

    # 1. Where to crop, from which image, at what µm/px (fails before any model is loaded).
    if is_spatialdata(data):
        if img is not None:
            msg = "`img=` is for AnnData input; for a SpatialData object pass the image element name as `image_key=`."
            raise ValueError(msg)
        table, table_name, new_table = _resolve_table(data, table_key, shapes_key)
        inputs = _inputs_spatialdata(
            data, table, image_key=image_key, shapes_key=shapes_key, spatial_key=spatial_key, slide_mpp=slide_mpp
        )
        inputs.extra["table_key"] = table_name
    else:
        table = get_table(data)
        table_name, new_table = None, False
        inputs = _inputs_anndata(
            table, img=img, library_id=library_id, spatial_key=spatial_key, slide_mpp=slide_mpp, mpp=mpp
        )

    # 2. The encoder and the tile geometry.
    from ..encoders import load_encoder

    enc = load_encoder(model, model_path=model_path, revision=revision, device=device)
    key = key_added if key_added is not None else check_valid_key(f"X_{enc.key}")
    tile_px = int(tile_px) if tile_px is not None else int(enc.tile_px)
    enc_mpp = float(mpp) if mpp is not None else (float(enc.mpp) if enc.mpp is not None else _DEFAULT_MPP)
    if mpp is None and enc.mpp is None:
        logger.info("encoder %r has no µm/px on its card; using %.2f µm/px", enc.key, _DEFAULT_MPP)
    if spot_scale is None:
        tile_um = enc_mpp * tile_px
    else:
        if inputs.spot_diameter_px is None:
            msg = (
                "`spot_scale` sets the crop side in spot diameters, but the spot diameter is unknown: "
                "`scalefactors['spot_diameter_fullres']` is missing. Set it, or use `spot_scale=None` with `mpp=`."
            )
            raise ValueError(msg)
        tile_um = float(spot_scale) * inputs.spot_diameter_px * inputs.slide_mpp
    side_px = tile_um / inputs.slide_mpp
    _check_inside(inputs)

    from ..data import TileDataset

    dataset = TileDataset(inputs.source, inputs.xy, side_px, tile_px, resize=False)  # resampled on the device
    n = len(dataset)

    # 3. Features: from the cache, or computed.
    # The key hashes the image and the weights: skipped when the cache is off.
    digest = _cache_key(inputs, enc, dataset, tile_um=tile_um, enc_mpp=enc_mpp, spot_scale=spot_scale) if cache else None
    cache_path = settings.cache_dir / "features" / f"{digest}.npy" if cache else None
    feats = _cache_read(cache_path, (n, enc.embed_dim)) if cache_path is not None else None
    hit = feats is not None
    dev_used, amp_used, tuned = "none (cache)", False, False
    if feats is None:
        feats, dev_used, amp_used, tuned = _embed(
            enc, dataset, batch_size=batch_size, num_workers=num_workers, amp=amp, progress=progress
        )
        if cache:
            _cache_write(cache_path, feats)
    else:
        logger.info("extract_features: %d tiles read from the cache (%s)", n, cache_path.name)

    if dataset.n_padded:
        _warn(
            f"{dataset.n_padded} of {n} tiles ({tile_um:.0f} µm) reach past the image border and were padded with "
            "white; their features describe partly empty tiles (see `uns['stfm'][...]['n_tiles_padded']`)."
        )
    prov = {
        **enc.provenance(),
        "encoder": enc.key,
        "tile_px": tile_px,
        "mpp": tile_um / tile_px,
        "encoder_mpp": enc_mpp,
        "slide_mpp": inputs.slide_mpp,
        "spot_scale": spot_scale,
        "tile_um": tile_um,
        "crop_px": dataset.crop_px,
        "level": dataset.level,
        "image": inputs.image,
        "library_id": inputs.library_id,
        "n_tiles": n,
        "n_tiles_padded": dataset.n_padded,
        "cache_hit": hit,
        "cache_key": digest,
        "device": dev_used,
        "amp": amp_used,
        "malloc_tuned": tuned,
        **inputs.extra,
    }
    prov.pop("key", None)

    # 4. Output (nothing is written before this point).
    if not inplace:
        return feats
    out = prepare_output(data, copy=copy)
    if new_table:  # H&E-only SpatialData: the table is added only now, complete
        out.tables[table_name] = table
    target = get_table(out, table_name) if table_name is not None else get_table(out)
    target.obsm[key] = feats
    record(target, key, "pp.extract_features", **prov)
    logger.info("extract_features: added obsm[%r] (%d × %d)", key, n, enc.embed_dim)
    return out if copy else None


# ---------------------------------------------------------------------------------------------------------
# Inputs


def _known_spot_um(sf: dict[str, Any], meta: dict[str, Any]) -> tuple[float, str] | None:
    """Physical spot diameter (µm) of the platform, when it can be told from the metadata."""
    if "spot_diameter_um" in meta:
        return float(meta["spot_diameter_um"]), "`metadata['spot_diameter_um']`"
    platform = str(meta.get("platform", "")).lower()
    if "visium" in platform or "fiducial_diameter_fullres" in sf:
        return _KNOWN_SPOT_UM["visium"], "Visium"
    if platform.startswith("st") or "spatial transcriptomics" in platform:
        return _KNOWN_SPOT_UM["st"], "legacy ST"
    return None


def _check_mpp(sf: dict[str, Any], meta: dict[str, Any], mpp_used: float, *, user: bool, where: str) -> None:
    """Warn when the µm/px in use disagrees with the stored one or with the platform's spot diameter."""
    stored = sf.get("microns_per_pixel")
    if user and stored is not None and np.isfinite(stored) and abs(mpp_used / float(stored) - 1) > 0.1:
        _warn(
            f"`slide_mpp`={mpp_used:.4g} µm/px differs from {where}['scalefactors']['microns_per_pixel']={float(stored):.4g}; "
            f"tiles are cut with {mpp_used:.4g}."
        )
    known = _known_spot_um(sf, meta)
    if known is not None and "spot_diameter_fullres" in sf:
        implied = float(sf["spot_diameter_fullres"]) * mpp_used
        if abs(implied / known[0] - 1) > 0.15:
            _warn(
                f"µm/px {mpp_used:.4g} is inconsistent with the spot diameter: {float(sf['spot_diameter_fullres']):.1f} px "
                f"× {mpp_used:.4g} µm/px = {implied:.1f} µm, but {known[1]} spots are {known[0]:.0f} µm. Tiles will have "
                "the wrong physical size; check `microns_per_pixel` / `slide_mpp`."
            )


def _inputs_anndata(
    adata: AnnData, *, img: Any, library_id: str | None, spatial_key: str, slide_mpp: float | None, mpp: float | None
) -> _Inputs:
    from ..data import ArraySource, open_image

    if spatial_key not in adata.obsm:
        msg = (
            f"`obsm[{spatial_key!r}]` not found: spot coordinates (x, y in full-resolution pixels) are needed to cut "
            f"tiles. Available: {sorted(adata.obsm)}. Read the data with a spatial reader (e.g. `stfm.io.read_her2st`, "
            "`scanpy.read_visium`) or pass `spatial_key=`."
        )
        raise KeyError(msg)
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)[:, :2]
    lib = get_library_id(adata, library_id)
    lib_uns = adata.uns["spatial"][lib] if lib is not None else {}
    sf = dict(lib_uns.get("scalefactors", {}))
    meta = dict(lib_uns.get("metadata", {}))
    where = f"uns['spatial'][{lib!r}]"

    if slide_mpp is not None:
        full_mpp = float(slide_mpp)
    elif sf.get("microns_per_pixel") is not None and np.isfinite(sf["microns_per_pixel"]):
        full_mpp = float(sf["microns_per_pixel"])
    elif "spot_diameter_fullres" in sf and (known := _known_spot_um(sf, meta) or (_KNOWN_SPOT_UM["visium"], "Visium")):
        full_mpp = known[0] / float(sf["spot_diameter_fullres"])
    else:
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
        return _Inputs(source, xy, full_mpp, spot_px, lib, source.description)
    path = meta.get("source_image_path")
    if path is not None and Path(str(path)).is_file():
        source = open_image(str(path))
        return _Inputs(source, xy, full_mpp, spot_px, lib, source.description)
    missing = f" (`metadata['source_image_path']` = {str(path)!r} does not exist)" if path is not None else ""
    hires = lib_uns.get("images", {}).get("hires") if lib is not None else None
    target = float(mpp) if mpp is not None else _DEFAULT_MPP
    if hires is not None and "tissue_hires_scalef" in sf:
        scalef = float(sf["tissue_hires_scalef"])
        hires_mpp = full_mpp / scalef
        if hires_mpp <= target * 1.05:
            _warn(
                f"No full-resolution image for library {lib!r}{missing}; using the hires image, which at "
                f"{hires_mpp:.3g} µm/px is fine enough for tiles at {target:.3g} µm/px."
            )
            spot = spot_px * scalef if spot_px is not None else None
            return _Inputs(
                ArraySource(hires, description=f"{where}['images']['hires']"),
                xy * scalef,
                hires_mpp,
                spot,
                lib,
                "hires",
            )
        msg = (
            f"No full-resolution image for library {lib!r}{missing}, and the hires image ({hires_mpp:.2f} µm/px) is too "
            f"coarse for tiles at {target:.2f} µm/px. Pass the full-resolution H&E as `img=` (array, PIL image or path), "
            f"or set {where}['metadata']['source_image_path']."
        )
        raise ValueError(msg)
    msg = (
        f"No image found for library {lib!r}{missing}: pass the full-resolution H&E as `img=` (array, PIL image or "
        f"path) or set {where}['metadata']['source_image_path']."
    )
    raise ValueError(msg)


def _resolve_table(sdata: SpatialData, table_key: str | None, shapes_key: str | None) -> tuple[AnnData, str, bool]:
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
            msg = f"`sdata.shapes[{shapes_key!r}]` not found. Available shapes: {list(sdata.shapes.keys())}."
            raise KeyError(msg)
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
    """A zero-gene table annotating ``shapes[shapes_key]`` (CONVENTIONS: ``'{shapes_key}_table'``)."""
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


def _inputs_spatialdata(
    sdata: SpatialData,
    table: AnnData,
    *,
    image_key: str | None,
    shapes_key: str | None,
    spatial_key: str,
    slide_mpp: float | None,
) -> _Inputs:
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import get_transformation

    from ..data import LazyArraySource

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
    if image_key not in sdata.images:
        msg = f"`sdata.images[{image_key!r}]` not found. Available images: {images}."
        raise KeyError(msg)
    element = sdata.images[image_key]
    if type(element).__name__ == "DataArray":
        levels = [element]
    else:  # multiscale DataTree: scale0 (finest), scale1, ...
        names = sorted(element.keys(), key=lambda k: int("".join(c for c in str(k) if c.isdigit()) or 0))
        levels = [element[k]["image"] if "image" in element[k] else next(iter(element[k].values())) for k in names]
    source = LazyArraySource([lvl.transpose("c", "y", "x") for lvl in levels], axes="cyx", description=image_key)

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
        cs_mpp = None
        if sf.get("microns_per_pixel") is not None and np.isfinite(sf["microns_per_pixel"]):
            cs_mpp = float(sf["microns_per_pixel"])
        elif "spot_diameter_fullres" in sf:
            cs_mpp = (_known_spot_um(sf, meta) or (_KNOWN_SPOT_UM["visium"], ""))[0] / float(
                sf["spot_diameter_fullres"]
            )
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
    return _Inputs(
        source, xy_px, px_mpp, spot_px, shapes_key, image_key, extra={"image_key": image_key, "shapes_key": shapes_key}
    )


def _check_inside(inputs: _Inputs) -> None:
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


# ---------------------------------------------------------------------------------------------------------
# Cache


def _weights_fingerprint(enc: ImageEncoder) -> str:
    """Hash of parameter names, shapes and a strided sample of their values (cheap even for ViT-g)."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    with torch.no_grad():
        for name, t in enc.state_dict().items():
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.detach().reshape(-1)
            if flat.numel():
                step = max(1, flat.numel() // 4096)
                h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()


def _cache_key(
    inputs: _Inputs,
    enc: ImageEncoder,
    dataset: TileDataset,
    *,
    tile_um: float,
    enc_mpp: float,
    spot_scale: float | None,
) -> str:
    spec = {
        "version": _CACHE_VERSION,
        "image": inputs.source.fingerprint(),
        "xy": hashlib.blake2b(np.round(inputs.xy, 2).astype(np.float64).tobytes(), digest_size=16).hexdigest(),
        "encoder": [
            enc.key,
            str(enc.source),
            str(enc.revision),
            str(getattr(enc, "pooling", "")),
            list(enc.mean),
            list(enc.std),
        ],
        "weights": _weights_fingerprint(enc),
        "slide_mpp": round(inputs.slide_mpp, 6),
        "mpp": round(enc_mpp, 6),
        "tile_px": dataset.tile_px,
        "tile_um": round(tile_um, 4),
        "spot_scale": spot_scale,
        "crop": [dataset.level, dataset.crop_px],
    }
    return hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=20).hexdigest()


def _cache_read(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        logger.warning("ignoring unreadable feature cache entry %s (%s)", path, e)
        return None
    if arr.shape != shape or arr.dtype != np.float32:
        return None
    return arr


def _cache_write(path: Path, feats: np.ndarray) -> None:
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.save(f, feats, allow_pickle=False)
            Path(tmp).replace(path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:  # a read-only or full cache must not fail the computation
        logger.warning("could not write the feature cache %s (%s)", path, e)


# ---------------------------------------------------------------------------------------------------------
# Inference


def _embed(
    enc: ImageEncoder, dataset: TileDataset, *, batch_size: int, num_workers: int | None, amp: bool | None, progress: bool
) -> tuple[np.ndarray, str, bool, bool]:
    import contextlib
    import multiprocessing as mp

    import torch
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from ..data import resize_tiles
    from ..data._malloc import malloc_tuned, tune_malloc

    dev = enc.device
    cuda = dev.type == "cuda"
    if dev.type == "cpu" and settings.tune_malloc:
        tune_malloc()
    use_amp = bool(amp if amp is not None else (settings.amp if settings.amp is not None else cuda))
    if use_amp and dev.type == "cpu":
        use_amp = bool(amp)  # only when asked for explicitly: bf16 on CPU is slower on most machines
    dtype = getattr(torch, settings.autocast_dtype)
    enc = enc.to(memory_format=torch.channels_last)
    dataset.source.prepare()  # decode once here; forked workers share it

    n = len(dataset)
    if num_workers is None:
        num_workers = settings.resolve_num_workers(dev)
    workers = num_workers if n > batch_size else 0
    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs["prefetch_factor"] = 4
        if "fork" in mp.get_all_start_methods():
            kwargs["multiprocessing_context"] = "fork"
    # Crops are read in bands across the image (chunk caches stay warm) and resampled to the encoder input a
    # batch at a time on the device; features are written back in the caller's order.
    order = dataset.locality_order()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=order.tolist(),
        num_workers=workers,
        pin_memory=cuda,
        **kwargs,
    )
    out = np.empty((n, enc.embed_dim), dtype=np.float32)
    autocast = torch.autocast(device_type=dev.type, dtype=dtype) if use_amp else contextlib.nullcontext()
    # On CUDA, features go back through pinned buffers with asynchronous copies, and the host waits for batch k
    # only after batch k + 1 is queued: a blocking `.cpu()` per batch would leave the GPU idle while the next
    # batch is fetched and its kernels are launched.
    pending: tuple[np.ndarray, torch.Tensor, Any] | None = None

    def _drain(item: tuple[np.ndarray, torch.Tensor, Any]) -> None:
        rows, host, done = item
        done.synchronize()
        out[rows] = host.numpy()

    start = 0
    with torch.inference_mode(), autocast:
        # tqdm.auto's tqdm calls iter() on what it wraps and then iterates it again: hand it an iterator, or a
        # DataLoader would start (and prefetch with) a second, unused set of workers.
        batches = iter(loader)
        for batch in tqdm(batches, total=len(loader), disable=not progress, desc="extract_features", unit="batch"):
            x = batch.to(dev, non_blocking=cuda).permute(0, 3, 1, 2)  # (B, H, W, 3) -> channels-last (B, 3, H, W)
            f = enc(resize_tiles(x, dataset.tile_px))
            rows = order[start : start + x.shape[0]]
            if cuda:
                host = torch.empty(f.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(f, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                if pending is not None:
                    _drain(pending)
                pending = (rows, host, done)
            else:
                out[rows] = f.cpu().numpy()  # no copy on the CPU
            start += x.shape[0]
        if pending is not None:
            _drain(pending)
    return out, str(dev), use_amp, malloc_tuned()
