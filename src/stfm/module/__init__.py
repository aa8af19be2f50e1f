"""Torch modules (scvi-tools ``BaseModuleClass`` subclasses); no AnnData inside."""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "ExpressionModule": "_expression",
        "CancerModule": "_cancer",
    },
)
