"""``embedding_standardize='section'``: every section's embedding centred and scaled with its own statistics.

Synthetic cohorts (``stfm.datasets.synthetic_st``) with a per-section affine "stain" shift of the embedding: the
same tissue signal seen through a different scanner or staining per section, as B4 against patient C in her2st.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import stfm
from stfm.model._checks import standardize_by_section

EMB = "X_synthetic"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _stained(seed: int = 0, n_sections: int = 5):
    """A cohort whose sections each see the embedding through their own per-dimension gain and offset."""
    cohort = stfm.datasets.synthetic_st(n_sections=n_sections, n_patients=n_sections, grid=(12, 10), n_genes=30,
                                        embedding_dim=24, embedding_noise=0.3, seed=seed)  # fmt: skip
    rng = np.random.default_rng(seed + 100)
    emb = np.asarray(cohort.obsm[EMB], dtype=np.float64).copy()
    sections = cohort.obs["section"].astype(str).to_numpy()
    for s in np.unique(sections):
        m = sections == s
        gain = rng.uniform(0.5, 2.0, emb.shape[1])
        offset = rng.normal(0.0, 3.0, emb.shape[1]) * emb[m].std(0)
        emb[m] = emb[m] * gain + offset
    cohort.obsm[EMB] = emb.astype(np.float32)
    return {s: cohort[cohort.obs["section"].astype(str) == s].copy() for s in np.unique(sections)}


def test_every_section_is_centred_and_scaled_on_its_own():
    rng = np.random.default_rng(0)
    x = np.vstack([rng.normal(5, 2, (40, 6)), rng.normal(-3, 0.1, (60, 6))])
    x[:, 5] = 7.0  # a constant dimension stays finite (zero)
    groups = np.array(["a"] * 40 + ["b"] * 60)
    z = standardize_by_section(x, groups)
    for g in ("a", "b"):
        np.testing.assert_allclose(z[groups == g, :5].mean(0), 0, atol=1e-5)
        np.testing.assert_allclose(z[groups == g, :5].std(0), 1, atol=1e-4)
    assert np.all(z[:, 5] == 0)
    # one group for everything when no sections are given: the two blocks no longer sit at 0 each
    pooled = standardize_by_section(x, None)
    assert abs(pooled[:40, 0].mean()) > 0.5


def test_bad_sections_and_values_get_clear_errors():
    x = np.random.default_rng(0).normal(size=(5, 3))
    with pytest.raises(ValueError, match="has 1 spot"):
        standardize_by_section(x, np.array(["a", "a", "a", "a", "b"]))
    with pytest.warns(UserWarning, match="fewer than 30 spots"):
        standardize_by_section(x, None)
    data = _stained()
    with pytest.raises(ValueError, match="embedding_standardize"):
        stfm.tl.fit_expression(list(data.values())[:3], method="ridge", embedding_key=EMB, n_top_genes=10,
                               embedding_standardize="slide")  # fmt: skip


def test_a_query_seen_through_another_stain_predicts_the_same(tmp_path):
    data = _stained()
    names = sorted(data)
    train, query = [data[s] for s in names[:4]], data[names[4]]
    model = stfm.tl.fit_expression(train, method="ridge", embedding_key=EMB, n_top_genes=15,
                                   embedding_standardize="section")  # fmt: skip
    assert model.setup_args["embedding_standardize"] == "section"
    assert "X_synthetic_section_z" in model.adata.obsm
    restained = query.copy()
    rng = np.random.default_rng(7)
    restained.obsm[EMB] = (query.obsm[EMB] * rng.uniform(0.3, 3.0, query.obsm[EMB].shape[1])
                           + rng.normal(0, 5, query.obsm[EMB].shape[1])).astype(np.float32)  # fmt: skip
    p = model.predict(query)
    np.testing.assert_allclose(model.predict(restained), p, rtol=1e-3, atol=1e-3 * float(p.mean()))
    model.save(tmp_path / "m")
    loaded = stfm.model.load_model(tmp_path / "m")
    np.testing.assert_allclose(loaded.predict(restained), p, rtol=1e-3, atol=1e-3 * float(p.mean()))
    # without the option the restained query is predicted differently
    plain = stfm.tl.fit_expression(train, method="ridge", embedding_key=EMB, n_top_genes=15)
    assert not np.allclose(plain.predict(restained), plain.predict(query), rtol=1e-2)


def test_standardising_by_section_recovers_composition_under_section_stains():
    """Held-out sections with their own stain: the standardised model tracks the true composition better."""
    data = _stained(seed=3, n_sections=6)
    names = sorted(data)
    gains = []
    for held in names[4:]:
        train = [data[s] for s in names if s not in names[4:]]
        query = data[held]
        scores = {}
        for mode in ("none", "section"):
            model = stfm.tl.fit_expression(train, method="ridge", embedding_key=EMB, n_top_genes=15,
                                           embedding_standardize=mode)  # fmt: skip
            pred = model.predict(query, library_size=1e4)
            cols = [list(query.var_names).index(g) for g in model.genes]
            true = np.asarray(query.obsm["true_composition"])[:, cols]
            scores[mode] = np.mean([stats.pearsonr(pred[:, j], true[:, j])[0] for j in range(len(cols))])
        gains.append(scores["section"] - scores["none"])
        assert scores["section"] > 0.5, scores
    assert min(gains) > 0.1, gains
