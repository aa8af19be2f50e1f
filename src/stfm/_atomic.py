"""Atomic writes: a target is either its old complete version or its new complete version, never half of one.

Writers stage into a hidden temporary sibling (``.<name>.stfm-tmp-*``) and move it into place; an existing target
is first renamed aside (``.<name>.stfm-old-*``) and deleted only once the new one is in. SIGTERM / SIGINT during a
write remove the temporary (then the signal is handled as before); a SIGKILL cannot be caught, so the next write
of the same target removes the stale temporaries first. Used by model saves, ``stfm.io.write_zarr`` /
``stfm.io.write_h5ad`` and the feature cache.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_dir", "atomic_file", "check_writable", "replace_dir", "stale_temporaries"]


_ACTIVE: set[Path] = set()
_ASIDE: dict[Path, Path] = {}  # old version renamed aside -> the target it belongs to, while a swap is under way
_LOCK = threading.RLock()  # re-entrant: the signal handler runs on the main thread, possibly inside a locked block
_PREVIOUS: dict[int, Any] = {}
_QUIESCE_S = 5.0  # longest wait for other writer threads to go quiet after SIGTERM / SIGINT


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def _cleanup_handler(signum: int, frame: Any) -> None:
    with _LOCK:
        active = list(_ACTIVE)
        # Other threads may still be finishing a write they started (zarr's I/O loop, dask workers) and recreate the
        # temporary after it is removed; this thread is the one that starts new work, so remove until the
        # temporaries stay gone (bounded: a write still running after the deadline leaves one for the next write).
        deadline = time.monotonic() + _QUIESCE_S
        quiet = 0
        while active and quiet < 2 and time.monotonic() < deadline:
            for tmp in active:
                _remove(tmp)
            time.sleep(0.05)  # lets a writer thread finish (or fail) what it had in flight
            quiet = 0 if any(os.path.lexists(t) for t in active) else quiet + 1
        _ACTIVE.clear()
        for aside, target in list(_ASIDE.items()):  # interrupted inside a swap: keep exactly one complete version
            if target.exists():
                shutil.rmtree(aside, ignore_errors=True)
            elif aside.exists():
                aside.rename(target)
        _ASIDE.clear()
    prev = _PREVIOUS.get(signum)
    if callable(prev):
        prev(signum, frame)
    else:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


@contextlib.contextmanager
def _signals_cleanup() -> Iterator[None]:
    """Remove active temporary folders on SIGTERM / SIGINT (main thread only), then re-raise the signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        prev = signal.getsignal(sig)
        if prev is not _cleanup_handler:
            _PREVIOUS[sig] = prev
            signal.signal(sig, _cleanup_handler)
            installed[sig] = prev
    try:
        yield
    finally:
        for sig, prev in installed.items():
            signal.signal(sig, prev)


def _new_temporary(parent: Path, target: Path, *, directory: bool) -> Path:
    """Create a fresh temporary sibling of ``target``, registered for signal cleanup *before* it exists.

    ``tempfile.mkdtemp`` / ``mkstemp`` return only after the path exists, so a SIGTERM landing between their return
    and the registration left the temporary behind; here the name is registered first, then created exclusively.
    """
    suffix = "" if directory else target.suffix
    for _ in range(100):
        tmp = parent / f".{target.name}.stfm-tmp-{secrets.token_hex(6)}{suffix}"
        with _LOCK:
            _ACTIVE.add(tmp)
        try:
            if directory:
                tmp.mkdir(mode=0o700)  # exclusive: FileExistsError if taken
            else:
                os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except BaseException as err:
            with _LOCK:
                _ACTIVE.discard(tmp)
            if isinstance(err, FileExistsError):  # another writer's temporary: not ours to remove, try another name
                continue
            raise
        return tmp
    msg = f"Could not create a temporary beside {str(target)!r}: 100 names were taken. Remove stale `.{target.name}.stfm-tmp-*` entries."
    raise FileExistsError(msg)


def stale_temporaries(target: Path) -> list[Path]:
    """Temporary siblings left behind by an interrupted write of ``target``."""
    prefix = f".{target.name}.stfm-tmp-"
    old = f".{target.name}.stfm-old-"
    if not target.parent.is_dir():
        return []
    return [p for p in target.parent.iterdir() if p.name.startswith((prefix, old))]


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``target`` (old renamed aside, new moved in, old deleted).

    On any error, or SIGTERM / SIGINT, the temporary folder is removed and ``target`` is left as it was. Stale
    temporaries of the same target from an earlier killed write are removed first.
    """
    target = Path(target)
    if target.exists() and not overwrite:
        msg = f"{str(target)!r} already exists. Pass `overwrite=True` to replace it, or choose another folder."
        raise FileExistsError(msg)
    parent = target.parent if str(target.parent) else Path()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        msg = f"Cannot create the folder {str(parent)!r} to write {target.name!r} into: {err.strerror}."
        raise PermissionError(msg) from err
    if not os.access(parent, os.W_OK):
        msg = f"The folder {str(parent)!r} is not writable; choose another output path."
        raise PermissionError(msg)
    for stale in stale_temporaries(target):
        shutil.rmtree(stale, ignore_errors=True)
    # the handlers are in place before the temporary exists and until it is gone: no window for a default SIGTERM
    with _signals_cleanup():
        tmp = _new_temporary(parent, target, directory=True)
        try:
            yield tmp
            replace_dir(tmp, target)
        finally:
            with _LOCK:
                _ACTIVE.discard(tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``: an existing ``target`` is renamed aside first and deleted only afterwards."""
    aside = None
    if target.exists():
        aside = target.parent / f".{target.name}.stfm-old-{os.getpid()}"
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
        with _LOCK:
            _ASIDE[aside] = target
        target.rename(aside)
    try:
        new.rename(target)
    except OSError:
        if aside is not None:
            aside.rename(target)
        raise
    finally:
        if aside is not None and target.exists():
            shutil.rmtree(aside, ignore_errors=True)
        with _LOCK:
            _ASIDE.pop(aside, None)


def check_writable(target: str | os.PathLike[str]) -> Path:
    """Create ``target``'s parent folder if needed and check it is writable (before any work); return the parent."""
    target = Path(target)
    parent = target.parent if str(target.parent) else Path()
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        msg = f"Cannot create the folder {str(parent)!r} to write {target.name!r} into: {err.strerror}. Choose another output path."
        raise PermissionError(msg) from err
    if not os.access(parent, os.W_OK | os.X_OK):
        msg = f"The folder {str(parent)!r} is not writable; choose another output path for {target.name!r}."
        raise PermissionError(msg)
    return parent


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike[str], *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside ``target``; on success it replaces ``target`` with one ``os.replace``."""
    target = Path(target)
    if target.exists() and not overwrite:
        msg = f"{str(target)!r} already exists. Pass `overwrite=True` to replace it, or choose another path."
        raise FileExistsError(msg)
    parent = check_writable(target)
    for stale in stale_temporaries(target):
        _remove(stale)
    with _signals_cleanup():
        tmp = _new_temporary(parent, target, directory=False)
        try:
            yield tmp
            tmp.replace(target)
        finally:
            with _LOCK:
                _ACTIVE.discard(tmp)
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
