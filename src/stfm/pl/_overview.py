"""Overview plot: the H&E image with the spots drawn at their true size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from .._containers import get_library_id, get_table, is_spatialdata

if TYPE_CHECKING:
    from anndata import AnnData
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from spatialdata import SpatialData


def overview(
    data: AnnData | SpatialData,
    *,
    color: str | None = None,
    library_id: str | None = None,
    table_key: str | None = None,
    spatial_key: str = "spatial",
    alpha: float = 0.45,
    title: str | None = None,
    ax: Axes | None = None,
    show: bool | None = None,
    return_fig: bool = False,
    **kwargs: Any,
) -> Figure | None:
    """Draw the hires H&E with every spot as a circle of its physical diameter.

    Parameters
    ----------
    data
        AnnData with ``uns['spatial'][library_id]['images']['hires']``, or a SpatialData (converted with
        :func:`stfm.io.to_anndata`).
    color
        ``obs`` column to colour the spots by (categorical or numeric); default: outlines only.
    library_id, table_key, spatial_key
        Which library, SpatialData table and coordinates to use.
    alpha
        Fill opacity of the spots.
    title
        Axes title (default: the library id, spot count and µm/px).
    ax
        Axes to draw into; a new figure otherwise.
    show
        Call :func:`matplotlib.pyplot.show` (default: when no figure is returned).
    return_fig
        Return the figure.
    **kwargs
        Passed to :class:`matplotlib.collections.PatchCollection`.
    """
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Circle

    if is_spatialdata(data):
        from ..io._convert import to_anndata

        adata = to_anndata(data, table_key=table_key)
    else:
        adata = get_table(data)
    lib = get_library_id(adata, library_id)
    if lib is None or "hires" not in adata.uns["spatial"][lib].get("images", {}):
        msg = "No hires image in `uns['spatial'][library_id]['images']`; read the section with its image first."
        raise KeyError(msg)
    entry = adata.uns["spatial"][lib]
    sf = entry["scalefactors"]
    scale = float(sf.get("tissue_hires_scalef", 1.0))
    img = np.asarray(entry["images"]["hires"])
    xy = np.asarray(adata.obsm[spatial_key])[:, :2] * scale
    radius = float(sf.get("spot_diameter_fullres", 10.0 / scale)) * scale / 2

    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 7 * img.shape[0] / img.shape[1]))
    else:
        fig = ax.figure
    ax.imshow(img)
    circles = [Circle((x, y), radius) for x, y in xy]
    coll = PatchCollection(circles, linewidths=0.6, **kwargs)
    if color is None:
        coll.set_facecolor((0, 0, 0, 0))
        coll.set_edgecolor("black")
    else:
        values = adata.obs[color]
        if hasattr(values, "cat"):
            colors = adata.uns.get(f"{color}_colors")
            cats = list(values.cat.categories)
            if colors is None or len(colors) != len(cats):
                cmap = plt.get_cmap("tab10" if len(cats) <= 10 else "tab20")
                colors = [cmap(i % cmap.N) for i in range(len(cats))]
            lut = dict(zip(cats, colors, strict=True))
            from matplotlib.colors import to_rgba

            face = [to_rgba(lut[v], alpha) if v in lut else (0.6, 0.6, 0.6, 0.2) for v in values]
            coll.set_facecolor(face)
            from matplotlib.lines import Line2D

            handles = [Line2D([], [], marker="o", ls="", color=lut[c], label=c) for c in cats]
            ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, title=color)
        else:
            coll.set_array(np.asarray(values, dtype=float))
            coll.set_alpha(alpha)
            fig.colorbar(coll, ax=ax, shrink=0.6, label=color)
        coll.set_edgecolor((0, 0, 0, 0.5))
    ax.add_collection(coll)
    ax.set_axis_off()
    mpp = sf.get("microns_per_pixel")
    default = f"{lib}: {adata.n_obs} spots" + (f", {float(mpp):.3f} µm/px" if mpp is not None else "")
    ax.set_title(title or default)
    if show or (show is None and not return_fig):
        plt.show()
    return fig if return_fig else None
