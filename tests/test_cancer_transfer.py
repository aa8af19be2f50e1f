"""Cancer maps, second pass: the model's own expression embedding, threshold transfer, histology-only input."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from scipy import sparse

import stfm
from stfm.model._calibration import (
    Calibration,
    best_threshold,
    compare_strategies,
    expected_calibration_error,
    prior_shift,
)

POS = ("invasive cancer", "cancer in situ")
FAST = {"max_epochs": 8, "batch_size": 64, "scales": (1.0, 2.0, 4.0),
        "model_kwargs": {"d_model": 16, "n_layers": 1, "n_heads": 2, "dropout": 0.1}}  # fmt: skip


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


# -- calibration and transfer (pure NumPy) ----------------------------------------------------------------
def test_best_threshold_is_the_brute_force_optimum():
    rng = np.random.default_rng(0)
    p = np.round(rng.random(200), 2)  # ties included
    y = (rng.random(200) < p).astype(int)
    for criterion in ("f1", "youden"):
        t, val = best_threshold(p, y, criterion)
        best = -1.0
        for c in np.unique(p):
            pred = p >= c
            tp, fp = np.sum(pred & (y == 1)), np.sum(pred & (y == 0))
            fn, tn = np.sum(~pred & (y == 1)), np.sum(~pred & (y == 0))
            v = 2 * tp / (2 * tp + fp + fn) if criterion == "f1" else tp / (tp + fn) + tn / (tn + fp) - 1
            best = max(best, v)
        assert val == pytest.approx(best)
        pred = p >= t
        tp, fp = np.sum(pred & (y == 1)), np.sum(pred & (y == 0))
        fn, tn = np.sum(~pred & (y == 1)), np.sum(~pred & (y == 0))
        got = 2 * tp / (2 * tp + fp + fn) if criterion == "f1" else tp / (tp + fn) + tn / (tn + fp) - 1
        assert got == pytest.approx(best)  # the stored threshold reproduces the optimum it reports


def test_expected_calibration_error_by_hand():
    p = np.array([0.1, 0.1, 0.9, 0.9])
    y = np.array([0, 1, 1, 1])
    # bin 0.1: |0.1 − 0.5| · 1/2; bin 0.9: |0.9 − 1| · 1/2
    assert expected_calibration_error(p, y) == pytest.approx(0.25)
    assert expected_calibration_error(np.array([0.0, 1.0]), np.array([0, 1])) == pytest.approx(0.0)


def _section(rng, n, prior, offset=0.0):
    """Logits of a well-separated two-Gaussian section (posterior σ(3x) at prior 0.5) plus a section offset."""
    y = (rng.random(n) < prior).astype(float)
    x = rng.normal(np.where(y == 1, 1.5, -1.5), 1.0)
    return x + offset, y


def test_prior_shift_recovers_the_section_prior():
    rng = np.random.default_rng(1)
    for prior in (0.15, 0.5, 0.85):
        x, _ = _section(rng, 4000, prior)
        adj, est = prior_shift(_sigmoid(3 * x), train_prior=0.5)
        assert est == pytest.approx(prior, abs=0.03)
        # the re-weighted posterior is the Bayes posterior under the section's prior
        np.testing.assert_allclose(adj, _sigmoid(3 * x + np.log(est / (1 - est))), atol=1e-6)


def test_prior_estimate_stays_within_the_validation_range():
    # scores that are all low under the validation prior run EM to the clip value (every spot ~0) ...
    p = np.full(300, 0.05)
    _, free = prior_shift(p, train_prior=0.5)
    assert free < 0.01
    # ... so the calibration bounds it by the tumour fractions its validation sections span
    adj, bounded = prior_shift(p, train_prior=0.5, bounds=(0.2, 0.9))
    assert bounded == pytest.approx(0.2) and adj.min() > 0.01
    rng = np.random.default_rng(4)
    (x0, y0), (x1, y1) = _section(rng, 400, 0.25), _section(rng, 400, 0.75)
    cal, _ = Calibration.fit(np.r_[x0, x1], np.r_[y0, y1], np.r_[[0] * 400, [1] * 400], strategy="prior")
    assert cal.prior_range == pytest.approx((y0.mean(), y1.mean()))
    assert Calibration.from_dict(cal.to_dict()).prior_range == pytest.approx(cal.prior_range)


def test_each_transfer_does_what_it_says():
    rng = np.random.default_rng(2)
    (x0, y0), (x1, y1) = _section(rng, 300, 0.3), _section(rng, 300, 0.7)
    lo, la, gr = np.r_[x0, x1], np.r_[y0, y1], np.r_[[0] * 300, [1] * 300]
    platt, _ = Calibration.fit(lo, la, gr, strategy="platt")
    np.testing.assert_allclose(platt.apply(x0), _sigmoid(platt.a * x0 + platt.b))
    # 'section': a constant offset of a whole section's logits changes nothing
    sec, _ = Calibration.fit(lo, la, gr, strategy="section")
    np.testing.assert_allclose(sec.apply(x0 + 4.0), sec.apply(x0), atol=1e-12)
    assert not np.allclose(platt.apply(x0 + 4.0), platt.apply(x0))
    # 'quantile': every section calls the stored fraction of its spots
    qua, _ = Calibration.fit(lo, la, gr, strategy="quantile")
    for x in (x0, x1 + 2.0):
        assert np.mean(qua.apply(x) >= qua.threshold) == pytest.approx(qua.fraction, abs=0.01)
    # 'prior': a section with more tumour gets higher scores for the same logits
    pri, _ = Calibration.fit(lo, la, gr, strategy="prior")
    rich, poor = _section(rng, 600, 0.9)[0], _section(rng, 600, 0.1)[0]
    same = np.array([0.0])
    assert pri.apply(np.r_[rich, same])[-1] > pri.apply(np.r_[poor, same])[-1]
    # a round trip through the stored dict keeps every transfer
    for cal in (platt, sec, qua, pri):
        np.testing.assert_allclose(Calibration.from_dict(cal.to_dict()).apply(x1, None), cal.apply(x1, None))


def test_nested_comparison_prefers_the_transfer_the_shift_calls_for():
    rng = np.random.default_rng(3)
    # sections differ by a logit offset (a batch effect), same tumour fraction: standardising per section wins
    offs = {f"S{i}": _section(rng, 400, 0.4, offset=o) for i, o in enumerate((-3.0, 0.0, 3.0, 1.5))}
    table = compare_strategies({k: v[0] for k, v in offs.items()}, {k: v[1] for k, v in offs.items()})
    assert table["section"]["mean_f1"] > table["platt"]["mean_f1"] + 0.05
    # sections differ in tumour fraction, no offset: the prior-shift correction beats a fixed fraction
    pri = {f"S{i}": _section(rng, 400, p) for i, p in enumerate((0.1, 0.5, 0.9, 0.3))}
    table = compare_strategies({k: v[0] for k, v in pri.items()}, {k: v[1] for k, v in pri.items()})
    assert table["prior"]["mean_f1"] > table["quantile"]["mean_f1"] + 0.05
    assert set(table["prior"]["sections"]) == set(pri)
    # a held-out section's threshold is fitted without its labels
    flipped = {k: (v[1] if k != "S0" else 1 - v[1]) for k, v in pri.items()}
    again = compare_strategies({k: v[0] for k, v in pri.items()}, flipped)
    for s in table:
        assert again[s]["sections"]["S0"]["threshold"] == table[s]["sections"]["S0"]["threshold"]
    assert {"f1", "specificity", "ece", "threshold"} <= set(table["prior"]["sections"]["S0"])


# -- one call from counts -------------------------------------------------------------------------------
def counts_section(name: str, seed: int, *, n_side: int = 12, n_genes: int = 60, depth: float = 1.0, tumour_frac: float = 3.2):
    """A square-grid section with raw counts: 10 marker genes up in a round tumour, the rest background."""
    rng = np.random.default_rng(seed)
    xx, yy = np.meshgrid(np.arange(n_side), np.arange(n_side))
    n = n_side * n_side
    xy = np.c_[xx.ravel(), yy.ravel()] * 290.6 + rng.normal(0, 5, (n, 2))
    c = rng.uniform(4, n_side - 4, 2)
    tumour = (xx.ravel() - c[0]) ** 2 + (yy.ravel() - c[1]) ** 2 < (n_side / tumour_frac) ** 2
    base = rng.gamma(2.0, 1.0, n_genes)
    rate = np.tile(base, (n, 1))
    rate[:, :10] *= np.where(tumour[:, None], 4.0, 1.0)
    rate[:, 10:20] *= np.where(tumour[:, None], 0.4, 1.0)
    lib = rng.lognormal(0, 0.3, n)[:, None] * depth
    x = rng.poisson(rate * lib).astype(np.float32)
    labels = np.where(tumour, "invasive cancer", rng.choice(["connective tissue", "adipose tissue"], n))
    a = AnnData(sparse.csr_matrix(x), obs=pd.DataFrame({"section": name, "pathologist_label": pd.Categorical(labels)},
                                                     index=[f"{name}_{i}" for i in range(n)]))  # fmt: skip
    a.var_names = [f"g{i}" for i in range(n_genes)]
    a.obsm["spatial"] = xy
    return a


@pytest.fixture(scope="module")
def ref():
    return {f"R{i}": counts_section(f"R{i}", i, depth=(0.5, 1.0, 2.0)[i]) for i in range(3)}


@pytest.fixture(scope="module")
def one_call(ref):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = stfm.tl.fit_cancer_model(ref, seed=0, **FAST)
    torch.set_num_threads(n)
    return model


def _auc(y, s):
    from sklearn.metrics import roc_auc_score

    return roc_auc_score(y, s)


def test_one_call_maps_a_section_never_seen_at_fit_time(one_call, tmp_path):
    model = one_call
    assert model.embedder_ is not None and model.fit_params_["expression"] == "stored PCA"
    assert len(model.embedder_genes) == 60 and model.embedder.n_comps == 16
    # the threshold transfer was chosen by the nested comparison and its calibration error is reported
    assert model.calibration_["strategy"] in model.validation_["threshold_transfer"]
    assert 0 <= model.calibration_["ece_validation"] <= 1
    new = counts_section("NEW", 11, depth=3.0)  # made after the fit, another depth, no embedding in obsm
    assert not new.obsm.keys() - {"spatial"}
    stfm.tl.detect_cancer_regions(new, model)
    y = new.obs["pathologist_label"].isin(POS).to_numpy()
    s = new.obs["cancer_region_score"].to_numpy()
    assert _auc(y, s) > 0.9
    assert new.uns["stfm"]["cancer_region"]["expression_key"] == "stored embedding of X"
    # save / load keeps the embedding, so a loaded model maps the section identically
    model.save(tmp_path / "m")
    again = counts_section("NEW", 11, depth=3.0)
    stfm.tl.detect_cancer_regions(again, tmp_path / "m")
    np.testing.assert_allclose(again.obs["cancer_region_score"], new.obs["cancer_region_score"], atol=1e-6)
    # query labels are never read: shuffling them changes nothing
    shuffled = counts_section("NEW", 11, depth=3.0)
    shuffled.obs["pathologist_label"] = pd.Categorical(np.random.default_rng(0).permutation(shuffled.obs["pathologist_label"].to_numpy()))
    stfm.tl.detect_cancer_regions(shuffled, model)
    np.testing.assert_array_equal(shuffled.obs["cancer_region_score"], new.obs["cancer_region_score"])


def test_histology_only_section_goes_through_the_predicted_layer(one_call):
    measured = counts_section("Q", 12)
    stfm.tl.detect_cancer_regions(measured, one_call)
    # an H&E-only section: no counts, expression predicted (here: the measured values stand in for a prediction)
    he = AnnData(obs=measured.obs[["section"]].copy(), var=pd.DataFrame(index=measured.var_names))
    he.obsm["spatial"] = measured.obsm["spatial"].copy()
    he.layers["predicted"] = measured.X.toarray() * 0.37  # another scale: the embedding normalises per spot
    stfm.tl.detect_cancer_regions(he, one_call, layer="predicted")
    np.testing.assert_allclose(he.obs["cancer_region_score"], measured.obs["cancer_region_score"], atol=1e-5)
    assert he.uns["stfm"]["cancer_region"]["expression_key"] == "stored embedding of layers['predicted']"
    with pytest.raises(ValueError, match="no counts in `X` and no `layer`"):
        stfm.tl.detect_cancer_regions(he.copy(), one_call)
    with pytest.raises(KeyError, match="layers\\['predicted'\\]"):
        stfm.tl.detect_cancer_regions(measured.copy(), one_call, layer="predicted")
    # another embedding kind cannot stand in for the stored one
    other = measured.copy()
    other.obsm["X_scvi_expr"] = np.zeros((other.n_obs, 16), np.float32)
    with pytest.raises(ValueError, match="embeds expression itself"):
        stfm.tl.detect_cancer_regions(other, one_call, expr_rep="X_scvi_expr")


def test_stored_embedding_is_standardised_within_each_section(one_call):
    a = counts_section("A", 21)
    b = counts_section("B", 22, depth=4.0)
    import anndata as ad

    both = ad.concat([a, b])
    z = one_call.embed(both, section_key="section")
    for sec in ("A", "B"):
        m = (both.obs["section"] == sec).to_numpy()
        np.testing.assert_allclose(z[m].mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(z[m].std(0), 1, atol=1e-3)


def test_too_few_shared_genes_says_how_many_and_which(one_call):
    q = counts_section("Q", 13)[:, 30:].copy()  # 30 of the 60 genes
    with pytest.raises(ValueError, match=r"shares 30 of the 60 genes .*at least 48 required.*Missing: g0, g1"):
        stfm.tl.detect_cancer_regions(q, one_call)
    # a few missing genes are tolerated (they take the reference mean)
    ok = counts_section("Q", 13)[:, 5:].copy()
    stfm.tl.detect_cancer_regions(ok, one_call)
    assert np.isfinite(ok.obs["cancer_region_score"]).all()


def test_embedding_kind_mismatch_is_refused(ref):
    from test_cancer import synth_section

    secs = {k: synth_section(k, i) for i, k in enumerate(("S0", "S1"))}
    for s in secs.values():
        s.uns["stfm"] = {"X_expr": {"function": "expression_embedding", "method": "scvi"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = stfm.tl.fit_cancer_model(secs, use_rep=None, expr_rep="X_expr", seed=0, **{**FAST, "max_epochs": 2})
    assert model.embedding_kinds_ == {"X_expr": "expression_embedding:scvi"}
    q = synth_section("S3", 3)
    q.uns["stfm"] = {"X_expr": {"function": "expression_embedding", "method": "pca"}}
    with pytest.raises(ValueError, match=r"made by 'expression_embedding:scvi'.*made by 'expression_embedding:pca'"):
        stfm.tl.detect_cancer_regions(q, model)
    q.uns["stfm"]["X_expr"]["method"] = "scvi"
    stfm.tl.detect_cancer_regions(q, model)


def test_low_held_out_auc_warns_with_the_numbers(ref):
    rng = np.random.default_rng(5)
    noisy = {}
    for k, a in ref.items():
        b = a.copy()
        b.obs["pathologist_label"] = pd.Categorical(rng.permutation(b.obs["pathologist_label"].to_numpy()))
        noisy[k] = b
    with pytest.warns(UserWarning, match=r"Held-out AUC below 0.6 on reference section\(s\) R\d: 0\.\d\d"):
        model = stfm.tl.fit_cancer_model(noisy, seed=0, **{**FAST, "max_epochs": 2})
    low = [s for s, r in model.validation_["sections"].items() if r["auc"] < 0.6]
    assert low


def test_reference_without_counts_or_bad_transfer_is_refused(ref):
    bare = {k: AnnData(obs=a.obs.copy(), obsm={"spatial": a.obsm["spatial"]}) for k, a in ref.items()}
    with pytest.raises(ValueError, match="has no counts in `X`"):
        stfm.tl.fit_cancer_model(bare, **FAST)
    with pytest.raises(ValueError, match="threshold_transfer"):
        stfm.tl.fit_cancer_model(ref, threshold_transfer="magic", **FAST)
