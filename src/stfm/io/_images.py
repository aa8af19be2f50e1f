"""Image helpers shared by the readers: decoding, downsampling, bounds checks."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["check_jpeg_complete", "check_spots_in_image", "downsample", "read_image"]


def check_jpeg_complete(data: bytes, path: Path) -> None:
    """Raise when JPEG bytes lack their end-of-image marker: a truncated file, whose missing part libjpeg would
    otherwise decode as flat grey without a word (the spots there would all get the same features)."""
    if not data.startswith(b"\xff\xd8"):
        msg = f"{str(path)!r} is not a JPEG file (no start-of-image marker); re-download it or pass the right file."
        raise ValueError(msg)
    if data.rfind(b"\xff\xd9", max(0, len(data) - 65536)) < 0:
        msg = (
            f"The JPEG {str(path)!r} is truncated or corrupt: it has no end-of-image marker ({len(data):,} bytes). "
            "Re-download or re-export the image; a partial file would give the spots of its missing part empty tiles."
        )
        raise ValueError(msg)


def read_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an RGB image (JPEG, PNG, TIFF) into a ``(height, width, 3)`` uint8 array.

    Raises a :class:`ValueError` naming the file when it cannot be decoded.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"Image file {str(path)!r} does not exist."
        raise FileNotFoundError(msg)
    if path.suffix.lower() in {".tif", ".tiff"}:
        import tifffile

        try:
            arr = tifffile.imread(path)
        except Exception as e:
            msg = f"Could not read image {str(path)!r} as TIFF ({type(e).__name__}: {e}). Pass a valid RGB image file."
            raise ValueError(msg) from e
    else:
        from PIL import Image, UnidentifiedImageError

        if path.suffix.lower() in {".jpg", ".jpeg"}:
            check_jpeg_complete(path.read_bytes(), path)
        limit = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None  # slide-sized H&E scans are expected here; restored below
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            msg = (
                f"Could not decode image {str(path)!r} ({type(e).__name__}: {e}). "
                "Expected a JPEG/PNG/TIFF H&E image; re-download the file or pass `image=None` to read without it."
            )
            raise ValueError(msg) from e
        finally:
            Image.MAX_IMAGE_PIXELS = limit
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] < 3:
        msg = f"Expected an RGB image of shape (height, width, 3) in {str(path)!r}, found shape {arr.shape}."
        raise ValueError(msg)
    return np.ascontiguousarray(arr[..., :3])


def downsample(img: np.ndarray, max_px: int) -> tuple[np.ndarray, float]:
    """Shrink ``img`` so its longest side is at most ``max_px``; return it and the scale factor."""
    from PIL import Image

    h, w = img.shape[:2]
    scale = min(1.0, max_px / max(h, w))
    if scale == 1.0:
        return img, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.LANCZOS))
    return small, scale


def check_spots_in_image(xy: np.ndarray, shape: tuple[int, int], *, what: str, tol: float = 0.0) -> None:
    """Raise when spot centres ``xy`` (x, y) fall outside an image of ``shape`` (height, width)."""
    h, w = shape
    outside = (xy[:, 0] < -tol) | (xy[:, 1] < -tol) | (xy[:, 0] >= w + tol) | (xy[:, 1] >= h + tol)
    if outside.any():
        n = int(outside.sum())
        ext = f"x ∈ [{xy[:, 0].min():.0f}, {xy[:, 0].max():.0f}], y ∈ [{xy[:, 1].min():.0f}, {xy[:, 1].max():.0f}]"
        msg = (
            f"{n} of {len(xy)} spots fall outside the image of {what} ({w} × {h} px; spots span {ext}). "
            "The image does not match the spot coordinates: pass the full-resolution image the spot file refers to, "
            "or `image=None`."
        )
        raise ValueError(msg)
