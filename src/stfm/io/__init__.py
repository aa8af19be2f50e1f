"""Readers to AnnData / SpatialData, conversions between them, and atomic writers."""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "read_her2st": "_her2st",
        "read_visium": "_visium",
        "to_spatialdata": "_convert",
        "to_anndata": "_convert",
        "write_zarr": "_write",
        "write_h5ad": "_write",
    },
)
