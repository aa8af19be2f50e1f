"""The spatial layer (``stfm.graph``): neighbour searches checked against brute force, within sections only."""

from __future__ import annotations

import numpy as np
import pytest

import stfm.graph as g


def _grid(nx=6, ny=5, pitch=200.0, jitter=0.0, seed=0):
    rng = np.random.default_rng(seed)
    xy = np.stack(np.meshgrid(np.arange(nx), np.arange(ny)), -1).reshape(-1, 2) * pitch
    return xy + rng.normal(scale=jitter, size=xy.shape)


def _brute_knn(xy, k, groups):
    out = []
    for i in range(len(xy)):
        same = np.flatnonzero(groups == groups[i])
        same = same[same != i]
        d = np.linalg.norm(xy[same] - xy[i], axis=1)
        out.append(same[np.argsort(d, kind="stable")[:k]])
    return out


def test_knn_within_sections_matches_brute_force():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 1000, size=(60, 2))
    groups = np.repeat(["a", "b", "c"], 20)
    nbr = g.knn_indices(xy, 5, groups=groups)
    for i, ref in enumerate(_brute_knn(xy, 5, groups)):
        assert set(nbr[i]) == set(ref), i
        assert (groups[nbr[i]] == groups[i]).all()  # never another section
    # the two sections laid on top of each other still do not mix
    xy2 = np.concatenate([xy[:20], xy[:20]])
    nbr2 = g.knn_indices(xy2, 3, groups=np.repeat(["s1", "s2"], 20))
    assert (nbr2[:20] < 20).all() and (nbr2[20:] >= 20).all()


def test_knn_small_groups_and_coincident_spots():
    xy = np.array([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [50.0, 50.0]])
    nbr = g.knn_indices(xy, 2, groups=np.array(["a", "a", "a", "b"]))
    assert sorted(nbr[0]) == [1, 2] and sorted(nbr[1]) == [0, 2]  # coincident spots are each other's neighbour
    assert (nbr[3] == 3).all()  # a lone spot lists itself
    with pytest.raises(ValueError, match="k` >= 1"):
        g.knn_indices(xy, 0)
    with pytest.raises(ValueError, match="NaN or inf"):
        g.knn_indices(np.array([[0.0, np.nan], [1.0, 1.0]]), 1)


def test_spot_pitch_and_radius_graph():
    xy = _grid(jitter=1.0)
    assert g.spot_pitch(xy) == pytest.approx(200.0, rel=0.02)
    adj = g.radius_graph(xy)  # 1.5 pitches: the 8 neighbours of a square grid
    assert (adj != adj.T).nnz == 0
    deg = np.asarray((adj > 0).sum(1)).ravel()
    interior = (xy[:, 0] > 100) & (xy[:, 0] < 900) & (xy[:, 1] > 100) & (xy[:, 1] < 700)
    assert (deg[interior] == 8).all() and deg.min() == 3  # corners
    d = adj.tocoo()
    np.testing.assert_allclose(d.data, np.linalg.norm(xy[d.row] - xy[d.col], axis=1))
    with pytest.raises(ValueError, match="at least 2 spots"):
        g.spot_pitch(xy[:1])


def test_radius_graph_isolated_spots_fall_back_to_knn():
    xy = np.concatenate([_grid(4, 4), [[5000.0, 5000.0]]])
    with pytest.warns(UserWarning, match="1 of 17 spots have no neighbour within the radius.*4 nearest"):
        adj = g.radius_graph(xy, radius=300.0)
    assert (adj[16] > 0).sum() == 4 and (adj != adj.T).nnz == 0
    with pytest.warns(UserWarning, match="left isolated"):
        adj = g.radius_graph(xy, radius=300.0, fallback_k=None)
    assert (adj[16] > 0).sum() == 0


def test_smoothing_matrix_averages_self_and_neighbours():
    xy = _grid()
    w = g.smoothing_matrix(xy, 4)
    np.testing.assert_allclose(np.asarray(w.sum(1)).ravel(), 1.0)
    v = np.arange(len(xy), dtype=float)
    nbr = g.knn_indices(xy, 4)
    np.testing.assert_allclose(w @ v, (v + v[nbr].sum(1)) / 5)
    np.testing.assert_array_equal(g.smoothing_matrix(xy, 0).toarray(), np.eye(len(xy)))


def test_similarity_topk_matches_dense_search_in_chunks():
    rng = np.random.default_rng(0)
    q, r = rng.normal(size=(37, 8)), rng.normal(size=(501, 8))
    idx, sim = g.similarity_topk(q, r, 7, chunk_size=64)
    qn, rn = q / np.linalg.norm(q, axis=1, keepdims=True), r / np.linalg.norm(r, axis=1, keepdims=True)
    dense = qn @ rn.T
    ref = np.argsort(-dense, axis=1)[:, :7]
    np.testing.assert_array_equal(idx, ref)
    np.testing.assert_allclose(sim, np.take_along_axis(dense, ref, 1), rtol=1e-5)
    with pytest.raises(ValueError, match=r"1 <= k <= 501"):
        g.similarity_topk(q, r, 600)


def test_reference_graph_links_each_target_to_every_reference_section():
    rng = np.random.default_rng(0)
    xy = _grid(5, 4)
    tx = rng.normal(size=(20, 6))
    refs = {"R1": (rng.normal(size=(30, 6)), rng.poisson(3, (30, 4))), "R2": (rng.normal(size=(25, 6)), rng.poisson(3, (25, 4)))}
    h = g.reference_graph(xy, tx, refs, k_reference=3, k_reference_knn=2)
    links = h["target", "links", "reference"].edge_index.numpy()
    sec = h["reference"].section.numpy()
    src = h["reference"].source_index.numpy()
    for t in range(20):
        mine = links[1, links[0] == t]
        assert len(mine) == 6 and sorted(np.bincount(sec[mine], minlength=2)) == [3, 3]
        for s_i, name in enumerate(refs):
            emb = refs[name][0]
            cos = emb @ tx[t] / (np.linalg.norm(emb, axis=1) * np.linalg.norm(tx[t]))
            assert set(src[mine][sec[mine] == s_i]) == set(np.argsort(-cos)[:3])
    # reference nodes carry their section's measured expression
    y = h["reference"].y.numpy()
    for n in range(len(sec)):
        np.testing.assert_array_equal(y[n], refs[list(refs)[sec[n]]][1][src[n]])
    assert h["reference", "linked_by", "target"].edge_index.shape == (2, 120)
    with pytest.raises(ValueError, match="k_reference=28 is larger than reference section 'R2'"):
        g.reference_graph(xy, tx, refs, k_reference=28)
    with pytest.raises(ValueError, match="same encoder"):
        g.reference_graph(xy, tx[:, :4], refs)


def test_spatial_blocks_partition_the_spots_and_each_halo_holds_every_neighbour():
    """Checked by brute force on a non-square integer grid whose block edges fall on spots: every spot is in exactly
    one core, and a block's members are every spot within ``halo`` (inclusive) of one of its core spots, and no spot
    much farther."""
    yy, xx = np.mgrid[0:13, 0:21]
    xy = np.stack([xx.ravel() + 3.0, yy.ravel() + 5.0], 1)  # 21 × 13 spots, 273 in all, off the origin
    halo = 2.0
    blocks = g.spatial_blocks(xy, 20, halo)
    assert len(blocks) == 16  # ceil(sqrt(273 / 20)) = 4 blocks a side
    cores = np.concatenate([c for c, _ in blocks])
    np.testing.assert_array_equal(np.sort(cores), np.arange(len(xy)))
    sizes = [len(c) for c, _ in blocks]
    assert max(sizes) <= 2 * min(sizes), sizes  # equal squares of the section's extent: similar spot counts
    for core, members in blocks:
        cheb = np.abs(xy[:, None, :] - xy[None, core, :]).max(-1).min(1)  # L∞ distance to the nearest core spot
        want = np.flatnonzero(cheb <= halo)
        assert np.isin(want, members).all(), "a spot within the halo of a core spot is missing"
        assert (cheb[members] <= halo + 1.0).all(), "a member lies beyond the halo"
    # one block when the section is small
    (core, members), = g.spatial_blocks(xy[:20], 20, halo)
    np.testing.assert_array_equal(core, np.arange(20))


def test_radius_graph_links_a_two_spot_section():
    xy = np.array([[0.0, 0.0], [1.0, 0.0], [50.0, 50.0], [51.0, 50.0], [90.0, 0.0]])
    w = g.radius_graph(xy, 2.0, groups=np.array(["a", "a", "b", "b", "c"]), fallback_k=None)
    dense = w.toarray() > 0
    assert dense[0, 1] and dense[1, 0] and dense[2, 3] and dense[3, 2]
    assert not dense[4].any() and dense.sum() == 4  # the one-spot section stays isolated; nothing across sections


def test_call_regions_with_a_one_spot_section():
    """A section of one spot (a lone tile, a cropped section) has no neighbours: its call is kept as it is, and the
    other sections are unaffected."""
    yy, xx = np.mgrid[0:4, 0:4]
    xy = np.vstack([np.stack([xx.ravel(), yy.ravel()], 1), [[100.0, 100.0]]]).astype(float)
    tumour = np.zeros(17, bool)
    tumour[[0, 1, 4, 5]] = True  # a 2 × 2 tumour corner of the grid
    tumour[16] = True
    groups = np.array(["a"] * 16 + ["b"])
    calls = np.asarray(g.call_regions(xy, tumour, groups=groups))
    assert calls[16] == "tumor"  # alone in its section: no neighbour of the other call, so not boundary
    assert calls[0] == "tumor" and (calls[[1, 4, 5]] == "boundary").all() and calls[15] == "non-tumor"
