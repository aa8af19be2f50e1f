"""Direction-binned multi-scale context pooling: numba kernel vs the slow reference, geometry, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from stfm.graph import pool_context, pool_context_reference, ring_radii, spot_pitch


def _grid(nx: int, ny: int, pitch: float, rng, jitter: float = 0.0) -> np.ndarray:
    xx, yy = np.meshgrid(np.arange(nx), np.arange(ny))
    xy = np.c_[xx.ravel(), yy.ravel()].astype(float) * pitch
    return xy + rng.normal(0, jitter, xy.shape)


def _hex(nx: int, ny: int, pitch: float) -> np.ndarray:
    pts = [((i + 0.5 * (j % 2)) * pitch, j * pitch * np.sqrt(3) / 2) for j in range(ny) for i in range(nx)]
    return np.asarray(pts)


@pytest.mark.parametrize(
    ("layout", "scales", "n_sectors"),
    [("st_grid", (1.0, 2.0, 4.0), 4), ("visium_hex", (1.0, 3.0), 6), ("random", (1.0, 2.0), 8)],
)
def test_kernel_matches_reference(layout, scales, n_sectors):
    rng = np.random.default_rng(1)
    if layout == "st_grid":
        xy = _grid(11, 9, 290.6, rng, jitter=6.0)  # her2st: 200 µm pitch ≈ 290.6 px
    elif layout == "visium_hex":
        xy = _hex(10, 10, 100.0)  # Visium: 100 µm centre-to-centre
    else:
        xy = rng.uniform(0, 2000, (150, 2))
    feats = rng.normal(size=(len(xy), 5))
    tokens, mask = pool_context(xy, feats, scales=scales, n_sectors=n_sectors)
    ref_tokens, ref_mask = pool_context_reference(xy, feats, scales=scales, n_sectors=n_sectors)
    assert tokens.shape == (len(xy), len(scales) * n_sectors, 5)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(tokens, ref_tokens, atol=1e-5)
    assert mask.any() and not mask.all()  # border spots miss sectors
    assert np.all(tokens[~mask] == 0)


def test_sectors_follow_image_directions():
    # centre spot with one neighbour to the right (+x) and one below (+y, image coordinates)
    xy = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 100.0]])
    feats = np.array([[0.0], [1.0], [2.0]])
    tokens, mask = pool_context(xy, feats, scales=(1.0,), n_sectors=4, pitch=100.0)
    assert mask[0].tolist() == [True, True, False, False]  # right, down, left, up
    assert tokens[0, 0, 0] == 1.0 and tokens[0, 1, 0] == 2.0
    # the right neighbour sees the centre to its left (sector 2) and the lower spot diagonally (down-left)
    assert mask[1, 2]


def test_rings_are_annuli_in_pitch_units_and_scale_free():
    rng = np.random.default_rng(0)
    xy = _grid(9, 9, 1.0, rng)
    feats = rng.normal(size=(81, 3))
    t1, m1 = pool_context(xy, feats, scales=(1.0, 2.0))
    t2, m2 = pool_context(xy * 137.5, feats, scales=(1.0, 2.0))  # same layout at another pixel size
    np.testing.assert_allclose(t1, t2, atol=1e-5)
    np.testing.assert_array_equal(m1, m2)
    centre = 40  # (4, 4): ring 0 = distance <= 1.5 (8 neighbours), ring 1 = (1.5, 2.5]
    ring0 = np.linalg.norm(xy - xy[centre], axis=1)
    np.testing.assert_allclose(ring_radii((1.0, 2.0), 1.0), [1.5, 2.5])
    expected = feats[(ring0 > 0) & (ring0 <= 1.5)].mean(0)
    assert m1[centre].all()
    # the mean over all ring-0 neighbours equals the count-weighted mean of the sector tokens
    counts = []
    for k in range(4):
        ang = np.arctan2(xy[:, 1] - xy[centre, 1], xy[:, 0] - xy[centre, 0])
        sec = np.floor(((ang + np.pi / 4) % (2 * np.pi)) / (np.pi / 2)).astype(int)
        counts.append(np.sum((ring0 > 0) & (ring0 <= 1.5) & (sec == k)))
    weighted = (t1[centre, :4] * np.asarray(counts)[:, None]).sum(0) / sum(counts)
    np.testing.assert_allclose(weighted, expected, atol=1e-5)


def test_groups_never_mix_sections():
    rng = np.random.default_rng(3)
    xy = _grid(6, 6, 10.0, rng)
    feats_a = rng.normal(size=(36, 2))
    both_xy = np.vstack([xy, xy])  # two sections at the same coordinates
    both_f = np.vstack([feats_a, feats_a + 100.0])
    groups = np.array(["a"] * 36 + ["b"] * 36)
    tokens, _ = pool_context(both_xy, both_f, groups=groups)
    alone, _ = pool_context(xy, feats_a)
    np.testing.assert_allclose(tokens[:36], alone, atol=1e-5)
    assert np.all(tokens[36:][tokens[36:] != 0] > 50)


def test_spot_pitch_for_st_visium_and_tiles():
    rng = np.random.default_rng(0)
    assert spot_pitch(_grid(10, 10, 290.6, rng)) == pytest.approx(290.6)
    assert spot_pitch(_hex(8, 8, 100.0)) == pytest.approx(100.0)
    assert spot_pitch(_grid(20, 20, 224.0, rng)) == pytest.approx(224.0)


def test_bad_input():
    with pytest.raises(ValueError, match="strictly increasing"):
        ring_radii((2.0, 1.0), 1.0)
    with pytest.raises(ValueError, match="at least 2 spots"):
        spot_pitch(np.zeros((1, 2)))
    with pytest.raises(ValueError, match="coordinates of shape"):
        pool_context(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="match the coordinates"):
        pool_context(np.random.default_rng(0).normal(size=(5, 2)), np.zeros((4, 2)))
