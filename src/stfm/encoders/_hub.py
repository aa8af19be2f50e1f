"""Weights: Hugging Face Hub downloads with pinned revisions, offline mode, and local files.

The Hub token is never an argument: ``huggingface_hub`` reads it from ``HF_TOKEN`` or from
``hf auth login``; stfm never logs or stores it.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stfm._logging import logger
from stfm._settings import settings

__all__ = ["WeightsNotFoundError", "file_revision", "hub_download", "load_weights_file"]


class WeightsNotFoundError(FileNotFoundError):
    """The file is not in the repository, or (offline) not in the local cache; another file name may be."""


def _access_hint(repo_id: str) -> str:
    return (
        f"Request access at https://huggingface.co/{repo_id} (log in, accept the terms), then authenticate "
        "with `hf auth login` or by setting the HF_TOKEN environment variable; or download the weights "
        "yourself and pass `model_path=` to `stfm.encoders.load_encoder`."
    )


def hub_download(repo_id: str, filename: str, *, revision: str | None = None, key: str | None = None) -> Path:
    """Return the local path of ``filename`` in ``repo_id`` at ``revision``, downloading it if allowed.

    Uses the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``). With ``stfm.settings.offline`` (or
    ``HF_HUB_OFFLINE=1``) only the cache is read. Errors are re-raised with what to do.
    """
    import huggingface_hub
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = key or repo_id
    offline = bool(settings.offline) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {
        "1",
        "true",
        "yes",
        "on",
    }
    where = f"{repo_id}/{filename}" + (f" (revision {revision})" if revision else "")
    try:
        path = huggingface_hub.hf_hub_download(repo_id, filename, revision=revision, local_files_only=offline)
    except GatedRepoError as e:
        msg = f"The weights of encoder {name!r} ({where}) are gated and this account has no access. " + _access_hint(
            repo_id
        )
        raise PermissionError(msg) from e
    except LocalEntryNotFoundError as e:
        if offline:
            msg = (
                f"Offline mode is on (stfm.settings.offline or HF_HUB_OFFLINE) and the weights of encoder {name!r} "
                f"({where}) are not in the Hugging Face cache ({huggingface_hub.constants.HF_HUB_CACHE}). Either "
                "download them once with network access (set `stfm.settings.offline = False` and unset "
                "HF_HUB_OFFLINE), or pass a local file with `model_path=`."
            )
            raise WeightsNotFoundError(msg) from e
        msg = (
            f"Could not download the weights of encoder {name!r} ({where}): the Hugging Face Hub is not "
            "reachable and the file is not in the local cache. Check the network connection, set "
            "`stfm.settings.offline = True` to use only the cache, or pass a local file with `model_path=`."
        )
        raise FileNotFoundError(msg) from e
    except RevisionNotFoundError as e:
        msg = (
            f"Revision {revision!r} of {repo_id} does not exist (encoder {name!r}). Pass `revision=None` for the "
            "card's pinned revision, or a commit listed on the repository's history page."
        )
        raise FileNotFoundError(msg) from e
    except EntryNotFoundError as e:
        msg = f"{repo_id} has no file {filename!r} at revision {revision or 'main'} (encoder {name!r})."
        raise WeightsNotFoundError(msg) from e
    except RepositoryNotFoundError as e:
        msg = (
            f"The Hugging Face repository {repo_id!r} (encoder {name!r}) was not found, or it is private/gated and "
            "no token is available. " + _access_hint(repo_id)
        )
        raise PermissionError(msg) from e
    logger.info("encoder %s: weights %s", name, where)
    return Path(path)


def file_revision(path: str | os.PathLike[str]) -> str:
    """Short content hash of a weights file (``sha256:<12 hex>``), recorded as the revision of local weights."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()[:12]


def _unwrap(obj: Any) -> dict[str, Any]:
    """Find the tensor dict inside a checkpoint (``state_dict``/``model`` wrappers, ``module.`` prefixes)."""
    import torch

    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, Mapping):
            for wrapper in ("state_dict", "model", "model_state_dict", "teacher", "module"):
                if wrapper in obj and isinstance(obj[wrapper], Mapping):
                    obj = obj[wrapper]
                    break
            else:
                break
    if not (isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        msg = (
            "Expected the weights file to hold a state dict (a mapping of parameter names to tensors, possibly "
            f"under 'state_dict' or 'model'), found {type(obj).__name__}. Save weights with "
            "`torch.save(model.state_dict(), path)` or `safetensors.torch.save_file(model.state_dict(), path)`."
        )
        raise ValueError(msg)
    sd = dict(obj)
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def load_weights_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a state dict from a safetensors file or a PyTorch checkpoint (``torch.load(weights_only=True)``).

    Parameters
    ----------
    path
        ``*.safetensors``, or a ``*.pth``/``*.pt``/``*.bin`` file saved by :func:`torch.save`.

    Returns
    -------
    The state dict (parameter name → tensor), on CPU.
    """
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        msg = f"Expected `model_path` to be an existing weights file (.safetensors, .pth, .pt, .bin), found {str(p)!r}."
        raise FileNotFoundError(msg)
    with open(p, "rb") as fh:
        head = fh.read(8)
    is_safetensors = p.suffix == ".safetensors"
    if not is_safetensors and len(head) == 8:
        # safetensors files start with a little-endian u64 header length followed by '{'
        n = int.from_bytes(head, "little")
        with open(p, "rb") as fh:
            fh.seek(8)
            is_safetensors = 0 < n < p.stat().st_size and fh.read(1) == b"{"
    if is_safetensors:
        from safetensors.torch import load_file

        return _unwrap(load_file(str(p), device="cpu"))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # re-raised with the file name and what to do
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        reason = next((ln for ln in lines if "Unsupported global" in ln), lines[0] if lines else "")
        reason = re.sub(r"\x1b\[[0-9;]*m", "", reason)
        msg = (
            f"Could not read {p.name!r} with `torch.load(weights_only=True)` ({type(e).__name__}: {reason}). stfm only "
            "loads plain tensors (no pickled code): re-save the weights as a state dict with "
            "`torch.save(model.state_dict(), path)` or as safetensors."
        )
        raise ValueError(msg) from e
    return _unwrap(obj)
