"""Sphinx configuration (myst-nb; notebooks are rendered, not executed, at build time)."""

from __future__ import annotations

import os
import sys
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

project = "stfm"
author = "stfm developers"
copyright = f"{date.today().year}, {author}"
release = "0.2.0"

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx_autodoc_typehints",
    "sphinxcontrib.bibtex",
]
bibtex_bibfiles = ["references.bib"]
bibtex_reference_style = "author_year"
autosummary_generate = True
autodoc_member_order = "groupwise"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
typehints_defaults = "braces"
myst_enable_extensions = ["colon_fence", "dollarmath"]
nb_execution_mode = "off"
# autosummary writes its stubs with the first suffix: reStructuredText, so `.. autofunction::` is parsed
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "**.ipynb_checkpoints"]
html_theme = "sphinx_book_theme"
html_title = "stfm"
_INTERSPHINX = {
    "anndata": "https://anndata.readthedocs.io/en/stable/",
    "scanpy": "https://scanpy.readthedocs.io/en/stable/",
    "squidpy": "https://squidpy.readthedocs.io/en/stable/",
    "spatialdata": "https://spatialdata.scverse.org/en/stable/",
    "scvi": "https://docs.scvi-tools.org/en/stable/",
    "torch": "https://pytorch.org/docs/stable/",
    "python": "https://docs.python.org/3/",
    "numpy": "https://numpy.org/doc/stable/",
    "pandas": "https://pandas.pydata.org/docs/",
}
#: local inventories (docs/_inventories/<name>.inv) are read first, so an offline build cross-links without network;
#: a project with neither a local inventory nor network is left out rather than failing a -W build
_INV = Path(__file__).parent / "_inventories"


def _online(url: str, timeout: float = 3.0) -> bool:
    import urllib.request

    try:
        urllib.request.urlopen(url + "objects.inv", timeout=timeout).close()
    except Exception:
        return False
    return True


intersphinx_mapping = {}
for _name, _url in _INTERSPHINX.items():
    _local = _INV / f"{_name}.inv"
    if _local.is_file():
        intersphinx_mapping[_name] = (_url, str(_local))
    elif os.environ.get("STFM_DOCS_OFFLINE") != "1" and _online(_url):
        intersphinx_mapping[_name] = (_url, None)

# --- notebook gallery -------------------------------------------------------------------------------------------
# notebooks/*.ipynb (with the outputs `notebooks/build_notebooks.py --execute` stored) are copied into
# docs/notebooks/ at every build; each one's first figure becomes its thumbnail on the gallery page.
html_static_path = ["_static"]
_DOCS = Path(__file__).resolve().parent


def _build_gallery() -> None:
    import base64
    import json
    import shutil

    src, dst, thumbs = _DOCS.parent / "notebooks", _DOCS / "notebooks", _DOCS / "_static" / "thumbnails"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.rmtree(thumbs, ignore_errors=True)
    dst.mkdir(parents=True)
    thumbs.mkdir(parents=True)
    cards, names = [], []
    for nb_path in sorted(src.glob("*.ipynb")):
        shutil.copy2(nb_path, dst / nb_path.name)
        nb = json.loads(nb_path.read_text())
        title = next((ln.lstrip("# ").strip() for c in nb["cells"] if c["cell_type"] == "markdown"
                      for ln in "".join(c["source"]).splitlines() if ln.startswith("# ")), nb_path.stem)  # fmt: skip
        png = next((o["data"]["image/png"] for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])
                    if "image/png" in o.get("data", {})), None)  # fmt: skip
        img = ""
        if png is not None:
            (thumbs / f"{nb_path.stem}.png").write_bytes(
                base64.b64decode("".join(png) if isinstance(png, list) else png)
            )
            img = f'<img src="../_static/thumbnails/{nb_path.stem}.png" alt="{title}">'
        else:
            img = '<div class="stfm-nothumb">not executed</div>'
        cards.append(f'<a class="stfm-card" href="{nb_path.stem}.html">{img}<span>{title}</span></a>')
        names.append(nb_path.stem)
    style = (
        "<style>.stfm-gallery{display:flex;flex-wrap:wrap;gap:1rem}.stfm-card{width:15rem;border:1px solid #ddd;"
        "border-radius:6px;padding:.5rem;text-decoration:none}.stfm-card img{width:100%;height:10rem;"
        "object-fit:contain}.stfm-card span{display:block;margin-top:.4rem;font-weight:600}"
        ".stfm-nothumb{height:10rem;display:flex;align-items:center;justify-content:center;color:#888}</style>"
    )
    page = ["# Notebooks", "",
            "Each notebook is a real analysis of her2st, run top to bottom with its outputs stored "
            "(`python notebooks/build_notebooks.py --execute`); the test suite runs every one in a fast mode "
            "(`STFM_NOTEBOOK_FAST=1`). The `.ipynb` files are in the repository's `notebooks/` folder.", "",
            "```{raw} html", style, '<div class="stfm-gallery">', *cards, "</div>", "```", "",
            "```{toctree}", ":hidden:", "", *names, "```", ""]  # fmt: skip
    (dst / "index.md").write_text("\n".join(page))


_build_gallery()
