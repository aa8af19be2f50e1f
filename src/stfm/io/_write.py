"""Atomic writers: ``write_zarr`` (SpatialData) and ``write_h5ad`` (AnnData); a crash never leaves half a file."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from .._atomic import atomic_dir, atomic_file

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["write_h5ad", "write_zarr"]


def write_zarr(sdata: SpatialData, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write a SpatialData object to ``path`` (zarr) atomically.

    The store is written to a hidden temporary folder beside ``path`` and moved into place; an existing store
    (``overwrite=True``) is renamed aside first and deleted only once the new one is in, so an interrupted write
    leaves either the old complete store or the new one. SIGTERM / SIGINT remove the temporary folder; after a
    SIGKILL the next write to ``path`` removes it. ``sdata.path`` points at ``path`` afterwards.

    Parameters
    ----------
    sdata
        The object to write.
    path
        Target folder (``*.zarr``).
    overwrite
        Replace an existing store.

    Returns
    -------
    The target path.
    """
    target = Path(path)
    with atomic_dir(target, overwrite=overwrite) as tmp:
        tmp.rmdir()  # spatialdata creates the store itself
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*autosharding.*", category=UserWarning)
            sdata.write(tmp)
    sdata.path = target
    return target


def write_h5ad(adata: AnnData, path: str | os.PathLike[str], *, overwrite: bool = True, **kwargs) -> Path:
    """Write an AnnData to ``path`` (h5ad) atomically: a temporary file beside it, then one rename.

    ``**kwargs`` go to :meth:`anndata.AnnData.write_h5ad` (e.g. ``compression='gzip'``).
    """
    target = Path(path)
    with atomic_file(target, overwrite=overwrite) as tmp:
        adata.write_h5ad(tmp, **kwargs)
    return target
