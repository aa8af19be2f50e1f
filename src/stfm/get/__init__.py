"""Accessors (scanpy ``get`` analogue)."""

from .._lazy import attach

__getattr__, __dir__, __all__ = attach(
    __name__,
    {
        "model_genes": "_get",
        "table": "_get",
    },
)
