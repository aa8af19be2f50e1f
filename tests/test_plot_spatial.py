"""``stfm.pl.spatial_pred`` smoke tests on her2st B4 (AnnData via squidpy, SpatialData via spatialdata-plot)."""

from __future__ import annotations

import anndata as ad
import matplotlib.pyplot as plt
import numpy as np
import pytest
from conftest import needs_her2st, sections_with_features

import stfm

EMB = "X_efficientnet_lite0"
MARKERS = ["ERBB2", "KRT19", "MGP"]

pytestmark = [
    needs_her2st,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.fixture(scope="module")
def predicted_b4():
    """B4 with ridge predictions (trained on C2 + C3) for the marker genes + 20 variable genes."""
    feats = sections_with_features(("B4", "C2", "C3"))
    from stfm.tl._expression import concat_sections, select_genes

    genes = list(dict.fromkeys([*MARKERS, *select_genes(concat_sections([feats["C2"], feats["C3"]]), 20)]))
    model = stfm.tl.fit_expression([feats["C2"], feats["C3"]], method="ridge", embedding_key=EMB, genes=genes)
    b4 = feats["B4"][:, genes].copy()
    stfm.tl.predict_expression(b4, model, library_size=1e4)
    return b4, model


def _png(fig, path):
    fig.savefig(path, dpi=60)
    plt.close(fig)
    assert path.stat().st_size > 10_000
    img = plt.imread(path)
    assert img.std() > 0.01  # not a blank canvas


def test_spatial_pred_anndata_compare_png(predicted_b4, tmp_path):
    b4, _ = predicted_b4
    fig = stfm.pl.spatial_pred(b4, MARKERS, return_fig=True)
    axes = [a for a in fig.axes if a.get_title()]
    assert [a.get_title() for a in axes] == [
        f"{g} {kind}" for g in MARKERS for kind in ("predicted", "measured (normalised)")
    ]
    # one shared colour scale per gene: the predicted and measured panels of a gene have the same limits
    for g in range(len(MARKERS)):
        lims = [
            c.norm.vmax
            for a in axes[2 * g : 2 * g + 2]
            for c in a.collections
            if c.norm is not None and c.get_array() is not None
        ]
        assert len(set(np.round(lims, 6))) == 1
    _png(fig, tmp_path / "b4_compare.png")


def test_spatial_pred_anndata_predicted_only(predicted_b4, tmp_path):
    b4, _ = predicted_b4
    fig = stfm.pl.spatial_pred(b4, "ERBB2", compare=False, vmax="p95", cmap="magma", return_fig=True)
    assert [a.get_title() for a in fig.axes if a.get_title()] == ["ERBB2 predicted"]
    _png(fig, tmp_path / "b4_pred.png")


def test_spatial_pred_spatialdata_png(predicted_b4, tmp_path):
    b4, _ = predicted_b4
    sdata = stfm.io.to_spatialdata(b4)
    fig = stfm.pl.spatial_pred(sdata, ["ERBB2", "KRT19"], return_fig=True)
    titles = [a.get_title() for a in fig.axes if a.get_title()]
    assert titles[:2] == ["ERBB2 predicted", "ERBB2 measured (normalised)"]
    _png(fig, tmp_path / "b4_sdata.png")


def test_spatial_pred_he_only_warns_and_plots_predictions(predicted_b4, tmp_path):
    b4, model = predicted_b4
    q = ad.AnnData(obs=b4.obs.copy(), obsm={EMB: b4.obsm[EMB].copy(), "spatial": b4.obsm["spatial"].copy()})
    q.uns["spatial"] = b4.uns["spatial"]
    stfm.tl.predict_expression(q, model)
    with pytest.warns(UserWarning, match="no measured expression"):
        fig = stfm.pl.spatial_pred(q, "MGP", return_fig=True)
    _png(fig, tmp_path / "b4_he_only.png")


def test_spatial_pred_errors(predicted_b4):
    b4, _ = predicted_b4
    with pytest.raises(KeyError, match=r"Genes \['NOPE'\] are not in `layers\['predicted'\]`; available var_names"):
        stfm.pl.spatial_pred(b4, "NOPE")
    with pytest.raises(KeyError, match=r"Run `stfm.tl.predict_expression"):
        stfm.pl.spatial_pred(b4, "ERBB2", layer="missing")
    with pytest.raises(ValueError, match="percentile like 'p99'"):
        stfm.pl.spatial_pred(b4, "ERBB2", vmax="99")
