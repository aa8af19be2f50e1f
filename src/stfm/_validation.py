"""Input checks shared by every stfm function; each error says what was expected and what to do."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "assert_key_in",
    "check_copy_inplace",
    "check_positive",
    "check_unique_name",
    "check_valid_key",
]

_VALID_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def check_valid_key(key: str, *, what: str = "key_added") -> str:
    """Check ``key`` against spatialdata's naming rules and return it.

    Names may hold only letters, digits, ``_``, ``-`` and ``.``, must not be ``.``/``..`` and must not
    start with ``__`` (spatialdata ``check_valid_name``), so that every slot stfm writes survives
    ``SpatialData.write`` as well as ``write_h5ad``.
    """
    if not isinstance(key, str):
        msg = f"Expected `{what}` to be a string, found {type(key).__name__}."
        raise TypeError(msg)
    problem = None
    if not key:
        problem = "it is empty"
    elif key in {".", ".."}:
        problem = f"{key!r} is reserved"
    elif key.startswith("__"):
        problem = "it starts with '__'"
    elif not _VALID_NAME.match(key):
        bad = sorted({c for c in key if not re.match(r"[A-Za-z0-9_.\-]", c)})
        problem = f"it contains {', '.join(repr(c) for c in bad)}"
    if problem is not None:
        msg = (
            f"`{what}`={key!r} breaks SpatialData naming rules: {problem}. Use only letters, digits, "
            "'_', '-' and '.', and do not start with '__' (e.g. 'X_uni2_h')."
        )
        raise ValueError(msg)
    return key


def check_unique_name(key: str, existing: Iterable[str], *, what: str = "key_added") -> None:
    """Raise if ``key`` collides case-insensitively with another element name (spatialdata rule)."""
    clash = [e for e in existing if e.lower() == key.lower() and e != key]
    if clash:
        msg = (
            f"`{what}`={key!r} differs only in case from the existing element {clash[0]!r}; SpatialData element "
            "names must be unique regardless of case. Pick another name."
        )
        raise ValueError(msg)


def assert_key_in(key: str, mapping: Mapping[str, Any] | Iterable[str], *, where: str, hint: str = "") -> None:
    """Raise a :class:`KeyError` naming the slot, the available keys and the call to make first."""
    keys = list(mapping.keys()) if isinstance(mapping, Mapping) else list(mapping)
    if key in keys:
        return
    msg = f"`{where}[{key!r}]` not found. Available: {sorted(map(str, keys))}."
    if hint:
        msg += f" {hint}"
    raise KeyError(msg)


def check_copy_inplace(*, copy: bool, inplace: bool) -> None:
    """``copy=True`` returns a modified copy; ``inplace=False`` returns the result; not both (scanpy)."""
    if copy and not inplace:
        msg = "`copy=True` and `inplace=False` cannot be combined: `copy` returns a modified copy of the data, `inplace=False` returns only the result."
        raise ValueError(msg)


def check_positive(value: float, *, name: str, allow_zero: bool = False) -> float:
    """Return ``value`` if it is a finite positive number, else raise a :class:`ValueError`."""
    import math

    ok = isinstance(value, int | float) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        msg = f"Expected `{name}` to be a finite number {bound}, found {value!r}."
        raise ValueError(msg)
    return float(value)
