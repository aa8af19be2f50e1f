"""Spot/cell/tile-centred crops at a physical size, resampled to an encoder's input, as a torch Dataset."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ._sources import ImageSource, open_image

__all__ = ["TileDataset", "crop_boxes", "resize_tiles"]


def crop_boxes(xy: np.ndarray, side_px: float, *, downsample: float = 1.0) -> tuple[np.ndarray, int]:
    """Integer crop boxes centred on ``xy`` (level-0 pixels, x then y) in a level ``downsample`` times coarser.

    Returns ``(boxes, size)``: ``boxes[:, 0]`` = x0, ``boxes[:, 1]`` = y0 in level pixels, and the box side
    ``size`` (the same for every box, at least one pixel).
    """
    size = max(1, round(side_px / downsample))
    centres = np.asarray(xy, dtype=np.float64)[:, :2] / downsample
    # Top-left corner such that the box centre is as close as possible to the spot centre.
    x0 = np.floor(centres[:, 0] - size / 2 + 0.5).astype(np.int64)
    y0 = np.floor(centres[:, 1] - size / 2 + 0.5).astype(np.int64)
    return np.stack([x0, y0], axis=1), size


def resize_tiles(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resample a batch of square tiles ``(B, 3, S, S)`` uint8 to ``(B, 3, size, size)`` uint8 (bicubic, antialiased).

    Bicubic with ``a = -0.5`` and a kernel that widens when shrinking, as PIL's ``Image.resize(BICUBIC)``. On
    the CPU, torch's integer kernel for uint8 (channels-last) is used — within two grey levels of PIL (almost
    always equal) and 3-8× faster; elsewhere (CUDA) the tiles are resampled in float32 and rounded. The memory format of ``x`` is kept.
    """
    if x.ndim != 4 or x.shape[1] != 3 or x.dtype != torch.uint8:
        msg = f"Expected uint8 tiles of shape (B, 3, S, S), found {x.dtype} {tuple(x.shape)}."
        raise ValueError(msg)
    if x.shape[-2:] == (size, size):
        return x
    from torch.nn.functional import interpolate

    if x.device.type == "cpu":
        return interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    y = interpolate(x.float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return y.round_().clamp_(0, 255).to(torch.uint8)


class TileDataset(Dataset):
    """Square crops of ``side_px`` level-0 pixels centred on ``xy``, resampled to ``tile_px`` × ``tile_px``.

    Items are ``(tile_px, tile_px, 3)`` uint8 tensors (height, width, channel); the default collate stacks
    them into ``(B, H, W, 3)``, and ``batch.permute(0, 3, 1, 2)`` is then a channels-last ``(B, 3, H, W)``
    tensor with no copy. Crops are cut from the coarsest pyramid level that is at least as fine as the
    requested output (``side_px / tile_px`` level-0 pixels per output pixel), then resampled with
    :func:`resize_tiles` (antialiased bicubic, as PIL's). Boxes past the image border are padded with white and
    counted in :attr:`n_padded`. With ``resize=False`` items are the raw ``(crop_px, crop_px, 3)`` crops, to be
    resampled a batch at a time on the inference device (what :func:`stfm.pp.extract_features` does).

    Parameters
    ----------
    source
        Image (anything :func:`~stfm.data.open_image` accepts).
    xy
        ``(n, 2)`` crop centres (x, y) in level-0 pixels.
    side_px
        Crop side in level-0 pixels (physical tile side / slide µm per pixel).
    tile_px
        Output side in pixels (the encoder input).
    level
        Pyramid level to read; ``None`` picks the coarsest sufficient one.
    resize
        Resample every crop to ``tile_px`` in :meth:`read_tile` (default); ``False`` returns the crops as read.
    masks
        Optional boundary per crop (cell or nucleus outline), each a ``(m, 2)`` polygon (x, y) in level-0 pixels.
        The outline is rasterised at the crop's resolution and the pixels outside it are set to white, the
        background the encoders see past a slide's border: RGB encoders take no fourth channel, so the mask is
        applied to the tile.
    """

    def __init__(
        self,
        source: Any,
        xy: np.ndarray,
        side_px: float,
        tile_px: int,
        *,
        level: int | None = None,
        resize: bool = True,
        masks: list[np.ndarray] | None = None,
    ) -> None:
        self.source: ImageSource = open_image(source)
        self.xy = np.asarray(xy, dtype=np.float64)[:, :2]
        if side_px <= 0 or tile_px <= 0:
            msg = f"Expected positive crop and tile sizes, found side_px={side_px!r}, tile_px={tile_px!r}."
            raise ValueError(msg)
        self.side_px = float(side_px)
        self.tile_px = int(tile_px)
        self.level = self.source.best_level(self.side_px / self.tile_px) if level is None else int(level)
        self.downsample = self.source.level_downsamples[self.level]
        self.boxes, self.crop_px = crop_boxes(self.xy, self.side_px, downsample=self.downsample)
        h, w = self.source.level_shapes[self.level]
        x0, y0 = self.boxes[:, 0], self.boxes[:, 1]
        self.padded = (x0 < 0) | (y0 < 0) | (x0 + self.crop_px > w) | (y0 + self.crop_px > h)
        self.resize = bool(resize)
        if masks is not None and len(masks) != len(self.xy):
            msg = f"Expected one mask polygon per crop ({len(self.xy)}), found {len(masks)}."
            raise ValueError(msg)
        self.masks = masks

    @property
    def n_padded(self) -> int:
        """Number of crops that reach past the image border (filled with white)."""
        return int(self.padded.sum())

    def __len__(self) -> int:
        return len(self.xy)

    def locality_order(self) -> np.ndarray:
        """An order of the crops that reads the image in horizontal bands (row by row of crops, left to right).

        Lazy sources decode whole chunks: reading neighbours one after another lets a worker's chunk cache serve
        them, whatever order the spots come in (Visium barcodes, for instance, are spatially random).
        """
        band = self.boxes[:, 1] // max(1, self.crop_px)
        return np.lexsort((self.boxes[:, 0], band))

    def read_tile(self, i: int) -> np.ndarray:
        """Crop ``i`` as a ``(tile_px, tile_px, 3)`` uint8 array (``(crop_px, crop_px, 3)`` with ``resize=False``)."""
        x0, y0 = (int(v) for v in self.boxes[i])
        crop = np.ascontiguousarray(self.source.read_region(x0, y0, self.crop_px, self.crop_px, level=self.level))
        if self.masks is not None:
            crop = np.array(crop)  # writable
            crop[~self.crop_mask(i)] = 255
        if self.resize and self.crop_px != self.tile_px:
            t = torch.from_numpy(crop).permute(2, 0, 1)[None]  # channels-last view, no copy
            crop = resize_tiles(t, self.tile_px)[0].permute(1, 2, 0).numpy()
        return crop

    def crop_mask(self, i: int) -> np.ndarray:
        """Boolean ``(crop_px, crop_px)`` mask of crop ``i``: the pixels inside its outline (needs ``masks``)."""
        from skimage.draw import polygon2mask

        if self.masks is None:
            msg = "This TileDataset has no masks; pass `masks=` (one polygon per crop)."
            raise ValueError(msg)
        poly = np.asarray(self.masks[i], dtype=np.float64) / self.downsample - self.boxes[i]
        # pixel (r, c) covers [c, c+1) × [r, r+1): its centre is inside when the outline, shifted by half a pixel, is
        return polygon2mask((self.crop_px, self.crop_px), poly[:, ::-1] - 0.5)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.read_tile(i)))
