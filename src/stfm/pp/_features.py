"""``stfm.pp.extract_features``: embed the H&E tile around every spot/cell/tile with a foundation model."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._containers import get_table, is_spatialdata, prepare_output
from .._logging import logger
from .._provenance import record
from .._settings import settings
from .._validation import assert_one_of, check_copy_inplace, check_positive, check_valid_key
from ._cache import CACHE_SUFFIX, cache_key, cache_read, cache_write
from ._inference import embed_tiles
from ._inputs import (
    DEFAULT_MPP,
    Inputs,
    check_inside,
    check_orientation,
    inputs_anndata,
    inputs_spatialdata,
    resolve_table,
    warn,
)

if TYPE_CHECKING:
    import torch
    from anndata import AnnData
    from spatialdata import SpatialData

    from ..encoders import ImageEncoder

__all__ = ["extract_features"]


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
    tile_um: float | None = None,
    tile_px: int | None = None,
    mpp: float | None = None,
    slide_mpp: float | None = None,
    mask: str | None = None,
    bins: Literal["auto", "tile", "each"] = "auto",
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
    tile_um
        Crop side in µm (e.g. a 40 µm cell-centred crop); resampled to ``tile_px``. Exclusive with ``spot_scale``;
        ``None`` uses the encoder's field of view, ``mpp × tile_px`` µm.
    tile_px
        Encoder input size in pixels (default: the encoder's).
    mpp
        µm per pixel of the encoder input (default: the encoder card's, 0.5 when the encoder has none).
    slide_mpp
        µm per full-resolution pixel of the slide (default: ``scalefactors['microns_per_pixel']``, else derived
        from ``spot_diameter_fullres``).
    mask
        SpatialData only: a shapes element with one outline per cell (polygons, or circles with a ``radius``),
        e.g. Xenium's ``'cell_boundaries'`` or ``'nucleus_boundaries'``, matched to the table by instance id. Each
        tile then shows only its own cell: pixels outside the outline are set to white (encoders take RGB, so the
        mask is applied to the tile rather than given as a fourth channel). Every cell needs an outline.
    bins
        For bin-level tables (Visium HD, ``metadata['platform'] == 'visium_hd'``): ``'tile'`` embeds one tile per
        cell of a grid of encoder-sized squares and gives every bin its square's features (so 2 µm bins are not
        2 µm tiles, nor one overlapping 112 µm tile each), and records the square of each bin in
        ``obs['<key>_tile']`` (sum the bins per square with :func:`scanpy.get.aggregate` for a spot-like table);
        ``'each'`` embeds one tile centred on every bin; ``'auto'`` is ``'tile'`` for Visium HD bins smaller than
        the tile, else ``'each'``.
    model_path
        Local weights file for ``model`` (see :func:`stfm.encoders.load_encoder`).
    revision
        Hub revision of the weights (default: the card's pinned one).
    batch_size
        Tiles per forward pass (default: ``stfm.settings.tile_batch_size(device)``:
        :attr:`stfm.settings.batch_size` when set, else 64 on an accelerator and 16 on the CPU, where a larger batch
        is no faster and holds more memory).
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
    `.obs['X_<encoder key>_tile']` : :class:`int`
        Bin-level tables tiled on a grid (``bins='tile'``) only: the grid square of each bin.
    `.uns['stfm']['X_<encoder key>' | key_added]` : :class:`dict`
        Encoder provenance (key, source, revision, embed_dim, pooling, licence) plus `tile_px`, `mpp`
        (µm/px of the tiles), `encoder_mpp`, `slide_mpp`, `spot_scale`, `tile_um`, `crop_px`, `level`,
        `image` (a file's name, never its folder), `image_fingerprint` (a content hash of an image file),
        `image_key`, `library_id`, `n_tiles`, `n_tiles_padded`, `cache_hit`, `cache_key` (`None` with
        `cache=False`), `device`, `amp`, `malloc_tuned`.

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
    for name, value in (("mpp", mpp), ("slide_mpp", slide_mpp), ("spot_scale", spot_scale), ("tile_um", tile_um)):
        if value is not None:
            check_positive(value, name=name)
    if spot_scale is not None and tile_um is not None:
        msg = "Pass either `spot_scale=` (crop side in spot diameters) or `tile_um=` (crop side in µm), not both."
        raise ValueError(msg)
    assert_one_of(bins, ("auto", "tile", "each"), name="bins")
    if mask is not None and not is_spatialdata(data):
        msg = (
            "`mask=` names a shapes element of cell outlines: it needs a SpatialData input (e.g. from "
            "`stfm.io.read_xenium(path)`), not an AnnData."
        )
        raise ValueError(msg)
    if batch_size is not None:  # None: resolved for the encoder's device below
        batch_size = int(check_positive(batch_size, name="batch_size"))
    if num_workers is not None:  # None: resolved for the device in `_embed`
        num_workers = int(check_positive(num_workers, name="num_workers", allow_zero=True))
    progress = settings.show_progress_bar if show_progress_bar is None else bool(show_progress_bar)

    # 1. Where to crop, from which image, at what µm/px (fails before any model is loaded).
    if is_spatialdata(data):
        if img is not None:
            msg = "`img=` is for AnnData input; for a SpatialData object pass the image element name as `image_key=`."
            raise ValueError(msg)
        table, table_name, new_table = resolve_table(data, table_key, shapes_key)
        inputs = inputs_spatialdata(
            data,
            table,
            image_key=image_key,
            shapes_key=shapes_key,
            spatial_key=spatial_key,
            slide_mpp=slide_mpp,
            mask_key=mask,
        )
        inputs.extra["table_key"] = table_name
    else:
        table = get_table(data)
        table_name, new_table = None, False
        inputs = inputs_anndata(
            table,
            img=img,
            library_id=library_id,
            spatial_key=spatial_key,
            slide_mpp=slide_mpp,
            mpp=mpp,
            tile_px=tile_px,
        )

    # 2. The encoder and the tile geometry.
    from ..encoders import load_encoder

    enc = load_encoder(model, model_path=model_path, revision=revision, device=device)
    if batch_size is None:
        batch_size = settings.tile_batch_size(enc.device)
    key = key_added if key_added is not None else check_valid_key(f"X_{enc.key}")
    tile_px = int(tile_px) if tile_px is not None else int(enc.tile_px)
    enc_mpp = float(mpp) if mpp is not None else (float(enc.mpp) if enc.mpp is not None else DEFAULT_MPP)
    if mpp is None and enc.mpp is None:
        logger.info("encoder %r has no µm/px on its card; using %.2f µm/px", enc.key, DEFAULT_MPP)
    if tile_um is not None:
        tile_um = float(tile_um)
    elif spot_scale is None:
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
    tile_mpp = tile_um / tile_px
    if inputs.slide_mpp > 4 * tile_mpp:  # (at 2.8× coarser, features still match full resolution: test_physical_scale)
        native_px = max(1, round(tile_um / inputs.slide_mpp))
        msg = (
            f"The image {inputs.image!r} is {inputs.slide_mpp:.3g} µm/px, more than four times as coarse as the tiles the encoder "
            f"would see ({tile_um:.0f} µm over {tile_px} px = {tile_mpp:.3g} µm/px): every tile would be a {native_px}-px "
            "crop blown up. Use the full-resolution image, or embed at the image's own resolution: "
            f"`tile_px={native_px}` (with `tile_um={tile_um:.4g}`; the features then describe a far coarser image than "
            "the encoder was trained on)."
        )
        raise ValueError(msg)
    check_inside(inputs)
    tile_of = None
    if _tile_bins(bins, table, inputs, side_px, mask):
        # one tile per grid square of the tile's size; every bin takes the features of the square it falls in
        cell = np.floor(inputs.xy / side_px).astype(np.int64)
        squares, tile_of = np.unique(cell, axis=0, return_inverse=True)
        inputs = dataclasses.replace(inputs, xy=(squares + 0.5) * side_px)

    from ..data import TileDataset

    dataset = TileDataset(
        inputs.source, inputs.xy, side_px, tile_px, resize=False, masks=inputs.masks
    )  # resampled on the device
    n = len(dataset)

    # 3. Features: from the cache, or computed.
    # The key hashes the image and the weights: skipped when the cache is off.
    digest = cache_key(inputs, enc, dataset, tile_um=tile_um, enc_mpp=enc_mpp, spot_scale=spot_scale) if cache else None
    cache_path = settings.cache_dir / "features" / f"{digest}{CACHE_SUFFIX}" if cache else None
    feats = cache_read(cache_path, (n, enc.embed_dim)) if cache_path is not None else None
    hit = feats is not None
    dev_used, amp_used, tuned = "none (cache)", False, False
    if feats is None:
        check_orientation(inputs)  # (a cache hit has the same coordinates: they were checked when it was computed)
        feats, dev_used, amp_used, tuned = embed_tiles(
            enc, dataset, batch_size=batch_size, num_workers=num_workers, amp=amp, progress=progress
        )
        if cache:
            cache_write(cache_path, feats)
    else:
        logger.info("extract_features: %d tiles read from the cache (%s)", n, cache_path.name)

    if dataset.n_padded:
        warn(
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
        # a file is named, never located (no home folders in shared files), and identified by its content
        "image": Path(inputs.image).name if Path(inputs.image).is_absolute() else inputs.image,
        "image_fingerprint": inputs.source.fingerprint() if Path(inputs.image).is_absolute() else "None",
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
    if tile_of is not None:
        prov |= {"bins": "tile", "n_bins": len(tile_of)}
    prov.pop("key", None)

    if tile_of is not None:
        feats = feats[tile_of.ravel()]
    # 4. Output (nothing is written before this point).
    if not inplace:
        return feats
    out = prepare_output(data, copy=copy)
    if new_table:  # H&E-only SpatialData: the table is added only now, complete
        out.tables[table_name] = table
    target = get_table(out, table_name) if table_name is not None else get_table(out)
    target.obsm[key] = feats
    if tile_of is not None:
        target.obs[f"{key}_tile"] = tile_of.ravel().astype(np.int64)
    record(target, key, "pp.extract_features", **prov)
    logger.info("extract_features: added obsm[%r] (%d × %d)", key, len(feats), enc.embed_dim)
    return out if copy else None


def _tile_bins(bins: str, table: AnnData, inputs: Inputs, side_px: float, mask: str | None) -> bool:
    """Whether bins are embedded on a grid of tile-sized squares (see ``bins`` of :func:`extract_features`)."""
    if bins == "each":
        return False
    lib = table.uns.get("spatial", {}).get(inputs.library_id or "", {})
    is_hd = lib.get("metadata", {}).get("platform") == "visium_hd"
    if bins == "tile":
        if mask is not None:
            msg = "`bins='tile'` embeds grid squares, which have no single cell outline: leave `mask=None`."
            raise ValueError(msg)
        return True
    return is_hd and mask is None and (inputs.spot_diameter_px or 0) < side_px
