"""Faults: a writer killed (SIGKILL, SIGTERM) mid-write leaves the old complete target or the new complete one.

Each writer runs in a child process that rewrites one target in a loop (alternating two versions); the test kills
it at a random moment, then reads the target back. SIGTERM removes the temporary folder on its way out; after a
SIGKILL the next write of the same target removes it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import stfm
from stfm._atomic import stale_temporaries

CHILD = textwrap.dedent(
    """
    import sys, numpy as np, stfm, warnings
    warnings.simplefilter("ignore")
    kind, target = sys.argv[1], sys.argv[2]
    cohort = stfm.datasets.synthetic_st(n_sections=2, n_patients=1, grid=(12, 10), n_genes=40)
    if kind == "model":
        objs = [stfm.tl.fit_expression(cohort, method="ridge", embedding_key="X_synthetic", n_top_genes=n) for n in (20, 30)]
        write = lambda o: o.save(target, overwrite=True)
    elif kind == "zarr":
        objs = []
        for tag in "AB":
            s = stfm.datasets.synthetic_st(n_sections=2, n_patients=1, grid=(12, 10), n_genes=40, as_spatialdata=True)
            s.tables["table"].uns["version"] = tag
            objs.append(s)
        write = lambda o: stfm.io.write_zarr(o, target, overwrite=True)
    elif kind == "h5ad":
        objs = []
        for tag in "AB":
            a = cohort.copy(); a.uns["version"] = tag; objs.append(a)
        write = lambda o: stfm.io.write_h5ad(o, target)
    elif kind == "cache":
        from pathlib import Path
        from stfm.pp._cache import cache_write
        objs = [np.full((2000, 256), v, np.float32) for v in (1.0, 2.0)]
        write = lambda o: cache_write(Path(target), o)
    write(objs[0])
    print("ready", flush=True)
    i = 1
    while True:
        write(objs[i % 2]); i += 1
    """
)


def _read(kind, target):
    """The version found at ``target`` (0 or 1); raises if it is missing or unreadable."""
    if kind == "model":
        return {20: 0, 30: 1}[len(stfm.model.load_model(target).genes)]
    if kind == "zarr":
        import spatialdata as sd

        return "AB".index(str(sd.read_zarr(target).tables["table"].uns["version"]))
    if kind == "h5ad":
        import anndata as ad

        return "AB".index(str(ad.read_h5ad(target).uns["version"]))
    from stfm.pp._cache import cache_read

    arr = cache_read(target, (2000, 256))
    assert arr is not None, "the cache entry is unreadable"
    return {1.0: 0, 2.0: 1}[float(arr[0, 0])]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["model", "zarr", "h5ad", "cache"])
def test_killed_writers_leave_a_complete_target(kind, tmp_path):
    target = tmp_path / {"model": "m", "zarr": "s.zarr", "h5ad": "a.h5ad", "cache": "f.npz"}[kind]
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = np.random.default_rng(0)
    for sig in (signal.SIGKILL, signal.SIGTERM, signal.SIGKILL):
        proc = subprocess.Popen([sys.executable, str(script), kind, str(target)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"})  # fmt: skip
        for line in proc.stdout:  # libraries may print first
            if line.strip() == "ready":
                break
        else:
            pytest.fail(f"the {kind} writer never finished its first write (exit {proc.wait()})")
        time.sleep(float(rng.uniform(0.05, 0.6)))  # somewhere inside a later write
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == -sig
        assert _read(kind, target) in (0, 1)  # old complete or new complete, never half
        if sig == signal.SIGTERM:
            assert stale_temporaries(target) == [], "SIGTERM must clean the temporary up"
    # after a SIGKILL a temporary may be left behind: the next write of the target removes it
    if kind == "model":
        stfm.tl.fit_expression(stfm.datasets.synthetic_st(n_sections=2, n_patients=1, n_genes=40), method="ridge",
                               embedding_key="X_synthetic", n_top_genes=20).save(target, overwrite=True)  # fmt: skip
    elif kind == "h5ad":
        stfm.io.write_h5ad(stfm.datasets.synthetic_st(n_sections=1, n_patients=1, n_genes=5), target)
    elif kind == "zarr":
        stfm.io.write_zarr(stfm.datasets.synthetic_st(n_sections=1, n_patients=1, n_genes=5, as_spatialdata=True),
                           target, overwrite=True)  # fmt: skip
    else:
        from stfm.pp._cache import cache_write

        cache_write(target, np.zeros((2000, 256), np.float32))
    assert stale_temporaries(target) == []


@pytest.mark.parametrize("moment", ["old_renamed_aside", "old_being_deleted"])
def test_sigterm_inside_the_swap_keeps_exactly_one_complete_version(moment, tmp_path, monkeypatch):
    """The random kills above rarely land inside the swap itself; this one puts SIGTERM exactly there."""
    import shutil
    from pathlib import Path

    from stfm import _atomic

    target = tmp_path / "m"
    target.mkdir()
    (target / "v").write_text("old")

    class Stopped(Exception):
        pass

    def previous(signum, frame):  # the program's own SIGTERM handler, called after stfm's cleanup
        raise Stopped

    fired = []
    real_rename, real_rmtree = Path.rename, shutil.rmtree

    def rename(self, dest):
        out = real_rename(self, dest)
        if moment == "old_renamed_aside" and ".stfm-old-" in str(dest) and not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # old version aside, new one not yet in place
        return out

    def rmtree(path, *args, **kwargs):
        if moment == "old_being_deleted" and ".stfm-old-" in str(path) and Path(path).exists() and not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # new version in place, old one not yet deleted
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(_atomic.shutil, "rmtree", rmtree)
    before = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(Stopped), _atomic.atomic_dir(target, overwrite=True) as tmp:
            (tmp / "v").write_text("new")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert fired, "the signal was never sent: the swap no longer renames the old version aside"
    assert (target / "v").read_text() == ("old" if moment == "old_renamed_aside" else "new")
    assert stale_temporaries(target) == [], "SIGTERM inside the swap must leave no temporary behind"


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_sigterm_right_after_the_temporary_is_created_removes_it(kind, tmp_path, monkeypatch):
    """SIGTERM the moment the temporary exists removes it. The random kills above once landed between
    ``tempfile.mkdtemp``'s return and the temporary's registration for cleanup, and left it behind."""
    from stfm import _atomic

    class Stopped(Exception):
        pass

    def previous(signum, frame):
        raise Stopped

    fired = []
    name = "mkdir" if kind == "dir" else "open"
    real = getattr(os, name)

    def create(path, *args, **kwargs):
        out = real(path, *args, **kwargs)
        if ".stfm-tmp-" in str(path) and not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGTERM)  # the temporary exists; nothing else has run yet
        return out

    monkeypatch.setattr(_atomic.os, name, create)
    target = tmp_path / ("m" if kind == "dir" else "f.npz")
    writer = _atomic.atomic_dir(target) if kind == "dir" else _atomic.atomic_file(target)
    before = signal.signal(signal.SIGTERM, previous)
    try:
        with pytest.raises(Stopped), writer:
            pytest.fail("the signal should have stopped the write before it began")
    finally:
        signal.signal(signal.SIGTERM, before)
    assert fired, f"the temporary was not created through os.{name}"
    assert stale_temporaries(target) == [], "SIGTERM right after the temporary was created left it behind"
    assert not target.exists()


def test_sigterm_waits_for_writer_threads_before_the_temporary_is_gone(tmp_path):
    """zarr writes on its own I/O thread (dask on worker threads): a chunk in flight when SIGTERM arrives recreates
    the temporary after the handler removed it, unless the handler waits for the writers to go quiet."""
    import threading
    from pathlib import Path

    from stfm import _atomic

    class Stopped(Exception):
        pass

    def previous(signum, frame):
        raise Stopped

    target = tmp_path / "s.zarr"
    stop = threading.Event()
    started = threading.Event()

    def writer(tmp: Path) -> None:  # like a store's put: create the parent, then write the chunk
        i = 0
        started.set()
        t_end = time.monotonic() + 0.4
        while time.monotonic() < t_end and not stop.is_set():
            chunk = tmp / "x" / "c" / str(i)
            chunk.parent.mkdir(parents=True, exist_ok=True)
            chunk.write_bytes(b"0" * 64)
            i += 1
            time.sleep(0.002)

    before = signal.signal(signal.SIGTERM, previous)
    thread = None
    try:
        with pytest.raises(Stopped), _atomic.atomic_dir(target) as tmp:
            thread = threading.Thread(target=writer, args=(tmp,), daemon=True)
            thread.start()
            started.wait()
            os.kill(os.getpid(), signal.SIGTERM)
        thread.join()  # the writer finishes what it had in flight (a process would be dead by now)
        assert stale_temporaries(target) == [], "a writer thread recreated the temporary after SIGTERM removed it"
        assert not target.exists()
    finally:
        stop.set()
        if thread is not None:
            thread.join()
        signal.signal(signal.SIGTERM, before)
