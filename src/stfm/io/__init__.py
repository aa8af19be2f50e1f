"""Readers to AnnData / SpatialData, conversions between them, and atomic writers."""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "read_cosmx": "_platforms",
        "read_her2st": "_her2st",
        "read_merscope": "_platforms",
        "read_visium": "_visium",
        "read_visium_hd": "_visium_hd",
        "read_xenium": "_platforms",
        "to_spatialdata": "_convert",
        "to_anndata": "_convert",
        "write_zarr": "_write",
        "write_h5ad": "_write",
    },
)
