"""Spot/cell/tile-centred crops at a physical size, resampled to an encoder's input, as a torch Dataset."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ._sources import ImageSource, open_image

__all__ = ["TileDataset", "crop_boxes"]


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


class TileDataset(Dataset):
    """Square crops of ``side_px`` level-0 pixels centred on ``xy``, resampled to ``tile_px`` × ``tile_px``.

    Items are ``(tile_px, tile_px, 3)`` uint8 tensors (height, width, channel); the default collate stacks
    them into ``(B, H, W, 3)``, and ``batch.permute(0, 3, 1, 2)`` is then a channels-last ``(B, 3, H, W)``
    tensor with no copy. Crops are cut from the coarsest pyramid level that is at least as fine as the
    requested output (``side_px / tile_px`` level-0 pixels per output pixel), then resampled with an
    antialiasing filter (PIL bicubic, whose kernel widens when shrinking). Boxes past the image border
    are padded with white and counted in :attr:`n_padded`.

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
    """

    def __init__(self, source: Any, xy: np.ndarray, side_px: float, tile_px: int, *, level: int | None = None) -> None:
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

    @property
    def n_padded(self) -> int:
        """Number of crops that reach past the image border (filled with white)."""
        return int(self.padded.sum())

    def __len__(self) -> int:
        return len(self.xy)

    def read_tile(self, i: int) -> np.ndarray:
        """Crop ``i`` as a ``(tile_px, tile_px, 3)`` uint8 array."""
        x0, y0 = (int(v) for v in self.boxes[i])
        crop = self.source.read_region(x0, y0, self.crop_px, self.crop_px, level=self.level)
        if self.crop_px != self.tile_px:
            from PIL import Image

            crop = np.array(
                Image.fromarray(np.ascontiguousarray(crop)).resize(
                    (self.tile_px, self.tile_px), Image.Resampling.BICUBIC
                )
            )
        return crop

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.read_tile(i)))
