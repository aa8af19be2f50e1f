"""``ExpressionEnsemble`` (any method, several seeds) and ``load_model`` (any saved expression model)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from anndata import AnnData

from . import _persist
from ._registry import get_method

__all__ = ["ExpressionEnsemble", "load_model"]


class ExpressionEnsemble:
    """Average of several models of one method trained with different seeds.

    The prediction is the mean of the members' predictions; the standard deviation combines the members' own
    variances with their disagreement (law of total variance: ``sqrt(mean(std²) + var(mean))``).
    """

    def __init__(self, members: Sequence[Any]) -> None:
        self.members = list(members)
        if not self.members:
            msg = "An ensemble needs at least one member model."
            raise ValueError(msg)
        genes = self.members[0].genes
        if any(m.genes != genes for m in self.members):
            msg = "All ensemble members must predict the same genes in the same order."
            raise ValueError(msg)
        methods = {m.method for m in self.members}
        if len(methods) != 1:
            msg = f"All ensemble members must use one method, found {sorted(methods)}."
            raise ValueError(msg)

    @property
    def genes(self) -> list[str]:
        """The gene panel, in output order."""
        return self.members[0].genes

    @property
    def method(self) -> str:
        """The members' method key."""
        return self.members[0].method

    @property
    def module(self) -> Any:
        """The first member's module (for capability checks such as ``has_std``)."""
        return self.members[0].module

    def __getattr__(self, name: str) -> Any:
        # attributes shared by the members (embedding_key_, encoder_, gene_sets_, training_sections_, …)
        if name.endswith("_") and not name.startswith("__") and "members" in self.__dict__:
            return getattr(self.__dict__["members"][0], name)
        raise AttributeError(name)

    def predict(self, adata: AnnData | None = None, **kwargs: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        """Mean of the members' :meth:`predict` outputs (``return_std=True``: total standard deviation)."""
        outs = [m.predict(adata, **kwargs) for m in self.members]
        if not isinstance(outs[0], tuple):
            return np.mean(outs, axis=0).astype(np.float32)
        means = np.stack([o[0] for o in outs])
        res = [means.mean(0)]
        for j in range(1, len(outs[0])):
            arrs = np.stack([np.broadcast_to(o[j], outs[0][j].shape) for o in outs])
            if kwargs.get("return_std") and j == 1:
                res.append(np.sqrt((arrs**2).mean(0) + means.var(0)))
            else:
                res.append(arrs.mean(0))
        return tuple(np.asarray(r, dtype=np.float32) for r in res)

    def to_device(self, device: Any) -> None:
        """Move every member."""
        for m in self.members:
            m.to_device(device)

    def save(self, dir_path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """One folder: ``stfm_model.json`` (the ensemble) and ``member_<i>/`` (each member's own model folder)."""
        meta = {"method": self.method, "class": "ExpressionEnsemble", "stfm_version": __import__("stfm").__version__,
                "var_names": self.genes, "n_members": len(self.members)}  # fmt: skip
        with _persist.atomic_dir(dir_path, overwrite=overwrite) as tmp:
            for i, m in enumerate(self.members):
                m.save(tmp / f"member_{i}")
            _persist.write_meta(tmp, meta)

    @classmethod
    def load(cls, dir_path: str | os.PathLike[str], **kwargs: Any) -> ExpressionEnsemble:
        """Load an ensemble folder written by :meth:`save`."""
        meta = _persist.read_meta(dir_path, expected="ExpressionEnsemble")
        spec = get_method(meta["method"])
        members = [spec.cls.load(Path(dir_path) / f"member_{i}", **kwargs) for i in range(int(meta["n_members"]))]
        return cls(members)

    def __repr__(self) -> str:
        return f"ExpressionEnsemble({len(self.members)} × {type(self.members[0]).__name__}, {len(self.genes)} genes)"


def load_model(path: str | os.PathLike[str], *, device: Any = None) -> Any:
    """Load any stfm expression model folder (single model or ensemble), picking the class from the registry.

    Faults (missing folder, empty or truncated files, a 0.1.0 pickle, another class) raise errors that say what
    was found and what to do; nothing is unpickled.
    """
    meta = _persist.read_meta(path)
    kwargs = {} if device is None else {"device": device}
    if meta.get("class") == "ExpressionEnsemble":
        return ExpressionEnsemble.load(path, **kwargs)
    spec = get_method(str(meta.get("method")))
    if spec.cls.__name__ != meta.get("class"):
        msg = f"{str(path)!r} says method {meta.get('method')!r} but class {meta.get('class')!r}; the folder is inconsistent."
        raise _persist.CheckpointError(msg)
    return spec.cls.load(path, **kwargs)
