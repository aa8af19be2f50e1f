"""Cancer-region panel: tumour score and region calls on the H&E."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._containers import get_library_id, get_table, is_spatialdata
from .._validation import check_spatial

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap
    from matplotlib.figure import Figure
    from spatialdata import SpatialData

__all__ = ["cancer_regions"]


def cancer_regions(
    data: AnnData | SpatialData,
    *,
    key: str = "cancer_region",
    score_key: str | None = None,
    show_high_risk: bool = True,
    library_id: str | None = None,
    table_key: str | None = None,
    spatial_key: str = "spatial",
    img: bool = True,
    img_alpha: float | None = None,
    cmap: str | Colormap = "magma",
    size: float | None = None,
    title: str | Sequence[str] | None = None,
    ax: Axes | Sequence[Axes] | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    **kwargs: Any,
) -> Figure | None:
    """Plot the tumour score and the tumour / boundary / non-tumour calls side by side on the H&E.

    Delegates to :func:`squidpy.pl.spatial_scatter` (hires image of ``uns['spatial'][library_id]`` when there
    is one; spots only otherwise). A SpatialData input is converted with :func:`stfm.io.to_anndata` first.

    Parameters
    ----------
    data
        Output of :func:`stfm.tl.detect_cancer_regions`.
    key
        Calls column (``key_added`` of the detection).
    score_key
        Score column; default ``f'{key}_score'``.
    show_high_risk
        Outline the spots flagged in ``obs['cancer_high_risk']`` (annotated non-cancer, high score), when present.
    library_id
        Library of ``uns['spatial']``.
    table_key
        Table of a SpatialData input.
    spatial_key
        ``obsm`` key of spot centres.
    img
        Draw the H&E under the spots (when the library has a hires image).
    img_alpha
        Image transparency.
    cmap
        Colour map of the score.
    size
        Spot size scale passed to squidpy.
    title
        Panel titles (two).
    ax
        Two axes to draw in.
    show
        Show the figure (default: when no ``ax`` is given and ``return_fig`` is false).
    return_fig
        Return the figure.
    **kwargs
        Passed to :func:`squidpy.pl.spatial_scatter`.

    Returns
    -------
    The figure when ``return_fig=True``, else ``None``.
    """
    import matplotlib.pyplot as plt
    import squidpy as sq

    if is_spatialdata(data):
        from ..io import to_anndata

        adata = to_anndata(data, table_key=table_key)
    else:
        adata = get_table(data, table_key)
    score_key = score_key or f"{key}_score"
    missing = [k for k in (key, score_key) if k not in adata.obs]
    if missing:
        msg = f"`obs` lacks {missing}. Available obs columns: {sorted(map(str, adata.obs))}. Run `stfm.tl.detect_cancer_regions` first."
        raise KeyError(msg)
    check_spatial(adata, spatial_key, purpose="plotting the cancer map")
    lib = get_library_id(adata, library_id)
    has_img = lib is not None and "hires" in adata.uns["spatial"][lib].get("images", {})
    if ax is None:
        fig, axs = plt.subplots(1, 2, figsize=(11, 5), constrained_layout=True)
    else:
        axs = list(ax) if isinstance(ax, Sequence) else [ax]
        if len(axs) != 2:
            msg = f"Expected two axes (score, calls), found {len(axs)}."
            raise ValueError(msg)
        fig = axs[0].figure
    plot = adata
    colors_key = f"{key}_colors"
    if colors_key not in plot.uns:
        from .._constants import REGION_COLORS

        plot = adata.copy()
        plot.uns[colors_key] = list(REGION_COLORS)[: len(plot.obs[key].cat.categories)]
    titles = list(title) if title is not None and not isinstance(title, str) else [title or "tumour score", "cancer regions"]
    common: dict[str, Any] = {"spatial_key": spatial_key, "size": size}
    if has_img and img:
        common.update({"library_id": lib, "img_res_key": "hires", "img_alpha": img_alpha})
    else:
        common.update({"img": False, "shape": None, "scale_factor": 1.0})
        if lib is not None:
            common["library_id"] = lib
    common.update(kwargs)
    score = plot.obs[score_key].to_numpy(dtype=np.float64)
    sq.pl.spatial_scatter(plot, color=score_key, cmap=cmap, ax=axs[0], title=titles[0], vmin=0.0,
                          vmax=max(1e-6, float(np.nanmax(score)) if score.size else 1.0), **common)  # fmt: skip
    sq.pl.spatial_scatter(plot, color=key, ax=axs[1], title=titles[1], **common)
    if show_high_risk and "cancer_high_risk" in plot.obs and bool(plot.obs["cancer_high_risk"].any()):
        xy = np.asarray(plot.obsm[spatial_key], dtype=np.float64)[:, :2]
        sel = plot.obs["cancer_high_risk"].to_numpy(dtype=bool)
        scale = float(plot.uns["spatial"][lib]["scalefactors"].get("tissue_hires_scalef", 1.0)) if has_img and img else 1.0
        axs[1].scatter(xy[sel, 0] * scale, xy[sel, 1] * scale, s=40, facecolors="none", edgecolors="black",
                       linewidths=1.2, label="high risk (annotated non-cancer)")  # fmt: skip
        axs[1].legend(loc="lower left", fontsize=7, frameon=False)
    if return_fig:
        return fig
    if show or (show is None and ax is None):
        plt.show()
    return None
