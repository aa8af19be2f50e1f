"""Content fingerprints and the per-slide hash that makes ``stfm batch`` resumable and idempotent.

A slide's hash covers (1) the stfm version, (2) everything in the configuration that changes an output (steps and
their settings, tiling, whether images are copied; not the engine), with each model folder replaced by a hash of
its files, (3) the manifest row (id, kind, µm/px, platform, keys) and (4) a content fingerprint of each input: the
input file or store and, for an ``.h5ad``, the full-resolution image it references (or the row's ``image``).
Paths themselves are not hashed, so moving a cohort to another disk keeps its outputs valid.

The hash is written into the slide's output, ``uns['stfm']['batch']['hash']`` of its main table, inside the same
atomic write as the results, so an output either carries the hash of the work that produced it or does not exist.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "HASH_SCHEMA",
    "config_digest",
    "fingerprint",
    "h5ad_image_path",
    "read_record",
    "slide_hash",
]

#: Bump when the meaning of an output changes without the stfm version changing.
HASH_SCHEMA = 1
_FULL_BELOW = 256 * 2**20  # files up to this size are hashed whole; larger ones by size + 64 evenly spaced MiB
_BLOCKS, _BLOCK = 64, 2**20
_META_NAMES = {".zattrs", ".zarray", ".zgroup", ".zmetadata", "zarr.json"}


def _hash_file(path: Path, h: Any) -> None:
    size = path.stat().st_size
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= _FULL_BELOW:
            for chunk in iter(lambda: f.read(8 * 2**20), b""):
                h.update(chunk)
        else:
            for i in range(_BLOCKS):
                f.seek(int(i * (size - _BLOCK) / (_BLOCKS - 1)))
                h.update(f.read(_BLOCK))


def fingerprint(path: str | os.PathLike[str], *, what: str = "input") -> str:
    """Content fingerprint of a file or a folder (a zarr store, a model folder).

    A file is hashed whole up to 256 MiB, above that by its size and 64 evenly spaced 1 MiB blocks. A folder is
    hashed by the relative path and size of every file, plus the bytes of every file while their total stays
    under 256 MiB; past that, the metadata files (``.zattrs``, ``zarr.json``, …) and an even sample of 64 others.

    Parameters
    ----------
    path
        File or folder.
    what
        Named in the error when ``path`` does not exist.
    """
    p = Path(path)
    if not p.exists():
        msg = (
            f"The {what} does not exist: {str(p)!r}. Check the path in the manifest (relative paths are taken from "
            "the configuration file's folder)."
        )
        raise FileNotFoundError(msg)
    h = hashlib.blake2b(digest_size=16)
    if p.is_file():
        _hash_file(p, h)
        return h.hexdigest()
    files = sorted(
        f
        for f in p.rglob("*")
        if f.is_file() and not any(part.startswith(".stfm") or ".stfm-" in part for part in f.relative_to(p).parts)
    )
    sizes = [f.stat().st_size for f in files]
    for f, s in zip(files, sizes):
        h.update(f"{f.relative_to(p).as_posix()}\0{s}\n".encode())
    if sum(sizes) <= _FULL_BELOW:
        chosen = files
    else:
        meta = [f for f in files if f.name in _META_NAMES]
        rest = [f for f in files if f.name not in _META_NAMES]
        step = max(1, len(rest) // _BLOCKS)
        chosen = meta + rest[::step]
    for f in chosen:
        _hash_file(f, h)
    return h.hexdigest()


def h5ad_image_path(path: str | os.PathLike[str], library_id: str | None = None) -> str | None:
    """``uns['spatial'][lib]['metadata']['source_image_path']`` of an ``.h5ad``, read without loading the file."""
    import h5py

    with h5py.File(path, "r") as f:
        spatial = f.get("uns/spatial")
        if spatial is None:
            return None
        libs = [library_id] if library_id is not None else list(spatial.keys())
        for lib in libs:
            node = spatial.get(f"{lib}/metadata/source_image_path")
            if node is not None:
                value = node[()]
                return value.decode() if isinstance(value, bytes) else str(value)
    return None


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def config_digest(outputs_config: dict[str, Any]) -> str:
    """Hash of the output-relevant configuration, with each model folder replaced by its content fingerprint."""
    steps = {}
    for name, settings in outputs_config["steps"].items():
        s = dict(settings)
        for key in ("model", "model_path"):
            if s.get(key) is not None:
                s[key] = fingerprint(s[key], what=f"steps.{name}.{key}")
        steps[name] = s
    body = {**outputs_config, "steps": steps, "schema": HASH_SCHEMA}
    return hashlib.blake2b(_canonical(body).encode(), digest_size=16).hexdigest()


def slide_hash(slide: dict[str, Any], digest: str, version: str) -> tuple[str, dict[str, str]]:
    """The slide's hash and the input fingerprints it was computed from.

    Raises a :class:`FileNotFoundError` naming the path when an input (or the image an ``.h5ad`` references)
    does not exist.
    """
    fps = {"input": fingerprint(slide["input"], what=f"input of slide {slide['id']!r}")}
    image = slide.get("image")
    if image is None and slide["kind"] == "h5ad":
        image = h5ad_image_path(slide["input"], slide.get("library_id"))
    if image is not None:
        fps["image"] = fingerprint(image, what=f"full-resolution image of slide {slide['id']!r}")
    row = {k: v for k, v in slide.items() if k not in ("input", "image")}
    body = {"version": version, "config": digest, "slide": row, "inputs": fps, "schema": HASH_SCHEMA}
    return hashlib.blake2b(_canonical(body).encode(), digest_size=16).hexdigest(), fps


def read_record(store: str | os.PathLike[str], table_key: str) -> dict[str, Any] | None:
    """``uns['stfm']['batch']`` of ``tables[table_key]`` in a SpatialData zarr, or ``None`` when there is none.

    Only that group is read (not the table's matrices), so the check is cheap for large outputs.
    """
    import zarr
    from anndata.io import read_elem

    group_path = Path(store) / "tables" / table_key / "uns" / "stfm" / "batch"
    if not group_path.is_dir():
        return None
    try:
        group = zarr.open_group(str(group_path), mode="r")
        rec = read_elem(group)
    except Exception:
        return None
    return {k: (v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v) for k, v in dict(rec).items()}
