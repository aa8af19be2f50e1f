"""Package-level behaviour: light import, settings, the download path, the demo."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
from conftest import DATA_DIR, HAS_HER2ST, needs_her2st

import stfm


def test_import_is_light():
    code = (
        "import sys, time; t = time.perf_counter(); import stfm; dt = time.perf_counter() - t; "
        "heavy = [m for m in ('torch', 'scvi', 'timm', 'spatialdata', 'scanpy', 'squidpy', 'lightning') if m in sys.modules]; "
        "print(heavy, dt)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "[]", f"`import stfm` pulled in {out}"
    # subpackages are lazy too
    code2 = "import sys, stfm.tl, stfm.pp, stfm.pl, stfm.model, stfm.encoders, stfm.graph; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_tile_batch_size_depends_on_the_device_until_batch_size_is_set():
    import torch

    s = stfm._settings.Settings()
    assert s.batch_size == 64
    assert s.tile_batch_size(torch.device("cpu")) == 16 and s.tile_batch_size(torch.device("cuda")) == 64
    s.batch_size = 48  # set by the user: used on every device
    assert s.tile_batch_size(torch.device("cpu")) == 48 and s.tile_batch_size("cuda") == 48
    s.batch_size = None
    assert s.batch_size == 64 and s.tile_batch_size("cpu") == 16


def test_settings_validate_and_reset(monkeypatch):
    s = stfm._settings.Settings()
    with pytest.raises(ValueError, match=r"Expected `batch_size` to be a positive integer, found 0"):
        s.batch_size = 0
    with pytest.raises(ValueError, match=r"Expected `num_workers` to be >= 0"):
        s.num_workers = -1
    with pytest.raises(ValueError, match=r"Expected `verbosity` to be one of"):
        s.verbosity = "loud"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("STFM_DATA_DIR", "/some/mirror")
    s.reset()
    assert s.offline is True and str(s.data_dir) == "/some/mirror"
    assert s.resolve_device("cpu").type == "cpu"


def test_cpu_workers_do_not_oversubscribe(monkeypatch):
    import torch

    s = stfm._settings.Settings()
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert s.resolve_num_workers("cpu") == 0  # both cores already run the model's threads
    assert s.resolve_num_workers("cuda") == 1  # an accelerator leaves the CPU to the tile workers
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert s.resolve_num_workers("cpu") == 4
    s.num_workers = 3
    assert s.resolve_num_workers("cpu") == 3 and s.resolve_num_workers("cuda") == 3


def test_unknown_attribute():
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        stfm.tl.nope  # noqa: B018


@pytest.fixture
def http_mirror(tmp_path):
    """A local HTTP server laid out like the public repository, so the real download path runs."""
    root = tmp_path / "served"
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@needs_her2st
def test_download_path_checksums(http_mirror, tmp_path, monkeypatch):
    from stfm.datasets import _her2st

    root, base = http_mirror
    for rel in ("data/ST-cnts/C1.tsv.gz", "data/ST-spotfiles/C1_selection.tsv"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA_DIR / "her2st" / rel, root / rel)
    monkeypatch.setattr(_her2st, "_url", lambda rel: f"{base}/{rel}")
    monkeypatch.setattr(stfm.settings, "_data_dir", None)
    monkeypatch.setattr(stfm.settings, "_cache_dir", tmp_path / "cache")
    monkeypatch.setattr(stfm.settings, "offline", False)
    adata = stfm.datasets.her2st("C1", image=False, labels=False, clusters=False)
    assert adata.n_obs == 176
    cached = tmp_path / "cache" / "her2st" / "data" / "ST-cnts" / "C1.tsv.gz"
    assert cached.is_file()
    # a tampered download is refused and not kept
    cached.unlink()
    with open(root / "data/ST-cnts/C1.tsv.gz", "ab") as fh:
        fh.write(b"tampered")
    with pytest.raises(ValueError, match=r"Checksum mismatch downloading .*C1.tsv.gz"):
        stfm.datasets.her2st("C1", image=False, labels=False, clusters=False)
    assert not cached.exists()
    # a copy already in the cache is verified again on every read
    shutil.copy(DATA_DIR / "her2st" / "data/ST-cnts/C1.tsv.gz", cached)
    stfm.datasets.her2st("C1", image=False, labels=False, clusters=False)
    with open(cached, "ab") as fh:
        fh.write(b"bit rot")
    with pytest.raises(ValueError, match=r"Checksum mismatch for .*cache.*C1.tsv.gz.*delete it"):
        stfm.datasets.her2st("C1", image=False, labels=False, clusters=False)


def test_unpinned_files_are_never_fetched(monkeypatch, tmp_path):
    """Files with no pinned checksum (the E–H labels and clusters among them) are not downloaded at all."""
    import pooch

    from stfm.datasets import _her2st

    def no_network(*a, **k):
        msg = "pooch.retrieve was called for an unpinned file"
        raise AssertionError(msg)

    monkeypatch.setattr(pooch, "retrieve", no_network)
    monkeypatch.setattr(stfm.settings, "_data_dir", None)
    monkeypatch.setattr(stfm.settings, "_cache_dir", tmp_path)
    monkeypatch.setattr(stfm.settings, "offline", False)
    for rel in ("data/ST-pat/lbl/E1_labeled_coordinates.tsv", "res/ST-cluster/lbl/G2-cluster-annotation.tsv.gz"):
        assert rel not in _her2st.HER2ST_SHA256
        with pytest.raises(FileNotFoundError, match=r"no pinned checksum.*does not fetch it"):
            _her2st._fetch(rel)


@pytest.mark.skipif(not HAS_HER2ST, reason="her2st mirror not found (set STFM_DATA_DIR)")
def test_demo_end_to_end(tmp_path):
    """The README's main job, with `--fast` (few epochs): every step runs and every output is written."""
    import pandas as pd
    import spatialdata as sd

    # the session's cache (conftest): features the in-process tests computed are read, not recomputed
    env = {**os.environ, "STFM_DATA_DIR": str(DATA_DIR), "STFM_CACHE_DIR": str(stfm.settings.cache_dir), "MPLBACKEND": "Agg"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "stfm", "demo", "--fast", "--out", str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "out"
    assert f"outputs written to {out}" in proc.stdout
    sdata = sd.read_zarr(out / "B4.zarr")
    table, predicted = sdata.tables["table"], sdata.tables["predicted"]
    assert table.n_obs == 283 and "B4_full_image" in sdata.images and "B4_tumor" in sdata.shapes
    assert table.obsm["X_efficientnet_lite0"].shape == (283, 1280)
    assert set(table.obs["cancer_region"].cat.categories) == {"tumor", "boundary", "non-tumor"}
    assert {"ERBB2", "KRT19", "MGP"} <= set(predicted.var_names)
    assert predicted.layers["predicted"].shape == predicted.shape
    metrics = pd.read_csv(out / "B4_expression_metrics.csv")
    assert set(metrics["method"]) == set(stfm.model.list_methods().index) >= {"ridge", "zinb", "retrieval"}
    assert metrics["pearson_all"].notna().all() and metrics["pearson_all_composition"].notna().all()
    # not garbage: ridge is closed-form (`--fast` does not shorten it) and scores 0.59 raw on B4 in the benchmark
    ridge = metrics.set_index("method").loc["ridge"]
    assert ridge["pearson_all"] > 0.45 and ridge["pearson_all_composition"] > 0.1, ridge
    for png in ("overview", "expression", "cancer"):
        assert (out / f"B4_{png}.png").stat().st_size > 30_000
    print(f"demo took {time.perf_counter() - t0:.0f} s")
