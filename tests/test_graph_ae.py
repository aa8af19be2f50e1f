"""graph_ae (after HESpotEx): both stages' epochs on validation sections, alignment, nuclei inputs, errors."""

from __future__ import annotations

import numpy as np
import pytest

import stfm

EMB = "X_synthetic"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def cohort():
    c = stfm.datasets.synthetic_st(n_sections=4, n_patients=2, n_genes=24, grid=(10, 9), seed=5)
    rng = np.random.default_rng(0)
    c.obs["n_nuclei"] = rng.poisson(20, c.n_obs)
    return c


@pytest.fixture(scope="module")
def model(cohort):
    train = cohort[cohort.obs["section"] != "S3"].copy()
    return stfm.tl.fit_expression(train, method="graph_ae", embedding_key=EMB, n_top_genes=16, max_epochs=15,
                                  autoencoder_epochs=25, autoencoder_patience=5, align_weight=20.0, seed=0,
                                  n_hidden=64, n_hidden_ae=64, n_latent=16)  # fmt: skip


def test_each_stage_keeps_its_best_validation_epoch(model):
    assert model.validation_sections_ == ["S2"]
    ae = model.history_autoencoder_["elbo_validation"].to_numpy().ravel().astype(float)
    assert model.best_epoch_autoencoder_ == int(np.argmin(ae))  # stage 1: lowest validation reconstruction error
    hist = model.validation_history_
    assert model.best_epoch_ == int(hist.loc[hist["score"].idxmax(), "epoch"])  # stage 2: best validation score


def _alignment(m):
    import torch

    latent = m._autoencoder_latent()
    with torch.no_grad():
        z = m.module.image_latent(torch.as_tensor(m._training_arrays()["embedding"])).numpy()
    keep = latent.std(0) > 1e-6
    return float(np.mean([np.corrcoef(z[:, j], latent[:, j])[0, 1] for j in np.flatnonzero(keep)]))


def test_the_image_latent_is_aligned_to_the_autoencoder(cohort):
    """The alignment term (1 − Pearson) pulls the image encoder onto the frozen autoencoder's latent."""
    kw = {"method": "graph_ae", "embedding_key": EMB, "n_top_genes": 12, "max_epochs": 10, "autoencoder_epochs": 10,
          "early_stopping": False, "n_hidden": 64, "n_hidden_ae": 64, "n_latent": 12, "seed": 0, "smoothing": 0}  # fmt: skip
    aligned = _alignment(stfm.tl.fit_expression(cohort, align_weight=50.0, **kw))
    free = _alignment(stfm.tl.fit_expression(cohort, align_weight=0.0, **kw))
    assert aligned > 0.6 and aligned > free + 0.2, (aligned, free)


def test_autoencoder_is_frozen_in_stage_two(cohort):
    """The stage-1 weights after training equal those at the end of stage 1 (stage 2 does not move them)."""
    import torch

    from stfm.model import GraphAEPredictor

    snapshot = {}
    original = GraphAEPredictor._autoencoder_latent

    def spy(self):
        snapshot.update({n: p.detach().clone() for n, p in self.module.named_parameters() if n.startswith(("enc", "dec"))})
        return original(self)

    GraphAEPredictor._autoencoder_latent = spy
    try:
        m = stfm.tl.fit_expression(cohort, method="graph_ae", embedding_key=EMB, n_top_genes=8, max_epochs=3,
                                   autoencoder_epochs=3, n_hidden=32, n_hidden_ae=32, n_latent=8)  # fmt: skip
    finally:
        GraphAEPredictor._autoencoder_latent = original
    for n, p in m.module.named_parameters():
        if n in snapshot:
            torch.testing.assert_close(p.detach(), snapshot[n])


def test_nuclei_features_are_inputs_queries_must_carry(cohort):
    train = cohort[cohort.obs["section"] != "S3"].copy()
    m = stfm.tl.fit_expression(train, method="graph_ae", embedding_key=EMB, n_top_genes=8, max_epochs=2,
                               autoencoder_epochs=2, nuclei_keys=["n_nuclei"], n_hidden=32, n_hidden_ae=32, n_latent=8)  # fmt: skip
    assert m.module.standardize.mean.shape[0] == 48 + 1  # the embedding ⊕ log1p(n_nuclei)
    q = cohort[cohort.obs["section"] == "S3"].copy()
    assert m.predict(q).shape == (q.n_obs, 8)
    del q.obs["n_nuclei"]
    with pytest.raises(KeyError, match=r"`adata.obs\['n_nuclei'\]` not found.*trained with it as an input"):
        m.predict(q)


def test_errors(model, cohort):
    q = cohort[cohort.obs["section"] == "S3"].copy()
    del q.obsm["spatial"]
    with pytest.raises(KeyError, match="graph_ae"):
        model.predict(q)
    bad = cohort.copy()
    bad.obs["n_nuclei"] = -1
    with pytest.raises(ValueError, match="finite, non-negative"):
        stfm.tl.fit_expression(bad, method="graph_ae", embedding_key=EMB, n_top_genes=8, max_epochs=1,
                               autoencoder_epochs=1, nuclei_keys=["n_nuclei"])  # fmt: skip
