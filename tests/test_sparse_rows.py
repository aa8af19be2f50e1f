"""Wide panels stay sparse: counts are read a block of rows at a time, banks are CSR, scores stream over blocks."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import torch
from scipy import sparse

import stfm
from stfm import _rows
from stfm._rows import ColumnPearson, CountRows, RowRef, csr_rows_torch, log_composition_csr, materialize
from stfm.model._registry import available_methods
from stfm.model._training import input_statistics, validation_scores
from stfm.module._components import ReferenceBank

EMB = "X_synthetic"


def _counts(n=53, g=9, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.gamma(0.6, 2.0, (n, g))).astype(np.float32)
    x[3] = 0  # an empty spot
    x[:, 4] = 0  # a gene nobody expresses
    return x


@pytest.mark.parametrize("blocks", [[53], [1, 52], [7] * 7 + [4], [20, 0, 33]])
def test_column_pearson_is_exact_however_the_rows_are_split(blocks):
    rng = np.random.default_rng(1)
    p, t = rng.normal(size=(53, 6)) * [1, 10, 0.1, 1, 1, 1] + 100, rng.normal(size=(53, 6))
    p[:, 5] = 3.0  # a constant column has no correlation
    acc, a = ColumnPearson(), 0
    for b in blocks:
        acc.add(p[a : a + b], t[a : a + b])
        a += b
    want = [np.corrcoef(p[:, j], t[:, j])[0, 1] for j in range(5)]
    r = acc.correlations()
    np.testing.assert_allclose(r[:5], want, rtol=1e-10)
    assert np.isnan(r[5]) and np.isclose(acc.mean(), np.mean(want))


def test_count_rows_csr_rows_and_weighted_sums_equal_the_dense_matrix():
    x = _counts()
    rows = CountRows(sparse.csr_matrix(x))
    idx = np.array([5, 3, 5, 50])
    np.testing.assert_array_equal(rows[idx], x[idx])
    mask = np.arange(len(x)) % 3 == 0
    np.testing.assert_array_equal(rows[mask], x[mask])  # boolean masks and slices work too
    np.testing.assert_array_equal(rows[4:9], x[4:9])
    assert rows.shape == x.shape and len(rows) == len(x) and rows[idx].dtype == np.float32
    csr = rows.sparse
    got = csr_rows_torch(torch.as_tensor(csr.indptr, dtype=torch.long), torch.as_tensor(csr.indices),
                         torch.as_tensor(csr.data), torch.as_tensor([[5, 3], [5, 50]]), x.shape[1])  # fmt: skip
    np.testing.assert_array_equal(got.numpy(), x[[5, 3, 5, 50]])
    w = np.array([[0.25, 0.75], [1.0, 0.0]])
    np.testing.assert_allclose(rows.weighted(np.array([[0, 1], [2, 2]]), w), [0.25 * x[0] + 0.75 * x[1], x[2]], rtol=1e-6)
    comp, lib = log_composition_csr(x)
    dense = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)
    np.testing.assert_allclose(comp.toarray(), dense, rtol=1e-6)
    assert comp.nnz == np.count_nonzero(x) and np.array_equal(lib, np.maximum(x.sum(1), 1))


def test_log_normalise_is_one_formula_dense_and_sparse():
    """stfm's one NumPy log-normalisation: dense and sparse agree, empty rows stay 0, duplicate CSR entries are
    summed before the log, the input is untouched, and ``check`` refuses what is not counts."""
    from stfm._rows import log_normalise

    rng = np.random.default_rng(3)
    x = rng.poisson(2.0, (30, 9)).astype(np.float64)
    x[4] = 0
    want = np.log1p(x / np.where(x.sum(1, keepdims=True) > 0, x.sum(1, keepdims=True), 1) * 1e4)
    np.testing.assert_allclose(log_normalise(x), want, rtol=1e-12)
    sp = log_normalise(sparse.csr_matrix(x), sparse_output=True, dtype=np.float32)
    assert sparse.issparse(sp) and sp.dtype == np.float32 and sp.nnz == np.count_nonzero(x)
    np.testing.assert_allclose(sp.toarray(), want, rtol=1e-6)
    assert np.all(log_normalise(x)[4] == 0)
    # a CSR with a duplicate entry: (0, 1) holds 2 + 3; the log is of the sum, not a sum of logs
    dup = sparse.csr_matrix((np.array([2.0, 3.0, 5.0]), np.array([1, 1, 0]), np.array([0, 3])), shape=(1, 2))
    before = dup.data.copy()
    np.testing.assert_allclose(log_normalise(dup, sparse_output=True).toarray(), np.log1p([[5e3, 5e3]]), rtol=1e-12)
    np.testing.assert_array_equal(dup.data, before)
    with pytest.raises(ValueError, match="non-negative finite"):
        log_normalise(-x, check=True)
    with pytest.raises(ValueError, match="non-negative finite"):
        log_normalise(sparse.csr_matrix(np.where(x > 2, np.nan, x)), sparse_output=True, check=True)


def test_count_rows_and_gene_statistics_never_modify_their_input():
    """A gene subset leaves a CSR's column indices unsorted; ``csr_matrix(x, dtype=float32)`` copies an int32 matrix's
    values but shares its indices, so sorting in place permuted the caller's counts within rows (multimodal trained
    on scrambled targets: 0.60 → 0.47 on C6)."""
    from stfm.tl._expression import _log1p_stats

    rng = np.random.default_rng(0)
    x = sparse.random(40, 12, density=0.4, format="csr", random_state=1)
    x.data = np.ceil(x.data * 20)
    counts = x.astype(np.int32)[:, rng.permutation(12)]
    assert not counts.has_sorted_indices
    before = counts.toarray().copy()
    rows = CountRows(counts)
    np.testing.assert_array_equal(counts.toarray(), before)
    np.testing.assert_array_equal(rows[np.arange(40)], before)
    # explicit zeros in a float64 CSR: the statistics skip them without eliminating them in the caller's matrix
    f = sparse.csr_matrix(before.astype(np.float64))
    f.data[::5] = 0.0
    kept = (f.data.copy(), f.indices.copy(), f.indptr.copy())
    frac, mean, var = _log1p_stats(ad.AnnData(f))
    for a, b in zip((f.data, f.indices, f.indptr), kept, strict=True):
        np.testing.assert_array_equal(a, b)
    dense = np.log1p(f.toarray())
    np.testing.assert_allclose(mean, dense.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, dense.var(0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(frac, (dense > 0).mean(0))


def test_materialize_fills_row_references_only():
    x = _counts()
    sources = {"counts": CountRows(x)}
    edge = torch.tensor([[0, 1], [1, 0]])
    g = materialize({"counts": RowRef("counts", np.array([2, 0])), "edge_index": edge}, sources)
    np.testing.assert_array_equal(g["counts"].numpy(), x[[2, 0]])
    assert g["edge_index"] is edge
    with pytest.raises(KeyError, match="reads rows of 'bank'"):
        materialize({"ref": RowRef("bank", np.array([0]))}, sources)


def test_scores_and_statistics_of_sparse_counts_equal_the_dense_formulas(monkeypatch):
    monkeypatch.setattr(_rows, "BLOCK_ROWS", 5)  # many blocks per section
    x = _counts(n=60)
    rng = np.random.default_rng(2)
    pred = np.abs(x + rng.normal(0, 1.0, x.shape)).astype(np.float32)
    groups = np.repeat(["a", "b", "c"], 20)

    def by_hand(p, t):
        def r(u, v):
            keep = (u.std(0) > 0) & (v.std(0) > 0)
            return np.mean([np.corrcoef(u[:, j], v[:, j])[0, 1] for j in np.flatnonzero(keep)])

        pc = np.log1p(p / np.maximum(p.sum(1, keepdims=True), 1e-300) * 1e4)
        tc = np.log1p(np.divide(t * 1e4, t.sum(1, keepdims=True), out=np.zeros_like(t), where=t.sum(1, keepdims=True) > 0))
        return r(np.log1p(p), np.log1p(t)), r(pc, tc)

    got = validation_scores(pred, sparse.csr_matrix(x), groups)
    want = np.mean([by_hand(pred[groups == s].astype(float), x[groups == s].astype(float)) for s in "abc"], axis=0)
    np.testing.assert_allclose([got["raw"], got["composition"]], want, rtol=1e-9)
    assert got == validation_scores(pred, x, groups)
    with pytest.raises(ValueError, match="same shape"):
        validation_scores(pred[:, :3], x, groups)
    emb = rng.normal(size=(60, 4))
    stats = input_statistics(sparse.csr_matrix(x), emb)
    comp = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)
    np.testing.assert_allclose(stats["composition_mean"], comp.mean(0), rtol=1e-6)
    np.testing.assert_allclose(stats["composition_std"], comp.std(0), rtol=1e-5, atol=1e-6)
    assert np.isclose(stats["log_library_mean"], np.log(np.maximum(x.sum(1), 1)).mean())


def test_reference_graph_densifies_only_the_reference_rows_it_uses():
    rng = np.random.default_rng(0)
    xy = np.c_[np.arange(12) % 4, np.arange(12) // 4].astype(float)
    tx = rng.normal(size=(12, 5))
    emb, expr = rng.normal(size=(40, 5)), rng.poisson(2, (40, 6)).astype(np.float32)
    dense = stfm.graph.reference_graph(xy, tx, {"R": (emb, expr)}, k_reference=2)
    sp = stfm.graph.reference_graph(xy, tx, {"R": (emb, sparse.csr_matrix(expr))}, k_reference=2)
    np.testing.assert_array_equal(sp["reference"].y.numpy(), dense["reference"].y.numpy())
    np.testing.assert_array_equal(dense["reference"].y.numpy(), expr[dense["reference"].source_index.numpy()])
    bare = stfm.graph.reference_graph(xy, tx, {"R": (emb, None)}, k_reference=2)
    assert "y" not in bare["reference"] and bare["reference"].x.shape == dense["reference"].x.shape
    with pytest.raises(ValueError, match="every reference section, or of none"):
        stfm.graph.reference_graph(xy, tx, {"R": (emb, expr), "S": (emb, None)}, k_reference=2)


@pytest.fixture(scope="module")
def cohort():
    return stfm.datasets.synthetic_st(n_sections=4, n_patients=2, n_genes=30, grid=(12, 10), seed=3)


BRIEF = {"zinb": {"max_epochs": 1, "batch_size": 32}, "retrieval": {"max_epochs": 1, "batch_size": 32},
         "hetero_graph": {"max_epochs": 1}, "graph_ae": {"max_epochs": 1, "autoencoder_epochs": 1},
         "multimodal": {"max_epochs": 1, "pretrain_epochs": 1}, "ridge": {}}  # fmt: skip


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("method", available_methods())
def test_no_method_densifies_the_training_counts_whole(method, cohort, monkeypatch):
    """Every dense block of the panel's counts made while fitting and predicting stays a batch: at most one
    section (a graph batch; for hetero_graph, the reference spots one batch links to), never the training set."""
    monkeypatch.setattr(_rows, "BLOCK_ROWS", 16)
    train = cohort[cohort.obs["section"].isin(["S0", "S1", "S2"])].copy()
    per_section, n_genes = 120, 20
    seen: list[int] = []
    for cls in (sparse.csr_matrix, sparse.csr_array):
        original = cls.toarray

        def recording(self, *args, _original=original, **kwargs):
            if self.shape[1] == n_genes:
                seen.append(self.shape[0])
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "toarray", recording)
    model = stfm.tl.fit_expression(train, method=method, embedding_key=EMB, n_top_genes=n_genes, seed=0,
                                   smoothing=(0, 4), **BRIEF.get(method, {"max_epochs": 1}))  # fmt: skip
    test = cohort[cohort.obs["section"] == "S3"].copy()
    pred = model.predict(test, library_size="predicted")
    assert pred.shape == (per_section, n_genes) and np.isfinite(pred).all()
    assert seen, "the counts were never read"
    assert max(seen) < train.n_obs, sorted(set(seen))
    if method != "hetero_graph":
        assert max(seen) <= per_section, sorted(set(seen))
    if hasattr(model, "_training_graphs"):  # graph batches held for an epoch refer to rows; none holds them dense
        graphs = model._training_graphs(np.arange(train.n_obs))
        wide = [k for g in graphs for k, v in g.items() if isinstance(v, torch.Tensor) and v.shape[-1] == n_genes]
        assert graphs and not wide, wide


class _Bank(ReferenceBank, torch.nn.Module):
    def __init__(self):
        super().__init__()
        self._register_bank(3, 9)


def test_bank_weighted_sums_match_a_dense_gather_and_the_module_still_copies():
    import copy
    import pickle

    x = _counts()
    m = _Bank()
    m.set_bank(np.zeros((len(x), 3)), sparse.csr_matrix(x), np.zeros(len(x), int))
    dense = torch.as_tensor(np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4))
    rows = torch.as_tensor([[0, 5, 3], [50, 50, 1]])
    w = torch.as_tensor([[0.2, 0.3, 0.5], [0.5, 0.25, 0.25]])
    want = (w.unsqueeze(-1) * dense[rows]).sum(1)
    np.testing.assert_allclose(m.bank_weighted(rows, w).numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    m.product_budget = 1  # one query row per sparse product: the same sums
    np.testing.assert_allclose(m.bank_weighted(rows, w).numpy(), want.numpy(), rtol=1e-5, atol=1e-6)
    del m.product_budget
    frac = torch.expm1(dense) / 1e4
    np.testing.assert_allclose(m.bank_weighted(rows, w, "frac2").numpy(), (w.unsqueeze(-1) * frac[rows] ** 2).sum(1).numpy(),
                               rtol=1e-4, atol=1e-12)  # fmt: skip
    np.testing.assert_allclose(m.bank_composition(rows).numpy(), dense[rows.reshape(-1)].numpy(), rtol=1e-6)
    # a new bank is read, not the cached one; copies and pickles of a module with a filled cache work
    m.set_bank(np.zeros((len(x), 3)), sparse.csr_matrix(x[::-1].copy()), np.zeros(len(x), int))
    np.testing.assert_allclose(m.bank_weighted(rows, w).numpy(), (w.unsqueeze(-1) * dense.flip(0)[rows]).sum(1).numpy(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        np.testing.assert_array_equal(twin.bank_weighted(rows, w).numpy(), m.bank_weighted(rows, w).numpy())


def test_bank_rows_do_not_alias_the_buffers():
    """The bank's CountRows (held by graph data modules) own their memory: moving the buffers to shared memory, as
    spawning DDP workers does, must not leave them reading a freed block (it gave NaN reference rows)."""
    x = _counts()
    m = _Bank()
    m.set_bank(np.zeros((len(x), 3)), sparse.csr_matrix(x), np.zeros(len(x), int))
    rows = m.bank_composition_rows()
    for name in ("bank_comp_values", "bank_comp_indices", "bank_comp_indptr"):
        buf = getattr(m, name).numpy()
        assert not any(np.shares_memory(buf, a) for a in (rows.sparse.data, rows.sparse.indices, rows.sparse.indptr)), name
    before = rows[np.arange(len(x))]
    for b in m.buffers():
        b.share_memory_()
    np.testing.assert_array_equal(rows[np.arange(len(x))], before)
