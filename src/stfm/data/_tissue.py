"""Tissue detection on a low-resolution view of a slide, and a grid of tiles over the tissue."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._sources import ImageSource, open_image

__all__ = ["detect_tissue", "thumbnail", "tile_grid"]


def thumbnail(source: Any, *, max_px: int = 2048) -> tuple[np.ndarray, float]:
    """A ``(h, w, 3)`` uint8 view of the whole slide with its longest side near ``max_px``.

    Reads the coarsest pyramid level that is at least ``max_px`` wide (lazy sources read only that
    level), then resizes. Returns the view and its downsample (level-0 pixels per view pixel).
    """
    from PIL import Image

    src: ImageSource = open_image(source)
    h0, w0 = src.shape
    want = max(h0, w0) / max_px
    level = src.best_level(max(1.0, want))
    lh, lw = src.level_shapes[level]
    if isinstance(src, ImageSource) and not src.lazy:
        # In-memory image: stride first (cheap), then resize.
        step = max(1, int(np.floor(max(lh, lw) / max_px / 2)))
        arr = src.read_region(0, 0, lw, lh, level=level)[::step, ::step]
    else:
        arr = _read_level_in_blocks(src, level, max_px)
    scale = min(1.0, max_px / max(arr.shape[:2]))
    size = (max(1, round(arr.shape[1] * scale)), max(1, round(arr.shape[0] * scale)))
    if size != (arr.shape[1], arr.shape[0]):
        arr = np.asarray(Image.fromarray(np.ascontiguousarray(arr)).resize(size, Image.Resampling.BOX))
    return arr, float(np.sqrt((h0 / arr.shape[0]) * (w0 / arr.shape[1])))


def _read_level_in_blocks(src: ImageSource, level: int, max_px: int = 4096, block: int = 4096) -> np.ndarray:
    """Read a whole pyramid level block by block, strided to about twice ``max_px``, so memory stays bounded.

    Each block's strided pixels are copied out before the next block is read: a strided view would keep the
    whole block alive until the end.
    """
    lh, lw = src.level_shapes[level]
    step = max(1, int(np.floor(max(lh, lw) / (2 * max_px))))  # the BOX resize then averages about 2 × 2 samples
    rows = []
    for y in range(0, lh, block):
        cols = []
        for x in range(0, lw, block):
            part = src.read_region(x, y, min(block, lw - x), min(block, lh - y), level=level)
            cols.append(np.ascontiguousarray(part[(-y) % step :: step, (-x) % step :: step]))
        rows.append(np.concatenate(cols, axis=1))
    return np.concatenate(rows, axis=0)


def detect_tissue(
    source: Any,
    *,
    slide_mpp: float | None = None,
    mask_mpp: float = 8.0,
    max_px: int = 4096,
    min_area_px: int | None = None,
    close_px: int = 3,
) -> tuple[np.ndarray, float]:
    """Tissue mask of an H&E slide, on a thumbnail.

    Stained tissue is coloured (saturation) and darker than the glass: a pixel is tissue when its HSV
    saturation is above an Otsu threshold and it is neither near-white nor near-black (pen marks, scanner
    borders). The mask is closed, holes are filled and components smaller than ``min_area_px`` thumbnail
    pixels are dropped.

    Parameters
    ----------
    source
        The slide (anything :func:`~stfm.data.open_image` accepts).
    slide_mpp
        µm per level-0 pixel; with it the mask is computed at ``mask_mpp`` µm per pixel (tissue scale,
        where pale stroma between fibres still closes into one region), else on a 1024-px thumbnail.
    mask_mpp
        µm per mask pixel when ``slide_mpp`` is known.
    max_px
        Upper bound on the longest side of the thumbnail the mask is computed on.
    min_area_px
        Smallest tissue component kept, in thumbnail pixels (default: 0.05 % of the thumbnail).
    close_px
        Radius of the morphological closing, in thumbnail pixels.

    Returns
    -------
    ``(mask, downsample)``: a boolean ``(h, w)`` mask and the level-0 pixels per mask pixel.
    """
    from scipy import ndimage
    from skimage.color import rgb2hsv
    from skimage.filters import threshold_otsu

    src = open_image(source)
    if slide_mpp is not None:
        side = int(np.ceil(max(src.shape) * float(slide_mpp) / float(mask_mpp)))
    else:
        side = 1024
    thumb, downsample = thumbnail(src, max_px=max(16, min(int(max_px), side)))
    hsv = rgb2hsv(thumb)
    sat, val = hsv[..., 1], hsv[..., 2]
    bright_bg = val > 0.92
    try:
        t = threshold_otsu(sat[~bright_bg]) if (~bright_bg).sum() > 16 else 1.0
    except ValueError:  # constant image
        t = 1.0
    t = max(float(t), 0.05)
    mask = (sat > t) & (val > 0.15) & (val < 0.98)
    if close_px > 0:
        structure = ndimage.generate_binary_structure(2, 1)
        mask = ndimage.binary_closing(mask, structure=structure, iterations=close_px)
    mask = ndimage.binary_fill_holes(mask)
    labels, n = ndimage.label(mask)
    if n:
        areas = np.bincount(labels.ravel())
        areas[0] = 0
        min_area = int(0.0005 * mask.size) if min_area_px is None else int(min_area_px)
        mask = areas[labels] >= max(1, min_area)
    return mask, downsample


def tile_grid(
    mask: np.ndarray,
    mask_downsample: float,
    side_px: float,
    *,
    shape: tuple[int, int],
    min_tissue_fraction: float = 0.5,
    stride_px: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A regular grid of square tiles over the slide, kept where enough of the tile is tissue.

    Parameters
    ----------
    mask
        Tissue mask from :func:`detect_tissue`.
    mask_downsample
        Level-0 pixels per mask pixel.
    side_px
        Tile side in level-0 pixels.
    shape
        ``(height, width)`` of level 0.
    min_tissue_fraction
        Keep a tile when at least this fraction of it is tissue.
    stride_px
        Distance between tile origins (default: ``side_px``, no overlap).

    Returns
    -------
    ``(xy, fraction)``: tile centres (x, y) in level-0 pixels and the tissue fraction of each kept tile.
    """
    h0, w0 = shape
    stride = float(side_px if stride_px is None else stride_px)
    n_x = max(1, int(np.floor((w0 - side_px) / stride)) + 1)
    n_y = max(1, int(np.floor((h0 - side_px) / stride)) + 1)
    x0 = np.arange(n_x) * stride
    y0 = np.arange(n_y) * stride
    # Integral image of the mask gives the tissue fraction of every tile in one pass.
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    mh, mw = mask.shape

    def idx(v: np.ndarray, n: int) -> np.ndarray:
        return np.clip(np.round(v / mask_downsample).astype(np.int64), 0, n)

    xa, xb = idx(x0, mw), idx(x0 + side_px, mw)
    ya, yb = idx(y0, mh), idx(y0 + side_px, mh)
    total = (
        integral[yb[:, None], xb[None, :]]
        - integral[ya[:, None], xb[None, :]]
        - integral[yb[:, None], xa[None, :]]
        + integral[ya[:, None], xa[None, :]]
    )
    area = np.maximum((yb - ya)[:, None] * (xb - xa)[None, :], 1)
    frac = total / area
    keep_y, keep_x = np.nonzero(frac >= min_tissue_fraction)
    xy = np.stack([x0[keep_x] + side_px / 2, y0[keep_y] + side_px / 2], axis=1)
    return xy, frac[keep_y, keep_x]
