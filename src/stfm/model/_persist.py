"""Safe, atomic model folders: weights in safetensors, everything else in JSON; nothing is ever unpickled.

A model folder written by stfm holds

``stfm_model.json``
    ``{"format": "stfm-model", "format_version": 1, "method": <registry key>, "class": <class name>,
    "stfm_version": …, "var_names": [...], "registry": {...}, "init_params": {...}, "attributes": {...}}``
    (numpy arrays are stored as ``{"__ndarray__": [...], "dtype": …, "shape": [...]}``).
``model.safetensors``
    the module's ``state_dict`` (tensors only).

Folders are written to a hidden temporary sibling and moved into place; an existing target is first renamed
aside, then deleted, so a crash leaves either the old complete folder or the new one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._atomic import atomic_dir, replace_dir, stale_temporaries

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMAT",
    "META_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "SafeSaveLoadMixin",
    "atomic_dir",
    "from_jsonable",
    "read_meta",
    "read_weights",
    "replace_dir",
    "stale_temporaries",
    "to_jsonable",
    "write_meta",
    "write_weights",
]

FORMAT = "stfm-model"
FORMAT_VERSION = 1
META_FILE = "stfm_model.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A model folder that is missing, empty, truncated, of another class or in an unsafe format."""


# --------------------------------------------------------------------------------------------------
# JSON with numpy arrays
# --------------------------------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    """``obj`` as JSON-compatible values; arrays are tagged so that :func:`from_jsonable` restores them."""
    import pandas as pd

    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "OUS":
            return {"__ndarray__": [str(v) for v in obj.ravel().tolist()], "dtype": "str", "shape": list(obj.shape)}
        return {"__ndarray__": obj.ravel().tolist(), "dtype": str(obj.dtype), "shape": list(obj.shape)}
    if isinstance(obj, pd.DataFrame):
        return {"__dataframe__": {str(c): to_jsonable(obj[c].to_numpy()) for c in obj.columns},
                "index": to_jsonable(np.asarray(obj.index))}  # fmt: skip
    if isinstance(obj, pd.Index):
        return to_jsonable(np.asarray(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    msg = f"Cannot store a {type(obj).__name__} in a model file (only numbers, strings, lists, dicts and arrays)."
    raise TypeError(msg)


def from_jsonable(obj: Any) -> Any:
    """Inverse of :func:`to_jsonable`."""
    import pandas as pd

    if isinstance(obj, dict):
        if "__ndarray__" in obj:
            dtype = object if obj["dtype"] == "str" else np.dtype(obj["dtype"])
            arr = np.asarray(obj["__ndarray__"], dtype=dtype)
            return arr.reshape(obj["shape"])
        if "__dataframe__" in obj:
            cols = {k: from_jsonable(v) for k, v in obj["__dataframe__"].items()}
            return pd.DataFrame(cols, index=pd.Index(from_jsonable(obj["index"])))
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    return obj


def write_meta(folder: Path, meta: dict[str, Any]) -> None:
    """Write ``stfm_model.json`` (format header added)."""
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **to_jsonable(meta)}
    (folder / META_FILE).write_text(json.dumps(body))


def read_meta(folder: str | os.PathLike[str], *, expected: str | None = None) -> dict[str, Any]:
    """Read and check a model folder's metadata; every fault becomes a :class:`CheckpointError` that says what to do."""
    folder = Path(folder)
    if not folder.exists():
        msg = f"No model folder at {str(folder)!r}. Save a model with `model.save(path)` or pass the folder it wrote."
        raise FileNotFoundError(msg)
    if not folder.is_dir():
        msg = f"{str(folder)!r} is a file; a saved stfm model is a folder (holding {META_FILE} and {WEIGHTS_FILE})."
        raise CheckpointError(msg)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        found = sorted(p.name for p in folder.iterdir())[:8]
        if (folder / "model.pt").is_file():
            msg = (
                f"{str(folder)!r} holds a `model.pt` (scvi-tools' pickle format, as written by stfm 0.1.0), not an stfm "
                f"model folder ({META_FILE} + {WEIGHTS_FILE}). stfm does not unpickle model files, since a pickle can run "
                "code when loaded; refit the model with this version of stfm and save it again."
            )
        elif not found:
            msg = f"The model folder {str(folder)!r} is empty; it was never written or its save was interrupted."
        else:
            msg = f"{str(folder)!r} is not an stfm model folder: {META_FILE} not found (it holds {found})."
        raise CheckpointError(msg)
    text = meta_path.read_text()
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as err:
        msg = (
            f"{str(meta_path)!r} is truncated or corrupt ({err.msg} at character {err.pos} of {len(text)}). "
            "Save the model again."
        )
        raise CheckpointError(msg) from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        msg = f"{str(meta_path)!r} is not an stfm model description (format {meta.get('format') if isinstance(meta, dict) else None!r})."
        raise CheckpointError(msg)
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        msg = (
            f"{str(folder)!r} was written by a newer stfm (model format {meta['format_version']}, this one reads "
            f"{FORMAT_VERSION}); upgrade stfm."
        )
        raise CheckpointError(msg)
    if expected is not None and meta.get("class") != expected:
        msg = (
            f"{str(folder)!r} holds a {meta.get('class')!r} model (method {meta.get('method')!r}), not a {expected!r}. "
            "Load it with `stfm.model.load_model(path)`, which picks the right class."
        )
        raise CheckpointError(msg)
    return meta


def read_weights(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The module state dict from ``model.safetensors`` (a :class:`CheckpointError` if missing or truncated)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        msg = f"{str(path)!r} not found: the model folder is incomplete. Save the model again."
        raise CheckpointError(msg)
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        msg = f"{str(path)!r} is truncated or corrupt ({path.stat().st_size} bytes; {err}). Save the model again."
        raise CheckpointError(msg) from err


def write_weights(folder: Path, state: dict[str, Any]) -> None:
    """Write a state dict to ``model.safetensors`` (tensors made contiguous, on the CPU)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / WEIGHTS_FILE))


# --------------------------------------------------------------------------------------------------
# save / load for scvi-tools models
# --------------------------------------------------------------------------------------------------
#: attributes never written to a model folder (scvi bookkeeping or large index arrays)
_SKIP_ATTRS = {"registry_", "init_params_", "is_trained_", "train_indices_", "test_indices_", "validation_indices_",
               "run_name_", "run_id_", "get_normalized_function_name_"}  # fmt: skip


class SafeSaveLoadMixin:
    """``save`` / ``load`` for scvi-tools ``BaseModelClass`` subclasses without pickles (stfm model folders).

    Saved: the module's ``state_dict`` (safetensors), the registry, ``init_params_`` and every public attribute
    ending in ``_`` (JSON). Loading rebuilds the model from the registry (``cls(None, registry=…, **init)``),
    resizes data-sized buffers listed in ``_resizable_buffers`` and loads the weights strictly.
    """

    #: module buffers whose size depends on the training data (resized from the saved state on load)
    _resizable_buffers: tuple[str, ...] = ()

    def view_anndata_setup(self, adata: Any = None, hide_state_registries: bool = False) -> None:  # noqa: FBT001, FBT002 (scvi's signature)
        """scvi-tools' summary of the registered fields (``adata``: a query registered the same way).

        Works around scvi-tools 1.4 calling ``rich.pretty`` without importing it; a model loaded without data
        needs ``adata``.
        """
        import rich.pretty  # noqa: F401  (imported for its side effect: scvi uses `rich.pretty` unimported)

        if adata is None and getattr(self, "adata_manager", None) is None:
            msg = (
                f"This {type(self).__name__} was loaded without its training data, so there is no registered AnnData "
                "to show; pass `adata=` (registered with `setup_anndata`) or look at `model.registry_`."
            )
            raise ValueError(msg)
        return super().view_anndata_setup(adata=adata, hide_state_registries=hide_state_registries)

    def _attributes(self) -> dict[str, Any]:
        out = {}
        for name, value in vars(self).items():
            if not name.endswith("_") or name.startswith("_") or name in _SKIP_ATTRS:
                continue
            if name == "history_":
                value = {k: v for k, v in (value or {}).items()} if isinstance(value, dict) else None
            out[name] = value
        return out

    def save(self, dir_path: str | os.PathLike[str], *, overwrite: bool = False, **kwargs: Any) -> None:
        """Write the model to ``dir_path``: ``model.safetensors`` (weights) + ``stfm_model.json`` (the rest).

        Never pickles, never saves the training AnnData. The folder is written to a hidden temporary sibling and
        moved into place; an existing folder (``overwrite=True``) is replaced only once the new one is complete.
        """
        if kwargs:
            msg = f"Unexpected arguments {sorted(kwargs)}: stfm models are saved without the training data."
            raise TypeError(msg)
        meta = {
            "method": getattr(self, "method", None),
            "class": type(self).__name__,
            "stfm_version": __import__("stfm").__version__,
            "var_names": list(getattr(self, "genes", None) or []),
            "registry": _plain(self.registry_),
            "init_params": _plain(self.init_params_),
            "attributes": self._attributes(),
        }
        with atomic_dir(dir_path, overwrite=overwrite) as tmp:
            write_weights(tmp, self.module.state_dict())
            write_meta(tmp, meta)

    @classmethod
    def load(cls, dir_path: str | os.PathLike[str], adata: Any = None, *, device: Any = None) -> Any:
        """Load a folder written by :meth:`save` (weights through safetensors, no unpickling).

        ``adata`` (optional) must hold exactly the model's genes, in order; without it the model keeps only its
        registry and :meth:`predict` works on any query holding the embedding.
        """
        meta = read_meta(dir_path, expected=cls.__name__)
        state = read_weights(dir_path)
        cls._check_state(state, str(dir_path))
        registry = from_jsonable(meta["registry"])
        init = from_jsonable(meta["init_params"])
        kwargs = {**init.get("non_kwargs", {}), **{k: v for d in init.get("kwargs", {}).values() for k, v in d.items()}}
        from scvi.data._constants import _SETUP_ARGS_KEY

        if adata is not None:
            names = [str(g) for g in adata.var_names]
            if meta["var_names"] and names != list(meta["var_names"]):
                n_missing = len(set(meta["var_names"]) - set(names))
                msg = (
                    f"`adata.var_names` do not match the model's {len(meta['var_names'])} genes ({n_missing} missing, "
                    f"{adata.n_vars} given, order must match). Subset first: `adata[:, stfm.get.model_genes(model)]`."
                )
                raise ValueError(msg)
            # a query may hold sections (categories) the model never saw: extend them rather than refuse
            cls.setup_anndata(adata, source_registry=registry, extend_categories=True, **registry[_SETUP_ARGS_KEY])
            model = cls(adata, **kwargs)
        else:
            model = cls(None, registry=registry, **kwargs)
        _load_state(model.module, state, where=str(dir_path), resizable=cls._resizable_buffers)
        import pandas as pd

        for name, value in from_jsonable(meta["attributes"]).items():
            if name == "history_":
                value = {k: pd.DataFrame(v) if not isinstance(v, pd.DataFrame) else v for k, v in (value or {}).items()} or None
            setattr(model, name, value)
        model.is_trained_ = True
        model.module.eval()
        model._check_loaded(str(dir_path))
        if device is not None:
            from .._settings import settings

            model.to_device(settings.resolve_device(device))
        return model

    @classmethod
    def _check_state(cls, state: dict[str, Any], where: str) -> None:
        """Hook: check the saved weights before they are loaded (e.g. that a reference bank is there)."""

    def _check_loaded(self, where: str) -> None:
        """Hook: check that a loaded model has everything it needs to predict."""


def _plain(obj: Any) -> Any:
    """``obj`` with dict subclasses (scvi's ``defaultdict``) and tuples turned into plain dicts and lists."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def _load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], *, where: str, resizable: Sequence[str]) -> None:
    """``module.load_state_dict(state)``; data-sized buffers are resized first; mismatches become stfm errors."""
    import torch

    own = module.state_dict()
    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            owner_name, _, buf = key.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            if buf in owner._buffers and (key in resizable or buf in resizable):
                owner._buffers[buf] = torch.empty_like(value)
            else:
                msg = (
                    f"The weights in {where!r} do not fit the model: {key!r} has shape {tuple(value.shape)} in the file "
                    f"but {tuple(own[key].shape)} in a model built from the saved settings. The folder is corrupt or was "
                    "edited; save the model again."
                )
                raise CheckpointError(msg)
    missing = sorted(set(module.state_dict()) - set(state))
    unexpected = sorted(set(state) - set(module.state_dict()))
    if missing or unexpected:
        msg = (
            f"The weights in {where!r} do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]}). "
            "The folder was written by another version or model; save the model again."
        )
        raise CheckpointError(msg)
    module.load_state_dict(state)
