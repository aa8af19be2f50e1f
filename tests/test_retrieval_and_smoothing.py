"""Retrieval (after STco / BLEEP) and the neighbour smoothing every method shares, on synthetic data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import stfm
from stfm.model import RetrievalPredictor

EMB = "X_synthetic"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def cohort():
    return stfm.datasets.synthetic_st(n_sections=4, n_patients=2, n_genes=25, grid=(10, 9), seed=3)


@pytest.fixture(scope="module")
def retrieval(cohort):
    train = cohort[cohort.obs["section"].isin(["S0", "S1", "S2"])].copy()
    return stfm.tl.fit_expression(train, method="retrieval", embedding_key=EMB, n_top_genes=20, max_epochs=15,
                                  k_candidates=(5, 20), seed=0)  # fmt: skip


def test_validation_never_retrieves_validation_spots(cohort, monkeypatch):
    """While k and the weighting are chosen, the bank holds the training rows only; afterwards every spot."""
    seen = {}
    original = RetrievalPredictor._on_train_end

    def spy(self, train_idx, val_idx, val_arrays):
        seen["bank"] = self.module.bank_size
        seen["train"], seen["val"] = len(train_idx), len(val_idx)
        original(self, train_idx, val_idx, val_arrays)

    monkeypatch.setattr(RetrievalPredictor, "_on_train_end", spy)
    train = cohort[cohort.obs["section"].isin(["S0", "S1", "S2"])].copy()
    model = stfm.tl.fit_expression(train, method="retrieval", embedding_key=EMB, n_top_genes=10, max_epochs=2)
    assert seen["val"] > 0 and seen["bank"] == seen["train"] == train.n_obs - seen["val"]
    assert model.module.bank_size == train.n_obs and model.validation_sections_ == ["S2"]


def test_k_and_weighting_are_the_best_on_validation(retrieval):
    scores = retrieval.retrieval_scores_
    assert set(scores) == {"5|inverse_square", "5|softmax", "20|inverse_square", "20|softmax"}
    best = max(scores, key=scores.get)
    assert f"{retrieval.k_}|{retrieval.weighting_}" == best
    assert retrieval.module.k == retrieval.k_ and retrieval.module.weighting == retrieval.weighting_


def test_prediction_is_the_weighted_mean_of_retrieved_spots(retrieval, cohort):
    """Recompute one spot by hand: top-k bank spots by cosine of the towers, weights, log-composition average."""
    module = retrieval.module.eval()
    q = cohort[cohort.obs["section"] == "S3"].copy()
    pred, std = retrieval.predict(q, library_size="predicted", smooth=0, return_std=True)
    with torch.no_grad():
        z = module.encode_image(torch.as_tensor(q.obsm[EMB][:1]))
        every = torch.arange(module.bank_size)
        bank = module.encode_expression(module.bank_composition(every), module.bank_position)
    sims = (z @ bank.T).numpy().ravel()
    top = np.argsort(-sims)[: retrieval.k_]
    if retrieval.weighting_ == "inverse_square":
        w = 1 / np.maximum(2 - 2 * sims[top], 1e-6)
    else:
        w = np.exp(sims[top] / float(module.log_temperature.exp()))
    w = w / w.sum()
    logcomp = module.bank_composition(torch.as_tensor(top)).numpy()
    comp = np.expm1((w[:, None] * logcomp).sum(0))
    lib = np.exp((w * module.bank_loglib.numpy()[top]).sum())
    np.testing.assert_allclose(pred[0], comp / comp.sum() * lib, rtol=1e-3)
    frac = np.expm1(logcomp) / 1e4
    spread = np.sqrt((w[:, None] * (frac - (w[:, None] * frac).sum(0)) ** 2).sum(0))
    np.testing.assert_allclose(std[0], spread / (w[:, None] * frac).sum(0) * pred[0], rtol=1e-3)


def test_retrieval_learns_the_structure(retrieval, cohort):
    """On held-out patient-section S3, the composition tracks the truth far better than the training mean does."""
    from stfm.model._training import validation_scores

    q = cohort[cohort.obs["section"] == "S3"].copy()
    genes = retrieval.genes
    x = q[:, genes].X.toarray()
    pred = retrieval.predict(q, library_size="predicted")
    scores = validation_scores(pred, x)
    assert scores["composition"] > 0.4 and scores["raw"] > 0.4, scores


@pytest.mark.parametrize("method", ["ridge", "zinb", "retrieval"])
def test_smoothing_is_chosen_on_validation_and_applied(method, cohort):
    train = cohort[cohort.obs["section"].isin(["S0", "S1", "S2"])].copy()
    kw = {} if method == "ridge" else {"max_epochs": 5}
    model = stfm.tl.fit_expression(train, method=method, embedding_key=EMB, n_top_genes=15, smoothing=(0, 4, 8), **kw)
    scores = model.smoothing_scores_
    assert set(scores) == {"0", "4", "8"}
    assert model.smoothing_ == int(max(scores, key=lambda k: scores[k]["mean"]))
    q = cohort[cohort.obs["section"] == "S3"].copy()
    raw = model.predict(q, library_size="predicted", smooth=0)
    smoothed = model.predict(q, library_size="predicted", smooth=4)
    # by hand: average composition and log depth over each spot and its 4 nearest spots
    nbr = stfm.graph.knn_indices(q.obsm["spatial"], 4)
    lib = raw.sum(1)
    comp = raw / lib[:, None]
    sc = (comp + comp[nbr].sum(1)) / 5
    ll = (np.log(lib) + np.log(lib)[nbr].sum(1)) / 5
    np.testing.assert_allclose(smoothed, sc / sc.sum(1, keepdims=True) * np.exp(ll)[:, None], rtol=1e-4)
    # neighbours never cross sections: S1 laid on S3's grid, in one query, leaves S3's smoothed values alone
    both = stfm.datasets.synthetic_st(n_sections=4, n_patients=2, n_genes=25, grid=(10, 9), seed=3)
    both = both[both.obs["section"].isin(["S1", "S3"])].copy()
    s3 = (both.obs["section"] == "S3").to_numpy()
    np.testing.assert_allclose(both.obsm["spatial"][s3], both.obsm["spatial"][~s3], atol=25)  # the same grid (pitch 200)
    np.testing.assert_allclose(model.predict(both, library_size="predicted", smooth=4)[s3], smoothed, rtol=1e-5)
    default = model.predict(q, library_size="predicted")
    np.testing.assert_array_equal(default, model.predict(q, library_size="predicted", smooth=model.smoothing_))
    # fixed, and off
    fixed = stfm.tl.fit_expression(train, method=method, embedding_key=EMB, n_top_genes=15, smoothing=8, **kw)
    assert fixed.smoothing_ == 8 and fixed.smoothing_scores_ == {}
    no_xy = q.copy()
    del no_xy.obsm["spatial"]
    with pytest.raises(KeyError, match=r"needs spot coordinates.*smooth=0"):
        fixed.predict(no_xy)
    assert fixed.predict(no_xy, smooth=0).shape == raw.shape
