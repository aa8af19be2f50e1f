"""Preprocessing: foundation-model features and nucleus counts per spot, cell or tile."""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "count_nuclei": "_nuclei",
        "extract_features": "_features",
        "make_tiles": "_tiles",
    },
)
