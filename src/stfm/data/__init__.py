"""Tile sources: spot/cell/tile-centred crops at a physical size, from in-memory or lazy images."""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "ImageSource": "_sources",
        "ArraySource": "_sources",
        "DecodedFileSource": "_sources",
        "LazyArraySource": "_sources",
        "TiffSource": "_sources",
        "open_image": "_sources",
        "as_dask": "_sources",
        "SourceArray": "_sources",
        "TileDataset": "_dataset",
        "crop_boxes": "_dataset",
        "resize_tiles": "_dataset",
        "detect_tissue": "_tissue",
        "thumbnail": "_tissue",
        "tile_grid": "_tissue",
    },
)
