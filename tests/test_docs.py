"""The documentation builds with warnings as errors, and the API pages show the docstrings (not raw directives)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("sphinx", reason="the docs dependencies are in the `test` extra (`./dev.sh setup`)")
pytest.importorskip("myst_nb", reason="the docs dependencies are in the `test` extra (`./dev.sh setup`)")


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html", "-d", str(out / "doctrees"),
           str(ROOT / "docs"), str(out / "html")]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env={**__import__("os").environ, "STFM_DOCS_OFFLINE": "1"},
                         check=False)  # fmt: skip
    warnings = [ln for ln in res.stderr.splitlines() if "WARNING" in ln or "ERROR:" in ln]
    assert res.returncode == 0, "docs build failed (-W):\n" + "\n".join(warnings[:20] or res.stderr.splitlines()[-20:])
    return out / "html"


def _text(page: Path) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page.read_text()))


@pytest.mark.parametrize(("page", "expected"), [
    ("stfm.pp.extract_features", ["tile_um", "mask", "Sets the following fields", "obsm"]),
    ("stfm.tl.fit_expression", ["method", "n_top_genes"]),
    ("stfm.tl.predict_expression", ["library_size", "layers"]),
    ("stfm.model.MultimodalPredictor", ["k_retrieve", "retrieval_temperature"]),
    ("stfm.io.read_xenium", ["image_mpp"]),
])  # fmt: skip
def test_api_pages_show_the_docstrings(html, page, expected):
    text = _text(html / "generated" / f"{page}.html")
    assert "autofunction" not in text and "autoclass" not in text  # the directive was run, not printed
    for word in expected:
        assert word in text, (page, word)


def test_every_public_function_has_a_page(html):
    import stfm

    for sub in ("pp", "tl", "pl", "io", "datasets", "encoders", "model", "get", "data", "graph", "module", "batch"):
        mod = getattr(stfm, sub)
        for name in mod.__all__:
            if name.startswith("_") or not callable(getattr(mod, name)):
                continue
            assert (html / "generated" / f"stfm.{sub}.{name}.html").is_file(), f"stfm.{sub}.{name} has no API page"


def test_the_gallery_links_every_notebook(html):
    notebooks = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 5
    gallery = (html / "notebooks" / "index.html").read_text()
    for stem in notebooks:
        assert f'href="{stem}.html"' in gallery, f"the gallery does not link {stem}"
        page = html / "notebooks" / f"{stem}.html"
        assert page.is_file(), f"{stem} was not rendered"
        stored = '"image/png"' in (ROOT / "notebooks" / f"{stem}.ipynb").read_text()
        # an executed notebook shows its figures on its page and its first figure as the thumbnail
        assert (html / "_static" / "thumbnails" / f"{stem}.png").is_file() == stored, stem
        if stored:
            assert "<img" in page.read_text(), f"{stem}'s stored figures are not on its page"
