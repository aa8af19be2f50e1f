"""``spatial_pred``: predicted (and measured) expression on the H&E, one shared colour scale per gene."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import sparse

from .._containers import get_table, is_spatialdata
from .._validation import assert_key_in, check_spatial

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure

__all__ = ["spatial_pred"]


def _column(adata: AnnData, gene: str, layer: str | None) -> np.ndarray:
    j = adata.var_names.get_loc(gene)
    x = adata.X if layer is None else adata.layers[layer]
    col = x[:, j]
    col = col.toarray() if sparse.issparse(col) else np.asarray(col)
    return np.asarray(col, dtype=np.float64).ravel()


def _library_size_of(adata: AnnData, layer: str) -> float | None:
    prov = adata.uns.get("stfm", {})
    entry = prov.get(layer, {}) if hasattr(prov, "get") else {}
    value = entry.get("library_size") if hasattr(entry, "get") else None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _has_measured(adata: AnnData, layer: str, measured_layer: str | None) -> bool:
    if measured_layer is not None:
        return True
    prov = adata.uns.get("stfm", {})
    entry = prov.get(layer, {}) if hasattr(prov, "get") else {}
    rebuilt = bool(entry.get("table_rebuilt", False)) if hasattr(entry, "get") else False
    return adata.X is not None and not rebuilt


def _measured(adata: AnnData, genes: list[str], layer: str, measured_layer: str | None) -> np.ndarray:
    """Measured values of ``genes``, normalised to the predictions' library size when that was a number."""
    x = adata.X if measured_layer is None else adata.layers[measured_layer]
    x = x.toarray() if sparse.issparse(x) else np.asarray(x)
    x = np.asarray(x, dtype=np.float64)
    lib = _library_size_of(adata, layer)
    if lib is not None:
        tot = x.sum(1, keepdims=True)
        x = np.divide(x * lib, tot, out=np.zeros_like(x), where=tot > 0)
    idx = [adata.var_names.get_loc(g) for g in genes]
    return x[:, idx]


def _limit(value: float | str | None, values: np.ndarray, default: float) -> float:
    finite = values[np.isfinite(values)]
    if value is None:
        return float(np.percentile(finite, default)) if finite.size else 0.0
    if isinstance(value, str):
        if not value.startswith("p"):
            msg = f"Expected `vmin`/`vmax` as a number or a percentile like 'p99', found {value!r}."
            raise ValueError(msg)
        return float(np.percentile(finite, float(value[1:])))
    return float(value)


def spatial_pred(
    data: Any,
    genes: str | Sequence[str],
    *,
    layer: str = "predicted",
    compare: bool = True,
    measured_layer: str | None = None,
    library_id: str | None = None,
    library_key: str | None = None,
    spatial_key: str = "spatial",
    table_key: str | None = None,
    shapes_key: str | None = None,
    image_key: str | None = None,
    img: bool = True,
    img_alpha: float | None = None,
    cmap: str | Colormap | None = None,
    vmin: float | str | None = None,
    vmax: float | str | None = None,
    size: float | None = None,
    ncols: int = 4,
    title: str | Sequence[str] | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    **kwargs: Any,
) -> Figure | None:
    """Plot predicted (and measured) expression in tissue coordinates over the H&E.

    Parameters
    ----------
    data
        AnnData (drawn with :func:`squidpy.pl.spatial_scatter`) or SpatialData (drawn with spatialdata-plot's
        ``render_images`` / ``render_shapes``).
    genes
        Gene(s) to show; each must be in the table's ``var_names``.
    layer
        Layer with predictions (from :func:`stfm.tl.predict_expression`).
    compare
        Put the measured values (``X`` or ``measured_layer``) next to the predictions, one row per gene with a
        shared colour scale. When the predictions were made at a fixed library size, the measured counts are
        normalised to the same library size over the table's genes so both panels are on one scale. Skipped
        with a warning for tables without measurements (H&E-only tables rebuilt by ``predict_expression``).
    measured_layer
        Layer with measured counts (``None``: ``X``).
    library_id, library_key, spatial_key
        Passed to :func:`squidpy.pl.spatial_scatter` (AnnData).
    table_key, shapes_key, image_key
        SpatialData table, shapes (spots/tiles) and image element (``None``: the only table; the table's
        annotated region; the first image).
    img
        Draw the H&E underneath.
    img_alpha
        Image transparency.
    cmap
        Colour map (default ``'viridis'``).
    vmin, vmax
        Colour limits shared by the predicted and measured panels of a gene: numbers or percentiles such as
        ``'p99'`` of the two panels' values pooled (default ``0`` and ``'p99'``).
    size
        Spot size (squidpy ``size``; SpatialData: shape scale).
    ncols
        Panels per row when ``compare=False``.
    title
        Panel titles (default ``'<gene> predicted'`` / ``'<gene> measured'``).
    ax
        Axes to draw into (as many as panels).
    show
        Call :func:`matplotlib.pyplot.show` (default: when no ``ax`` is given and ``return_fig=False``).
    return_fig
        Return the :class:`~matplotlib.figure.Figure`.
    **kwargs
        Passed to :func:`squidpy.pl.spatial_scatter` or ``render_shapes``.

    Returns
    -------
    The figure if ``return_fig=True``, else ``None``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize

    table = get_table(data, table_key)
    genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
    if not genes:
        msg = "Expected at least one gene to plot."
        raise ValueError(msg)
    assert_key_in(layer, table.layers, where="layers", hint="Run `stfm.tl.predict_expression(data, model)` first.")
    unknown = [g for g in genes if g not in table.var_names]
    if unknown:
        avail = list(map(str, table.var_names[:20]))
        msg = (
            f"Genes {unknown} are not in `layers[{layer!r}]`; available var_names ({table.n_vars}): {avail}"
            + (" …" if table.n_vars > 20 else "")
            + ". See `stfm.get.model_genes(model)`."
        )
        raise KeyError(msg)
    if measured_layer is not None:
        assert_key_in(measured_layer, table.layers, where="layers")
    if compare and not _has_measured(table, layer, measured_layer):
        warnings.warn(
            "This table has no measured expression (it was rebuilt from an H&E-only table); showing predictions only.",
            UserWarning,
            stacklevel=2,
        )
        compare = False

    pred = np.column_stack([_column(table, g, layer) for g in genes])
    meas = _measured(table, genes, layer, measured_layer) if compare else None
    norms = []
    for j in range(len(genes)):
        vals = pred[:, j] if meas is None else np.concatenate([pred[:, j], meas[:, j]])
        lo, hi = _limit(vmin, vals, 0) if vmin is not None else 0.0, _limit(vmax, vals, 99)
        norms.append(Normalize(vmin=lo, vmax=hi if hi > lo else lo + 1e-9))
    panels: list[tuple[str, np.ndarray, Normalize]] = []
    for j, g in enumerate(genes):
        panels.append((f"{g} predicted", pred[:, j], norms[j]))
        if meas is not None:
            panels.append(
                (f"{g} measured" + (" (normalised)" if _library_size_of(table, layer) else ""), meas[:, j], norms[j])
            )
    if title is not None:
        titles = [title] if isinstance(title, str) else list(title)
        if len(titles) != len(panels):
            msg = f"Expected {len(panels)} titles (one per panel), found {len(titles)}."
            raise ValueError(msg)
        panels = [(t, v, n) for t, (_, v, n) in zip(titles, panels, strict=True)]

    n_cols = 2 if meas is not None else min(ncols, len(panels))
    n_rows = int(np.ceil(len(panels) / n_cols))
    if ax is None:
        width = 5.2 if is_spatialdata(data) else 4.2  # spatialdata-plot adds a labelled colour bar
        fig, axes = plt.subplots(n_rows, n_cols, figsize=(width * n_cols, 4.0 * n_rows), squeeze=False)
        axes = list(axes.ravel())
        for extra in axes[len(panels) :]:
            extra.set_axis_off()
    else:
        axes = [ax] if not isinstance(ax, Sequence) else list(ax)
        if len(axes) < len(panels):
            msg = f"Expected {len(panels)} axes (one per panel), found {len(axes)}."
            raise ValueError(msg)
        fig = axes[0].figure
    cmap = cmap or "viridis"

    if is_spatialdata(data):
        _draw_spatialdata(
            data, table, table_key, panels, axes, shapes_key, image_key, img, img_alpha, cmap, size, kwargs
        )
    else:
        _draw_anndata(table, panels, axes, library_id, library_key, spatial_key, img, img_alpha, cmap, size, kwargs)

    if show is None:
        show = ax is None and not return_fig
    if show:
        plt.show()
    return fig if return_fig else None


def _draw_anndata(
    table, panels, axes, library_id, library_key, spatial_key, img, img_alpha, cmap, size, kwargs
) -> None:
    import squidpy as sq
    from anndata import AnnData

    check_spatial(table, spatial_key, purpose="drawing the spots")
    names = [f"panel_{i}" for i in range(len(panels))]
    tmp = AnnData(X=np.column_stack([v for _, v, _ in panels]).astype(np.float32), obs=table.obs[[]].copy())
    tmp.var_names = names
    if library_key is not None:
        tmp.obs[library_key] = table.obs[library_key].to_numpy()
    tmp.obsm[spatial_key] = np.asarray(table.obsm[spatial_key])
    has_img = "spatial" in table.uns
    if has_img:
        tmp.uns["spatial"] = table.uns["spatial"]
    for (title, _, norm), name, a in zip(panels, names, axes, strict=False):
        sq.pl.spatial_scatter(
            tmp,
            color=name,
            library_id=library_id,
            library_key=library_key,
            spatial_key=spatial_key,
            img=img and has_img,
            img_res_key="hires",
            img_alpha=img_alpha,
            shape="circle" if has_img else None,
            size=size,
            cmap=cmap,
            norm=norm,
            title=title,
            ax=a,
            **kwargs,
        )


def _draw_spatialdata(
    sdata, table, table_key, panels, axes, shapes_key, image_key, img, img_alpha, cmap, size, kwargs
) -> None:
    import spatialdata_plot  # noqa: F401 (registers the `.pl` accessor)
    from anndata import AnnData
    from spatialdata import SpatialData

    attrs = table.uns.get("spatialdata_attrs", {})
    if shapes_key is None:
        region = attrs.get("region")
        region = [region] if isinstance(region, str) else list(region or [])
        if not region:
            msg = f"Table {table_key!r} annotates no region; pass `shapes_key=` (one of {list(sdata.shapes)})."
            raise ValueError(msg)
        shapes_key = region[0]
    assert_key_in(shapes_key, sdata.shapes, where="sdata.shapes")
    if img and image_key is None and len(sdata.images):
        image_key = next(iter(sdata.images))
    names = [t for t, _, _ in panels]
    if len(set(names)) != len(names):
        names = [f"{t} ({i})" for i, t in enumerate(names)]
    tmp = AnnData(X=np.column_stack([v for _, v, _ in panels]).astype(np.float32), obs=table.obs.copy())
    tmp.var_names = names
    tmp.uns["spatialdata_attrs"] = dict(attrs)
    name = "stfm_plot_table"
    images = {image_key: sdata.images[image_key]} if img and image_key is not None else {}
    view = SpatialData(images=images, shapes={shapes_key: sdata.shapes[shapes_key]}, tables={name: tmp})
    cs = None
    from spatialdata.transformations import get_transformation

    systems = list(get_transformation(sdata.shapes[shapes_key], get_all=True))
    cs = systems[0] if systems else None
    for (title, _, norm), col, a in zip(panels, names, axes, strict=False):
        pl = view.pl
        if images:
            pl = pl.render_images(image_key, alpha=1.0 if img_alpha is None else img_alpha).pl
        pl.render_shapes(
            shapes_key, color=col, table_name=name, cmap=cmap, norm=norm, scale=1.0 if size is None else size, **kwargs
        ).pl.show(coordinate_systems=cs, ax=a, title=title)
