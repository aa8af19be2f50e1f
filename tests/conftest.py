"""Shared fixtures: real her2st sections and Visium fixtures from ``STFM_DATA_DIR`` (``../shared/data`` in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

import stfm

REPO = Path(__file__).resolve().parents[1]
_DATA_DIR = os.environ.get("STFM_DATA_DIR") or (str(REPO.parent / "shared" / "data") if (REPO.parent / "shared" / "data").is_dir() else None)
DATA_DIR = Path(_DATA_DIR) if _DATA_DIR else None
HAS_HER2ST = DATA_DIR is not None and (DATA_DIR / "her2st" / "data" / "ST-cnts" / "B4.tsv.gz").is_file()
HAS_VISIUM = DATA_DIR is not None and (DATA_DIR / "visium_tiny" / "spaceranger_1.0.0").is_dir()

needs_her2st = pytest.mark.skipif(
    not HAS_HER2ST, reason="her2st mirror not found: set STFM_DATA_DIR to a folder holding her2st/ (CI uses ../shared/data)"
)
needs_visium = pytest.mark.skipif(
    not HAS_VISIUM, reason="Visium fixtures not found: set STFM_DATA_DIR to a folder holding visium_tiny/"
)
#: Sections with a published full-resolution H&E image.
IMAGE_SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")
#: Sections with pathologist labels in the mirror (one per patient A–D).
LABELED_SECTIONS = ("A1", "B1", "C1", "D1")


@pytest.fixture(autouse=True, scope="session")
def _stfm_settings(tmp_path_factory):
    """Point stfm at the local mirror, a throw-away cache, offline, and no progress bars."""
    stfm.settings.reset()
    if DATA_DIR is not None:
        stfm.settings.data_dir = DATA_DIR
    stfm.settings.cache_dir = tmp_path_factory.mktemp("stfm_cache")
    stfm.settings.offline = True
    stfm.settings.show_progress_bar = False
    yield
    stfm.settings.reset()


_SECTION_CACHE: dict = {}


def load_section(section: str, **kwargs):
    """A her2st section read once per session; callers get their own copy."""
    key = (section, tuple(sorted(kwargs.items())))
    if key not in _SECTION_CACHE:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            _SECTION_CACHE[key] = stfm.datasets.her2st(section, **kwargs)
    return _SECTION_CACHE[key].copy()


@pytest.fixture
def b4():
    """her2st B4 (283 spots, full-resolution H&E) as AnnData."""
    if not HAS_HER2ST:
        pytest.skip("her2st mirror not found (set STFM_DATA_DIR)")
    return load_section("B4")


_FEATURES: dict = {}


def sections_with_features(sections=IMAGE_SECTIONS, model: str = "efficientnet_lite0"):
    """her2st sections with ``obsm['X_<model>']`` from :func:`stfm.pp.extract_features` (computed once per session)."""
    if not HAS_HER2ST:
        pytest.skip("her2st mirror not found (set STFM_DATA_DIR)")
    out = {}
    for s in sections:
        if (s, model) not in _FEATURES:
            adata = load_section(s)
            stfm.pp.extract_features(adata, model, show_progress_bar=False)
            _FEATURES[s, model] = adata
        out[s] = _FEATURES[s, model].copy()
    return out


@pytest.fixture
def her2st_features():
    """B4 and C2–C6 with ``obsm['X_efficientnet_lite0']`` (real ImageNet weights), one copy per test."""
    return sections_with_features()


# Property-based tests (hypothesis): a bounded, deterministic profile so the fuzz suite fits the CI budget;
# `HYPOTHESIS_PROFILE=deep` explores more.
try:
    from hypothesis import HealthCheck
    from hypothesis import settings as _hyp_settings

    _hyp_settings.register_profile(
        "ci", max_examples=40, deadline=None, derandomize=True, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )  # fmt: skip
    _hyp_settings.register_profile("deep", max_examples=1000, deadline=None)
    _hyp_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass
