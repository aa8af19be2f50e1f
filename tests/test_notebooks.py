"""Every notebook in notebooks/ runs top to bottom in its fast mode (``STFM_NOTEBOOK_FAST=1``) on the real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import DATA_DIR

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

nbformat = pytest.importorskip("nbformat", reason="notebook tools are in the `test` extra (`./dev.sh setup`)")
nbclient = pytest.importorskip("nbclient", reason="notebook tools are in the `test` extra (`./dev.sh setup`)")

pytestmark = pytest.mark.skipif(DATA_DIR is None, reason="the notebooks read her2st: set STFM_DATA_DIR to the mirror")


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5, [p.name for p in NOTEBOOKS]


@pytest.fixture(scope="module")
def notebook_cache() -> str:
    """The session's throw-away cache (conftest): a section embedded by the in-process tests or one notebook is
    read by the next (entries are keyed by image content and weights, and checked on every read)."""
    import stfm

    return str(stfm.settings.cache_dir)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, notebook_cache):
    from nbclient.exceptions import CellExecutionError

    monkeypatch.setenv("STFM_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("STFM_CACHE_DIR", notebook_cache)
    monkeypatch.setenv("STFM_DATA_DIR", str(DATA_DIR))  # the kernel is a subprocess: it sees only the environment
    monkeypatch.setenv("STFM_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    try:
        client.execute()
    except CellExecutionError as err:
        failed = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code" and any(
            o.get("output_type") == "error" for o in c.get("outputs", []))), None)  # fmt: skip
        src = nb.cells[failed].source if failed is not None else ""
        pytest.fail(f"{path.name}: cell {failed} failed:\n{src}\n\n{str(err)[-2000:]}")
    assert os.environ["STFM_NOTEBOOK_FAST"] == "1"
