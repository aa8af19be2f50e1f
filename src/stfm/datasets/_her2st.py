"""The HER2+ breast cancer ST data set: checksummed download or local mirror."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._settings import settings
from ..io._her2st import HER2ST_SECTIONS
from ._her2st_registry import HER2ST_SHA256

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["fetch_section", "her2st", "her2st_sections"]

REPOSITORY = "almaan/her2st"
#: Commit of the public repository each group of files is downloaded from (content pinned by sha256).
_COMMITS = {
    "data/ST-cnts/": "e75e5c53a994726a8ad251aaf653a02d7932eb6a",
    "data/ST-spotfiles/": "9f2260c6aa8347996955d53f0a5f06ac14c93470",
    "data/ST-imgs/": "9f2260c6aa8347996955d53f0a5f06ac14c93470",
    "data/ST-pat/": "9f2260c6aa8347996955d53f0a5f06ac14c93470",
    "res/ST-cluster/lbl/": "5ef75b9530d59eff0965ad104672e75a7f0e2023",
    "res/ST-cluster/motivation.csv": "47b2e34be3bacfb7564095859c6a6003c26765d9",
    "app/www/imgs/": "e347d30d6e940eaf510f6aef7ee45870f19c4eaf",
}
_SECTIONS = list(HER2ST_SECTIONS)
#: Original full-resolution H&E per section, where the public repository holds one.
_FULLRES = {
    "B4": "data/ST-imgs/B/B4/BT10737_D2_HE.jpg",
    "C2": "data/ST-imgs/C/C2/5714_HE_BT_C2.jpg",
    "C3": "data/ST-imgs/C/C3/5714_HE_BT_D1.jpg",
    "C4": "data/ST-imgs/C/C4/5714_HE_BT_D2.jpg",
    "C5": "data/ST-imgs/C/C5/5714_HE_BT_E1.jpg",
    "C6": "data/ST-imgs/C/C6/5714_HE_BT_E2.jpg",
}
_VIEWER = {s: f"app/www/imgs/{s}_HE_image_dark.png" for s in ("A1", "A2")}
_LABELED = ("A1", "B1", "C1", "D1", "E1", "F1", "G2", "H1")


def her2st_sections() -> list[str]:
    """The 36 section ids of the her2st data set (patients A–H)."""
    return list(_SECTIONS)


def _url(relpath: str) -> str:
    commit = next(c for prefix, c in _COMMITS.items() if relpath.startswith(prefix))
    return f"https://raw.githubusercontent.com/{REPOSITORY}/{commit}/{relpath}"


def _section_parts(section: str) -> dict[str, str | None]:
    return {
        "counts": f"data/ST-cnts/{section}.tsv.gz",
        "spots": f"data/ST-spotfiles/{section}_selection.tsv",
        "image": _FULLRES.get(section) or _VIEWER.get(section),
        "labels": f"data/ST-pat/lbl/{section}_labeled_coordinates.tsv" if section in _LABELED else None,
        "clusters": f"res/ST-cluster/lbl/{section}-cluster-annotation.tsv.gz",
        "cluster_annotations": "res/ST-cluster/motivation.csv",
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, relpath: str) -> None:
    expected = HER2ST_SHA256[relpath]
    found = _sha256(path)
    if found != expected:
        msg = (
            f"Checksum mismatch for {str(path)!r}: expected sha256 {expected}, found {found}. The file is corrupt "
            f"or not the published one; delete it and fetch it again from {_url(relpath)}."
        )
        raise ValueError(msg)


def _fetch(relpath: str) -> Path:
    """Return a verified local copy of ``relpath``: the mirror at ``STFM_DATA_DIR`` first, then the cache/download.

    Every file is checked against its pinned sha256, including a copy already in the cache. A file with no pinned
    hash is never downloaded (nothing could verify it): a :class:`FileNotFoundError` says so.
    """
    expected = HER2ST_SHA256.get(relpath)
    if expected is None:
        msg = (
            f"{relpath} has no pinned checksum in stfm, so stfm does not fetch it (it could not be verified). Read a "
            "copy you trust with `stfm.io.read_her2st(..., labels=<path>, clusters=<path>)`."
        )
        raise FileNotFoundError(msg)
    if settings.data_dir is not None:
        local = settings.data_dir / "her2st" / relpath
        if local.is_file():
            _verify(local, relpath)
            return local
    target = settings.cache_dir / "her2st" / relpath
    if target.is_file():
        _verify(target, relpath)
        return target
    if settings.offline:
        msg = f"{relpath} is neither in the local mirror nor in the cache, and stfm is offline."
        raise FileNotFoundError(msg)
    import pooch

    try:
        out = pooch.retrieve(
            _url(relpath),
            known_hash=f"sha256:{expected}",
            fname=target.name,
            path=target.parent,
            progressbar=False,
        )
    except ValueError as e:  # pooch's hash mismatch
        msg = f"Checksum mismatch downloading {_url(relpath)}: {e}"
        raise ValueError(msg) from e
    return Path(out)


def fetch_section(section: str, *, parts: tuple[str, ...] | None = None) -> dict[str, Path | None]:
    """Local paths of one section's files, fetching them if needed.

    Counts and spot files are required; a missing image, label or cluster file only warns.
    """
    if section not in _SECTIONS:
        msg = f"Unknown her2st section {section!r}. Known sections: {', '.join(_SECTIONS)}."
        raise ValueError(msg)
    files: dict[str, Path | None] = {}
    missing_optional = []
    for part, relpath in _section_parts(section).items():
        if parts is not None and part not in parts:
            files[part] = None
            continue
        if relpath is None:
            files[part] = None
            if part == "image":  # labels exist for one section per patient only: their absence is the norm
                missing_optional.append(f"image (no H&E image of {section} is published in {REPOSITORY})")
            continue
        try:
            files[part] = _fetch(relpath)
        except (OSError, ValueError) as e:
            if isinstance(e, ValueError) and "Checksum mismatch" in str(e):
                raise
            if part in ("counts", "spots"):
                required = [_section_parts(section)[p] for p in ("counts", "spots")]
                msg = (
                    f"Cannot load her2st section {section}: the required files {required} are neither in the local "
                    f"mirror (`STFM_DATA_DIR`={str(settings.data_dir)!r}, expected under '<STFM_DATA_DIR>/her2st/') nor "
                    f"downloadable from {_url(relpath)} ({type(e).__name__}: {e}). Point `STFM_DATA_DIR` at a copy "
                    "of the her2st repository layout, or connect to the internet."
                )
                raise FileNotFoundError(msg) from e
            files[part] = None
            missing_optional.append(f"{part} ({relpath})")
    if missing_optional:
        warnings.warn(
            f"her2st {section}: loading without {', '.join(missing_optional)}.",
            UserWarning,
            stacklevel=3,
        )
    return files


def her2st(section: str, *, image: bool = True, labels: bool = True, clusters: bool = True, **kwargs: Any) -> AnnData | SpatialData:
    """One section of the HER2+ breast cancer ST data set :cite:p:`andersson2021`.

    Files are read from the local mirror at ``STFM_DATA_DIR`` (``<dir>/her2st/`` in the original repository
    layout) when present, else downloaded once from the public repository into ``stfm.settings.cache_dir``.
    Every file with a pinned sha256 is verified, mirror or download.

    Parameters
    ----------
    section
        One of :func:`her2st_sections` (``'A1'`` … ``'H3'``).
    image, labels, clusters
        Whether to fetch the optional H&E image, pathologist labels and expression clusters. Where one is
        not available (only B4 and C2–C6 have a published full-resolution image; A1 and A2 the viewer PNG;
        labels exist for one section per patient), the section still loads, with a warning.
    **kwargs
        Passed to :func:`stfm.io.read_her2st` (e.g. ``as_spatialdata=True``, ``duplicate_genes``).
    """
    from ..io._her2st import read_her2st

    wanted = ("counts", "spots") + (("image",) if image else ()) + (("labels",) if labels else ())
    wanted += ("clusters", "cluster_annotations") if clusters else ()
    files = fetch_section(section, parts=wanted)
    return read_her2st(
        files["counts"],
        section,
        spots=files["spots"],
        image=files["image"] or False,
        labels=files["labels"] or False,
        clusters=files["clusters"] or False,
        cluster_annotations=files["cluster_annotations"] or False,
        **kwargs,
    )
