"""The ``stfm`` logger and helpers that report which slots a function wrote."""

from __future__ import annotations

import logging

logger = logging.getLogger("stfm")
if not logger.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("stfm: %(message)s"))
    logger.addHandler(_handler)
    logger.propagate = False


def added(where: str, shape: tuple[int, ...] | None = None) -> None:
    """Log ``added <where> (n × d)`` at info level."""
    suffix = "" if shape is None else " (" + " × ".join(f"{s:,}" for s in shape) + ")"
    logger.info("added %s%s", where, suffix)
