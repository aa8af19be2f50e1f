"""glibc allocator tuning for CPU inference (see ``stfm.settings.tune_malloc`` and ``docs/features.md``).

With glibc's defaults, buffers above the dynamic mmap threshold (activations of a batch of tiles) are
returned to the OS when freed and faulted in again on the next batch; on CPU this costs about as much as
the convolutions themselves. Raising ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` keeps them in the heap
for reuse, the same as setting ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` before start-up.
The setting is process-wide and lasts until the process exits; the price is that memory freed after
inference is kept by the process (reused by later allocations) instead of being returned to the OS.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

__all__ = ["malloc_tuned", "tune_malloc"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: 1 GiB: larger than any per-batch buffer of a tile encoder, so those stay in the heap.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = (1 << 31) - 1

_STATE: dict[str, bool] = {"tuned": False}


def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    for name in ("libc.so.6", ctypes.util.find_library("c")):  # find_library forks ldconfig: only as a fallback
        if not name:
            continue
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def tune_malloc() -> bool:
    """Raise glibc's mmap and trim thresholds once per process; return whether the tuning is active."""
    if _STATE["tuned"]:
        return True
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    _STATE["tuned"] = ok
    return ok


def malloc_tuned() -> bool:
    """Whether :func:`tune_malloc` has been applied in this process."""
    return _STATE["tuned"]
