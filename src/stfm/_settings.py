"""Package-wide settings (``stfm.settings``).

Importing this module never imports torch: the device is resolved lazily when asked for.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

__all__ = ["Settings", "settings"]

_TRUE = {"1", "true", "yes", "on"}


def _env_flag(*names: str) -> bool:
    return any(os.environ.get(n, "").strip().lower() in _TRUE for n in names)


def _default_cache_dir() -> Path:
    if env := os.environ.get("STFM_CACHE_DIR"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "stfm"



#: default inference batch size, and tiles per encoder pass on the CPU (see ``tile_batch_size``)
_DEFAULT_BATCH, _CPU_TILE_BATCH = 64, 16

class Settings:
    """Defaults used by every stfm function whose matching argument is ``None``.

    Attributes are read from the environment when first created:

    ``STFM_DATA_DIR``
        local mirror of public data sets (same layout as the public source), see :attr:`data_dir`.
    ``STFM_CACHE_DIR``
        download and feature cache (default ``~/.cache/stfm``).
    ``HF_HUB_OFFLINE`` / ``STFM_OFFLINE``
        never touch the network, see :attr:`offline`.
    ``STFM_TUNE_MALLOC``
        ``0`` turns off the glibc allocator tuning applied before CPU inference, see :attr:`tune_malloc`.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Restore every setting to its default (re-reading the environment)."""
        self._device: str = os.environ.get("STFM_DEVICE", "auto")
        self.amp: bool | None = None
        self.autocast_dtype: str = "bfloat16"
        self._batch_size: int | None = None  # None: 64, and 16 for tile encoders on the CPU (tile_batch_size)
        self._num_workers: int | None = None
        self.show_progress_bar: bool = True
        self._cache_dir: Path = _default_cache_dir()
        data_dir = os.environ.get("STFM_DATA_DIR")
        self._data_dir: Path | None = Path(data_dir).expanduser() if data_dir else None
        self.offline: bool = _env_flag("HF_HUB_OFFLINE", "STFM_OFFLINE")
        self.verbosity: str = os.environ.get("STFM_VERBOSITY", "warning")
        #: Before CPU inference, raise glibc's mmap/trim thresholds (``mallopt``) so large freed buffers are
        #: reused instead of being returned to the OS and faulted in again every batch (2.2x the tiles/s
        #: on CPU; the process keeps freed memory for reuse). No effect off glibc. See ``docs/features.md``.
        self.tune_malloc: bool = os.environ.get("STFM_TUNE_MALLOC", "1").strip().lower() not in {"0", "false", "no", "off"}

    # -- device -----------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        """Torch device used for inference and training: ``'auto'`` picks CUDA, then MPS, then CPU."""
        return self._device

    @device.setter
    def device(self, value: str) -> None:
        self._device = str(value)

    def resolve_device(self, device: Any = None) -> Any:
        """Return a :class:`torch.device` for ``device`` (``None`` → :attr:`device`)."""
        import torch

        dev = self._device if device is None else device
        if isinstance(dev, torch.device):
            return dev
        if dev == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                return torch.device("mps")
            return torch.device("cpu")
        return torch.device(dev)

    # -- batching ---------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """Default inference batch size (64). Set it to an integer to use it everywhere, ``None`` for the default."""
        return _DEFAULT_BATCH if self._batch_size is None else self._batch_size

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        if value is None:
            self._batch_size = None
            return
        if int(value) < 1:
            msg = f"Expected `batch_size` to be a positive integer, found {value!r}."
            raise ValueError(msg)
        self._batch_size = int(value)

    def tile_batch_size(self, device: Any) -> int:
        """Tiles per encoder forward pass on ``device``: :attr:`batch_size` when it was set, else 64 on an accelerator
        and 16 on the CPU.

        On the CPU a larger batch is no faster (EfficientNet-Lite0, 1,129 tiles of a 40,960² TIFF: 24 s at 16,
        26 s at 32) while the activations it holds grow with it (peak RSS of the features stage 1.4 GB at 16,
        1.7 GB at 32, 2.5 GB at 64, with :attr:`tune_malloc`).
        """
        if self._batch_size is not None:
            return self._batch_size
        return _CPU_TILE_BATCH if getattr(device, "type", str(device)) == "cpu" else _DEFAULT_BATCH

    @property
    def num_workers(self) -> int:
        """DataLoader worker processes for tile reading, for an accelerator (default: one per spare core, at most 4).

        On the CPU the default is :meth:`resolve_num_workers`: only the cores torch's own threads leave free.
        """
        if self._num_workers is not None:
            return self._num_workers
        return max(0, min(4, (os.cpu_count() or 1) - 1))

    def resolve_num_workers(self, device: Any = None) -> int:
        """Workers to use on ``device``: the set value, else a default that does not oversubscribe the CPU.

        On the CPU the model's intra-op threads already use ``torch.get_num_threads()`` cores; a tile worker on top
        of them makes those threads wait for each other (measured on 2 cores: 0.70× the bare forward pass with one
        worker, 0.90× with none). So CPU inference gets ``cpu_count - torch threads`` workers (at most 4), and an
        accelerator gets :attr:`num_workers`.
        """
        if self._num_workers is not None:
            return self._num_workers
        if getattr(device, "type", device) == "cpu":
            import torch

            return max(0, min(4, (os.cpu_count() or 1) - torch.get_num_threads()))
        return self.num_workers

    @num_workers.setter
    def num_workers(self, value: int | None) -> None:
        if value is not None and int(value) < 0:
            msg = f"Expected `num_workers` to be >= 0, found {value!r}."
            raise ValueError(msg)
        self._num_workers = None if value is None else int(value)

    # -- paths ------------------------------------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        """Where downloads and cached features are stored."""
        return self._cache_dir

    @cache_dir.setter
    def cache_dir(self, value: str | os.PathLike[str]) -> None:
        self._cache_dir = Path(value).expanduser()

    @property
    def data_dir(self) -> Path | None:
        """Local mirror of public data sets (``STFM_DATA_DIR``); read before any download."""
        return self._data_dir

    @data_dir.setter
    def data_dir(self, value: str | os.PathLike[str] | None) -> None:
        self._data_dir = None if value is None else Path(value).expanduser()

    # -- logging ----------------------------------------------------------------------------------
    @property
    def verbosity(self) -> str:
        """Log level of the ``stfm`` logger (``'debug'``, ``'info'``, ``'warning'``, ``'error'``)."""
        return self._verbosity

    @verbosity.setter
    def verbosity(self, value: str | int) -> None:
        level = value if isinstance(value, int) else logging.getLevelName(str(value).upper())
        if not isinstance(level, int):
            msg = f"Expected `verbosity` to be one of 'debug', 'info', 'warning', 'error'; found {value!r}."
            raise ValueError(msg)
        logging.getLogger("stfm").setLevel(level)
        self._verbosity = logging.getLevelName(level).lower()

    def __repr__(self) -> str:
        fields = ("device", "amp", "autocast_dtype", "batch_size", "num_workers", "show_progress_bar",
                  "cache_dir", "data_dir", "offline", "verbosity")  # fmt: skip
        body = ", ".join(f"{f}={getattr(self, f)!r}" for f in fields)
        return f"stfm.settings({body})"


settings = Settings()
