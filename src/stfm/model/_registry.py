"""The expression-method registry: what ``fit_expression(method=…)``, ``predict_expression``, ``load_model``,
``evaluate_expression`` and ``cross_validate`` read (lazyslide-models ``register`` / ``to_dataframe`` style).

A method registers itself with :func:`register_expression_method` on its model class; the built-in methods are
listed in ``_BUILTIN`` so that they are found without importing torch until one is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["MethodSpec", "get_method", "list_methods", "register_expression_method"]

#: Vocabulary of ``needs=`` (what a method reads) and ``supports=`` (what it offers); checked on registration.
NEEDS = {
    "embedding": "an H&E embedding in obsm (from stfm.pp.extract_features)",
    "counts": "raw counts of the training sections (training only)",
    "spatial": "spot coordinates in obsm['spatial'] (training and prediction)",
    "reference_bank": "training spots stored with the model (embeddings + counts)",
}
SUPPORTS = {
    "std": "layers['predicted_std']",
    "dist_params": "zero-inflation probability and theta",
    "smoothing": "neighbour smoothing of predictions, chosen on validation sections",
    "early_stopping": "epochs chosen on validation sections",
    "ensemble": "n_models seeds averaged",
}

_BUILTIN = {
    "zinb": "stfm.model._zinb",
    "ridge": "stfm.model._ridge",
    "retrieval": "stfm.model._retrieval",
    "hetero_graph": "stfm.model._hetero_graph",
    "graph_ae": "stfm.model._graph_ae",
    "multimodal": "stfm.model._multimodal",
}


@dataclass(frozen=True)
class MethodSpec:
    """A registered expression method."""

    key: str
    cls: type
    needs: tuple[str, ...]
    supports: tuple[str, ...]
    after: str = ""
    likelihood: str = ""
    summary: str = ""
    fit_defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, MethodSpec] = {}


def register_expression_method(
    key: str,
    *,
    needs: Sequence[str] = ("embedding", "counts"),
    supports: Sequence[str] = (),
    after: str = "",
    likelihood: str = "",
    summary: str = "",
) -> Callable[[type], type]:
    """Class decorator: register an :class:`~stfm.model.ExpressionModelBase` subclass under ``key``.

    Parameters
    ----------
    key
        The ``method=`` name (lower case, e.g. ``'retrieval'``).
    needs
        What the method reads, from :data:`NEEDS`.
    supports
        What it offers, from :data:`SUPPORTS`.
    after
        The published system it follows.
    likelihood
        What it fits (e.g. ``'ZINB on counts'``).
    summary
        One line for :func:`list_methods`.
    """
    bad = [n for n in needs if n not in NEEDS] + [s for s in supports if s not in SUPPORTS]
    if bad or not key or key != key.lower():
        msg = f"Invalid registration {key!r}: unknown needs/supports {bad} (known: {sorted(NEEDS)}, {sorted(SUPPORTS)})."
        raise ValueError(msg)

    def deco(cls: type) -> type:
        if key in _REGISTRY and _REGISTRY[key].cls.__qualname__ != cls.__qualname__:
            msg = f"An expression method {key!r} is already registered ({_REGISTRY[key].cls.__name__})."
            raise ValueError(msg)
        cls.method_key = key
        cls.method_needs = tuple(needs)
        cls.method_supports = tuple(supports)
        _REGISTRY[key] = MethodSpec(key, cls, tuple(needs), tuple(supports), after, likelihood, summary)
        return cls

    return deco


def _load_builtins() -> None:
    for key, module in _BUILTIN.items():
        if key not in _REGISTRY:
            importlib.import_module(module)


def _ordered() -> list[str]:
    """Registered keys: the built-ins in their fixed order, then the others in registration order."""
    return [k for k in _BUILTIN if k in _REGISTRY] + [k for k in _REGISTRY if k not in _BUILTIN]


def available_methods() -> list[str]:
    """Registered method keys (built-ins first)."""
    _load_builtins()
    return _ordered()


def get_method(key: str) -> MethodSpec:
    """The :class:`MethodSpec` of ``key``; an unknown key raises a :class:`ValueError` listing the registered ones."""
    if not isinstance(key, str):
        msg = f"Expected `method` to be a string naming a registered method, found {type(key).__name__}."
        raise TypeError(msg)
    if key not in _REGISTRY and key in _BUILTIN:
        importlib.import_module(_BUILTIN[key])
    if key not in _REGISTRY:
        _load_builtins()
    if key not in _REGISTRY:
        close = [k for k in _REGISTRY if k.startswith(key[:3].lower())]
        hint = f" Did you mean {close[0]!r}?" if close else ""
        msg = (
            f"Unknown expression method {key!r}. Registered methods: {', '.join(repr(k) for k in _ordered())} "
            f"(see `stfm.model.list_methods()`).{hint}"
        )
        raise ValueError(msg)
    return _REGISTRY[key]


def method_of(cls_name: str) -> MethodSpec | None:
    """The spec whose class is named ``cls_name`` (for folders saved by a class)."""
    _load_builtins()
    for spec in _REGISTRY.values():
        if spec.cls.__name__ == cls_name:
            return spec
    return None


def list_methods() -> pd.DataFrame:
    """The registered expression methods as a table (one row per ``method=`` key).

    Returns
    -------
    :class:`~pandas.DataFrame` indexed by key with columns ``class``, ``after``, ``likelihood``, ``needs``,
    ``supports`` and ``summary``.

    Examples
    --------
    >>> stfm.model.list_methods()[["class", "after", "needs"]]
    """
    import pandas as pd

    _load_builtins()
    rows = [
        {
            "key": s.key,
            "class": s.cls.__name__,
            "after": s.after,
            "likelihood": s.likelihood,
            "needs": ", ".join(s.needs),
            "supports": ", ".join(s.supports),
            "summary": s.summary,
        }
        for s in (_REGISTRY[k] for k in _ordered())
    ]
    return pd.DataFrame(rows).set_index("key")
