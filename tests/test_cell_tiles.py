"""Cell-level tiles: cell-centred crops at a stated physical size, cell outlines as masks, Visium HD bins embedded on
a grid of encoder-sized squares; and the Xenium fixture end to end (read → cell tiles → features → fit → predict)."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pytest
from conftest import DATA_DIR

import stfm
from stfm.data import TileDataset
from stfm.pp._inputs import inputs_spatialdata

XENIUM = DATA_DIR / "formats" / "xenium_sfe_toy" if DATA_DIR is not None else None
XENIUM_KW = {
    "cells_labels": False,
    "nucleus_labels": False,
    "image_mpp": 400 / 237,
    "image_origin_um": (1000.0, 1000.0),
}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def xenium():
    if XENIUM is None or not XENIUM.is_dir():
        pytest.skip("format fixture 'xenium_sfe_toy' not found: set STFM_DATA_DIR to a folder holding formats/")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata = stfm.io.read_xenium(XENIUM, **XENIUM_KW)
    # 18 centroids lie just past the toy's crop (formats/README.md): keep the cells on the image
    table = sdata.tables["table"]
    xy = table.obsm["spatial"]
    sdata.tables["table"] = table[((xy >= 0) & (xy < 237)).all(1)].copy()
    return sdata


def _polygon_area(p: np.ndarray) -> float:
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))


def test_cell_masks_are_the_cells_outlines_in_image_pixels(xenium):
    table = xenium.tables["table"]
    inputs = inputs_spatialdata(xenium, table, image_key=None, shapes_key="cell_circles", spatial_key="spatial",
                                slide_mpp=None, mask_key="cell_boundaries")  # fmt: skip
    mpp = inputs.slide_mpp
    assert mpp == pytest.approx(400 / 237)
    side_px = 60 / mpp  # 60 µm crops
    ds = TileDataset(inputs.source, inputs.xy, side_px, 32, resize=False, masks=inputs.masks)
    assert ds.crop_px == round(side_px)
    # an outline's area in pixels is the cell's area in µm² (cells.parquet) over mpp²
    cells = __import__("pandas").read_parquet(XENIUM / "cells.parquet").set_index("cell_id")
    ids = table.obs["cell_id"].to_numpy()
    inside = [i for i in range(len(ids)) if not ds.padded[i]][:80]
    got = np.array([ds.crop_mask(i).sum() for i in inside], dtype=float)
    expect = cells.loc[ids[inside], "cell_area"].to_numpy(dtype=float) / mpp**2
    assert np.median(np.abs(got / expect - 1)) < 0.15, np.median(got / expect)
    # pixel by pixel it is the outline: pixel centres inside the polygon, tested independently (matplotlib)
    from matplotlib.path import Path as MplPath

    assert ds.level == 0
    r, cc = np.mgrid[0 : ds.crop_px, 0 : ds.crop_px]
    for i in inside[:20]:
        x0, y0 = ds.boxes[i]
        centres = np.c_[x0 + cc.ravel() + 0.5, y0 + r.ravel() + 0.5]
        ref = MplPath(inputs.masks[i]).contains_points(centres).reshape(ds.crop_px, ds.crop_px)
        assert (ds.crop_mask(i) == ref).mean() > 0.99
    # the outline surrounds the cell's centre: the crop's central pixel is inside it for almost every cell
    c = ds.crop_px // 2
    centre_in = np.mean([ds.crop_mask(i)[c - 1 : c + 2, c - 1 : c + 2].any() for i in inside])
    assert centre_in > 0.9, centre_in
    # the masked crop is white outside the outline and the image inside it
    i = inside[0]
    masked, m = ds.read_tile(i), ds.crop_mask(i)
    plain = TileDataset(inputs.source, inputs.xy, side_px, 32, resize=False).read_tile(i)
    assert (masked[~m] == 255).all() and np.array_equal(masked[m], plain[m])


def test_extract_features_on_cells_at_a_stated_size_with_masks(xenium, tmp_path):
    # fluorescence-only fixture: the format check is that cells are cut where and as large as stated
    # 40 µm at the toy's 1.69 µm/px is a 24-px crop: embedded at that size (finer tiles would be blown-up pixels)
    kw = {"shapes_key": "cell_circles", "tile_um": 40.0, "tile_px": 24, "cache": False, "show_progress_bar": False}
    stfm.pp.extract_features(xenium, "efficientnet_lite0", **kw)
    table = xenium.tables["table"]
    prov = table.uns["stfm"]["X_efficientnet_lite0"]
    assert prov["tile_um"] == 40.0 and prov["crop_px"] == round(40.0 / (400 / 237))
    assert prov["mpp"] == pytest.approx(40.0 / 24)
    plain = np.asarray(table.obsm["X_efficientnet_lite0"]).copy()
    assert plain.shape == (table.n_obs, 1280) and np.isfinite(plain).all()
    masked = stfm.pp.extract_features(xenium, "efficientnet_lite0", mask="nucleus_boundaries", inplace=False, **kw)
    assert masked.shape == plain.shape and not np.allclose(masked, plain)
    # then the panel: fit on cells of two thirds of the run, predict the rest from their tiles alone
    x = table.obsm["spatial"][:, 0]
    table.obs["section"] = np.where(x < np.quantile(x, 1 / 3), "a", np.where(x < np.quantile(x, 2 / 3), "b", "c"))
    table.obs["patient"] = "p"
    train = table[table.obs["section"] != "c"].copy()
    model = stfm.tl.fit_expression(train, method="multimodal", embedding_key="X_efficientnet_lite0", n_top_genes=10,
                                   section_key="section", max_epochs=2, pretrain_epochs=2, seed=0)  # fmt: skip
    query = table[table.obs["section"] == "c", model.genes].copy()
    stfm.tl.predict_expression(query, model, library_size="predicted")
    pred = np.asarray(query.layers["predicted"])
    assert pred.shape == (query.n_obs, 10) and np.isfinite(pred).all() and (pred >= 0).all()


def test_mask_errors(xenium):
    with pytest.raises(KeyError, match="cell_boundaries"):
        stfm.pp.extract_features(xenium, "efficientnet_lite0", shapes_key="cell_circles", mask="cells_outline",
                                 inplace=False, cache=False)  # fmt: skip
    table = xenium.tables["table"]
    shapes = xenium.shapes["cell_boundaries"]
    xenium.shapes["few_boundaries"] = shapes.iloc[5:]
    try:
        lacking = int(table.obs["cell_id"].isin(shapes.index[:5]).sum())
        with pytest.raises(ValueError, match=rf"{lacking} of {table.n_obs} cells have no boundary"):
            inputs_spatialdata(xenium, table, image_key=None, shapes_key="cell_circles", spatial_key="spatial",
                               slide_mpp=None, mask_key="few_boundaries")  # fmt: skip
    finally:
        del xenium.shapes["few_boundaries"]
    with pytest.raises(ValueError, match="SpatialData"):
        stfm.pp.extract_features(ad.AnnData(np.zeros((3, 1))), "efficientnet_lite0", mask="cell_boundaries")
    with pytest.raises(ValueError, match="not both"):
        stfm.pp.extract_features(xenium, "efficientnet_lite0", spot_scale=1.0, tile_um=30.0)


def _hd_bins(bin_um: float = 8.0, mpp: float = 0.5, size_px: int = 1344):
    """A Visium HD-like bin table on an H&E whose 112-µm squares each have their own colour."""
    side = 112.0 / mpp
    yy, xx = np.mgrid[0:size_px, 0:size_px]
    sq = (yy // side).astype(int) * 100 + (xx // side).astype(int)
    rng = np.random.default_rng(0)
    palette = {k: rng.integers(40, 230, 3) for k in np.unique(sq)}
    img = np.zeros((size_px, size_px, 3), np.uint8)
    for k, col in palette.items():
        img[sq == k] = col
    step = bin_um / mpp
    g = np.arange(step / 2, size_px, step)
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    a = ad.AnnData(np.zeros((len(xy), 1), np.float32))
    a.obsm["spatial"] = xy
    a.uns["spatial"] = {"hd": {"images": {}, "scalefactors": {"microns_per_pixel": mpp, "spot_diameter_fullres": step},
                               "metadata": {"platform": "visium_hd", "bin_size_um": bin_um}}}  # fmt: skip
    return a, img, side


def test_visium_hd_bins_are_embedded_on_encoder_sized_squares():
    a, img, side = _hd_bins()
    kw = {"img": img, "tile_px": 64, "tile_um": 112.0, "cache": False, "show_progress_bar": False}
    stfm.pp.extract_features(a, "efficientnet_lite0", **kw)
    prov = a.uns["stfm"]["X_efficientnet_lite0"]
    tile = a.obs["X_efficientnet_lite0_tile"].to_numpy()
    square = np.floor(a.obsm["spatial"] / side).astype(int)
    n_sq = len(np.unique(square, axis=0))
    assert prov["bins"] == "tile" and prov["n_tiles"] == n_sq and prov["n_bins"] == a.n_obs > 20 * n_sq
    # bins share features exactly when they share a square
    same = square[:, None, :] == square[None, :, :]
    assert np.array_equal(tile[:, None] == tile[None, :], same.all(-1))
    feats = np.asarray(a.obsm["X_efficientnet_lite0"])
    # and those features are the tile centred on the square, cut independently
    centres = ad.AnnData(np.zeros((n_sq, 1), np.float32))
    first = np.unique(tile, return_index=True)[1]
    centres.obsm["spatial"] = (square[first] + 0.5) * side
    centres.uns["spatial"] = {"c": {"images": {}, "scalefactors": {"microns_per_pixel": 0.5}, "metadata": {}}}
    direct = stfm.pp.extract_features(centres, "efficientnet_lite0", inplace=False, **kw)
    np.testing.assert_allclose(feats[first], direct, rtol=1e-5, atol=1e-5)
    # one tile per bin when asked
    each = stfm.pp.extract_features(a[:50].copy(), "efficientnet_lite0", bins="each", inplace=False, **kw)
    assert each.shape == (50, 1280)
