"""stfm: spatial transcriptomics × pathology foundation models, in the scverse ecosystem.

``import stfm`` is light: torch, timm, scvi-tools and spatialdata are imported only by the submodules
that need them, when they are first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from ._settings import settings

__version__ = "0.2.0"

_SUBMODULES = ("pp", "tl", "pl", "io", "datasets", "encoders", "data", "graph", "model", "module", "get", "batch")
__all__ = [*_SUBMODULES, "__version__", "settings"]

if TYPE_CHECKING:
    from . import batch, data, datasets, encoders, get, graph, io, model, module, pl, pp, tl  # noqa: F401


def __getattr__(name: str):
    if name in _SUBMODULES:
        mod = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = mod
        return mod
    msg = f"module 'stfm' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__() -> list[str]:
    return sorted(__all__)
