"""The shared torch parts (``stfm.module._components``) against independent computations in numpy.

Each block is used by several methods, whose end-to-end tests would still train (a loss still falls) with an
inverted standardisation, an InfoNCE normalised along the batch, or a residual subtracted: these tests pin what
each block computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stfm.module._components import CrossAttentionBlock, Standardize, edge_attention, info_nce, segment_softmax


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def test_standardize_is_x_minus_mean_over_std(rng):
    mean, std = rng.normal(size=5).astype(np.float32), rng.uniform(0.5, 3, size=5).astype(np.float32)
    x = rng.normal(size=(7, 5)).astype(np.float32)
    got = Standardize(5, mean, std)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, (x - mean) / std, rtol=1e-5, atol=1e-6)
    # a zero std is floored, never divides by zero
    out = Standardize(5, mean, np.zeros(5, np.float32))(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, (x - mean) / 1e-6, rtol=1e-4)


def _info_nce_numpy(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)  # each embedding to unit length (along its features)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = a @ b.T / t

    def ce(lg: np.ndarray) -> np.ndarray:  # cross-entropy of row i with target i
        m = lg.max(1, keepdims=True)
        lse = np.log(np.exp(lg - m).sum(1)) + m[:, 0]
        return lse - np.diag(lg)

    return 0.5 * (ce(logits) + ce(logits.T))


def test_info_nce_matches_an_independent_computation(rng):
    a = rng.normal(size=(6, 4)) * rng.uniform(0.2, 5, size=(6, 1))  # rows of different norms
    b = rng.normal(size=(6, 4)) * rng.uniform(0.2, 5, size=(6, 1))
    t = 0.3
    got = info_nce(torch.tensor(a), torch.tensor(b), float(np.log(t))).numpy()
    np.testing.assert_allclose(got, _info_nce_numpy(a, b, t), rtol=1e-6)
    # matched pairs score lower than shuffled ones
    assert info_nce(torch.tensor(a), torch.tensor(a), 0.0).mean() < info_nce(torch.tensor(a), torch.tensor(b), 0.0).mean()


def test_cross_attention_block_is_two_residual_steps(rng):
    torch.manual_seed(0)
    block = CrossAttentionBlock(8, n_heads=2, dropout=0.0).eval()
    q = torch.tensor(rng.normal(size=(3, 2, 8)), dtype=torch.float32)
    kv = torch.tensor(rng.normal(size=(3, 4, 8)), dtype=torch.float32)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True], [False, False, False, False]])
    with torch.no_grad():
        got = block(q, kv, mask)
        # attention by hand from the block's own projection weights: softmax(QKᵀ/√d) V over the real tokens
        w_in, b_in = block.attn.in_proj_weight, block.attn.in_proj_bias
        qn, kvn = block.norm_q(q), block.norm_kv(kv)
        Q = qn @ w_in[:8].T + b_in[:8]
        K = kvn @ w_in[8:16].T + b_in[8:16]
        V = kvn @ w_in[16:].T + b_in[16:]
        heads = []
        for h in range(2):
            s = slice(4 * h, 4 * h + 4)
            scores = Q[..., s] @ K[..., s].transpose(1, 2) / 2.0
            scores = scores.masked_fill(~mask[:, None, :], -torch.inf)
            att = torch.softmax(scores, -1).nan_to_num(0.0)  # a row with no real token: no attention at all
            heads.append(att @ V[..., s])
        attn = torch.cat(heads, -1) @ block.attn.out_proj.weight.T + block.attn.out_proj.bias
        attn[2] = 0.0  # the third row has no real token: its queries are left unchanged by the attention step
        mid = q + attn
        want = mid + block.ffn(block.norm_ffn(mid))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a masked-out token does not change the output
    kv2 = kv.clone()
    kv2[0, 2:] = 100.0
    with torch.no_grad():
        torch.testing.assert_close(block(q, kv2, mask)[0], got[0], rtol=1e-5, atol=1e-5)


def test_segment_softmax_and_edge_attention_match_loops(rng):
    e, n, heads, d = 9, 4, 2, 6
    scores = torch.tensor(rng.normal(size=(e, heads)))
    dst = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0])
    src = torch.tensor(rng.integers(0, 5, size=e))
    got = segment_softmax(scores, dst, n).numpy()
    for g in range(n):
        sel = (dst == g).numpy()
        ex = np.exp(scores.numpy()[sel] - scores.numpy()[sel].max(0))
        np.testing.assert_allclose(got[sel], ex / ex.sum(0), rtol=1e-6)
    # stable for large scores (the group maximum is subtracted first): no overflow to inf / inf
    big = segment_softmax(scores * 400 + 300, dst, n)
    assert torch.isfinite(big).all()
    per_group = torch.zeros(n, heads, dtype=big.dtype).index_add(0, dst, big)
    torch.testing.assert_close(per_group, torch.ones(n, heads, dtype=big.dtype))
    q, k, v = (torch.tensor(rng.normal(size=(5, d))) for _ in range(3))
    w = torch.tensor(rng.uniform(0.5, 2, size=(e, 1)))
    out = edge_attention(q, k, v, src, dst, n, heads, dropout=0.0, training=False, edge_weight=w).numpy()
    dh = d // heads
    want = np.zeros((n, d))
    for h in range(heads):
        s = slice(h * dh, (h + 1) * dh)
        a = (q.numpy()[dst][:, s] * k.numpy()[src][:, s]).sum(1) / np.sqrt(dh)
        for g in range(n):
            sel = (dst == g).numpy()
            att = np.exp(a[sel] - a[sel].max())
            att /= att.sum()
            want[g, s] = (att[:, None] * v.numpy()[src][sel][:, s] * w.numpy()[sel]).sum(0)
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-9)
