"""Plotting."""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "spatial_pred": "_spatial",
        "overview": "_overview",
        "cancer_regions": "_cancer",
    },
)
