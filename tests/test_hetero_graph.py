"""hetero_graph (after SpaHGC): no target ever reaches its own expression, blocks for large sections, errors."""

from __future__ import annotations

import numpy as np
import pytest

import stfm
from stfm.model import HeteroGraphPredictor

EMB = "X_synthetic"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def cohort():
    return stfm.datasets.synthetic_st(n_sections=5, n_patients=2, n_genes=24, grid=(11, 9), seed=4)


@pytest.fixture(scope="module")
def model(cohort):
    train = cohort[cohort.obs["section"].isin(["S0", "S1", "S2", "S3"])].copy()
    return stfm.tl.fit_expression(train, method="hetero_graph", embedding_key=EMB, n_top_genes=16, max_epochs=8,
                                  n_hidden=64, n_layers=2, seed=0)  # fmt: skip


def test_training_graphs_never_link_a_target_to_its_own_section(model):
    codes = {s: i for i, s in enumerate(model.bank_sections_)}
    assert model.validation_sections_ == ["S3"]
    labels = model._section_labels()
    train_idx = np.flatnonzero(labels != "S3")
    graphs = model._training_graphs(train_idx)
    targets = ["S0", "S1", "S2"]
    assert len(graphs) == 3
    for t, g in zip(targets, graphs, strict=True):
        linked = set(g["ref_section"].numpy().tolist())
        assert codes[t] not in linked and codes["S3"] not in linked  # neither itself nor the validation section
        assert linked == {codes[s] for s in targets if s != t}
        assert g["target_x"].shape[0] == int((labels == t).sum())
    # the validation section is predicted from the training sections only
    model._allowed = targets
    val = model._validation_graphs(np.flatnonzero(labels == "S3"))
    assert set(val[0]["ref_section"].numpy().tolist()) == {codes[s] for s in targets}
    model._allowed = list(model.bank_sections_)


def test_new_sections_use_every_training_section_and_a_namesake_is_excluded(model, cohort):
    q = cohort[cohort.obs["section"] == "S4"].copy()
    arrays = model._query_arrays(q)
    g = model._section_graphs(arrays["embedding"], arrays["coords"], None, [s for s in model._allowed if s != "S4"])[0][1]
    assert set(g["ref_section"].numpy().tolist()) == set(range(4))
    # a query that is (or is named like) a training section never links to it: no expression leaks in
    q2 = cohort[cohort.obs["section"] == "S1"].copy()
    pred_s1 = model.predict(q2, library_size="predicted", smooth=0)
    renamed = q2.copy()
    renamed.obs["section"] = "elsewhere"
    assert not np.allclose(model.predict(renamed, library_size="predicted", smooth=0), pred_s1)


def test_blocks_approximate_the_whole_section(model, cohort):
    q = cohort[cohort.obs["section"] == "S4"].copy()
    whole = model.predict(q, library_size="predicted", smooth=0)
    model.block_size = 30  # 99 spots → several blocks with halos
    try:
        blocked = model.predict(q, library_size="predicted", smooth=0)
    finally:
        model.block_size = 4096
    arrays = model._query_arrays(q)
    assert len(stfm.graph.spatial_blocks(arrays["coords"], 30, 1.0)) > 1
    r = np.corrcoef(np.log1p(whole).ravel(), np.log1p(blocked).ravel())[0, 1]
    assert r > 0.97, r


def test_quality_on_synthetic(model, cohort):
    from stfm.model._training import validation_scores

    q = cohort[cohort.obs["section"] == "S4"].copy()
    x = q[:, model.genes].X.toarray()
    scores = validation_scores(model.predict(q, library_size="predicted"), x)
    assert scores["composition"] > 0.4, scores


def test_sparse_query_warns_and_falls_back_to_knn(model, cohort):
    q = cohort[cohort.obs["section"] == "S4"].copy()
    q.obsm["spatial"] = q.obsm["spatial"].copy()
    q.obsm["spatial"][:3] += np.array([[1e5, 0], [0, 1e5], [1e5, 1e5]])  # three spots far from every other
    with pytest.warns(UserWarning, match=r"3 of 99 spots have no neighbour within the radius.*4 nearest spots instead"):
        pred = model.predict(q)
    assert np.isfinite(pred).all()


def test_errors(model, cohort, tmp_path):
    q = cohort[cohort.obs["section"] == "S4"].copy()
    no_xy = q.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(KeyError, match="spot coordinates are needed for hetero_graph's target–target graph"):
        model.predict(no_xy)
    narrow = q.copy()
    narrow.obsm[EMB] = narrow.obsm[EMB][:, :10]
    with pytest.raises(ValueError, match="10 dimensions but the model was trained on 48"):
        model.predict(narrow)
    big_k = stfm.tl.fit_expression
    one = cohort[cohort.obs["section"].isin(["S0", "S1", "S2"])].copy()
    with pytest.raises(ValueError, match=r"k_reference=200 is larger than reference section"):
        big_k(one, method="hetero_graph", embedding_key=EMB, n_top_genes=8, k_reference=200, max_epochs=1)
    with pytest.raises(ValueError, match="needs at least two training sections"):
        stfm.tl.fit_expression(cohort[cohort.obs["section"] == "S0"].copy(), method="hetero_graph",
                               embedding_key=EMB, n_top_genes=8, max_epochs=1)  # fmt: skip
    counts_free = one.copy()
    counts_free.X = counts_free.X * 0.5
    with pytest.raises(ValueError, match="non-integer values"):
        stfm.tl.fit_expression(counts_free, method="hetero_graph", embedding_key=EMB, n_top_genes=8, max_epochs=1)
    # a saved model without its bank
    from safetensors.torch import load_file, save_file

    model.save(tmp_path / "m")
    state = {k: v for k, v in load_file(str(tmp_path / "m" / "model.safetensors")).items() if not k.startswith("bank_")}
    save_file(state, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(stfm.model.CheckpointError, match="no reference bank"):
        HeteroGraphPredictor.load(tmp_path / "m")
