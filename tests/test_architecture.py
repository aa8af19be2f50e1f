"""The layers of docs/architecture.md are real: imports point down, no file over 600 lines, methods live in the registry."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "stfm"

#: rank of each subpackage: a module may import only from packages of lower rank (or its own package).
#: ``datasets`` sits above ``io`` (it fetches, then calls the reader); the private root modules are the floor.
RANK = {
    "_root": 0,
    "io": 1,
    "datasets": 2,
    "data": 2,
    "encoders": 3,
    "graph": 3,
    "pp": 5,
    "module": 6,
    "model": 7,
    "tl": 8,
    "get": 8,
    "pl": 9,
    "batch": 10,
    "_cli": 11,
}
CLI = {"_demo", "__main__"}


def _package(module: Path, root: Path = SRC) -> str:
    rel = module.relative_to(root)
    if len(rel.parts) == 1:
        return "_cli" if rel.stem in CLI else "_root"
    return rel.parts[0]


def _imports(module: Path, root: Path = SRC) -> list[tuple[int, str]]:
    """(line, target package) of every stfm-internal import, top-level or inside functions."""
    tree = ast.parse(module.read_text(), filename=str(module))
    pkg_parts = module.relative_to(root).parts[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = list(pkg_parts[: len(pkg_parts) - (node.level - 1)]) if node.level > 1 else list(pkg_parts)
            target = [*base, *(node.module.split(".") if node.module else [])]
            if not target:  # `from . import x` in a top-level module, or `from .. import x`
                names = [a.name for a in node.names]
                target = [names[0]] if names else []
            head = target[0] if target else "_root"
            if (root / f"{head}.py").exists() or head in CLI:
                head = "_cli" if head in CLI else "_root"
            out.append((node.lineno, head))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stfm."):
            out.append((node.lineno, node.module.split(".")[1]))
    return out


def _violations(module: Path, root: Path = SRC) -> list[str]:
    own = _package(module, root)
    if module == root / "__init__.py":  # the package facade lazily exposes every subpackage
        return []
    bad = []
    for line, target in _imports(module, root):
        if target == own or target not in RANK:
            continue
        if RANK[target] >= RANK[own] and not (own == "_root" and target == "_root"):
            bad.append(f"line {line}: {own} → {target}")
    return bad


MODULES = sorted(SRC.rglob("*.py"))


@pytest.mark.parametrize("module", MODULES, ids=[str(m.relative_to(SRC)) for m in MODULES])
def test_imports_point_down(module):
    bad = _violations(module)
    assert not bad, f"{module.relative_to(SRC)} imports up the layers of docs/architecture.md: {bad}"


def test_the_checker_sees_upward_imports(tmp_path):
    """The rule is not vacuous: relative and absolute upward imports, at top level or in a function, are flagged."""
    root = tmp_path / "stfm"
    (root / "model").mkdir(parents=True)
    (root / "io").mkdir()
    (root / "_settings.py").write_text("")
    (root / "model" / "_x.py").write_text(
        "from ..module._zinb import ExpressionModule\nfrom .._settings import settings\n"
        "def f():\n    from ..tl._expression import fit_expression\n    import stfm\n"
    )
    (root / "io" / "_y.py").write_text("from stfm.datasets._her2st import fetch_section\n")
    assert _violations(root / "model" / "_x.py", root) == ["line 4: model → tl"]
    assert _violations(root / "io" / "_y.py", root) == ["line 1: io → datasets"]


@pytest.mark.parametrize("module", MODULES, ids=[str(m.relative_to(SRC)) for m in MODULES])
def test_no_file_over_600_lines(module):
    n = len(module.read_text().splitlines())
    assert n <= 600, f"{module.relative_to(SRC)} has {n} lines; split it by job (docs/architecture.md)"


def test_tools_name_no_method():
    """tl/, get/ and evaluation read the registry: no method key or model class is hard-wired there."""
    import re

    offenders = []
    for folder in ("tl", "get"):
        for f in (SRC / folder).glob("*.py"):
            text = f.read_text()
            for pat in (r"is_ridge", r"Literal\[\"zinb\"", r"RidgeProbe", r"ExpressionPredictor\(", r"RetrievalPredictor"):
                if re.search(pat, text):
                    offenders.append(f"{f.name}: {pat}")
    assert not offenders, offenders


def test_io_does_not_import_datasets():
    for f in (SRC / "io").glob("*.py"):
        assert all(t != "datasets" for _, t in _imports(f)), f"{f.name} imports stfm.datasets (a cycle)"
