"""Expression prediction: ExpressionPredictor (scvi-tools ZINB), RidgeProbe, fit/predict/evaluate/cross_validate.

Real her2st sections with real ``efficientnet_lite0`` features (conftest ``sections_with_features``); few epochs.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from conftest import needs_her2st, sections_with_features
from scipy import sparse

import stfm

EMB = "X_efficientnet_lite0"
SECTIONS = ("B4", "C2", "C3")

pytestmark = [
    needs_her2st,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture(scope="module")
def feats():
    import logging

    for name in ("lightning", "lightning.pytorch", "scvi", "lightning_fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return sections_with_features(SECTIONS)


@pytest.fixture(scope="module")
def zinb(feats):
    """ZINB on C2 + C3 (validation C3), 20 genes, 3 epochs."""
    return stfm.tl.fit_expression(
        [feats["C2"], feats["C3"]], method="zinb", embedding_key=EMB, n_top_genes=20, max_epochs=3, seed=0
    )


@pytest.fixture(scope="module")
def ridge(feats):
    return stfm.tl.fit_expression([feats["C2"], feats["C3"]], method="ridge", embedding_key=EMB, n_top_genes=20)


def he_only(adata: ad.AnnData) -> ad.AnnData:
    """The same spots without genes: what ``extract_features`` gives on an H&E-only slide."""
    out = ad.AnnData(obs=adata.obs.copy())
    out.obsm[EMB] = np.asarray(adata.obsm[EMB]).copy()
    out.obsm["spatial"] = np.asarray(adata.obsm["spatial"]).copy()
    out.uns["spatial"] = adata.uns["spatial"]
    out.uns["stfm"] = {EMB: dict(adata.uns["stfm"][EMB])}
    return out


# ------------------------------------------------------------------------------------------------
# the ZINB model: one epoch, save/load, the likelihood itself, calibration, a quality floor
# ------------------------------------------------------------------------------------------------
def test_one_epoch_train_save_load_roundtrip(feats, tmp_path):
    from stfm.model import ExpressionPredictor

    a = ad.concat([feats["C2"], feats["C3"]], join="inner", index_unique="-")
    from stfm.tl._expression import select_genes

    genes = select_genes(a, 15)
    a = a[:, genes].copy()
    ExpressionPredictor.setup_anndata(a, embedding_key=EMB, section_key="section", patient_key="patient")
    model = ExpressionPredictor(a, n_hidden=64)
    model.train(max_epochs=1)
    assert model.is_trained_
    assert model.validation_sections_ == ["C3"]
    assert model.module.sample(_tensors(a), n_samples=2).shape == (2, a.n_obs, 15)
    pred = model.predict(a)
    assert pred.dtype == np.float32 and pred.shape == (a.n_obs, 15)
    model.save(tmp_path / "m")
    loaded = ExpressionPredictor.load(str(tmp_path / "m"))  # without data: registry only
    np.testing.assert_allclose(loaded.predict(feats["B4"]), model.predict(feats["B4"]), rtol=1e-5)
    assert loaded.genes == genes
    with pytest.raises(ValueError, match="var_names"):
        ExpressionPredictor.load(str(tmp_path / "m"), adata=feats["C2"][:, genes[::-1]].copy())
    back = ExpressionPredictor.load(str(tmp_path / "m"), adata=feats["C2"][:, genes].copy())
    np.testing.assert_allclose(back.predict(), model.predict(feats["C2"][:, genes].copy()), rtol=1e-5)


def _tensors(a):
    import torch

    return {"X": torch.as_tensor(a.X.toarray(), dtype=torch.float32), "embedding": torch.as_tensor(a.obsm[EMB])}


def _zinb_logpmf(x, mu, theta, pi):
    """ZINB log-pmf written from the definition (scipy's gammaln), independent of scvi-tools."""
    from scipy.special import gammaln

    nb = gammaln(x + theta) - gammaln(theta) - gammaln(x + 1) + theta * np.log(theta / (theta + mu)) + x * np.log(mu / (theta + mu))
    zero = np.log(pi + (1 - pi) * np.exp(theta * np.log(theta / (theta + mu))))
    return np.where(x == 0, zero, np.log1p(-pi) + nb)


def test_zinb_loss_is_the_zinb_likelihood(zinb, feats):
    """The training loss on a fixed batch equals an independent ZINB log-pmf of the counts (+ the library and
    composition terms): a likelihood that ignored the counts, or dropped a term, would not match."""
    import torch

    a = feats["C2"][:, zinb.genes].copy()
    t = _tensors(a)
    module = zinb.module
    module.eval()
    with torch.no_grad():
        inf = module.inference(t["embedding"])
        gen = module.generative(inf["h"], t["X"].sum(-1, keepdim=True))
        out = module.loss(t, inf, gen)
    x = t["X"].numpy().astype(np.float64)
    mu = gen["px"].mu.numpy().astype(np.float64)
    theta = np.exp(module.log_theta.detach().numpy().astype(np.float64))[None, :]
    pi = torch.sigmoid(gen["zi_logits"]).numpy().astype(np.float64)
    nll = -_zinb_logpmf(x, mu, theta, pi).sum(1)
    np.testing.assert_allclose(out.reconstruction_loss["reconstruction_loss"].numpy(), nll, rtol=1e-4)
    lib = x.sum(1)
    lib_term = 0.5 * (gen["log_library_pred"].numpy().ravel() - np.log(np.maximum(lib, 1))) ** 2
    comp = ((np.log1p(gen["scale"].numpy() * 1e4) - np.log1p(x / np.maximum(lib, 1)[:, None] * 1e4)) ** 2).sum(1)
    expected = np.mean(nll + module.library_loss_weight * lib_term + module.composition_weight * comp)
    assert float(out.loss) == pytest.approx(expected, rel=1e-4)
    # and the counts matter: the same batch with shuffled counts is far less likely
    shuffled = dict(t, X=t["X"][torch.randperm(len(x))])
    with torch.no_grad():
        worse = module.loss(shuffled, inf, module.generative(inf["h"], shuffled["X"].sum(-1, keepdim=True)))
    assert float(worse.loss) > 1.02 * float(out.loss)


def test_zinb_std_and_zero_fraction_match_draws(zinb, feats):
    """`return_std` and the zero-inflation are the fitted distribution's: checked against 4000 draws from it."""
    import torch

    q = feats["B4"][:40]
    mean, std, zi, theta = zinb.predict(q, library_size="predicted", return_std=True, return_dist_params=True, smooth=0)
    t = {"embedding": torch.as_tensor(q.obsm[EMB])}
    draws = zinb.module.sample(t, n_samples=4000).numpy()  # predicted library size
    np.testing.assert_allclose(draws.mean(0), (1 - zi) * mean, rtol=0.15, atol=0.05)
    np.testing.assert_allclose(draws.std(0), std, rtol=0.15, atol=0.05)
    p0 = zi + (1 - zi) * (theta / (theta + mean)) ** theta
    np.testing.assert_allclose((draws == 0).mean(0), p0, atol=0.05)


def test_predictions_reproducible_with_seed(feats):
    kw = {"method": "zinb", "embedding_key": EMB, "n_top_genes": 10, "max_epochs": 2}
    p = [
        stfm.tl.fit_expression([feats["C2"], feats["C3"]], seed=s, **kw).predict(feats["B4"], library_size="predicted")
        for s in (3, 3, 4)
    ]
    np.testing.assert_array_equal(p[0], p[1])
    assert not np.allclose(p[0], p[2])


def test_zinb_loss_decreases_and_early_stopping_restores_the_best_epoch(feats):
    model = stfm.tl.fit_expression(
        [feats["C2"], feats["C3"]], method="zinb", embedding_key=EMB, n_top_genes=20, max_epochs=12, seed=0,
        early_stopping=False, smoothing=0,
    )  # fmt: skip
    loss = model.history["train_loss"].to_numpy().ravel()
    assert len(loss) == 12
    assert loss[-1] < 0.9 * loss[0]
    hist = model.validation_history_
    assert len(hist) == 12 and set(hist.columns) >= {"epoch", "raw", "composition", "mean", "score"}
    best = int(hist.loc[hist["score"].idxmax(), "epoch"])
    assert model.best_epoch_ == best
    # the restored weights are the best epoch's: re-scoring the validation section gives its score
    from stfm.model._training import validation_scores

    v = feats["C3"][:, model.genes].copy()
    scores = validation_scores(model.predict(v, library_size="predicted", smooth=0), v.X.toarray())
    assert scores["mean"] == pytest.approx(hist["score"].max(), abs=1e-4)


def test_early_stopping_on_elbo(feats):
    model = stfm.tl.fit_expression(
        [feats["C2"], feats["C3"]], method="zinb", embedding_key=EMB, n_top_genes=10, max_epochs=6, seed=0,
        early_stopping_monitor="elbo", early_stopping_patience=2, smoothing=0,
    )  # fmt: skip
    hist = model.validation_history_
    elbo = np.array([float(v) for v in model.history["elbo_validation"].to_numpy().ravel()])
    assert model.best_epoch_ == int(np.argmin(elbo[: len(hist)]))
    np.testing.assert_allclose(hist["score"].to_numpy(), -elbo[: len(hist)], rtol=1e-5)
    assert np.isfinite(hist["raw"]).all()  # zinb predicts in every stage: the rows carry its Pearson too


def test_monitor_stops_patience_epochs_after_the_best_and_restores_it():
    """The early-stopping rule itself, on a scripted validation curve: best at epoch 2, patience 2 → training stops at
    the end of epoch 4, and the weights of epoch 2 are put back."""
    from types import SimpleNamespace

    import torch

    from stfm.model._training import ValidationMonitor

    module = torch.nn.Linear(1, 1)
    module.predicts_in_stage = False  # a stage without predictions: the ELBO alone decides
    monitor = ValidationMonitor(None, {}, metric="mean", patience=2, elbo=True)
    stops, weights = [], {}
    for epoch, elbo in enumerate([5.0, 4.0, 3.0, 3.5, 3.6, 3.7]):
        with torch.no_grad():
            module.weight.fill_(float(epoch))
        weights[epoch] = float(epoch)
        trainer = SimpleNamespace(sanity_checking=False, current_epoch=epoch, should_stop=False,
                                  callback_metrics={"elbo_validation": torch.tensor(elbo)})  # fmt: skip
        monitor.on_validation_epoch_end(trainer, SimpleNamespace(module=module))
        stops.append(trainer.should_stop)
        if trainer.should_stop:
            break
    assert stops == [False, False, False, False, True] and monitor.best_epoch == 2
    monitor.on_train_end(SimpleNamespace(callback_metrics={}), SimpleNamespace(module=module))
    assert float(module.weight) == weights[2]


@pytest.mark.parametrize("method", ["zinb", "ridge", "retrieval", "hetero_graph"])
def test_quality_floor_within_patient_c(method):
    """Trained on C2–C5, scored on C6 (patient C only; B4 is never used to choose anything). Floors sit below
    what each method scores today (raw / composition: zinb 0.58 / 0.29, ridge 0.57 / 0.33, retrieval 0.60 / 0.31,
    hetero_graph 0.58 / 0.35)."""
    f = sections_with_features(("C2", "C3", "C4", "C5", "C6"))
    model = stfm.tl.fit_expression([f[s] for s in ("C2", "C3", "C4", "C5")], method=method, embedding_key=EMB,
                                   n_top_genes=50, seed=0)  # fmt: skip
    from stfm.tl._evaluate import panel_view

    q, _ = panel_view(f["C6"], model.genes, EMB)
    stfm.tl.predict_expression(q, model, library_size="predicted")
    raw = stfm.tl.evaluate_expression(q, model=model).loc["C6", "pearson_all"]
    comp = stfm.tl.evaluate_expression(q, model=model, normalize=True).loc["C6", "pearson_all"]
    assert raw > 0.5 and comp > 0.24, (raw, comp)


def test_neighbor_pooling_stored_and_recomputed_for_queries(feats):
    model = stfm.tl.fit_expression(
        [feats["C2"], feats["C3"]],
        method="zinb",
        embedding_key=EMB,
        n_top_genes=10,
        max_epochs=1,
        neighbor_pooling=(4, 8),
    )
    assert model.module.n_input == 3 * 1280
    assert "X_efficientnet_lite0_nbr4-8" in model.adata.obsm
    from stfm.model._checks import pool_neighbors

    b4 = feats["B4"]
    pooled = pool_neighbors(b4, EMB, (4,), section_key="section")
    xy = b4.obsm["spatial"]
    d = np.linalg.norm(xy - xy[0], axis=1)
    nearest = np.argsort(d)[1:5]
    np.testing.assert_allclose(pooled[0, 1280:], b4.obsm[EMB][nearest].mean(0), rtol=1e-5)
    assert model.predict(he_only(b4)).shape == (b4.n_obs, 10)


# ------------------------------------------------------------------------------------------------
# tools: predict_expression
# ------------------------------------------------------------------------------------------------
def test_predict_expression_writes_layer_and_provenance(zinb, feats):
    b4 = feats["B4"][:, zinb.genes].copy()
    out = stfm.tl.predict_expression(b4, zinb, library_size=1e4, return_std=True, return_dist_params=True, copy=True)
    assert "predicted" not in b4.layers  # copy=True left the input alone
    layer = out.layers["predicted"]
    assert layer.dtype == np.float32 and layer.shape == (b4.n_obs, 20)
    mean, std, zi, theta = zinb.predict(b4, library_size=1e4, return_std=True, return_dist_params=True)
    np.testing.assert_array_equal(layer, mean)  # the layers hold what the model predicts, gene for gene
    np.testing.assert_array_equal(out.layers["predicted_std"], std)
    np.testing.assert_array_equal(out.layers["predicted_zi_prob"], zi)
    np.testing.assert_array_equal(out.var["predicted_theta"].to_numpy(), theta)
    prov = out.uns["stfm"]["predicted"]
    assert prov["function"] == "stfm.tl.predict_expression" and prov["method"] == "zinb" and prov["n_genes"] == 20
    assert prov["likelihood"].startswith("ZINB") and prov["smoothing_neighbors"] == zinb.smoothing_
    # inplace=False returns a new AnnData of predictions that plots with squidpy
    res = stfm.tl.predict_expression(feats["B4"], zinb, inplace=False, key_added="pred2")
    assert list(res.var_names) == zinb.genes and "spatial" in res.uns and "pred2" in res.layers
    # 'observed' library size needs counts; with counts each spot sums to its observed panel total
    stfm.tl.predict_expression(b4, zinb, library_size="observed")
    np.testing.assert_allclose(b4.layers["predicted"].sum(1), np.asarray(b4.X.sum(1)).ravel(), rtol=1e-4)


def test_he_only_query_gets_panel(zinb, ridge, feats, tmp_path):
    q = he_only(feats["B4"])
    assert q.n_vars == 0
    stfm.tl.predict_expression(q, zinb)
    assert list(q.var_names) == zinb.genes
    np.testing.assert_array_equal(q.X, q.layers["predicted"])
    assert q.uns["stfm"]["predicted"]["table_rebuilt"]
    assert EMB in q.obsm and "spatial" in q.uns
    q.write_h5ad(tmp_path / "q.h5ad")  # everything written survives h5ad
    # ridge too, and a SpatialData table
    sdata = stfm.io.to_spatialdata(he_only(feats["B4"]))
    stfm.tl.predict_expression(sdata, ridge, library_size="predicted")
    t = sdata.tables["table"]
    assert list(t.var_names) == ridge.genes and t.uns["spatialdata_attrs"]["region"] == "B4"
    with pytest.raises(ValueError, match="library_size='observed'"):
        stfm.tl.predict_expression(he_only(feats["B4"]), zinb, library_size="observed")


def test_predict_from_saved_path(ridge, zinb, feats, tmp_path):
    ridge.save(tmp_path / "r")
    zinb.save(str(tmp_path / "z"))
    b4 = feats["B4"][:, ridge.genes].copy()
    stfm.tl.predict_expression(b4, tmp_path / "r")
    np.testing.assert_allclose(b4.layers["predicted"], ridge.predict(feats["B4"]), rtol=1e-6)
    assert stfm.get.model_genes(tmp_path / "z") == zinb.genes
    with pytest.raises(FileNotFoundError, match="No model folder"):
        stfm.tl.predict_expression(b4, tmp_path / "nothing")


def test_interop_squidpy_and_scanpy(zinb, feats):
    import scanpy as sc
    import squidpy as sq

    b4 = feats["B4"][:, zinb.genes].copy()
    stfm.tl.predict_expression(b4, zinb, library_size="predicted")
    sq.gr.spatial_neighbors(b4)
    sq.gr.spatial_autocorr(b4, mode="moran", layer="predicted", genes=zinb.genes[:5], n_perms=None, n_jobs=1)
    assert b4.uns["moranI"].shape[0] == 5 and np.isfinite(b4.uns["moranI"]["I"]).all()
    sc.tl.score_genes(b4, zinb.genes[:5], layer="predicted", ctrl_size=10, n_bins=5, score_name="pred_score")
    assert np.isfinite(b4.obs["pred_score"]).all()


# ------------------------------------------------------------------------------------------------
# ridge probe
# ------------------------------------------------------------------------------------------------
def test_ridge_log1p_target_is_the_hest_probe(feats, tmp_path):
    """target='log1p', alpha='hest' reproduces HEST-Benchmark's probe (sklearn StandardScaler + PCA + Ridge)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import Ridge
    from sklearn.preprocessing import StandardScaler

    hest_probe = stfm.tl.fit_expression([feats["C2"], feats["C3"]], method="ridge", embedding_key=EMB, n_top_genes=20,
                                        target="log1p", alpha="hest", smoothing=0)  # fmt: skip
    train = ad.concat([feats["C2"], feats["C3"]], join="inner", index_unique="-")[:, hest_probe.genes]
    x, y = train.obsm[EMB].astype(np.float64), np.log1p(train.X.toarray())
    sc = StandardScaler().fit(x)
    pca = PCA(256, random_state=0).fit(sc.transform(x))
    # HEST solves with lsqr (an iterative approximation); the exact solution of the same problem:
    reg = Ridge(alpha=100 / (256 * 20), solver="cholesky", fit_intercept=False).fit(pca.transform(sc.transform(x)), y)
    test = feats["B4"].obsm[EMB].astype(np.float64)
    hest = np.clip(reg.predict(pca.transform(sc.transform(test))) + y.mean(0), 0, None)  # HEST + the training mean
    ours = np.log1p(hest_probe.predict(feats["B4"], library_size="predicted"))
    assert hest_probe.alpha_ == {"log1p": pytest.approx(100 / (256 * 20))}
    np.testing.assert_allclose(ours, hest, atol=1e-4)
    hest_probe.save(tmp_path / "r")
    back = stfm.model.load_model(tmp_path / "r")
    np.testing.assert_allclose(back.predict(feats["B4"], library_size="predicted"), np.expm1(ours), rtol=1e-4)


def test_ridge_penalties_are_chosen_by_leave_one_section_out(feats):
    """Each head's alpha is the best of the grid on held-out training sections, recomputed here by hand."""
    from stfm.model._ridge import _Fold

    def pearson_cols(p, t):  # mean over genes that vary, on dense arrays
        ok = (p.std(0) > 0) & (t.std(0) > 0)
        return np.mean([np.corrcoef(p[:, j], t[:, j])[0, 1] for j in np.flatnonzero(ok)])

    f = sections_with_features(("C2", "C3", "C4"))
    secs = [f["C2"], f["C3"], f["C4"]]
    model = stfm.tl.fit_expression(secs, method="ridge", embedding_key=EMB, n_top_genes=15, alphas=(1.0, 1e3, 1e5))
    train = model.adata
    emb = train.obsm[EMB].astype(np.float64)
    x = train.X.toarray().astype(np.float64)
    lib = x.sum(1, keepdims=True)
    comp = np.log1p(np.divide(x * 1e4, lib, out=np.zeros_like(x), where=lib > 0))  # spots with no panel counts: 0
    targets = {"composition": comp, "library": np.log(np.maximum(lib, 1))}
    labels = train.obs["section"].astype(str).to_numpy()
    for head, y in targets.items():
        scores = {}
        for a in (1.0, 1e3, 1e5):
            per = []
            for s in ("C2", "C3", "C4"):
                te = labels == s
                fold = _Fold(emb[~te], emb[te], {head: y[~te]}, 256)
                per.append(pearson_cols(fold.predict(head, a), y[te]))
            scores[a] = np.mean(per)
        assert model.alpha_[head] == max(scores, key=scores.get)
        assert model.alpha_scores_[head][f"{model.alpha_[head]:.4g}"] == pytest.approx(max(scores.values()))
    assert model.validation_sections_ == ["C2", "C3", "C4"]


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def test_metrics_match_hand_computation():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3, size=(40, 6)).astype(np.int32)
    pred = (counts + rng.gamma(2, 1, size=counts.shape)).astype(np.float32)
    a = ad.AnnData(X=sparse.csr_matrix(counts), layers={"predicted": pred})
    a.var_names = [f"g{i}" for i in range(6)]
    a.obs["section"] = np.repeat(["s1", "s2"], 20)
    df = stfm.tl.evaluate_expression(a, top_variable=["g0", "g1"], top_expressed=["g5"])
    lp, lt = np.log1p(pred), np.log1p(counts)
    for sec, sl in (("s1", slice(0, 20)), ("s2", slice(20, 40))):
        r = [np.corrcoef(lp[sl, j], lt[sl, j])[0, 1] for j in range(6)]
        assert df.loc[sec, "pearson_all"] == pytest.approx(np.mean(r))
        assert df.loc[sec, "pearson_top_variable"] == pytest.approx(np.mean(r[:2]))
        assert df.loc[sec, "pearson_top_expressed"] == pytest.approx(r[5])
        assert df.loc[sec, "mse"] == pytest.approx(np.mean((lp[sl] - lt[sl]) ** 2))
        assert df.loc[sec, "mae"] == pytest.approx(np.mean(np.abs(lp[sl] - lt[sl])))
    assert df.loc["mean", "pearson_all"] == pytest.approx(df.loc[["s1", "s2"], "pearson_all"].mean())
    pooled = np.mean([np.corrcoef(lp[:, j], lt[:, j])[0, 1] for j in range(6)])
    np.testing.assert_allclose(df["pearson_pooled_across_sections"].to_numpy(), pooled)
    # a constant gene is left out of the Pearson mean and counted
    a.X = a.X.toarray()
    a.X[:20, 3] = 2
    df2 = stfm.tl.evaluate_expression(a)
    r = [np.corrcoef(lp[:20, j], lt[:20, j])[0, 1] for j in (0, 1, 2, 4, 5)]
    assert df2.loc["s1", "n_genes_constant"] == 1
    assert df2.loc["s1", "pearson_all"] == pytest.approx(np.mean(r))


def test_cross_validate_every_fold_keeps_the_test_patient_out(feats):
    secs = [feats[s] for s in SECTIONS]
    df = stfm.tl.cross_validate(secs, method="ridge", embedding_key=EMB, n_top_genes=20)
    assert sorted(df["test_section"]) == ["B4", "C2", "C3"]  # every fold ran
    patient = {s: feats[s].obs["patient"].iloc[0] for s in SECTIONS}
    for _, row in df.iterrows():
        train = row["train_sections"].split(",")
        assert all(patient[s] != patient[row["test_section"]] for s in train), row["train_sections"]
        assert row["test_section"] not in train and not row["leaky"]
        assert row["train_patients"] != row["test_patient"]
    b4 = df.set_index("test_section").loc["B4"]
    assert b4["train_sections"] == "C2,C3" and b4["n_spots"] == 283
    assert df.attrs["protocol"]["split"] == "patient"
    # each row's numbers are the section's own evaluation of that fold's model
    model = stfm.tl.fit_expression([feats["C2"], feats["C3"]], method="ridge", embedding_key=EMB, n_top_genes=20)
    from stfm.tl._evaluate import panel_view

    q, _ = panel_view(feats["B4"], model.genes, EMB)
    stfm.tl.predict_expression(q, model, library_size="predicted")
    assert b4["pearson_all"] == pytest.approx(stfm.tl.evaluate_expression(q, model=model).iloc[0]["pearson_all"])
    assert b4["pearson_all_composition"] == pytest.approx(
        stfm.tl.evaluate_expression(q, model=model, normalize=True).iloc[0]["pearson_all"]
    )
    # the leak guard: a fold training on the test patient's other section
    with pytest.raises(ValueError, match=r"trains on sections \['C2'\] of test patient.*leaks patient-specific signal.*split='section'"):
        stfm.tl.cross_validate(secs, method="ridge", embedding_key=EMB, folds=[(["C2", "B4"], ["C3"])])
    # an explicit fold that keeps the test patient out runs under the patient split
    clean = stfm.tl.cross_validate(secs, method="ridge", embedding_key=EMB, folds=[(["C2", "C3"], ["B4"])], n_top_genes=20)
    assert list(clean["test_section"]) == ["B4"] and not clean["leaky"].any()
    leaky = stfm.tl.cross_validate(
        secs, method="ridge", embedding_key=EMB, split="section", folds=[(["C2", "B4"], ["C3"])], n_top_genes=20
    )
    assert leaky["leaky"].all() and leaky["split"].eq("section").all()


# ------------------------------------------------------------------------------------------------
# bad input → clear errors
# ------------------------------------------------------------------------------------------------
def test_error_embedding_missing(feats):
    a = feats["C2"].copy()
    del a.obsm[EMB]
    with pytest.raises(KeyError, match=r"stfm\.pp\.extract_features\(adata, 'efficientnet_lite0'\)"):
        stfm.tl.fit_expression(a, embedding_key=EMB)


def test_error_counts_not_integer_or_negative(feats):
    a = feats["C2"][:, :50].copy()
    a.X = a.X.astype(np.float32) * 0.5
    with pytest.raises(ValueError, match=r"non-integer values.*raw integer counts"):
        stfm.tl.fit_expression(a, method="zinb", embedding_key=EMB)
    a.X = -feats["C2"][:, :50].X.astype(np.float32)
    with pytest.raises(ValueError, match="negative values"):
        stfm.tl.fit_expression(a, method="zinb", embedding_key=EMB)


def test_error_query_embedding_dimension_or_encoder(zinb, ridge, feats):
    q = he_only(feats["B4"])
    q.obsm[EMB] = q.obsm[EMB][:, :512]
    with pytest.raises(ValueError, match=r"512 dimensions but the model was trained on 1280"):
        stfm.tl.predict_expression(q, zinb)
    with pytest.raises(ValueError, match="512 dimensions"):
        stfm.tl.predict_expression(q, ridge)
    q = he_only(feats["B4"])
    q.uns["stfm"][EMB]["encoder"] = "uni2_h"
    with pytest.raises(ValueError, match=r"encoder 'uni2_h'.*trained on 'efficientnet_lite0'"):
        stfm.tl.predict_expression(q, zinb)


def test_error_unknown_method_and_setting(feats):
    with pytest.raises(ValueError, match=r"Unknown expression method 'ridgee'.*'zinb', 'ridge', 'retrieval'.*Did you mean 'ridge'"):
        stfm.tl.fit_expression(feats["C2"], method="ridgee", embedding_key=EMB)
    with pytest.raises(TypeError, match=r"Method 'ridge' \(RidgeProbe\) does not take \['max_epochs'\].*'alpha'"):
        stfm.tl.fit_expression(feats["C2"], method="ridge", embedding_key=EMB, max_epochs=3)
    ridge = stfm.tl.fit_expression(feats["C2"], method="ridge", embedding_key=EMB, n_top_genes=5)
    with pytest.raises(ValueError, match="The query has 0 spots"):
        stfm.tl.predict_expression(feats["B4"][:0, ridge.genes].copy(), ridge)


def test_error_genes_not_predicted(zinb, feats):
    with pytest.raises(ValueError, match=r"1 requested genes are not predicted.*NOT_A_GENE"):
        stfm.tl.predict_expression(feats["B4"][:, zinb.genes].copy(), zinb, genes=["NOT_A_GENE"])
    with pytest.raises(ValueError, match=r"genes are not predicted by ExpressionPredictor.*stfm\.get\.model_genes"):
        stfm.tl.predict_expression(feats["B4"], zinb)


def test_error_single_section_patient_split(feats):
    with pytest.raises(ValueError, match="single section"):
        stfm.tl.cross_validate([feats["B4"]], method="ridge", embedding_key=EMB)
    with pytest.raises(ValueError, match="split='patient' needs sections from at least two patients"):
        stfm.tl.cross_validate([feats["C2"], feats["C3"]], method="ridge", embedding_key=EMB)


def test_error_nan_inf_embedding(zinb, feats):
    a = feats["C2"].copy()
    a.obsm[EMB] = a.obsm[EMB].copy()
    a.obsm[EMB][3, 0] = np.nan
    a.obsm[EMB][5, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf values in 2 of"):
        stfm.tl.fit_expression(a, embedding_key=EMB)
    with pytest.raises(ValueError, match="NaN or inf"):
        stfm.tl.predict_expression(a[:, zinb.genes].copy(), zinb)


def test_error_empty_section(feats):
    empty = feats["C3"][:0].copy()
    with pytest.raises(ValueError, match="empty"):
        stfm.tl.fit_expression([feats["C2"], empty], embedding_key=EMB)
    with pytest.raises(ValueError, match="empty section"):
        stfm.tl.cross_validate([feats["B4"], feats["C2"], empty], method="ridge", embedding_key=EMB)
    a = ad.concat([feats["C2"], feats["C3"]], join="inner", index_unique="-")[:, :30].copy()
    x = a.X.toarray()
    x[(a.obs["section"] == "C3").to_numpy()] = 0
    a.X = sparse.csr_matrix(x)
    with pytest.raises(ValueError, match=r"Section\(s\) \['C3'\] have no counts"):
        stfm.model.ExpressionPredictor.setup_anndata(a, embedding_key=EMB, section_key="section")


def test_error_copy_and_inplace(zinb, feats):
    with pytest.raises(ValueError, match="cannot be combined"):
        stfm.tl.predict_expression(feats["B4"], zinb, copy=True, inplace=False)
    with pytest.raises(ValueError, match="SpatialData naming rules"):
        stfm.tl.predict_expression(feats["B4"][:, zinb.genes].copy(), zinb, key_added="bad key")
    with pytest.raises(KeyError, match=r"Run `stfm.tl.predict_expression"):
        stfm.tl.evaluate_expression(feats["B4"])


def test_validation_scores_match_an_independent_computation():
    """The early-stopping metric, per section then averaged: raw = per-gene Pearson of log1p values, composition =
    the same on log1p counts per 10k of each spot (computed here with scipy, spot by spot)."""
    from scipy.stats import pearsonr

    from stfm.model import validation_scores

    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(2.0, 3.0, size=(60, 8)) * rng.uniform(0.3, 3, size=(60, 1))).astype(float)
    mean = counts * rng.uniform(0.5, 1.5, size=counts.shape) + 0.5
    groups = np.array(["s1"] * 25 + ["s2"] * 35)

    def per_section(f):
        out = []
        for gname in ("s1", "s2"):
            m = groups == gname
            p, t = f(mean[m]), f(counts[m])
            out.append(np.mean([pearsonr(p[:, j], t[:, j])[0] for j in range(p.shape[1])]))
        return float(np.mean(out))

    def cp10k(x):
        return np.log1p(np.array([row / row.sum() * 1e4 for row in x]))

    got = validation_scores(mean, counts, groups)
    assert got["raw"] == pytest.approx(per_section(np.log1p), abs=1e-9)
    assert got["composition"] == pytest.approx(per_section(cp10k), abs=1e-9)
    assert got["mean"] == pytest.approx((got["raw"] + got["composition"]) / 2, abs=1e-12)
