"""One contract, every registered expression method (``stfm.model.list_methods()``), on synthetic data.

Adding a method registers it; this file picks it up unchanged: train briefly, predict on an H&E-only copy, write
the layer and provenance through ``predict_expression``, save, load safely, and run one cross-validation fold.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import stfm
from stfm.model._registry import available_methods

EMB = "X_synthetic"
METHODS = available_methods()
#: the shortest training each method accepts (one epoch for gradient-trained methods)
BRIEF = {"zinb": {"max_epochs": 1}, "retrieval": {"max_epochs": 1}, "hetero_graph": {"max_epochs": 1},
         "graph_ae": {"max_epochs": 1, "autoencoder_epochs": 1}, "multimodal": {"max_epochs": 1, "pretrain_epochs": 1},
         "ridge": {}}  # fmt: skip

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def cohort():
    return stfm.datasets.synthetic_st(n_sections=4, n_patients=2, n_genes=30, grid=(10, 8), seed=1)


def _train(cohort):
    return cohort[cohort.obs["section"].isin(["S0", "S1", "S2"])].copy()


def _he_only(adata):
    out = ad.AnnData(obs=adata.obs[["section", "patient"]].copy())
    out.obsm[EMB] = np.asarray(adata.obsm[EMB]).copy()
    out.obsm["spatial"] = np.asarray(adata.obsm["spatial"]).copy()
    out.uns["stfm"] = {EMB: dict(adata.uns["stfm"][EMB])}
    return out


def _brief(method):
    return BRIEF.get(method, {"max_epochs": 1})


def test_every_builtin_is_registered():
    table = stfm.model.list_methods()
    assert {"zinb", "ridge", "retrieval"} <= set(table.index)
    assert {"class", "after", "needs", "supports", "likelihood", "summary"} <= set(table.columns)
    assert table.loc["retrieval", "needs"] == "embedding, counts, reference_bank"


@pytest.mark.parametrize("method", METHODS)
def test_contract(method, cohort, tmp_path):
    spec = stfm.model.get_method(method)
    ref = _train(cohort)
    ref.X = ref.X.astype(np.int32)  # integer counts, as the readers store them (a dtype the models convert)
    model = stfm.tl.fit_expression(ref, method=method, embedding_key=EMB, n_top_genes=20, seed=0, **_brief(method))
    assert isinstance(model, spec.cls) and model.method == method and model.is_trained_
    # training reads the registered counts and never rewrites them: converting the panel's CSR (its column indices
    # unsorted after the gene subset) once sorted the shared index arrays in place, permuting counts within rows
    np.testing.assert_array_equal(model.adata.X.toarray(), ref[:, model.genes].X.toarray())
    assert len(model.genes) == 20 and model.training_sections_ == ["S0", "S1", "S2"]
    # an H&E-only copy of an unseen section: the table gains the panel, the layer and the provenance
    test = cohort[cohort.obs["section"] == "S3"].copy()
    q = _he_only(test)
    stfm.tl.predict_expression(q, model, library_size=1e4)
    assert list(q.var_names) == model.genes
    layer = q.layers["predicted"]
    assert layer.shape == (test.n_obs, 20) and layer.dtype == np.float32 and np.isfinite(layer).all()
    assert (layer >= 0).all()
    # the layer is the model's own prediction for these spots and genes (nothing reordered, smoothed twice, or lost)
    np.testing.assert_array_equal(layer, model.predict(_he_only(test), library_size=1e4))
    prov = q.uns["stfm"]["predicted"]
    assert prov["method"] == method and prov["model"] == spec.cls.__name__ and prov["n_genes"] == 20
    assert prov["use_rep"] == EMB and prov["encoder"] == "synthetic"
    # predicted library sizes vary with the spot (they are predicted, not a constant)
    lib = model.predict(q, library_size="predicted").sum(1)
    assert lib.std() > 0
    # save, load safely, same predictions
    model.save(tmp_path / method)
    back = stfm.model.load_model(tmp_path / method)
    assert type(back) is spec.cls and back.genes == model.genes
    np.testing.assert_allclose(
        back.predict(q, library_size="predicted"), model.predict(q, library_size="predicted"), rtol=1e-5
    )
    assert back.smoothing_ == model.smoothing_
    # a path works as `model` too
    q2 = _he_only(test)
    stfm.tl.predict_expression(q2, tmp_path / method)
    np.testing.assert_allclose(q2.layers["predicted"], layer, rtol=1e-5)
    if "std" in spec.supports:
        _, std = model.predict(q, return_std=True)
        assert std.shape == layer.shape and np.isfinite(std).all()
    else:
        with pytest.raises(ValueError, match="predictive distribution"):
            stfm.tl.predict_expression(_he_only(test), model, return_std=True)


@pytest.mark.parametrize("method", METHODS)
def test_section_standardised_embedding_ignores_a_sections_stain(method, cohort):
    """``embedding_standardize='section'``: a query seen through another per-dimension gain and offset (another
    stain or scanner) is predicted exactly as the original, through every method's own inputs (graphs, banks)."""
    model = stfm.tl.fit_expression(_train(cohort), method=method, embedding_key=EMB, n_top_genes=12, seed=0,
                                   embedding_standardize="section", **_brief(method))  # fmt: skip
    q = _he_only(cohort[cohort.obs["section"] == "S3"].copy())
    rng = np.random.default_rng(5)
    restained = _he_only(cohort[cohort.obs["section"] == "S3"].copy())
    d = q.obsm[EMB].shape[1]
    restained.obsm[EMB] = (q.obsm[EMB] * rng.uniform(0.5, 2.0, d) + rng.normal(0, 2.0, d)).astype(np.float32)
    p = model.predict(q, library_size="predicted")
    np.testing.assert_allclose(model.predict(restained, library_size="predicted"), p, rtol=2e-3, atol=1e-3 * float(p.mean()))


@pytest.mark.parametrize("method", METHODS)
def test_one_cross_validation_fold(method, cohort):
    df = stfm.tl.cross_validate(
        cohort, method=method, embedding_key=EMB, n_top_genes=15, test_sections=["S1"], **_brief(method)
    )
    assert df["test_section"].tolist() == ["S1"] and df["method"].eq(method).all()
    row = df.iloc[0]
    # patient split: S1 is patient P1, so training holds only patient P0's sections
    assert row["train_sections"] == "S0,S2" and row["train_patients"] == "P0" and row["test_patient"] == "P1"
    assert np.isfinite(row["pearson_all"]) and np.isfinite(row["pearson_all_composition"])


@pytest.mark.parametrize("method", METHODS)
def test_reproducible_with_a_seed(method, cohort):
    """Same seed, same data: identical predictions on the CPU; another seed differs (gradient-trained methods)."""
    kw = {
        "method": method,
        "embedding_key": EMB,
        "n_top_genes": 12,
        **{**_brief(method), **({"max_epochs": 3} if _brief(method) else {})},
    }
    q = _he_only(cohort[cohort.obs["section"] == "S3"].copy())
    p = [stfm.tl.fit_expression(_train(cohort), seed=s, **kw).predict(q, library_size="predicted") for s in (3, 3, 4)]
    np.testing.assert_array_equal(p[0], p[1])
    if stfm.model.get_method(method).cls.train is not stfm.model.RidgeProbe.train:
        assert not np.allclose(p[0], p[2])


@pytest.mark.parametrize("method", METHODS)
def test_every_training_stage_starts_in_train_mode(method, cohort, monkeypatch):
    """scvi-tools puts the module in eval mode after a fit; the next stage of a two-stage method must not inherit
    it (dropout off, normalisation frozen), and neither must a refit."""
    if stfm.model.get_method(method).cls.train is stfm.model.RidgeProbe.train:
        pytest.skip("ridge is not gradient-trained")
    import lightning.pytorch as pl

    from stfm.model import _base

    seen: list[tuple[str | None, list[str]]] = []

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            frozen = [n for n, m in pl_module.module.named_modules() if not m.training]
            seen.append((getattr(pl_module.module, "stage", None), frozen))

    original = _base.ExpressionModelBase.train

    def train(self, *args, **kwargs):
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), Probe()]
        return original(self, *args, **kwargs)

    monkeypatch.setattr(_base.ExpressionModelBase, "train", train)
    model = stfm.tl.fit_expression(_train(cohort), method=method, embedding_key=EMB, n_top_genes=12, **_brief(method))
    model.train(
        **{
            "max_epochs": 1,
            **({"pretrain_epochs": 1} if method == "multimodal" else {}),
            **({"autoencoder_epochs": 1} if method == "graph_ae" else {}),
        }
    )  # a refit of the fitted model
    assert seen, "no training stage ran"
    for stage, frozen in seen:
        assert not frozen, f"{method} stage {stage!r} started with {len(frozen)} modules in eval mode: {frozen[:4]}"
