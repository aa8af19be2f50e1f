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
