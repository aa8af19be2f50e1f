"""Accessors: the gene panel of a trained predictor, the observation table of an AnnData/SpatialData."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._containers import get_table

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["model_genes", "table"]


def model_genes(model: Any) -> list[str]:
    """Genes a trained expression model predicts, in its output order.

    Parameters
    ----------
    model
        A model from :func:`stfm.tl.fit_expression` (any registered method, or an ensemble), or a folder written
        by its ``save``.

    Returns
    -------
    The gene panel as a list of strings.

    Examples
    --------
    >>> adata = adata[:, stfm.get.model_genes(model)].copy()
    """
    import os

    if isinstance(model, str | os.PathLike):
        from ..model._ensemble import load_model

        model = load_model(model)
    genes = getattr(model, "genes", None)
    if genes is None:
        msg = f"Expected an stfm expression model (see `stfm.model.list_methods()`), found {type(model).__name__}."
        raise TypeError(msg)
    return list(genes)


def table(data: Any, table_key: str | None = None) -> AnnData:
    """The observation table stfm reads and writes: the AnnData itself, or ``sdata.tables[table_key]``.

    Parameters
    ----------
    data
        AnnData or SpatialData.
    table_key
        Table of a SpatialData object (``None``: its only table).

    Returns
    -------
    The :class:`~anndata.AnnData` table (not a copy).
    """
    return get_table(data, table_key)
