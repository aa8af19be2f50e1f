"""Lazy attribute loading for subpackages, so ``import stfm.tl`` does not import torch or scvi-tools."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def attach(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """Return ``__getattr__``, ``__dir__`` and ``__all__`` resolving ``names[attr]`` (a private module) on access."""

    def __getattr__(attr: str) -> Any:
        if attr in names:
            value = getattr(importlib.import_module(f"{package}.{names[attr]}"), attr)
            importlib.import_module(package).__dict__[attr] = value
            return value
        msg = f"module {package!r} has no attribute {attr!r}"
        raise AttributeError(msg)

    def __dir__() -> list[str]:
        return sorted(names)

    return __getattr__, __dir__, sorted(names)
