"""Cancer-region detection: training, save/load, thresholds without test labels, regions, metrics, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from anndata import AnnData
from conftest import load_section, needs_her2st

import stfm
from stfm.graph import call_regions

POS = ("invasive cancer", "cancer in situ")
FAST = {"max_epochs": 5, "batch_size": 64, "scales": (1.0, 2.0, 4.0), "model_kwargs": {"d_model": 16, "n_layers": 1, "n_heads": 2, "dropout": 0.1}}


def synth_section(name: str, seed: int, *, n_side: int = 11, d_img: int = 12, d_expr: int = 8, shift: float = 0.0) -> AnnData:
    """A square-grid section (ST-like pitch in pixels) with a round tumour; embeddings carry the signal + noise."""
    rng = np.random.default_rng(seed)
    xx, yy = np.meshgrid(np.arange(n_side), np.arange(n_side))
    xy = np.c_[xx.ravel(), yy.ravel()] * 290.6 + rng.normal(0, 5, (n_side * n_side, 2))
    c = rng.uniform(4, n_side - 4, 2)
    tumour = (xx.ravel() - c[0]) ** 2 + (yy.ravel() - c[1]) ** 2 < (n_side / 3.5) ** 2
    labels = np.where(tumour, "invasive cancer", rng.choice(["connective tissue", "adipose tissue"], tumour.size))
    labels[rng.random(tumour.size) < 0.05] = "undetermined"
    w_img, w_expr = np.linspace(1, -1, d_img), np.linspace(-1, 1, d_expr)
    a = AnnData(obs=pd.DataFrame({"section": name, "pathologist_label": pd.Categorical(labels)},
                                 index=[f"{name}_{i}" for i in range(tumour.size)]))  # fmt: skip
    a.obsm["spatial"] = xy
    a.obsm["X_img"] = (rng.normal(size=(tumour.size, d_img)) + 1.2 * tumour[:, None] * w_img).astype(np.float32)
    a.obsm["X_expr"] = (rng.normal(size=(tumour.size, d_expr)) + 1.2 * tumour[:, None] * w_expr + shift).astype(np.float32)
    return a


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models train fastest on one thread (and do not fight other processes for cores)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def synth():
    return {f"S{i}": synth_section(f"S{i}", i, shift=0.2 * i) for i in range(4)}


@pytest.fixture(scope="module")
def fitted(synth):
    ref = {k: synth[k] for k in ("S0", "S1")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return stfm.tl.fit_cancer_model(ref, use_rep="X_img", expr_rep="X_expr", seed=0, **FAST)


def _auc(y, s):
    """AUC by hand: probability a positive outscores a negative (ties count one half)."""
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


# -- training, save / load, reproducibility ------------------------------------------------------------
def test_train_detect_save_load(fitted, synth, tmp_path):
    model = fitted
    # the threshold was fixed on every labelled, not-undetermined spot of the two held-out reference sections
    n_val = sum(int((synth[k].obs["pathologist_label"] != "undetermined").sum()) for k in ("S0", "S1"))
    assert model.calibration_["n_validation"] == n_val and model.calibration_["criterion"] == "f1"
    assert model.calibration_["validation_score"] > 0.5  # held-out F1 above calling every spot tumour (about 0.4)
    assert model.calibration_["method"] == "platt" and model.calibration_["a"] > 0
    assert set(model.validation_["sections"]) == {"S0", "S1"}
    q = synth["S3"].copy()
    stfm.tl.detect_cancer_regions(q, model, label_key="pathologist_label")
    s = q.obs["cancer_region_score"].to_numpy()
    assert q.obs["cancer_region_score"].dtype == np.float32 and s.min() >= 0 and s.max() <= 1
    assert list(q.obs["cancer_region"].cat.categories) == ["tumor", "boundary", "non-tumor"]
    assert len(q.uns["cancer_region_colors"]) == 3
    prov = q.uns["stfm"]["cancer_region"]
    assert prov["function"] == "detect_cancer_regions" and prov["threshold"] == pytest.approx(model.threshold_)
    y = q.obs["pathologist_label"].isin(POS).to_numpy()
    keep = q.obs["pathologist_label"] != "undetermined"
    assert _auc(y[keep].astype(int), s[keep]) > 0.9
    # high-risk = annotated non-cancer (not undetermined) with a score at or above the threshold
    hr = q.obs["cancer_high_risk"].to_numpy()
    expected = (~y) & keep.to_numpy() & (s >= model.threshold_)
    np.testing.assert_array_equal(hr, expected)

    model.save(tmp_path / "clf")
    with pytest.raises(FileExistsError, match="already exists"):
        model.save(tmp_path / "clf")
    loaded = stfm.model.CancerClassifier.load(tmp_path / "clf")
    assert loaded.threshold_ == model.threshold_ and loaded.calibration_ == model.calibration_
    q2 = synth["S3"].copy()
    stfm.tl.detect_cancer_regions(q2, tmp_path / "clf")  # a path works as `model`
    np.testing.assert_allclose(q2.obs["cancer_region_score"], q.obs["cancer_region_score"], atol=1e-6)
    np.testing.assert_array_equal(q2.obs["cancer_region"], q.obs["cancer_region"])
    # only weights and plain values are unpickled
    import torch

    (tmp_path / "bad").mkdir()
    torch.save({"attr_dict": {"x": pd.DataFrame({"a": [1]})}}, tmp_path / "bad" / "model.pt")
    with pytest.raises(stfm.model.CheckpointError, match="does not unpickle model files"):
        stfm.model.CancerClassifier.load(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="No model folder"):
        stfm.model.CancerClassifier.load(tmp_path / "nothing")


def test_either_modality_may_be_missing(fitted, synth):
    full = synth["S3"].copy()
    stfm.tl.detect_cancer_regions(full, fitted)
    y = full.obs["pathologist_label"].isin(POS).to_numpy().astype(int)
    for drop in ("X_img", "X_expr"):
        q = synth["S3"].copy()
        del q.obsm[drop]
        stfm.tl.detect_cancer_regions(q, fitted)
        s = q.obs["cancer_region_score"].to_numpy()
        assert _auc(y, s) > 0.8, drop
        assert q.uns["stfm"]["cancer_region"]["image_key" if drop == "X_img" else "expression_key"] == "None"


def test_reproducible_with_seed(synth):
    ref = {k: synth[k] for k in ("S0", "S1")}
    kw = dict(use_rep="X_img", expr_rep="X_expr", validation="none", seed=7, **FAST)
    m1 = stfm.tl.fit_cancer_model(ref, **kw)
    m2 = stfm.tl.fit_cancer_model(ref, **kw)
    np.testing.assert_array_equal(m1.predict(synth["S3"]), m2.predict(synth["S3"]))
    m3 = stfm.tl.fit_cancer_model(ref, **{**kw, "seed": 8})
    assert not np.array_equal(m1.predict(synth["S3"]), m3.predict(synth["S3"]))


def test_ensemble_members_are_distinct_and_averaged(synth, tmp_path):
    """n_members > 1: distinct networks in one model; the logit is their mean; save/load keeps every member."""
    import torch

    ref = {k: synth[k] for k in ("S0", "S1")}
    kw = {**FAST, "model_kwargs": {**FAST["model_kwargs"], "n_members": 3}}
    model = stfm.tl.fit_cancer_model(ref, use_rep="X_img", expr_rep="X_expr", validation="none", seed=0, **kw)
    assert model.module.n_members == 3 and "ensemble of 3" in model._model_summary_string
    w = [m.head[-1].weight.detach().clone() for m in model.module.members]
    assert not torch.allclose(w[0], w[1]) and not torch.allclose(w[1], w[2])
    q = synth["S3"]
    logits = model.predict_logits(q)
    # the mean of the members' logits, member by member
    tok = model._validate_anndata(model._query_tokens(q))
    dl = model._make_data_loader(adata=tok, batch_size=tok.n_obs, shuffle=False)
    model.module.eval()
    with torch.inference_mode():
        out = model.module.inference(**model.module._get_inference_input(next(iter(dl))))
    np.testing.assert_allclose(out["member_logits"].mean(0).numpy(), logits, rtol=1e-5, atol=1e-5)
    assert out["member_logits"].shape == (3, q.n_obs)
    assert float(out["member_logits"].std(0).mean()) > 1e-3  # the members disagree somewhat
    y = q.obs["pathologist_label"].isin(POS).to_numpy().astype(int)
    assert _auc(y, logits) > 0.85
    model.save(tmp_path / "ens")
    back = stfm.model.CancerClassifier.load(tmp_path / "ens")
    assert back.module.n_members == 3
    np.testing.assert_allclose(back.predict_logits(q), logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="n_members"):
        stfm.tl.fit_cancer_model(ref, expr_rep="X_expr", validation="none", **{**FAST, "model_kwargs": {"n_members": 0}})


def test_threshold_never_reads_test_labels(fitted, synth):
    rng = np.random.default_rng(0)
    q1 = synth["S3"].copy()
    q2 = synth["S3"].copy()
    q2.obs["pathologist_label"] = pd.Categorical(rng.permutation(q2.obs["pathologist_label"].to_numpy()))
    q3 = synth["S3"].copy()
    del q3.obs["pathologist_label"]
    for q in (q1, q2):
        stfm.tl.detect_cancer_regions(q, fitted, label_key="pathologist_label")
    stfm.tl.detect_cancer_regions(q3, fitted)
    for q in (q2, q3):
        np.testing.assert_array_equal(q.obs["cancer_region"], q1.obs["cancer_region"])
        np.testing.assert_array_equal(q.obs["cancer_region_score"], q1.obs["cancer_region_score"])
        assert q.uns["stfm"]["cancer_region"]["threshold"] == q1.uns["stfm"]["cancer_region"]["threshold"]


def test_threshold_transfers_through_calibration(fitted):
    # the stored threshold is on calibrated probabilities: with the Platt transfer raw logits map through σ(a·l + b)
    model = fitted.__class__.__new__(fitted.__class__)
    model.calibration_, model.threshold_ = {**fitted.calibration_, "strategy": "platt"}, fitted.threshold_
    a, b = fitted.calibration_["a"], fitted.calibration_["b"]
    logits = np.array([-3.0, 0.0, 3.0])
    np.testing.assert_allclose(model.calibrate(logits), 1 / (1 + np.exp(-(a * logits + b))), rtol=1e-5)
    # the fitted model's own transfer was chosen by the nested comparison, and is what `calibrate` applies
    chosen = fitted.calibration_["strategy"]
    table = fitted.validation_["threshold_transfer"]
    assert set(table) == {"platt", "section", "prior", "quantile"}
    assert table[chosen]["mean_f1"] == max(r["mean_f1"] for r in table.values())


def test_set_threshold_maximises_f1():
    model_like = stfm.model.CancerClassifier.__new__(stfm.model.CancerClassifier)
    logits = np.array([-2.0, -1.0, 0.5, 1.0, 2.0, 3.0])
    labels = np.array([0, 0, 1, 0, 1, 1])
    t = stfm.model.CancerClassifier.set_threshold(model_like, logits, labels, calibration="none")
    p = 1 / (1 + np.exp(-logits))
    # F1 is best (6/7) when calling the top four; threshold lies between the 4th and 5th highest scores
    assert p[1] < t < p[2]
    with pytest.raises(ValueError, match="both classes"):
        stfm.model.CancerClassifier.set_threshold(model_like, logits, np.ones(6))


# -- regions --------------------------------------------------------------------------------------------
def test_boundary_on_toy_grid():
    xx, yy = np.meshgrid(np.arange(6), np.arange(5))
    xy = np.c_[xx.ravel(), yy.ravel()] * 200.0
    tumour = xx.ravel() <= 1  # two tumour columns on the left
    calls = np.asarray(call_regions(xy, tumour))
    col = xx.ravel()
    assert set(calls[col == 0]) == {"tumor"}
    assert set(calls[col == 1]) == {"boundary"}  # tumour touching non-tumour
    assert set(calls[col == 2]) == {"boundary"}  # non-tumour touching tumour
    assert set(calls[col >= 3]) == {"non-tumor"}
    # 1.5 pitches adds diagonals; same columns here, but an isolated tumour spot is removed by min_spots
    lone = np.zeros(30, dtype=bool)
    lone[col.size - 1] = True
    assert "tumor" not in set(call_regions(xy, lone, min_spots=2)) and "boundary" not in set(call_regions(xy, lone, min_spots=2))
    assert set(np.asarray(call_regions(xy, lone, boundary_distance=1.5))[[22, 23, 28, 29]]) == {"boundary"}
    # sections never touch each other
    groups = np.where(col <= 1, "a", "b")
    assert "boundary" not in set(call_regions(xy, tumour, groups=groups))


# -- evaluation -----------------------------------------------------------------------------------------
def test_evaluate_metrics_by_hand():
    labels = ["invasive cancer", "cancer in situ", "connective tissue", "undetermined", "adipose tissue",
              "invasive cancer", "immune infiltrate", "undetermined"]  # fmt: skip
    score = np.array([0.9, 0.4, 0.6, 0.8, 0.1, 0.7, 0.3, 0.2], dtype=np.float32)
    a = AnnData(obs=pd.DataFrame({"section": ["X"] * 8, "pathologist_label": pd.Categorical(labels),
                                  "cancer_region_score": score}, index=[str(i) for i in range(8)]))  # fmt: skip
    ev = stfm.tl.evaluate_cancer_regions(a, threshold=0.5)
    r = ev.loc["X"]
    # excluded: spots 0,1,2,4,5,6 → y = 1,1,0,0,1,0; calls at 0.5 = 1,0,1,0,1,0
    assert r.n_spots == 6 and r.n_positive == 3
    assert r.auc == pytest.approx(8 / 9)  # pairs (pos > neg): 0.9>all 3, 0.7>all 3, 0.4>0.1,0.3 → 8 of 9
    assert r.ap == pytest.approx((1 + 1 + 3 / 4) / 3)  # ranking 0.9+ 0.7+ 0.6- 0.4+ ...: precisions 1, 1, 3/4
    assert r.f1 == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert r.sensitivity == pytest.approx(2 / 3) and r.specificity == pytest.approx(2 / 3)
    assert ev.attrs["undetermined"] == "excluded" and r.undetermined == "excluded"
    neg = stfm.tl.evaluate_cancer_regions(a, threshold=0.5, undetermined="negative").loc["X"]
    # negative: 8 spots, y adds two negatives with scores 0.8 (called) and 0.2
    assert neg.n_spots == 8 and neg.n_positive == 3
    assert neg.specificity == pytest.approx(3 / 5) and neg.f1 == pytest.approx(4 / (4 + 2 + 1))
    assert neg.undetermined == "negative"


def test_evaluate_uses_stored_threshold(fitted, synth):
    q = synth["S3"].copy()
    stfm.tl.detect_cancer_regions(q, fitted)
    ev = stfm.tl.evaluate_cancer_regions(q)
    assert ev["threshold"].iloc[0] == pytest.approx(fitted.threshold_)
    assert ev.index.tolist() == ["S3"]


# -- outputs: inplace / copy / SpatialData --------------------------------------------------------------
def test_inplace_false_and_copy(fitted, synth):
    q = synth["S3"].copy()
    df = stfm.tl.detect_cancer_regions(q, fitted, inplace=False, key_added="tum")
    assert list(df.columns) == ["tum_score", "tum"] and "tum" not in q.obs and "stfm" not in q.uns
    out = stfm.tl.detect_cancer_regions(q, fitted, copy=True)
    assert "cancer_region" in out.obs and "cancer_region" not in q.obs
    with pytest.raises(ValueError, match="cannot be combined"):
        stfm.tl.detect_cancer_regions(q, fitted, copy=True, inplace=False)


# -- bad input ------------------------------------------------------------------------------------------
def test_bad_input_errors(fitted, synth):
    ref = {k: synth[k].copy() for k in ("S0", "S1")}
    kw = dict(use_rep="X_img", expr_rep="X_expr", validation="none", **FAST)
    with pytest.raises(KeyError, match="Label column `obs\\['celltype'\\]` not found"):
        stfm.tl.fit_cancer_model(ref, label_key="celltype", **kw)
    with pytest.raises(ValueError, match="No positive spots"):
        stfm.tl.fit_cancer_model({k: v[v.obs.pathologist_label != "invasive cancer"].copy() for k, v in ref.items()},
                                 positive=("invasive cancer",), ignore=("undetermined",), **kw)  # fmt: skip
    with pytest.raises(ValueError, match=r"Unknown label names \['tumour'\].*Labels present"):
        stfm.tl.fit_cancer_model(ref, positive=("invasive cancer", "tumour"), **kw)
    with pytest.raises(KeyError, match=r"`obsm\['X_nope'\]` is not in any reference section\. Available obsm keys: \[.*'X_img'"):
        stfm.tl.fit_cancer_model(ref["S0"], **{**kw, "use_rep": "X_nope"})  # one section: its keys are listed
    with pytest.raises(ValueError, match="Neither `use_rep`"):
        stfm.tl.fit_cancer_model(ref, **{**kw, "use_rep": None, "expr_rep": None})
    no_xy = {k: v.copy() for k, v in ref.items()}
    for v in no_xy.values():
        del v.obsm["spatial"]
    with pytest.raises(KeyError, match="spot coordinates are needed"):
        stfm.tl.fit_cancer_model(no_xy, **kw)
    q = synth["S3"].copy()
    del q.obsm["X_img"], q.obsm["X_expr"]
    with pytest.raises(KeyError, match="neither embedding"):
        stfm.tl.detect_cancer_regions(q, fitted)
    q = synth["S3"].copy()
    q.obsm["X_img"] = np.zeros((q.n_obs, 5), np.float32)
    with pytest.raises(ValueError, match="has dimension 5, but the model's image embedding has dimension 12"):
        stfm.tl.detect_cancer_regions(q, fitted)
    q = synth["S3"].copy()
    del q.obsm["spatial"]
    with pytest.raises(KeyError, match="spot coordinates are needed"):
        stfm.tl.detect_cancer_regions(q, fitted)
    q = synth["S3"].copy()
    with pytest.raises(ValueError, match="needs a trained model"):
        stfm.tl.detect_cancer_regions(q)
    with pytest.raises(KeyError, match="spatial_neighbors"):
        stfm.tl.detect_cancer_regions(q, fitted, smooth=True)
    with pytest.raises(ValueError, match="needs a SpatialData"):
        stfm.tl.detect_cancer_regions(q, fitted, shapes_added="tumours")
    with pytest.raises(KeyError, match="Label column"):
        stfm.tl.evaluate_cancer_regions(q, label_key="nope")
    with pytest.raises(KeyError, match=r"Run `stfm\.tl\.detect_cancer_regions` first"):
        stfm.tl.evaluate_cancer_regions(q)
    assert "cancer_region" not in q.obs  # nothing half-written


# -- real data ------------------------------------------------------------------------------------------
@needs_her2st
def test_expression_embedding_pca_and_scvi_on_her2st():
    secs = {s: load_section(s) for s in ("B1", "C1")}
    stfm.tl.expression_embedding(secs, method="pca", reference=["B1"], n_comps=8, n_top_genes=500)
    for a in secs.values():
        assert a.obsm["X_pca_expr"].shape == (a.n_obs, 8) and np.isfinite(a.obsm["X_pca_expr"]).all()
        prov = a.uns["stfm"]["X_pca_expr"]
        assert prov["method"] == "pca" and list(prov["reference_sections"]) == ["B1"]
    # the PCA is fitted on the reference: its embedding is centred there, not on the query
    assert np.abs(secs["B1"].obsm["X_pca_expr"].mean(0)).max() < 1e-3
    assert np.abs(secs["C1"].obsm["X_pca_expr"].mean(0)).max() > 1e-2
    # standardize='section': every section (query included) centred and scaled on its own spots; the
    # within-section geometry is the reference PCA's, dimension by dimension
    raw = {k: a.obsm["X_pca_expr"].copy() for k, a in secs.items()}
    stfm.tl.expression_embedding(secs, method="pca", reference=["B1"], n_comps=8, n_top_genes=500,
                                 standardize="section", key_added="X_pca_sec")  # fmt: skip
    for k, a in secs.items():
        z = a.obsm["X_pca_sec"]
        np.testing.assert_allclose(z.mean(0), 0, atol=1e-4)
        np.testing.assert_allclose(z.std(0), 1, atol=1e-3)
        np.testing.assert_allclose(z, (raw[k] - raw[k].mean(0)) / raw[k].std(0), atol=1e-3)
        assert a.uns["stfm"]["X_pca_sec"]["standardize"] == "section"
    with pytest.raises(ValueError, match="'none' or 'section'"):
        stfm.tl.expression_embedding(secs, method="pca", standardize="batch")
    stfm.tl.expression_embedding(secs, method="scvi", reference=["B1"], n_comps=4, n_top_genes=300, max_epochs=2)
    z = np.vstack([a.obsm["X_scvi_expr"] for a in secs.values()])
    assert z.shape[1] == 4 and np.isfinite(z).mean() > 0.95
    with pytest.raises(KeyError, match="predict_expression"):
        stfm.tl.expression_embedding(secs, method="predicted")
    # an H&E-only query embedded from its predicted layer lands where its counts would (same PCA, same genes)
    secs["C1"].layers["predicted"] = secs["C1"].X.astype(np.float32)
    secs["C1"].X = secs["C1"].X * 0
    stfm.tl.expression_embedding(secs, method="predicted", reference=["B1"], n_comps=8, n_top_genes=500)
    np.testing.assert_allclose(secs["C1"].obsm["X_predicted_expr"], secs["C1"].obsm["X_pca_expr"], atol=1e-3)
    np.testing.assert_allclose(secs["B1"].obsm["X_predicted_expr"], secs["B1"].obsm["X_pca_expr"], atol=1e-3)


@needs_her2st
def test_signature_on_her2st_and_spatialdata_shapes():
    b1 = load_section("B1")
    stfm.tl.detect_cancer_regions(b1, method="signature", label_key="pathologist_label")
    ev = stfm.tl.evaluate_cancer_regions(b1)
    assert ev["auc"].iloc[0] > 0.6  # marker score ranks B1's pathologist tumour spots above the rest
    assert b1.uns["stfm"]["cancer_region"]["method"] == "signature"
    b4 = load_section("B4")
    sdata = stfm.io.to_spatialdata(b4)
    stfm.tl.detect_cancer_regions(sdata, method="signature", table_key="table", shapes_added="tumour_regions")
    shapes = sdata.shapes["tumour_regions"]
    table = sdata.tables["table"]
    assert len(shapes) >= 1 and shapes.geometry.geom_type.isin(["Polygon"]).all()
    import shapely

    tum = (table.obs["cancer_region_score"] >= 0.5).to_numpy() & (table.obs["cancer_region"] != "non-tumor").to_numpy()
    pts = shapely.points(np.asarray(table.obsm["spatial"])[tum])
    assert shapely.contains(shapely.union_all(shapes.geometry.to_numpy()), pts).all()
    assert int(shapes["n_spots"].sum()) == int(tum.sum())
    # no tumour call at all: no empty element (SpatialData cannot hold one), and the earlier polygons go
    with pytest.warns(UserWarning, match="No spot was called tumour.*earlier polygons of that name were removed"):
        stfm.tl.detect_cancer_regions(sdata, method="signature", table_key="table", shapes_added="tumour_regions", threshold=1.01)
    assert "tumour_regions" not in sdata.shapes
    assert (sdata.tables["table"].obs["cancer_region"] == "non-tumor").all()
    assert sdata.tables["table"].uns["stfm"]["cancer_region"]["shapes_added"].startswith("None (no tumour spots")


@needs_her2st
def test_plot_on_b4(tmp_path):
    import matplotlib.pyplot as plt

    b4 = load_section("B4")
    stfm.tl.detect_cancer_regions(b4, method="signature")
    fig = stfm.pl.cancer_regions(b4, return_fig=True)
    assert len(fig.axes) >= 2 and fig.axes[0].images  # H&E drawn under the spots
    fig.savefig(tmp_path / "b4.png")
    plt.close(fig)
    with pytest.raises(KeyError, match="detect_cancer_regions"):
        stfm.pl.cancer_regions(load_section("B1"), return_fig=True)


def test_each_threshold_fold_model_never_trained_on_its_held_out_section(synth):
    """The validation logits that fix the threshold come from fold models that did not see the scored section."""
    ref = {k: synth[k] for k in ("S0", "S1", "S2")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = stfm.tl.fit_cancer_model(ref, use_rep="X_img", expr_rep="X_expr", seed=0, **FAST)
    folds = model.validation_["sections"]
    assert set(folds) == {"S0", "S1", "S2"} and model.validation_["method"] == "sections"
    for held_out, info in folds.items():
        assert info["trained_on"] == sorted({"S0", "S1", "S2"} - {held_out})
        assert np.isfinite(info["auc"]) and info["n_spots"] > 0


def test_a_threshold_fold_without_positives_in_training_is_skipped(synth):
    """Holding out the only section with tumour leaves a fold whose training sections have none: that fold is skipped
    and logged, not trained on one class; the pooled validation labels then lack tumour, which is an error that
    says so (not a threshold chosen on negatives alone)."""
    ref = {"S0": synth["S0"]}
    for k in ("S1", "S2"):
        ref[k] = synth[k][synth[k].obs.pathologist_label != "invasive cancer"].copy()
    import logging

    from stfm._logging import logger

    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(), pytest.raises(ValueError, match="must contain both classes"):
            warnings.simplefilter("ignore")
            stfm.tl.fit_cancer_model(ref, use_rep="X_img", expr_rep="X_expr", seed=0, positive=("invasive cancer",),
                                     ignore=("undetermined",), **FAST)  # fmt: skip
    finally:
        logger.removeHandler(handler)
    assert any("skipping validation fold S0" in m for m in seen), seen
