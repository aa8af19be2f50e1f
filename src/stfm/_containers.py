"""Resolve ``AnnData | SpatialData`` inputs to the observation table every stfm function works on.

Rules (see ``docs/outputs.md``): an AnnData is its own table; for a SpatialData the table is
``sdata.tables[table_key]``, or the only table when ``table_key`` is ``None``. Results are written into that
table, so they travel with the SpatialData object and survive ``SpatialData.write``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "KNOWN_SPOT_UM",
    "get_library_id",
    "get_table",
    "is_spatialdata",
    "known_spot_um",
    "microns_per_pixel",
    "mpp_from_scalefactors",
    "prepare_output",
    "scalefactors",
]

#: Physical spot diameters (µm) of platforms whose spots give a slide's µm/px.
KNOWN_SPOT_UM = {"visium": 55.0, "st": 100.0}


def is_spatialdata(data: Any) -> bool:
    """Whether ``data`` is a SpatialData object (checked without importing spatialdata)."""
    return any(c.__name__ == "SpatialData" for c in type(data).__mro__)


def get_table(data: Any, table_key: str | None = None) -> AnnData:
    """The observation table of ``data``: the AnnData itself, or ``sdata.tables[table_key]``."""
    from anndata import AnnData

    if isinstance(data, AnnData):
        return data
    if not is_spatialdata(data):
        msg = f"Expected an AnnData or a SpatialData object, found {type(data).__name__}."
        raise TypeError(msg)
    tables = list(data.tables.keys())
    if table_key is None:
        if len(tables) != 1:
            msg = (
                "Unable to determine which table to use: pass `table_key=` (one of "
                f"{tables})." if tables else "The SpatialData object has no table; add one or pass an AnnData."
            )
            raise ValueError(msg)
        table_key = tables[0]
    if table_key not in data.tables:
        msg = f"`sdata.tables[{table_key!r}]` not found. Available tables: {tables}."
        raise KeyError(msg)
    return data.tables[table_key]


def prepare_output(data: Any, *, copy: bool) -> Any:
    """``data`` itself, or a deep copy of it when ``copy=True`` (AnnData or SpatialData)."""
    if not copy:
        return data
    if is_spatialdata(data):
        from spatialdata import deepcopy

        return deepcopy(data)
    return data.copy()


def get_library_id(adata: AnnData, library_id: str | None = None) -> str | None:
    """The ``uns['spatial']`` library to use: the given one, the only one, or ``None`` when there is none."""
    spatial = adata.uns.get("spatial", {})
    if library_id is not None:
        if library_id not in spatial:
            msg = f"`uns['spatial'][{library_id!r}]` not found. Available libraries: {sorted(spatial)}."
            raise KeyError(msg)
        return library_id
    if len(spatial) == 1:
        return next(iter(spatial))
    if not spatial:
        return None
    msg = f"Unable to determine which library id to use. Please specify one of {sorted(spatial)} as `library_id`."
    raise ValueError(msg)


def scalefactors(adata: AnnData, library_id: str | None = None) -> dict[str, Any]:
    """``uns['spatial'][library_id]['scalefactors']`` (empty dict when absent)."""
    lib = get_library_id(adata, library_id)
    if lib is None:
        return {}
    return dict(adata.uns["spatial"][lib].get("scalefactors", {}))


def known_spot_um(sf: dict[str, Any], meta: dict[str, Any] | None = None) -> tuple[float, str] | None:
    """Physical spot diameter (µm) of the platform and how it was told, when the metadata says; else ``None``."""
    meta = meta or {}
    if "spot_diameter_um" in meta:
        return float(meta["spot_diameter_um"]), "`metadata['spot_diameter_um']`"
    platform = str(meta.get("platform", "")).lower()
    if "visium" in platform or "fiducial_diameter_fullres" in sf:
        return KNOWN_SPOT_UM["visium"], "Visium"
    if platform.startswith("st") or "spatial transcriptomics" in platform:
        return KNOWN_SPOT_UM["st"], "legacy ST"
    return None


def mpp_from_scalefactors(
    sf: dict[str, Any], meta: dict[str, Any] | None = None, *, spot_diameter_um: float | None = None
) -> float | None:
    """µm per full-resolution pixel: the stored ``microns_per_pixel``, else the spot's physical diameter divided by
    ``spot_diameter_fullres`` (``spot_diameter_um``, the platform's from :func:`known_spot_um`, else Visium's 55 µm);
    ``None`` when neither is recorded. The one place stfm derives µm/px from scale factors."""
    stored = sf.get("microns_per_pixel")
    if stored is not None and np.isfinite(float(stored)):
        return float(stored)
    if "spot_diameter_fullres" in sf:
        if spot_diameter_um is not None:
            diameter = float(spot_diameter_um)
        else:
            diameter = (known_spot_um(sf, meta) or (KNOWN_SPOT_UM["visium"], "Visium"))[0]
        return diameter / float(sf["spot_diameter_fullres"])
    return None


def microns_per_pixel(adata: AnnData, library_id: str | None = None, *, spot_diameter_um: float | None = None) -> float | None:
    """µm per full-resolution pixel of ``uns['spatial'][library_id]`` (see :func:`mpp_from_scalefactors`)."""
    lib = get_library_id(adata, library_id)
    if lib is None:
        return None
    entry = adata.uns["spatial"][lib]
    return mpp_from_scalefactors(dict(entry.get("scalefactors", {})), dict(entry.get("metadata", {})), spot_diameter_um=spot_diameter_um)
