"""Tile sources (stfm.data) and make_tiles for H&E-only slides."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import load_section, needs_her2st

import stfm
from stfm.data import ArraySource, LazyArraySource, TiffSource, TileDataset, crop_boxes, open_image


def _synthetic_he(h: int = 1200, w: int = 1600, seed: int = 0) -> np.ndarray:
    """White glass with a pink/purple textured 'tissue' ellipse."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 240, dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    inside = ((yy - h / 2) / (0.35 * h)) ** 2 + ((xx - w / 2) / (0.3 * w)) ** 2 < 1
    tissue = np.stack([200 + 30 * rng.random((h, w)), 90 + 60 * rng.random((h, w)), 170 + 40 * rng.random((h, w))], -1)
    img[inside] = tissue[inside].astype(np.uint8)
    return img


def _write_pyramid(path, img, *, tile=256, compression="zlib"):
    import tifffile

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(img, tile=(tile, tile), subifds=2, compression=compression, photometric="rgb")
        tw.write(img[::2, ::2], tile=(tile, tile), subfiletype=1, compression=compression, photometric="rgb")
        tw.write(img[::4, ::4], tile=(tile, tile), subfiletype=1, compression=compression, photometric="rgb")


# ---------------------------------------------------------------------------------------------------------
# sources


def test_array_source_reads_and_pads_white():
    img = _synthetic_he(300, 400)
    src = open_image(img)
    assert isinstance(src, ArraySource) and src.shape == (300, 400)
    np.testing.assert_array_equal(src.read_region(10, 20, 50, 40), img[20:60, 10:60])
    out = src.read_region(-5, 290, 20, 20)  # past the left and bottom borders
    assert out.shape == (20, 20, 3)
    np.testing.assert_array_equal(out[:10, 5:], img[290:300, 0:15])
    assert (out[10:] == 255).all() and (out[:, :5] == 255).all()
    # channels-first arrays and float images in [0, 1] are accepted
    np.testing.assert_array_equal(open_image(np.moveaxis(img, -1, 0)).read_region(0, 0, 8, 8), img[:8, :8])
    np.testing.assert_array_equal(open_image(img / 255.0).read_region(0, 0, 8, 8), img[:8, :8])


def test_tiff_source_is_lazy_pyramidal_and_exact(tmp_path):
    img = _synthetic_he(1500, 1100)
    path = tmp_path / "slide.tif"
    _write_pyramid(path, img)
    src = open_image(path)
    assert isinstance(src, TiffSource) and src.lazy
    assert src.level_shapes == [(1500, 1100), (750, 550), (375, 275)]
    assert src.level_downsamples[1] == pytest.approx(2.0, rel=1e-3)
    np.testing.assert_array_equal(src.read_region(300, 700, 123, 77), img[700:777, 300:423])
    np.testing.assert_array_equal(src.read_region(10, 20, 30, 30, level=1), img[::2, ::2][20:50, 10:40])
    assert src.best_level(1.0) == 0 and src.best_level(2.5) == 1 and src.best_level(10) == 2
    assert src.fingerprint() == open_image(path).fingerprint()


def test_zarr_and_dask_sources(tmp_path):
    import dask.array as da
    import zarr

    img = _synthetic_he(500, 600)
    z = zarr.open_array(str(tmp_path / "img.zarr"), mode="w", shape=img.shape, chunks=(128, 128, 3), dtype="uint8")
    z[:] = img
    src = open_image(tmp_path / "img.zarr")
    assert isinstance(src, LazyArraySource)
    np.testing.assert_array_equal(src.read_region(100, 50, 70, 90), img[50:140, 100:170])
    d = da.from_array(np.moveaxis(img, -1, 0), chunks=(3, 128, 128))
    dsrc = open_image(d)
    np.testing.assert_array_equal(dsrc.read_region(-3, 400, 150, 150), ArraySource(img).read_region(-3, 400, 150, 150))


def test_open_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_image(tmp_path / "missing.jpg")
    with pytest.raises(TypeError, match="Expected an image"):
        open_image(42)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="Could not open image"):
        open_image(tmp_path / "bad.jpg")


def test_crop_boxes_centred_and_dataset_resamples():
    boxes, size = crop_boxes(np.array([[100.0, 200.0], [100.4, 199.6]]), 10.0)
    assert size == 10
    np.testing.assert_array_equal(boxes, [[95, 195], [95, 195]])  # centre (100, 200) ± 5
    img = _synthetic_he(400, 400)
    xy = np.array([[200.0, 200.0], [3.0, 3.0]])
    ds = TileDataset(img, xy, side_px=163, tile_px=224)
    assert len(ds) == 2 and ds.crop_px == 163 and ds.n_padded == 1
    t = ds[0]
    assert tuple(t.shape) == (224, 224, 3) and str(t.dtype) == "torch.uint8"
    # downsampling reads a coarser pyramid level when one is available
    pyr = LazyArraySource([img, img[::2, ::2]])
    ds2 = TileDataset(pyr, xy[:1], side_px=300, tile_px=100)
    assert ds2.level == 1 and ds2.crop_px == 150


def test_padded_flags_each_border_on_its_own_axis():
    """A crop is padded when it reaches past any one border (left, top, right, bottom, on a non-square image) and
    not when it only touches it; each case is flagged by itself, so an x/y mix-up or an off-by-one shows."""
    h, w, side = 300, 500, 20  # not square: a height/width swap changes the answer
    centres = {
        "inside": (250, 150), "touch left": (10, 150), "touch top": (250, 10), "touch right": (w - 10, 150),
        "touch bottom": (250, h - 10), "past left": (9, 150), "past top": (250, 9), "past right": (w - 9, 150),
        "past bottom": (250, h - 9), "past bottom only, x beyond h": (400, h - 9),
    }  # fmt: skip
    xy = np.array(list(centres.values()), float)
    ds = TileDataset(np.full((h, w, 3), 200, np.uint8), xy, side_px=side, tile_px=8, resize=False)
    flagged = dict(zip(centres, ds.padded.tolist(), strict=True))
    assert flagged == {k: k.startswith("past") for k in centres}
    assert ds.n_padded == 5
    # the padding itself is white, on the side that is past the border only
    tile = ds.read_tile(list(centres).index("past right"))
    assert (tile[:, -1] == 255).all() and (tile[:, 0] == 200).all()


def test_detect_tissue_and_grid_on_synthetic():
    img = _synthetic_he(1200, 1600)
    mask, ds = stfm.data.detect_tissue(img, max_px=400)  # no µm/px: a thumbnail of at most 1024 px
    assert mask.shape == (300, 400) and ds == pytest.approx(4.0)
    truth = ((np.mgrid[:300, :400][0] - 150) / 105.0) ** 2 + ((np.mgrid[:300, :400][1] - 200) / 120.0) ** 2 < 1
    assert (mask == truth).mean() > 0.97
    xy, frac = stfm.data.tile_grid(mask, ds, 100.0, shape=(1200, 1600), min_tissue_fraction=0.5)
    assert len(xy) > 20 and (frac >= 0.5).all()
    # every kept tile centre lies in (or within a tile of) the ellipse
    ry = (xy[:, 1] - 600) / (0.35 * 1200)
    rx = (xy[:, 0] - 800) / (0.3 * 1600)
    assert (ry**2 + rx**2 < 1.3).all()


def test_make_tiles_stride_sets_the_grid_spacing():
    """`stride_um` spaces tile centres at stride / µm-per-px pixels; tiles keep their own size (they overlap)."""
    img = _synthetic_he(1200, 1600)
    default = stfm.pp.make_tiles(img, slide_mpp=0.5, tile_um=56.0)
    dense = stfm.pp.make_tiles(img, slide_mpp=0.5, tile_um=56.0, stride_um=28.0)
    for sdata, step in ((default, 112.0), (dense, 56.0)):
        xy = sdata.tables["tiles_table"].obsm["spatial"]
        assert stfm.graph.spot_pitch(xy) == pytest.approx(step, rel=1e-6)
        bounds = sdata.shapes["tiles"].geometry.bounds
        np.testing.assert_allclose(bounds["maxx"] - bounds["minx"], 112.0, rtol=1e-6)  # 56 µm at 0.5 µm/px
    n_default = default.tables["tiles_table"].n_obs
    assert 3.5 * n_default < dense.tables["tiles_table"].n_obs < 4.5 * n_default  # half the stride, 4× the tiles
    assert dense.tables["tiles_table"].uns["stfm"]["tiles"]["stride_um"] == 28.0


# ---------------------------------------------------------------------------------------------------------
# make_tiles


@needs_her2st
def test_make_tiles_on_b4_finds_tissue_under_the_spots():
    b4 = load_section("B4")
    meta = b4.uns["spatial"]["B4"]
    mpp = meta["scalefactors"]["microns_per_pixel"]
    sdata = stfm.pp.make_tiles(meta["metadata"]["source_image_path"], slide_mpp=mpp)
    assert set(sdata.images) == {"he_image"} and set(sdata.shapes) == {"tiles"} and set(sdata.tables) == {"tiles_table"}
    table = sdata.tables["tiles_table"]
    n = table.n_obs
    assert 300 < n < 1200, n
    assert table.n_vars == 0
    prov = table.uns["stfm"]["tiles"]
    assert 0.05 < prov["tissue_fraction_of_slide"] < 0.5
    side = 112.0 / mpp
    shapes = sdata.shapes["tiles"]
    bounds = shapes.geometry.bounds
    np.testing.assert_allclose(bounds["maxx"] - bounds["minx"], side, rtol=1e-6)
    np.testing.assert_allclose(table.obsm["spatial"][:, 0], shapes.geometry.centroid.x.to_numpy(), atol=1e-6)
    # the ST spots were placed under tissue: nearly all of them fall on a kept tile
    xy = table.obsm["spatial"]
    spots = b4.obsm["spatial"]
    d = np.abs(spots[:, None, :] - xy[None, :, :]).max(-1)
    covered = (d <= side / 2).any(1).mean()
    assert covered > 0.8, covered  # the rest sit on fat (near-white), which is not called tissue
    sf = table.uns["spatial"]["tiles"]["scalefactors"]
    assert sf["microns_per_pixel"] == pytest.approx(mpp)
    assert sf["spot_diameter_fullres"] * sf["microns_per_pixel"] == pytest.approx(112.0)


def test_make_tiles_then_extract_features_on_lazy_tiff(tmp_path):
    """H&E-only slide as a tiled TIFF: the SpatialData image stays lazy and extract_features works on the table."""
    import dask.array as da

    img = _synthetic_he(1200, 1600)
    path = tmp_path / "slide.tif"
    _write_pyramid(path, img)
    sdata = stfm.pp.make_tiles(path, slide_mpp=0.5, tile_um=50.0, max_px=400)
    element = sdata.images["he_image"]
    assert isinstance(element.data, da.Array)  # not loaded into memory
    table = sdata.tables["tiles_table"]
    assert table.n_obs > 20
    sdata.tables["tiles_table"] = table[:6].copy()
    from stfm.encoders import load_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        enc = load_encoder("resnet18")  # random weights offline: only the plumbing is under test here
    stfm.pp.extract_features(sdata, enc, mpp=50.0 / 224, cache=False)
    t = sdata.tables["tiles_table"]
    key = f"X_{enc.key}"
    assert t.obsm[key].shape == (6, enc.embed_dim)
    prov = t.uns["stfm"][key]
    assert prov["image_key"] == "he_image" and prov["n_tiles_padded"] == 0
    assert prov["crop_px"] == 100 and prov["slide_mpp"] == pytest.approx(0.5)
    # same features from the TIFF through the AnnData path
    from anndata import AnnData

    ad = AnnData(np.zeros((6, 0), np.float32))
    ad.obsm["spatial"] = t.obsm["spatial"]
    ad.uns["spatial"] = {"s": {"scalefactors": {"microns_per_pixel": 0.5}}}
    ref = stfm.pp.extract_features(ad, enc, img=path, mpp=50.0 / 224, inplace=False, cache=False)
    np.testing.assert_allclose(t.obsm[key], ref, rtol=1e-5, atol=1e-5)
    # the image element is read through the TIFF itself, pyramid included: coarser tiles come from level 1
    stfm.pp.extract_features(sdata, enc, mpp=50.0 / 50, tile_px=50, key_added="X_coarse", cache=False)
    prov = sdata.tables["tiles_table"].uns["stfm"]["X_coarse"]
    assert prov["level"] == 1 and prov["crop_px"] == 50
    from stfm.data import TiffSource
    from stfm.data._unwrap import source_of

    assert isinstance(source_of(element), TiffSource)
    assert source_of(element.data + 0) is None  # a computed array is read as it is, never through the file


def test_make_tiles_into_existing_spatialdata_and_errors():
    img = _synthetic_he(800, 1000)
    sdata = stfm.pp.make_tiles(img, slide_mpp=0.5, tile_um=40.0, max_px=500, image_key="slide")
    # adding a second grid with another name; the µm/px comes from the first table
    assert stfm.pp.make_tiles(sdata, image_key="slide", tile_um=80.0, shapes_key="big", max_px=500) is None
    assert sdata.tables["big_table"].n_obs < sdata.tables["tiles_table"].n_obs
    assert sdata.tables["big_table"].uns["stfm"]["big"]["slide_mpp"] == pytest.approx(0.5)

    with pytest.raises(ValueError, match="already names an element"):
        stfm.pp.make_tiles(sdata, image_key="slide", max_px=500)
    with pytest.raises(ValueError, match="pass `slide_mpp=`"):
        stfm.pp.make_tiles(img, max_px=500)
    with pytest.raises(KeyError, match=r"`sdata.images\['nope'\]` not found. Available"):
        stfm.pp.make_tiles(sdata, image_key="nope", shapes_key="t2")
    with pytest.raises(ValueError, match="No tile of 40 µm"):
        stfm.pp.make_tiles(np.full((500, 500, 3), 245, np.uint8), slide_mpp=0.5, tile_um=40.0)
    with pytest.raises(ValueError, match="min_tissue_fraction"):
        stfm.pp.make_tiles(img, slide_mpp=0.5, min_tissue_fraction=1.5)


def test_make_tiles_output_survives_zarr_write(tmp_path):
    from spatialdata import read_zarr

    img = _synthetic_he(600, 800)
    sdata = stfm.pp.make_tiles(img, slide_mpp=0.5, tile_um=40.0, max_px=400)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sdata.write(tmp_path / "s.zarr")
        back = read_zarr(tmp_path / "s.zarr")
    t = back.tables["tiles_table"]
    assert t.n_obs == sdata.tables["tiles_table"].n_obs
    assert t.uns["spatial"]["tiles"]["metadata"]["image_key"] == "he_image"
