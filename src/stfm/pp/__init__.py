"""Preprocessing: foundation-model features per spot, cell or tile."""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "extract_features": "_features",
        "make_tiles": "_tiles",
    },
)
