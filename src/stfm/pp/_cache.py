"""The feature cache of ``extract_features``: entries keyed by image content, coordinates, encoder and scale."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .._logging import logger

if TYPE_CHECKING:
    from ..data import TileDataset
    from ..encoders import ImageEncoder
    from ._inputs import Inputs

__all__ = ["CACHE_SUFFIX", "CACHE_VERSION", "cache_key", "cache_read", "cache_write"]

#: Bump when the crop/resample algorithm changes, so stale cache entries are never reused.
CACHE_VERSION = "tiles-v2"  # v2: torch antialiased bicubic on the device (v1: PIL in the workers)
#: Entry format: ``<key>.npz`` holding ``features`` and their blake2b ``digest`` (checked on every read).
CACHE_SUFFIX = ".npz"


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


def cache_key(
    inputs: Inputs,
    enc: ImageEncoder,
    dataset: TileDataset,
    *,
    tile_um: float,
    enc_mpp: float,
    spot_scale: float | None,
) -> str:
    spec = {
        "version": CACHE_VERSION,
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
    if inputs.masks is not None:  # (only then: the keys of unmasked features stay as they were)
        h = hashlib.blake2b(digest_size=16)
        for poly in inputs.masks:
            h.update(np.round(np.asarray(poly, dtype=np.float64), 2).tobytes() + b"|")
        spec["mask"] = h.hexdigest()
    return hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=20).hexdigest()


def _digest(feats: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(feats).tobytes(), digest_size=16).hexdigest()


def cache_read(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The cached features, or ``None`` when the entry is missing, unreadable, of another shape or corrupt (its
    stored checksum does not match its contents): the caller then recomputes and rewrites it."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arr, digest = f["features"], str(f["digest"])
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        logger.warning("ignoring unreadable feature cache entry %s (%s); recomputing", path, e)
        return None
    if arr.shape != shape or arr.dtype != np.float32:
        return None
    if _digest(arr) != digest:
        logger.warning("feature cache entry %s is corrupt (checksum mismatch); recomputing", path)
        return None
    return arr


def cache_write(path: Path, feats: np.ndarray) -> None:
    """Write an entry atomically (temporary file + rename) with its checksum; a failed write only warns."""
    from .._atomic import atomic_file

    try:
        with atomic_file(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, features=feats, digest=np.asarray(_digest(feats)))
    except OSError as e:  # a read-only or full cache must not fail the computation
        logger.warning("could not write the feature cache %s (%s)", path, e)
