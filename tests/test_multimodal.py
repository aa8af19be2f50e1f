"""multimodal (after SPAM): both stages' epochs on validation sections, aligned retrieval, what the gene branch may
read (never the spot's own section, never a validation section, never the query's expression), errors."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch

import stfm
from stfm._rows import materialize

EMB = "X_synthetic"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def cohort():
    return stfm.datasets.synthetic_st(n_sections=5, n_patients=3, n_genes=24, grid=(10, 9), seed=7)


@pytest.fixture(scope="module")
def model(cohort):
    train = cohort[cohort.obs["section"] != "S4"].copy()
    return stfm.tl.fit_expression(train, method="multimodal", embedding_key=EMB, n_top_genes=16, max_epochs=12,
                                  pretrain_epochs=30, pretrain_patience=5, seed=0, n_hidden=64, n_latent=32)  # fmt: skip


def test_each_stage_keeps_its_best_validation_epoch(model):
    assert model.validation_sections_ == ["S3"]
    pre = model.history_pretrain_["elbo_validation"].to_numpy().ravel().astype(float)
    assert model.best_epoch_pretrain_ == int(np.argmin(pre))  # stage 1: lowest validation InfoNCE
    assert pre[model.best_epoch_pretrain_] < pre[0]  # and the pretraining learned something
    hist = model.validation_history_
    assert model.best_epoch_ == int(hist.loc[hist["score"].idxmax(), "epoch"])  # stage 2: best validation score


def test_pretraining_aligns_image_and_expression(model):
    """After stage 1 the frozen image encoder finds a spot's own expression among the bank's far above chance."""
    m = model.module
    rows = np.flatnonzero(m.bank_section.numpy() == model.bank_sections_.index("S0"))
    q = m.retrieval_keys(m.bank_x[rows], "aligned")
    sims = q @ m.bank_z[rows].T
    rank = (sims > sims.diag().unsqueeze(1)).sum(1).float()  # rank of the true partner among the section's spots
    assert float(rank.median()) < 0.1 * len(rows), float(rank.median())
    # the retrieved expression tracks the spot's own composition better than a shuffled pairing does
    ref, _ = model._retrieve(model._training_arrays()["embedding"][rows], ["S1", "S2"])
    comp = m.bank_composition_rows().weighted(ref.rows, ref.weights)
    own = m.bank_composition(torch.as_tensor(rows)).numpy()
    r = np.mean([np.corrcoef(comp[:, j], own[:, j])[0, 1] for j in range(own.shape[1]) if own[:, j].std() > 0])
    assert r > 0.3, r


def _section_mass(model, graph_retrieved) -> np.ndarray:
    """Fraction of the retrieval weight that fell on each bank section (columns of the indicator bank)."""
    dense = materialize({"r": graph_retrieved}, model._graph_sources(counts=False))["r"]
    return dense[:, : len(model.bank_sections_)].mean(0).numpy()


def test_the_gene_branch_never_reads_its_own_or_a_validation_section(model):
    """Bank expression replaced by section indicators: the retrieved vector is then the weight on each section."""
    m = model.module
    saved = (m.bank_comp_indptr, m.bank_comp_indices, m.bank_comp_values)
    m.bank_comp_indptr = torch.arange(m.bank_size + 1)  # one entry per bank row: 1 in its section's column
    m.bank_comp_indices = m.bank_section.clone()
    m.bank_comp_values = torch.ones(m.bank_size)
    code = model.bank_sections_.index
    try:
        groups = model._section_labels()
        train_idx, val_idx = np.flatnonzero(groups != "S3"), np.flatnonzero(groups == "S3")
        model._on_train_start(train_idx, val_idx)  # as training does: S3 validates, S0–S2 train
        try:
            secs = list(dict.fromkeys(groups[train_idx]))
            graphs = model._training_graphs(train_idx)
            assert len(graphs) == len(secs) == 3
            for s, g in zip(secs, graphs, strict=True):
                mass = _section_mass(model, g["retrieved"])
                assert np.isclose(mass.sum(), 1.0)
                assert mass[code(s)] == 0, (s, mass)  # never the spot's own section
                assert mass[code("S3")] == 0, (s, mass)  # never a validation section
            (val,) = model._validation_graphs(val_idx)
            mass = _section_mass(model, val["retrieved"])
            assert mass[code("S3")] == 0 and np.isclose(mass.sum(), 1.0)
        finally:
            model._on_train_end(train_idx, val_idx, None)
        # after training every bank section may serve a query, except a namesake of the query's own section
        xy = np.c_[np.arange(30) % 6, np.arange(30) // 6].astype(float)
        for name in ("S1", "new"):
            g = model._query_graph(m.bank_x[:30].numpy(), xy, name, np.ones(30, bool), {})
            mass = _section_mass(model, g["retrieved"])
            assert np.isclose(mass.sum(), 1.0)
            if name == "S1":
                assert mass[code("S1")] == 0
            else:
                assert mass[code("S3")] > 0  # the validation section joins the bank for new sections
    finally:
        m.bank_comp_indptr, m.bank_comp_indices, m.bank_comp_values = saved


def _he_only(adata):
    out = ad.AnnData(obs=adata.obs[["section", "patient"]].copy())
    out.obsm[EMB] = np.asarray(adata.obsm[EMB]).copy()
    out.obsm["spatial"] = np.asarray(adata.obsm["spatial"]).copy()
    out.uns["stfm"] = {EMB: dict(adata.uns["stfm"][EMB])}
    return out


def test_the_query_expression_is_never_an_input(model, cohort):
    test = cohort[cohort.obs["section"] == "S4"].copy()
    with_counts = model.predict(test, library_size="predicted")
    scrambled = test.copy()
    scrambled.X = np.random.default_rng(0).permutation(np.asarray(scrambled.X.todense() if hasattr(scrambled.X, "todense") else scrambled.X))
    assert np.array_equal(with_counts, model.predict(scrambled, library_size="predicted"))
    assert np.array_equal(with_counts, model.predict(_he_only(test), library_size="predicted"))
    truth = np.asarray(test[:, model.genes].X.todense() if hasattr(test.X, "todense") else test[:, model.genes].X)
    scores = stfm.model.validation_scores(with_counts, truth, np.zeros(test.n_obs))
    assert scores["raw"] > 0.3, scores


def test_bad_input(cohort):
    one = cohort[cohort.obs["section"] == "S0"].copy()
    with pytest.raises(ValueError, match="at least two training sections"):
        stfm.tl.fit_expression(one, method="multimodal", embedding_key=EMB, n_top_genes=8, max_epochs=1, pretrain_epochs=1)
    with pytest.raises(ValueError, match="retrieval"):
        stfm.tl.fit_expression(cohort, method="multimodal", embedding_key=EMB, n_top_genes=8, retrieval="nearest")
    no_xy = cohort.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises((KeyError, ValueError), match="spatial"):
        stfm.tl.fit_expression(no_xy, method="multimodal", embedding_key=EMB, n_top_genes=8, max_epochs=1)
