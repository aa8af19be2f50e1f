"""What a user probe broke (issue: reliability pass), each fixed and pinned by a test of its message or behaviour."""

from __future__ import annotations

import re
import warnings

import anndata as ad
import numpy as np
import pytest
from conftest import DATA_DIR, load_section, needs_her2st

import stfm

EMB = "X_efficientnet_lite0"


@pytest.fixture(scope="module")
def lite0():
    return stfm.encoders.load_encoder("efficientnet_lite0")


# ---------------------------------------------------------------------------------------------------------
# silent or harmful before
# ---------------------------------------------------------------------------------------------------------
@needs_her2st
def test_truncated_jpeg_is_refused_naming_the_file(tmp_path, lite0):
    b4 = load_section("B4")
    src = stfm.datasets.her2st("B4").uns["spatial"]["B4"]["metadata"]["source_image_path"]
    half = tmp_path / "B4_half.jpg"
    data = open(src, "rb").read()
    half.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"B4_half\.jpg.*truncated or corrupt.*end-of-image marker"):
        stfm.pp.extract_features(b4[:5].copy(), lite0, img=half, cache=False)
    with pytest.raises(ValueError, match=r"B4_half\.jpg.*truncated"):
        stfm.io.read_her2st(DATA_DIR / "her2st", "B4", image=half)
    not_jpeg = tmp_path / "noise.jpg"
    not_jpeg.write_bytes(b"\x00" * 1000)
    with pytest.raises(ValueError, match=r"noise\.jpg.*Expected a JPEG/PNG/TIFF H&E image"):
        stfm.pp.extract_features(b4[:5].copy(), lite0, img=not_jpeg, cache=False)


@needs_her2st
def test_a1_viewer_png_is_not_a_source_image_and_embeds_with_the_suggested_call(lite0):
    a1 = load_section("A1")
    meta = a1.uns["spatial"]["A1"]["metadata"]
    assert "source_image_path" not in meta and meta["hires_image_path"].endswith("A1_HE_image_dark.png")
    with pytest.raises(ValueError, match=r"too coarse.*To embed the hires image anyway") as err:
        stfm.pp.extract_features(a1, lite0, cache=False)
    mpp, tile_px = re.search(r"mpp=([0-9.]+), tile_px=(\d+)", str(err.value)).groups()
    with pytest.warns(UserWarning, match="using the hires image"):
        stfm.pp.extract_features(a1, lite0, mpp=float(mpp), tile_px=int(tile_px), cache=False)
    prov = a1.uns["stfm"][EMB]
    assert a1.obsm[EMB].shape == (a1.n_obs, 1280) and prov["image"] == "hires"
    assert prov["tile_um"] == pytest.approx(112.0, rel=0.02)  # the same physical tile as at 0.5 µm/px
    # the crops sit on the tissue of the PNG: spot centres are darker than the glass
    hires = a1.uns["spatial"]["A1"]["images"]["hires"].astype(float)
    xy = (a1.obsm["spatial"] * a1.uns["spatial"]["A1"]["scalefactors"]["tissue_hires_scalef"]).round().astype(int)
    centre = hires[xy[:, 1].clip(0, hires.shape[0] - 1), xy[:, 0].clip(0, hires.shape[1] - 1)].mean(1)
    glass = np.percentile(hires.mean(2), 99)
    assert (centre < glass - 20).mean() > 0.8
    x = a1.obsm[EMB] / np.linalg.norm(a1.obsm[EMB], axis=1, keepdims=True)
    assert (x @ x.T).mean() < 0.99  # not one feature vector for every spot


def test_atomic_zarr_and_h5ad_writers(tmp_path):
    sdata = stfm.datasets.synthetic_st(n_sections=2, n_patients=1, grid=(5, 4), n_genes=8, as_spatialdata=True)
    target = tmp_path / "out.zarr"
    stfm.io.write_zarr(sdata, target)
    with pytest.raises(FileExistsError, match="already exists"):
        stfm.io.write_zarr(sdata, target)
    sdata.tables["table"].obs["new"] = 1
    stfm.io.write_zarr(sdata, target, overwrite=True)
    import spatialdata as sd

    back = sd.read_zarr(target)
    assert "new" in back.tables["table"].obs and sorted(p.name for p in tmp_path.iterdir()) == ["out.zarr"]
    assert sdata.path == target
    a = stfm.datasets.synthetic_st(n_sections=1, n_patients=1, grid=(4, 4), n_genes=5)
    stfm.io.write_h5ad(a, tmp_path / "a.h5ad")
    assert ad.read_h5ad(tmp_path / "a.h5ad").shape == a.shape
    with pytest.raises(FileExistsError):
        stfm.io.write_h5ad(a, tmp_path / "a.h5ad", overwrite=False)


def test_unwritable_output_fails_before_any_work(tmp_path):
    import os

    a = stfm.datasets.synthetic_st(n_sections=1, n_patients=1, grid=(4, 4), n_genes=5)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a file where the output folder should be: even root cannot write under it
    model = stfm.tl.fit_expression(a, method="ridge", embedding_key="X_synthetic", n_top_genes=4)
    for write in (lambda p: stfm.io.write_h5ad(a, p), lambda p: model.save(p)):
        with pytest.raises(PermissionError, match="Cannot create the folder"):
            write(blocker / "sub" / "out")
    if os.geteuid() == 0:
        return  # root ignores folder permissions; the mode check below needs an ordinary user
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            stfm.io.write_h5ad(a, ro / "a.h5ad")
    finally:
        ro.chmod(0o700)


def test_shapes_added_never_replaces_another_element():
    sdata = stfm.datasets.synthetic_st(n_sections=2, n_patients=1, grid=(6, 5), n_genes=60, as_spatialdata=True)
    kw = {"method": "signature", "gene_list": ["G0", "G1", "G2", "G3"], "table_key": "table"}
    with pytest.raises(ValueError, match=r"`shapes_added`='S0' would replace the spots the table annotates"):
        stfm.tl.detect_cancer_regions(sdata, shapes_added="S0", **kw)
    with pytest.raises(ValueError, match=r"`shapes_added`='s0' differs only in case from the existing shapes element 'S0'"):
        stfm.tl.detect_cancer_regions(sdata, shapes_added="s0", **kw)
    with pytest.raises(ValueError, match="would replace an existing tables element"):
        stfm.tl.detect_cancer_regions(sdata, shapes_added="table", **kw)
    assert set(sdata.shapes) == {"S0", "S1"}  # nothing was written by the refused calls
    stfm.tl.detect_cancer_regions(sdata, shapes_added="tumour", **kw)
    assert "tumour" in sdata.shapes
    stfm.tl.detect_cancer_regions(sdata, shapes_added="tumour", **kw)  # its own polygons may be replaced


@needs_her2st
def test_transposed_coordinates_warn(lite0):
    b4 = load_section("B4")
    sub = b4[np.linspace(0, b4.n_obs - 1, 40).astype(int)].copy()
    swapped = sub.copy()
    swapped.obsm["spatial"] = swapped.obsm["spatial"][:, ::-1].copy()  # still inside the 9272 × 9923 image
    with pytest.warns(UserWarning, match=r"sit on tissue.*would with x and y swapped.*\(y, x\)"):
        stfm.pp.extract_features(swapped, lite0, cache=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        stfm.pp.extract_features(sub, lite0, cache=False)  # the right way round: no warning


# ---------------------------------------------------------------------------------------------------------
# deep tracebacks before: each is an stfm message now
# ---------------------------------------------------------------------------------------------------------
def test_signature_on_a_panel_too_small_for_control_genes():
    a = stfm.datasets.synthetic_st(n_sections=1, n_patients=1, grid=(6, 5), n_genes=6)
    with pytest.raises(ValueError, match=r"only 2 other genes.*at least 8 genes besides the signature"):
        stfm.tl.detect_cancer_regions(a, method="signature", gene_list=["G0", "G1", "G2", "G3"])


@pytest.mark.parametrize("method", ["zinb", "ridge", "retrieval"])
def test_load_with_a_section_never_seen_in_training(method, tmp_path):
    cohort = stfm.datasets.synthetic_st(n_sections=3, n_patients=1, grid=(6, 5), n_genes=10)
    train = cohort[cohort.obs["section"] != "S2"].copy()
    kw = {} if method == "ridge" else {"max_epochs": 2}
    model = stfm.tl.fit_expression(train, method=method, embedding_key="X_synthetic", n_top_genes=6, **kw)
    model.save(tmp_path / "m")
    query = cohort[cohort.obs["section"] == "S2", model.genes].copy()
    back = type(model).load(tmp_path / "m", adata=query)
    np.testing.assert_allclose(back.predict(), model.predict(query), rtol=1e-5)


def test_nan_coordinates_are_named(lite0):
    a = stfm.datasets.synthetic_st(n_sections=1, n_patients=1, grid=(5, 4), n_genes=5)
    a.obsm["spatial"] = a.obsm["spatial"].copy()
    a.obsm["spatial"][2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf coordinates for 1 of 20 spots \(e.g. \['S0_2'\]\)"):
        stfm.pp.extract_features(a, lite0, img=np.full((1200, 1200, 3), 200, np.uint8), slide_mpp=1.0)
    with pytest.raises(ValueError, match="NaN or inf coordinates"):
        stfm.tl.detect_cancer_regions(a, method="signature", gene_list=["G0", "G1"])


def test_view_anndata_setup_works_and_explains_a_loaded_model(tmp_path):
    a = stfm.datasets.synthetic_st(n_sections=2, n_patients=1, grid=(5, 4), n_genes=6)
    model = stfm.tl.fit_expression(a, method="ridge", embedding_key="X_synthetic", n_top_genes=4)
    model.view_anndata_setup()  # scvi-tools 1.4 alone fails here: `rich.pretty` is used without being imported
    model.save(tmp_path / "m")
    with pytest.raises(ValueError, match=r"loaded without its training data.*pass `adata=`"):
        stfm.model.load_model(tmp_path / "m").view_anndata_setup()


def test_encoder_suggestions():
    with pytest.raises(KeyError, match=r"Unknown encoder 'UNI2-h'\. Did you mean 'uni2_h'\?"):
        stfm.encoders.get_card("UNI2-h")
    with pytest.raises(KeyError, match=r"Did you mean 'h_optimus_1'"):
        stfm.encoders.get_card("bioptimus/H-optimus-1")
    with pytest.raises(KeyError, match=r"neither a card key nor a timm model name\. Did you mean 'uni2_h'\?"):
        stfm.encoders.load_encoder("UNI2-h")
    a = stfm.datasets.synthetic_st(n_sections=1, n_patients=1, grid=(4, 4), n_genes=5)
    with pytest.raises(KeyError, match=r"extract_features\(adata, 'efficientnet_lite0', key_added='X_efficientnet'\)"):
        stfm.tl.fit_expression(a, embedding_key="X_efficientnet")
    with pytest.raises(KeyError, match=r"extract_features\(adata, 'uni2_h'\)` \(it writes `obsm\['X_uni2_h'\]`\)"):
        stfm.tl.fit_expression(a, embedding_key="X_uni2_h")
