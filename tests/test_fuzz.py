"""Fuzzing (hypothesis): readers, tile geometry, context pooling and graphs, key validation.

Properties, not examples: nothing outside the documented errors is raised (``ValueError``, ``KeyError``,
``TypeError``, ``FileNotFoundError``), and what comes back has the documented shapes and dtypes.
"""

from __future__ import annotations

import string

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import stfm

DOCUMENTED = (ValueError, KeyError, TypeError, FileNotFoundError)


# ---------------------------------------------------------------------------------------------------------
# her2st readers: counts TSV and spot files with missing columns, duplicated spots, NaN, text
# ---------------------------------------------------------------------------------------------------------
COUNT_FAULTS = ["none", "nan", "negative", "float", "text", "duplicate_row", "extra_value", "duplicate_gene", "empty"]
SPOT_FAULTS = ["none", "drop_column", "nan_pixel", "text_pixel", "none_selected", "duplicate_row", "missing_spot"]
SPOT_COLUMNS = ["x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"]


@st.composite
def her2st_files(draw):
    n_spots = draw(st.integers(1, 10))
    n_genes = draw(st.integers(1, 5))
    cells = sorted(draw(st.sets(st.tuples(st.integers(1, 30), st.integers(1, 30)), min_size=n_spots, max_size=n_spots)))
    counts = draw(st.lists(st.lists(st.integers(0, 30), min_size=n_genes, max_size=n_genes), min_size=n_spots, max_size=n_spots))
    return cells, counts, draw(st.sampled_from(COUNT_FAULTS)), draw(st.sampled_from(SPOT_FAULTS)), draw(st.integers(0, 10**6))


def _write(tmp, cells, counts, count_fault, spot_fault, seed):
    rng = np.random.default_rng(seed)
    genes = [f"G{j}" for j in range(len(counts[0]))]
    if count_fault == "duplicate_gene" and len(genes) > 1:
        genes[1] = genes[0]
    rows = [[str(v) for v in r] for r in counts]
    i, j = rng.integers(len(rows)), rng.integers(len(rows[0]))
    if count_fault in ("nan", "negative", "float", "text"):
        rows[i][j] = {"nan": "nan", "negative": "-3", "float": "1.5", "text": "abc"}[count_fault]
    if count_fault == "extra_value":
        rows[i].append("7")
    names = [f"{x}x{y}" for x, y in cells]
    lines = ["\t" + "\t".join(genes)] + [f"{n}\t" + "\t".join(r) for n, r in zip(names, rows, strict=True)]
    if count_fault == "duplicate_row":
        lines.append(lines[-1])
    if count_fault == "empty":
        lines = lines[:1]
    (tmp / "S.tsv").write_text("\n".join(lines) + "\n")
    spot_rows = []
    for x, y in cells:
        px, py = 290.6 * x + rng.normal(0, 2), 290.6 * y + rng.normal(0, 2)
        spot_rows.append([x, y, x + rng.normal(0, 0.01), y + rng.normal(0, 0.01), px, py, 1])
    cols = list(SPOT_COLUMNS)
    if spot_fault == "missing_spot" and len(spot_rows) > 1:
        spot_rows = spot_rows[1:]
    if spot_fault == "duplicate_row":
        spot_rows.append(list(spot_rows[0]))
    if spot_fault == "none_selected":
        for r in spot_rows:
            r[-1] = 0
    text = [[str(v) for v in r] for r in spot_rows]
    if spot_fault in ("nan_pixel", "text_pixel"):
        text[0][4] = "nan" if spot_fault == "nan_pixel" else "left"
    if spot_fault == "drop_column":
        k = int(rng.integers(len(cols)))
        cols = cols[:k] + cols[k + 1 :]
        text = [r[:k] + r[k + 1 :] for r in text]
    (tmp / "S_selection.tsv").write_text("\n".join(["\t".join(cols)] + ["\t".join(r) for r in text]) + "\n")
    return tmp / "S.tsv", tmp / "S_selection.tsv"


@given(her2st_files())
def test_her2st_reader_raises_only_documented_errors(tmp_path_factory, files):
    cells, counts, count_fault, spot_fault, seed = files
    tmp = tmp_path_factory.mktemp("her2st")
    counts_path, spots_path = _write(tmp, cells, counts, count_fault, spot_fault, seed)
    try:
        adata = stfm.io.read_her2st(counts_path, "A1", spots=spots_path, image=False, labels=False, clusters=False)
    except DOCUMENTED as err:
        assert str(err), "an stfm error always says what went wrong"
        return
    # accepted: the documented shapes and types
    assert count_fault in ("none", "duplicate_gene") and spot_fault in ("none", "duplicate_row")
    assert adata.n_obs == len(cells) and adata.X.dtype == np.int32 and adata.X.min() >= 0
    xy = adata.obsm["spatial"]
    assert xy.shape == (adata.n_obs, 2) and np.isfinite(xy).all()
    mpp = adata.uns["spatial"]["A1"]["scalefactors"]["microns_per_pixel"]
    assert np.isfinite(mpp) and mpp > 0


# ---------------------------------------------------------------------------------------------------------
# tile geometry: spots on and past every border, extreme µm/px
# ---------------------------------------------------------------------------------------------------------
@given(
    st.integers(8, 80), st.integers(8, 80),
    st.lists(st.tuples(st.floats(-40, 120), st.floats(-40, 120)), min_size=1, max_size=12),
    st.floats(1.0, 90.0), st.integers(4, 32),
)  # fmt: skip
def test_tile_dataset_shapes_and_padding(h, w, centres, side, tile_px):
    from stfm.data import TileDataset

    img = np.full((h, w, 3), 100, np.uint8)
    xy = np.asarray(centres, dtype=np.float64)
    ds = TileDataset(img, xy, side, tile_px)
    assert len(ds) == len(xy)
    for i in range(len(ds)):
        tile = ds[i]
        assert tuple(tile.shape) == (tile_px, tile_px, 3) and str(tile.dtype) == "torch.uint8"
    # a tile is counted as padded exactly when its crop box (centred, rounded half up) leaves the image
    c = ds.crop_px
    x0, y0 = np.floor(xy[:, 0] - c / 2 + 0.5), np.floor(xy[:, 1] - c / 2 + 0.5)
    leaves = (x0 < 0) | (y0 < 0) | (x0 + c > w) | (y0 + c > h)
    assert ds.n_padded == int(leaves.sum())
    # padding is white, the image is grey: a tile wholly inside the image has no white pixel
    for i in np.flatnonzero(~leaves):
        assert (ds[i].numpy() == 100).all()


@given(st.floats(1e-3, 1e3), st.floats(1e-3, 1e3))
def test_extract_features_scale_errors_are_documented(slide_mpp, mpp):
    a = stfm.datasets.synthetic_st(n_sections=1, n_patients=1, grid=(3, 3), n_genes=3)
    tiny = stfm.encoders.load_encoder(
        _TinyNet(), transform={"tile_px": 8, "mean": (0.5,) * 3, "std": (0.5,) * 3, "mpp": 0.5, "key": "tiny"}
    )
    try:
        feats = stfm.pp.extract_features(a, tiny, img=np.full((900, 900, 3), 90, np.uint8), slide_mpp=slide_mpp,
                                         mpp=mpp, cache=False, inplace=False)  # fmt: skip
    except DOCUMENTED:
        return
    assert feats.shape == (a.n_obs, 4) and feats.dtype == np.float32 and np.isfinite(feats).all()


class _TinyNet:  # placeholder replaced below (torch imported lazily)
    def __new__(cls):
        import torch

        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = torch.nn.Conv2d(3, 4, 3)

            def forward(self, x):
                return self.conv(x).mean(dim=(2, 3))

        return Net()


# ---------------------------------------------------------------------------------------------------------
# context pooling and graphs: degenerate layouts
# ---------------------------------------------------------------------------------------------------------
layouts = st.one_of(
    st.lists(st.tuples(st.floats(0, 1000), st.floats(0, 1000)), min_size=1, max_size=25),  # random
    st.integers(1, 12).map(lambda n: [(100.0 * i, 50.0) for i in range(n)]),  # collinear
    st.integers(1, 8).map(lambda n: [(7.0, 7.0)] * n),  # all coincide
    st.integers(2, 8).map(lambda n: [(0.0, 0.0)] * n + [(500.0, 500.0)]),  # duplicates and a lone spot
)


@given(layouts, st.integers(1, 6))
def test_graphs_on_degenerate_layouts(points, k):
    xy = np.asarray(points, dtype=np.float64)
    n = len(xy)
    groups = np.asarray(["a", "b"])[np.arange(n) % 2]
    try:
        nbr = stfm.graph.knn_indices(xy, k, groups=groups)
    except DOCUMENTED:
        return
    assert nbr.shape == (n, k) and nbr.dtype == np.int64 and (nbr >= 0).all() and (nbr < n).all()
    assert (groups[nbr] == groups[:, None]).all()  # never across sections
    w = stfm.graph.smoothing_matrix(xy, k, groups=groups)
    np.testing.assert_allclose(np.asarray(w.sum(1)).ravel(), 1.0)
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            adj = stfm.graph.radius_graph(xy, groups=groups)
    except DOCUMENTED:
        return
    assert adj.shape == (n, n) and (adj != adj.T).nnz == 0 and (adj.data > 0).all()


@given(layouts, st.sampled_from([(1.0,), (1.0, 2.0, 4.0), (0.5, 3.0)]), st.integers(1, 8))
def test_context_pooling_on_degenerate_layouts(points, scales, n_sectors):
    xy = np.asarray(points, dtype=np.float64)
    feats = np.random.default_rng(0).normal(size=(len(xy), 3)).astype(np.float32)
    try:
        tokens, mask = stfm.graph.pool_context(xy, feats, scales=scales, n_sectors=n_sectors)
    except DOCUMENTED:
        return
    n_ctx = len(scales) * n_sectors
    assert tokens.shape == (len(xy), n_ctx, 3) and tokens.dtype == np.float32 and mask.shape == (len(xy), n_ctx)
    assert np.isfinite(tokens).all() and (tokens[~mask] == 0).all()


@given(layouts, st.floats(0.5, 3.0), st.integers(1, 5))
def test_call_regions_on_degenerate_layouts(points, distance, min_spots):
    xy = np.asarray(points, dtype=np.float64)
    tumour = np.random.default_rng(len(xy)).random(len(xy)) < 0.5
    try:
        calls = stfm.graph.call_regions(xy, tumour, boundary_distance=distance, min_spots=min_spots)
    except DOCUMENTED:
        return
    assert len(calls) == len(xy) and set(calls.categories) == {"tumor", "boundary", "non-tumor"}
    assert not ((np.asarray(calls) == "tumor") & ~tumour).any()  # tumour calls only where the score said so


# ---------------------------------------------------------------------------------------------------------
# key validation
# ---------------------------------------------------------------------------------------------------------
@given(st.text(alphabet=string.printable + "µé/\\ ", max_size=12))
def test_key_validation(key):
    from stfm._validation import check_valid_key

    ok = bool(key) and key not in {".", ".."} and not key.startswith("__") and all(c.isascii() and (c.isalnum() or c in "_.-") for c in key)
    if ok:
        assert check_valid_key(key) == key
    else:
        with pytest.raises(ValueError, match="SpatialData naming rules"):
            check_valid_key(key)


@given(st.one_of(st.integers(), st.none(), st.floats(), st.lists(st.text(max_size=3), max_size=2)))
def test_key_validation_non_strings(value):
    from stfm._validation import check_valid_key

    with pytest.raises(TypeError, match="to be a string"):
        check_valid_key(value)
