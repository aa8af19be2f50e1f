"""Visium reader, AnnData ↔ SpatialData conversion and file round trips keeping every stfm slot."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import DATA_DIR, HAS_HER2ST, load_section, needs_visium

import stfm
from stfm._provenance import record
from stfm._validation import check_valid_key


@needs_visium
def test_read_visium_anndata_and_spatialdata():
    path = DATA_DIR / "visium_tiny" / "spaceranger_1.0.0"
    adata = stfm.io.read_visium(path, library_id="tiny")
    assert adata.shape == (100, 100)
    sf = adata.uns["spatial"]["tiny"]["scalefactors"]
    assert sf["microns_per_pixel"] == pytest.approx(55 / sf["spot_diameter_fullres"])
    assert adata.obsm["spatial"].dtype == np.float64
    sdata = stfm.io.read_visium(path, library_id="tiny", as_spatialdata=True)
    table = sdata.tables["table"]
    assert table.uns["spatial"]["tiny"]["scalefactors"]["microns_per_pixel"] == pytest.approx(sf["microns_per_pixel"])
    assert "tiny" in sdata.shapes and "tiny_hires_image" in sdata.images
    # same spots and coordinates through both paths
    order = table.obs_names.get_indexer(adata.obs_names)
    np.testing.assert_allclose(np.asarray(table.obsm["spatial"])[order], adata.obsm["spatial"])


@needs_visium
def test_read_visium_positions_only_and_annotations():
    root = DATA_DIR / "visium_bc_block_a_partial"
    adata = stfm.io.read_visium(root, counts_file=None, library_id="block_a")
    assert adata.n_vars == 0 and adata.n_obs == 3813
    assert (adata.obs["in_tissue"] == 1).all()
    assert adata.uns["spatial"]["block_a"]["scalefactors"]["microns_per_pixel"] == pytest.approx(55 / 177.4829519178534)
    ann = pd.read_csv(root / "annotations" / "stlearn_region_annotations.csv", index_col=0)
    joined = ann["annot_type"].reindex(adata.obs_names)
    assert joined.notna().sum() == 3789
    assert set(joined.dropna()) == {"Invasive", "Tumor", "Surrounding tumor", "Healthy"}
    sdata = stfm.io.read_visium(root, counts_file=None, library_id="block_a", as_spatialdata=True)
    assert sdata.tables["table"].n_obs == 3813


@needs_visium
def test_read_visium_errors(tmp_path):
    path = DATA_DIR / "visium_tiny" / "spaceranger_1.0.0"
    with pytest.raises(FileNotFoundError, match=r"Counts file .*nope.h5.* not found.*counts_file=None"):
        stfm.io.read_visium(path, counts_file="nope.h5")
    with pytest.raises(FileNotFoundError, match=r"has no 'spatial/' folder"):
        stfm.io.read_visium(tmp_path)
    from PIL import Image

    small = tmp_path / "small.png"
    Image.new("RGB", (500, 500)).save(small)
    with pytest.raises(ValueError, match=r"spots fall outside the image"):
        stfm.io.read_visium(path, fullres_image=small)


@pytest.mark.parametrize("bad", ["has space", "slash/key", "__dunder", "", ".", "colon:key"])
def test_invalid_keys_are_refused(bad):
    with pytest.raises(ValueError, match=r"breaks SpatialData naming rules"):
        check_valid_key(bad)


def test_valid_keys_pass():
    for good in ("X_uni2_h", "predicted", "cancer_region", "X_efficientnet_lite0", "a.b-c"):
        assert check_valid_key(good) == good


def _with_stfm_slots(adata: ad.AnnData) -> ad.AnnData:
    """Add every kind of slot stfm writes (features, predictions, calls, provenance)."""
    rng = np.random.default_rng(0)
    adata.obsm["X_efficientnet_lite0"] = rng.normal(size=(adata.n_obs, 16)).astype(np.float32)
    adata.layers["predicted"] = rng.gamma(2.0, size=adata.shape).astype(np.float32)
    adata.obs["cancer_region"] = pd.Categorical(rng.choice(["tumor", "boundary", "non-tumor"], adata.n_obs), categories=["tumor", "boundary", "non-tumor"])
    adata.obs["cancer_region_score"] = rng.uniform(size=adata.n_obs).astype(np.float32)
    adata.uns["cancer_region_colors"] = ["#d62728", "#ff7f0e", "#1f77b4"]
    record(adata, "X_efficientnet_lite0", "pp.extract_features", encoder="efficientnet_lite0", revision=None, tile_px=224, mpp=0.5, genes=("A", "B"))
    record(adata, "predicted", "tl.predict_expression", library_size=1e4, use_rep="X_efficientnet_lite0")
    return adata


def _assert_same_slots(a: ad.AnnData, b: ad.AnnData) -> None:
    assert list(a.obs_names) == list(b.obs_names) and list(a.var_names) == list(b.var_names)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    np.testing.assert_allclose(a.obsm["spatial"], b.obsm["spatial"])
    np.testing.assert_array_equal(a.obsm["X_efficientnet_lite0"], b.obsm["X_efficientnet_lite0"])
    np.testing.assert_array_equal(a.layers["predicted"], b.layers["predicted"])
    assert list(a.obs["cancer_region"]) == list(b.obs["cancer_region"])
    assert list(a.obs["cancer_region"].cat.categories) == list(b.obs["cancer_region"].cat.categories)
    np.testing.assert_array_equal(a.obs["cancer_region_score"], b.obs["cancer_region_score"])
    assert list(a.uns["cancer_region_colors"]) == list(b.uns["cancer_region_colors"])
    for slot in ("X_efficientnet_lite0", "predicted"):
        ea, eb = a.uns["stfm"][slot], b.uns["stfm"][slot]
        assert set(ea) == set(eb)
        for k in ea:
            np.testing.assert_array_equal(np.asarray(ea[k]), np.asarray(eb[k]))
    assert a.uns["spatial"].keys() == b.uns["spatial"].keys()
    lib = next(iter(a.uns["spatial"]))
    for k, v in a.uns["spatial"][lib]["scalefactors"].items():
        assert b.uns["spatial"][lib]["scalefactors"][k] == pytest.approx(v)


@pytest.mark.skipif(not HAS_HER2ST, reason="her2st mirror not found (set STFM_DATA_DIR)")
def test_h5ad_and_zarr_round_trips_keep_every_slot(tmp_path):
    import spatialdata as sd

    adata = _with_stfm_slots(load_section("B4"))
    adata.write_h5ad(tmp_path / "b4.h5ad")
    back = ad.read_h5ad(tmp_path / "b4.h5ad")
    _assert_same_slots(adata, back)
    assert back.uns["spatial"]["B4"]["images"]["hires"].shape == adata.uns["spatial"]["B4"]["images"]["hires"].shape

    sdata = stfm.io.to_spatialdata(back)  # from the h5ad copy: the full-resolution image is found again
    assert {"B4_hires_image", "B4_full_image"} <= set(sdata.images) and "B4" in sdata.shapes
    full = sdata.images["B4_full_image"]["scale0"]["image"]
    assert full.shape == (3, *back.uns["spatial"]["B4"]["metadata"]["fullres_shape"])
    assert "B4_full_image" not in stfm.io.to_spatialdata(back, fullres_image=False).images
    sdata.write(tmp_path / "b4.zarr")
    again = stfm.io.to_anndata(sd.read_zarr(tmp_path / "b4.zarr"))
    _assert_same_slots(adata, again)
    # the hires image comes back at the same scale
    a_img, b_img = adata.uns["spatial"]["B4"]["images"]["hires"], again.uns["spatial"]["B4"]["images"]["hires"]
    assert a_img.shape == b_img.shape
    np.testing.assert_array_equal(a_img, b_img)


@pytest.mark.skipif(not HAS_HER2ST, reason="her2st mirror not found (set STFM_DATA_DIR)")
def test_to_spatialdata_rejects_bad_names():
    adata = load_section("C1", image=False)
    with pytest.raises(ValueError, match=r"`library_id`='C 1' breaks SpatialData naming rules"):
        stfm.io.to_spatialdata(adata, library_id="C 1")
    with pytest.raises(ValueError, match=r"`table_key`='tab/le' breaks SpatialData naming rules"):
        stfm.io.to_spatialdata(adata, table_key="tab/le")
    with pytest.raises(ValueError, match=r"SpatialData element names must be unique"):
        stfm.io.to_spatialdata(adata, table_key="C1")
    with pytest.raises(ValueError, match=r"differs only in case from the existing element 'C1'"):
        stfm.io.to_spatialdata(adata, table_key="c1")
