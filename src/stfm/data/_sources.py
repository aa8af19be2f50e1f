"""Image sources that hand out RGB regions of a slide without loading more of it than needed.

Every source exposes the same small interface (:class:`ImageSource`):

- ``shape``: ``(height, width)`` of the full-resolution level (level 0);
- ``level_shapes`` / ``level_downsamples``: the pyramid, finest first (one entry for flat images);
- ``read_region(x0, y0, width, height, level=0)``: a ``(height, width, 3)`` uint8 array, padded with
  white (255) where the box leaves the image;
- ``fingerprint()``: a cheap content hash used as part of the feature-cache key.

Sources are safe to use from forked DataLoader workers: file-backed sources reopen their file in each
process, in-memory sources are shared copy-on-write.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from .._logging import logger
from ..io._images import check_jpeg_complete

__all__ = [
    "ArraySource",
    "DecodedFileSource",
    "ImageSource",
    "LazyArraySource",
    "SourceArray",
    "TiffSource",
    "as_dask",
    "open_image",
]

#: Value used for pixels outside the image (white: H&E background).
PAD_VALUE = 255
_TIFF_SUFFIXES = (".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff", ".btf", ".tf8")


def _as_uint8_rgb(arr: np.ndarray, *, axes: str = "yxc") -> np.ndarray:
    """``arr`` as a ``(h, w, 3)`` uint8 array (first three channels; greyscale replicated)."""
    if axes == "cyx":
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating):
            top = 1.0 if arr.size == 0 or float(np.nanmax(arr)) <= 1.0 else 255.0
            arr = np.clip(np.nan_to_num(arr) * (255.0 / top), 0, 255).round().astype(np.uint8)
        elif arr.dtype == np.uint16:
            arr = (arr // 257).astype(np.uint8)
        else:
            arr = np.clip(arr, 0, 255).astype(np.uint8)
    return arr


class ImageSource(ABC):
    """Base class: a (possibly multi-resolution) RGB image read region by region."""

    #: Short description written into provenance (``'array'``, a file path, an element name, ...).
    description: str = "image"
    #: Whether reading touches only the requested region (tiled files, chunked arrays).
    lazy: bool = False

    @property
    @abstractmethod
    def level_shapes(self) -> list[tuple[int, int]]:
        """``(height, width)`` of every pyramid level, finest first."""

    @property
    def shape(self) -> tuple[int, int]:
        """``(height, width)`` of level 0."""
        return self.level_shapes[0]

    @property
    def level_downsamples(self) -> list[float]:
        """Level-0 pixels per pixel of each level (1.0 for level 0)."""
        h0, w0 = self.level_shapes[0]
        return [float(np.sqrt((h0 / h) * (w0 / w))) for h, w in self.level_shapes]

    def best_level(self, downsample: float) -> int:
        """The coarsest level whose downsample does not exceed ``downsample`` (so no detail is lost)."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * 1.001:
                best = i
        return best

    @abstractmethod
    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels ``[y0:y1, x0:x1]`` of ``level`` (inside the image) as ``(h, w, 3)`` uint8."""

    def read_region(self, x0: int, y0: int, width: int, height: int, *, level: int = 0) -> np.ndarray:
        """A ``(height, width, 3)`` uint8 crop whose top-left corner is ``(x0, y0)`` in ``level`` pixels.

        Parts of the box outside the image are filled with white (255).
        """
        h, w = self.level_shapes[level]
        ya, yb = max(0, y0), min(h, y0 + height)
        xa, xb = max(0, x0), min(w, x0 + width)
        if ya == y0 and xa == x0 and yb == y0 + height and xb == x0 + width:
            return self._read(level, ya, yb, xa, xb)
        out = np.full((height, width, 3), PAD_VALUE, dtype=np.uint8)
        if ya < yb and xa < xb:
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = self._read(level, ya, yb, xa, xb)
        return out

    def prepare(self) -> None:  # noqa: B027 - optional hook, a no-op for most sources
        """Do one-off work (decoding) in the main process so forked workers share it."""

    @abstractmethod
    def fingerprint(self) -> str:
        """A cheap hash of the pixel content (shape plus sampled pixels or file bytes)."""

    def __repr__(self) -> str:
        h, w = self.shape
        return f"{type(self).__name__}({self.description!r}, {w} × {h} px, {len(self.level_shapes)} level(s))"


class ArraySource(ImageSource):
    """An in-memory RGB image: ``(height, width, 3)`` array (or ``(3, height, width)``, or a PIL image)."""

    lazy = False

    def __init__(self, img: Any, *, description: str = "array") -> None:
        if hasattr(img, "convert") and hasattr(img, "size"):  # PIL image
            img = np.asarray(img.convert("RGB"))
        arr = np.asarray(img)
        axes = "yxc"
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            axes = "cyx"
        if arr.ndim not in (2, 3):
            msg = f"Expected an image of shape (height, width, 3), found an array of shape {arr.shape}."
            raise ValueError(msg)
        self._arr = np.ascontiguousarray(_as_uint8_rgb(arr, axes=axes))
        self.description = description

    @property
    def array(self) -> np.ndarray:
        """The decoded ``(height, width, 3)`` uint8 image."""
        return self._arr

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return [tuple(self._arr.shape[:2])]

    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return self._arr[y0:y1, x0:x1]

    def fingerprint(self) -> str:
        return _hash_array_sample(self._arr)


class DecodedFileSource(ArraySource):
    """A JPEG/PNG (any PIL-readable) file, decoded once on first use; its size comes from the header."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from PIL import Image

        self.path = Path(path)
        if not self.path.is_file():
            msg = f"Image file {str(self.path)!r} does not exist."
            raise FileNotFoundError(msg)
        Image.MAX_IMAGE_PIXELS = None  # whole-slide-sized H&E images are expected
        try:
            with Image.open(self.path) as im:
                w, h = im.size
        except Exception as e:
            msg = f"Could not open image {str(self.path)!r} ({type(e).__name__}: {e}). Expected a JPEG/PNG/TIFF H&E image."
            raise ValueError(msg) from e
        self._shape = (int(h), int(w))
        self._arr = None  # type: ignore[assignment]
        self.description = str(self.path)

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return [self._shape]

    def prepare(self) -> None:
        if self._arr is None:
            self._arr = np.ascontiguousarray(_as_uint8_rgb(_decode(self.path)))

    @property
    def array(self) -> np.ndarray:
        self.prepare()
        return self._arr

    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        self.prepare()
        return self._arr[y0:y1, x0:x1]

    def fingerprint(self) -> str:
        return _hash_file(self.path)


class LazyArraySource(ImageSource):
    """Chunked or lazy arrays (zarr, dask, xarray), one per pyramid level; only the needed region is read.

    Parameters
    ----------
    levels
        Arrays, finest first, each ``(height, width, channels)`` (``axes='yxc'``) or
        ``(channels, height, width)`` (``axes='cyx'``), supporting slicing.
    axes
        Axis order of the arrays.
    description
        Name written into provenance.
    """

    lazy = True

    def __init__(self, levels: list[Any], *, axes: str = "yxc", description: str = "array") -> None:
        if axes not in ("yxc", "cyx"):
            msg = f"Expected `axes` to be 'yxc' or 'cyx', found {axes!r}."
            raise ValueError(msg)
        self._levels = [getattr(lvl, "data", lvl) if _is_xarray(lvl) else lvl for lvl in levels]
        self.axes = axes
        self.description = description
        for lvl in self._levels:
            if len(lvl.shape) not in (2, 3):
                msg = f"Expected 2-D or 3-D image arrays, found shape {tuple(lvl.shape)}."
                raise ValueError(msg)

    def _arrays(self) -> list[Any]:
        return self._levels

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        out = []
        for lvl in self._arrays():
            s = tuple(int(v) for v in lvl.shape)
            out.append(s[1:3] if (self.axes == "cyx" and len(s) == 3) else s[:2])
        return out

    def _read(self, level: int, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        arr = self._arrays()[level]
        cyx = self.axes == "cyx" and len(arr.shape) == 3
        grid = _chunk_grid(arr, cyx=cyx)
        if grid is None:
            block = arr[:, y0:y1, x0:x1] if cyx else arr[y0:y1, x0:x1]
            return _as_uint8_rgb(np.asarray(block), axes="cyx" if cyx else "yxc")
        return self._read_chunked(level, arr, grid, y0, y1, x0, x1, cyx=cyx)

    def _read_chunked(
        self,
        level: int,
        arr: Any,
        grid: tuple[np.ndarray, np.ndarray],
        y0: int,
        y1: int,
        x0: int,
        x1: int,
        *,
        cyx: bool,
    ) -> np.ndarray:
        """Assemble the region from whole chunks, kept in a small per-process LRU cache.

        Decoding a chunk (a JPEG tile of a TIFF, a compressed zarr chunk, a dask task) is the expensive part
        of reading; neighbouring tiles share chunks, so each chunk is decoded about once when tiles are read
        in spatial order.
        """
        ybounds, xbounds = grid
        by0, by1 = np.searchsorted(ybounds, y0, "right") - 1, np.searchsorted(ybounds, y1 - 1, "right") - 1
        bx0, bx1 = np.searchsorted(xbounds, x0, "right") - 1, np.searchsorted(xbounds, x1 - 1, "right") - 1
        out = np.empty((y1 - y0, x1 - x0, 3), dtype=np.uint8)
        for by in range(by0, by1 + 1):
            for bx in range(bx0, bx1 + 1):
                cy0, cy1, cx0, cx1 = ybounds[by], ybounds[by + 1], xbounds[bx], xbounds[bx + 1]
                chunk = self._chunk(level, arr, int(by), int(bx), (int(cy0), int(cy1), int(cx0), int(cx1)), cyx=cyx)
                sy0, sy1 = max(y0, cy0), min(y1, cy1)
                sx0, sx1 = max(x0, cx0), min(x1, cx1)
                out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = chunk[sy0 - cy0 : sy1 - cy0, sx0 - cx0 : sx1 - cx0]
        return out

    def _chunk(
        self, level: int, arr: Any, by: int, bx: int, box: tuple[int, int, int, int], *, cyx: bool
    ) -> np.ndarray:
        cache = self.__dict__.setdefault("_chunk_cache", {})
        if cache.get("pid") != os.getpid():
            cache.clear()
            cache["pid"] = os.getpid()
            cache["lru"] = OrderedDict()
        lru: OrderedDict = cache["lru"]
        key = (level, by, bx)
        if key in lru:
            lru.move_to_end(key)
            return lru[key]
        cy0, cy1, cx0, cx1 = box
        if hasattr(arr, "dask"):
            data = arr.blocks[(slice(None), by, bx) if cyx else (by, bx)].compute(scheduler="synchronous")
        else:
            data = arr[:, cy0:cy1, cx0:cx1] if cyx else arr[cy0:cy1, cx0:cx1]
        data = _as_uint8_rgb(np.asarray(data), axes="cyx" if cyx else "yxc")
        lru[key] = np.ascontiguousarray(data)
        limit = max(2, int(self.chunk_cache_mb * 2**20 // max(1, lru[key].nbytes)))
        while len(lru) > limit:
            lru.popitem(last=False)
        return lru[key]

    #: Decoded chunks kept per process (MiB), e.g. 4 chunks of 4096² RGB, or 1,000 TIFF tiles of 512².
    chunk_cache_mb = 256

    def fingerprint(self) -> str:
        """Shapes, the dask/zarr identity and a 3 × 3 grid of 64-px windows of level 0 (cheap on any backend)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(repr(self.level_shapes).encode())
        arr = self._arrays()[0]
        h.update(str(getattr(arr, "name", "")).encode())
        hh, ww = self.level_shapes[0]
        for fy in (0.25, 0.5, 0.75):
            for fx in (0.25, 0.5, 0.75):
                y, x = int(fy * hh), int(fx * ww)
                h.update(self.read_region(x, y, 64, 64).tobytes())
        return h.hexdigest()


class TiffSource(LazyArraySource):
    """A tiled (optionally pyramidal) TIFF read tile by tile through tifffile's zarr store.

    The file is reopened in every process, so forked DataLoader workers never share a file offset.
    Only the tiles overlapping a requested region are read and decoded.
    """

    lazy = True

    def __init__(self, path: str | os.PathLike[str], *, series: int = 0) -> None:
        import tifffile

        self.path = Path(path)
        if not self.path.is_file():
            msg = f"Image file {str(self.path)!r} does not exist."
            raise FileNotFoundError(msg)
        self.series = series
        self.description = str(self.path)
        self._pid: int | None = None
        self._tif = None
        self._zarrs: list[Any] = []
        try:
            with tifffile.TiffFile(self.path) as tf:
                s = tf.series[series]
                axes = s.axes
                self._shapes = [tuple(int(v) for v in lvl.shape) for lvl in s.levels]
                self.tiled = bool(s.levels[0].keyframe.is_tiled)
        except Exception as e:
            msg = f"Could not read {str(self.path)!r} as TIFF ({type(e).__name__}: {e}). Expected an RGB TIFF image."
            raise ValueError(msg) from e
        if axes.startswith("S") and len(axes) == 3:
            self.axes = "cyx"
        elif axes in ("YXS", "YX"):
            self.axes = "yxc"
        else:
            msg = f"Expected a 2-D RGB TIFF (axes 'YXS' or 'SYX'), found axes {axes!r} in {str(self.path)!r}."
            raise ValueError(msg)

    def _arrays(self) -> list[Any]:
        if self._pid != os.getpid():
            import tifffile
            import zarr

            self._tif = tifffile.TiffFile(self.path)
            s = self._tif.series[self.series]
            self._zarrs = [zarr.open(s.aszarr(level=i), mode="r") for i in range(len(s.levels))]
            self._pid = os.getpid()
        return self._zarrs

    @property
    def level_shapes(self) -> list[tuple[int, int]]:
        return [s[1:3] if self.axes == "cyx" and len(s) == 3 else s[:2] for s in self._shapes]

    def fingerprint(self) -> str:
        return _hash_file(self.path)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_tif=None, _zarrs=[], _pid=None)
        return state


def _chunk_grid(arr: Any, *, cyx: bool) -> tuple[np.ndarray, np.ndarray] | None:
    """Chunk boundaries along y and x of a dask or zarr array (``None`` for anything else)."""
    ya, xa = (1, 2) if cyx else (0, 1)
    chunks = getattr(arr, "chunks", None)
    if chunks is None:
        return None
    if hasattr(arr, "dask"):
        return np.cumsum((0, *chunks[ya])), np.cumsum((0, *chunks[xa]))
    if all(isinstance(c, int | np.integer) for c in chunks) and len(chunks) == len(arr.shape):
        h, w = int(arr.shape[ya]), int(arr.shape[xa])
        cy, cx = int(chunks[ya]), int(chunks[xa])
        return np.append(np.arange(0, h, cy), h), np.append(np.arange(0, w, cx), w)
    return None


def _decode(path: Path) -> np.ndarray:
    """Decode an image file: JPEG through imagecodecs' libjpeg-turbo (about 2.5x faster than PIL, identical
    pixels, no intermediate copies) when available, anything else through PIL. A truncated or corrupt file raises
    a :class:`ValueError` naming it (PIL's truncation check; for JPEG also the end-of-image marker)."""
    if path.suffix.lower() in (".jpg", ".jpeg"):
        data = path.read_bytes()
        check_jpeg_complete(data, path)
        try:
            import imagecodecs

            arr = imagecodecs.jpeg8_decode(data)
            if (arr.ndim == 3 and arr.shape[-1] == 3) or arr.ndim == 2:
                return arr
        except ImportError:
            pass
        except Exception as e:  # imagecodecs' own decode errors: let PIL try, then report
            logger.debug("imagecodecs could not decode %s (%s); trying PIL", path, e)
    from PIL import Image, UnidentifiedImageError

    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # slide-sized H&E scans are expected here; restored below
    try:
        with Image.open(path) as im:
            return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        msg = (
            f"Could not decode the image {str(path)!r} ({type(e).__name__}: {e}): the file is truncated, corrupt or not "
            "an image. Re-download or re-export it."
        )
        raise ValueError(msg) from e
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _is_xarray(obj: Any) -> bool:
    return type(obj).__name__ == "DataArray" and hasattr(obj, "dims")


def _hash_array_sample(arr: np.ndarray, n_pixels: int = 4_000_000) -> str:
    """Hash of shape, dtype and a strided sample of about ``n_pixels`` pixels (cheap, content-based)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((arr.shape, str(arr.dtype))).encode())
    step = max(1, int(np.ceil(np.sqrt(arr.shape[0] * arr.shape[1] / n_pixels))))
    h.update(np.ascontiguousarray(arr[::step, ::step]).tobytes())
    # rows at an offset too, so that edits between sampled rows are caught more often
    h.update(np.ascontiguousarray(arr[step // 2 :: step, step // 3 :: step]).tobytes())
    return h.hexdigest()


def _hash_file(path: Path, full_below: int = 256 * 2**20, n_blocks: int = 64, block: int = 2**20) -> str:
    """Hash of the file bytes: all of them below ``full_below`` bytes, else size + evenly spaced blocks."""
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= full_below:
            for chunk in iter(lambda: f.read(8 * 2**20), b""):
                h.update(chunk)
        else:
            for i in range(n_blocks):
                f.seek(int(i * (size - block) / (n_blocks - 1)))
                h.update(f.read(block))
    return h.hexdigest()


def open_image(img: Any, *, description: str | None = None) -> ImageSource:
    """Wrap ``img`` in the matching :class:`ImageSource`.

    Parameters
    ----------
    img
        An :class:`ImageSource` (returned as is); a path to a TIFF (read lazily, tile by tile, with its
        pyramid), a zarr array/group folder (lazy), or any PIL-readable file (decoded once, on first use);
        a numpy ``(height, width, 3)`` array or PIL image (in memory); a zarr/dask/xarray array (lazy);
        or a list of such arrays, finest first (a pyramid).
    description
        Name written into provenance (default: the path, or ``'array'``).

    Returns
    -------
    The image source.
    """
    if isinstance(img, ImageSource):
        return img
    if isinstance(img, str | os.PathLike):
        path = Path(img)
        name = path.name.lower()
        if path.is_dir():
            return _open_zarr(path)
        if not path.exists():
            msg = f"Image file {str(path)!r} does not exist. Expected a path to an H&E image (JPEG, PNG, TIFF or zarr)."
            raise FileNotFoundError(msg)
        if name.endswith(_TIFF_SUFFIXES):
            src = TiffSource(path)
            if not src.tiled and len(src.level_shapes) == 1:
                h, w = src.shape
                if h * w > 20_000 * 20_000:
                    msg = (
                        f"{str(path)!r} is a {w} × {h} px TIFF stored in strips, not tiles: it cannot be read region "
                        "by region efficiently. Convert it to a tiled pyramidal TIFF (e.g. `vips tiffsave --tile --pyramid`)."
                    )
                    raise ValueError(msg)
            return src
        return DecodedFileSource(path)
    if isinstance(img, list | tuple) and img and not isinstance(img[0], int | float | np.number):
        return LazyArraySource(list(img), axes=_guess_axes(img[0]), description=description or "array")
    if isinstance(img, np.ndarray) or (hasattr(img, "convert") and hasattr(img, "size")):
        return ArraySource(img, description=description or "array")
    if hasattr(img, "shape") and hasattr(img, "__getitem__"):  # zarr / dask / xarray
        if _is_xarray(img) and tuple(img.dims)[:1] == ("c",):
            return LazyArraySource([img], axes="cyx", description=description or "array")
        return LazyArraySource([img], axes=_guess_axes(img), description=description or "array")
    msg = (
        f"Expected an image as a numpy array, PIL image, path (JPEG/PNG/TIFF/zarr) or zarr/dask array, "
        f"found {type(img).__name__}."
    )
    raise TypeError(msg)


def _guess_axes(arr: Any) -> str:
    if _is_xarray(arr):
        return "cyx" if tuple(arr.dims)[:1] == ("c",) else "yxc"
    shape = tuple(arr.shape)
    if len(shape) == 3 and shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4):
        return "cyx"
    return "yxc"


def _open_zarr(path: Path) -> LazyArraySource:
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as e:
        msg = f"Could not open {str(path)!r} as a zarr array or group ({type(e).__name__}: {e})."
        raise ValueError(msg) from e
    if hasattr(node, "shape"):
        levels = [node]
    else:  # OME-Zarr-like group: arrays named 0, 1, 2, ... (finest first)
        names = sorted((k for k in node.array_keys() if str(k).isdigit()), key=int)
        if not names:
            msg = f"The zarr group {str(path)!r} holds no image arrays named '0', '1', ...; pass the array itself."
            raise ValueError(msg)
        levels = [node[k] for k in names]
    return LazyArraySource(levels, axes=_guess_axes(levels[0]), description=str(path))


class SourceArray:
    """A ``(3, height, width)`` uint8 array-like view of one level of an :class:`ImageSource`.

    Slicing reads only the requested region through the source (which reopens files per process), so
    ``dask.array.from_array(SourceArray(src), chunks=...)`` is a lazy, fork-safe dask image, usable as a
    SpatialData image element.
    """

    dtype = np.dtype(np.uint8)
    ndim = 3

    def __init__(self, source: ImageSource, level: int = 0) -> None:
        self.source = source
        self.level = int(level)
        h, w = source.level_shapes[self.level]
        self.shape = (3, int(h), int(w))

    def __getitem__(self, key: Any) -> np.ndarray:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        c, ys, xs = key
        if not (isinstance(ys, slice) and isinstance(xs, slice)):
            msg = "SourceArray supports slices along y and x only."
            raise TypeError(msg)
        y0, y1, ystep = ys.indices(self.shape[1])
        x0, x1, xstep = xs.indices(self.shape[2])
        if y1 <= y0 or x1 <= x0:
            return np.zeros((3, max(0, y1 - y0), max(0, x1 - x0)), dtype=np.uint8)[c]
        region = self.source.read_region(x0, y0, x1 - x0, y1 - y0, level=self.level)[::ystep, ::xstep]
        return np.moveaxis(region, -1, 0)[c]


def as_dask(source: ImageSource, *, level: int = 0, chunk: int = 4096) -> Any:
    """Level ``level`` of ``source`` as a lazy ``(3, height, width)`` dask array (one read per chunk)."""
    import dask.array as da

    arr = SourceArray(source, level)
    return da.from_array(
        arr, chunks=(3, chunk, chunk), asarray=True, fancy=False, name=f"stfm-image-{source.fingerprint()}-{level}"
    )
