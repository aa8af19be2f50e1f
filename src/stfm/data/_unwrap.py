"""The file-backed source behind a dask image made by :func:`stfm.data.as_dask` (to read it with its pyramid)."""

from __future__ import annotations

from typing import Any

from ._sources import ImageSource, SourceArray

__all__ = ["source_of"]


def source_of(arr: Any) -> ImageSource | None:
    """The :class:`ImageSource` behind a level-0 dask image made by :func:`as_dask` (``None`` for anything else).

    Only an untouched :func:`as_dask` array qualifies (its own name, shape and graph entry): reading through the
    source then uses the source's pyramid and its one chunk cache instead of 4096² dask blocks cached on top.
    """
    arr = getattr(arr, "data", arr)  # xarray.DataArray -> dask
    name = getattr(arr, "name", None)
    graph = getattr(arr, "dask", None)
    if not (isinstance(name, str) and name.startswith("stfm-image-") and graph is not None):
        return None
    try:
        original = graph[f"original-{name}"]
    except (KeyError, TypeError):
        return None
    if not isinstance(original, SourceArray) or original.level != 0 or tuple(arr.shape) != original.shape:
        return None
    return original.source
