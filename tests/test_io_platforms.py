"""Platform readers (Xenium, MERSCOPE, CosMx, Visium HD) on the real format fixtures under ``formats/``.

Every expected number is computed here from the fixture files themselves (parquet, CSV, JSON, PNG/TIFF), not from
what the readers or spatialdata-io report. The placement tests map the centres through the transformations the
returned SpatialData carries and look at the image; they also show that trusting the nominal metadata (the Xenium
``pixel_size``, MERSCOPE's ``manifest.json``) would put the cells off the image, so a reader that did would fail.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import DATA_DIR

import stfm

FORMATS = DATA_DIR / "formats" if DATA_DIR is not None else None
XENIUM_KW = {"cells_labels": False, "nucleus_labels": False}  # the toy's cells.zarr.zip has no masks (MANIFEST)
#: Where the Xenium toy's 237-px images really lie (formats/README.md): a 400-µm crop starting at (1000, 1000) µm.
XENIUM_TRUE = {"image_mpp": 400 / 237, "image_origin_um": (1000.0, 1000.0)}
MERSCOPE_KW = {"z_layers": [3], "cells_boundaries": False}  # boundaries exist at ZIndex 3 only (MANIFEST)


def _fixture(name: str):
    if FORMATS is None or not (FORMATS / name).is_dir():
        pytest.skip(f"format fixture {name!r} not found: set STFM_DATA_DIR to a folder holding formats/{name}/")
    return FORMATS / name


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


@pytest.fixture(scope="module")
def xenium():
    return _quiet(stfm.io.read_xenium, _fixture("xenium_sfe_toy"), **XENIUM_KW, **XENIUM_TRUE)


@pytest.fixture(scope="module")
def merscope():
    return _quiet(stfm.io.read_merscope, _fixture("merscope_sfe_vizgen_toy"), **MERSCOPE_KW)


@pytest.fixture(scope="module")
def cosmx():
    return _quiet(stfm.io.read_cosmx, _fixture("cosmx_spacetrooper_dbkero_tiny"), transcripts=False)


@pytest.fixture(scope="module")
def visium_hd():
    return _quiet(stfm.io.read_visium_hd, _fixture("visium_hd_visiumio_micro"), bin_size=2)


def _entry(sdata, table_key):
    table = sdata.tables[table_key]
    (shapes_key,) = table.uns["spatial"].keys()
    return table, shapes_key, table.uns["spatial"][shapes_key]


def _affine(element, cs):
    from spatialdata.transformations import get_transformation

    t = get_transformation(element, to_coordinate_system=cs)
    return np.asarray(t.to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y")), dtype=float)


def _to_image_px(sdata, shapes_key, image_key, cs):
    """Shape centres → ``cs`` (shapes' transformation) → image pixels (inverse of the image's transformation)."""
    shapes = sdata.shapes[shapes_key]
    c = shapes.geometry.centroid
    xy = np.c_[c.x.to_numpy(), c.y.to_numpy()]
    m = np.linalg.inv(_affine(sdata.images[image_key], cs)) @ _affine(shapes, cs)
    return xy @ m[:2, :2].T + m[:2, 2], shapes.index


def _sample(img, px):
    """Pixel values at (x, y) positions inside ``img`` (h, w), and the fraction of positions inside."""
    c, r = np.floor(px[:, 0]).astype(int), np.floor(px[:, 1]).astype(int)
    ok = (c >= 0) & (r >= 0) & (c < img.shape[1]) & (r < img.shape[0])
    return img[r[ok], c[ok]], ok.mean()


def _image(sdata, key, channel=0):
    from stfm.io._platform_core import level0

    return np.asarray(level0(sdata.images[key]).transpose("c", "y", "x").data[channel], dtype=float)


# ---------------------------------------------------------------------------------------------------- Xenium


def test_xenium_slots(xenium):
    root = _fixture("xenium_sfe_toy")
    cells = pd.read_parquet(root / "cells.parquet")
    import h5py

    with h5py.File(root / "cell_feature_matrix.h5") as f:
        n_genes = int((f["matrix/features/feature_type"][:] == b"Gene Expression").sum())
    table, shapes_key, entry = _entry(xenium, "table")
    assert table.shape == (len(cells), n_genes) == (526, 27)
    cells = cells.set_index("cell_id").loc[table.obs["cell_id"]]
    um = cells[["x_centroid", "y_centroid"]].to_numpy()
    mpp = 400 / 237
    np.testing.assert_allclose(table.obsm["spatial_um"], um)
    np.testing.assert_allclose(table.obsm["spatial"], (um - 1000) / mpp, atol=1e-6)  # x first, then y
    sf, meta = entry["scalefactors"], entry["metadata"]
    assert shapes_key == "cell_circles" and meta["shapes_key"] == "cell_circles" and meta["table_key"] == "table"
    assert meta["platform"] == "xenium" and meta["image_key"] == "morphology_focus" and not meta["image_rgb"]
    assert sf["microns_per_pixel"] == pytest.approx(mpp)
    assert dict(meta["image_mpp"]) == pytest.approx({"morphology_focus": mpp, "morphology_mip": mpp})
    assert meta["nominal_microns_per_pixel"] == pytest.approx(0.2125)  # kept for the record, not used
    diameter = 2 * np.sqrt(cells["cell_area"].to_numpy() / np.pi)
    assert meta["spot_diameter_um"] == pytest.approx(np.median(diameter))
    assert sf["spot_diameter_fullres"] == pytest.approx(np.median(diameter) / mpp)
    # the circles the table annotates: true size, in morphology pixels, same ids
    from spatialdata.models import get_table_keys

    assert get_table_keys(table) == ("cell_circles", "region", "cell_id")
    circles = xenium.shapes["cell_circles"].loc[table.obs["cell_id"]]
    np.testing.assert_allclose(circles["radius"], diameter / 2 / mpp)
    np.testing.assert_allclose(np.c_[circles.geometry.x, circles.geometry.y], table.obsm["spatial"])
    # transcripts and boundaries (µm) were moved with the cells: one µm → pixel transformation for all
    for name in ("transcripts", "cell_boundaries", "nucleus_boundaries"):
        element = xenium.points.get(name, xenium.shapes.get(name))
        np.testing.assert_allclose(
            _affine(element, "global")[:2], [[1 / mpp, 0, -1000 / mpp], [0, 1 / mpp, -1000 / mpp]]
        )
    prov = table.uns["stfm"]["spatial"]
    assert prov["function"] == "io.read_xenium" and prov["n_inside_image"] + prov["n_outside_image"] == 526


def test_xenium_cells_land_on_nuclei(xenium):
    """Cell centres, mapped by the transformations the object reports, sit on DAPI signal; x↔y swapped they do not,
    and under the nominal 0.2125 µm/px of experiment.xenium they would miss the 237-px image entirely."""
    px, _ = _to_image_px(xenium, "cell_circles", "morphology_focus", "global")
    dapi = _image(xenium, "morphology_focus")
    on, inside = _sample(dapi, px)
    assert inside > 0.95
    assert on.mean() > 1.5 * dapi.mean()
    swapped, _ = _sample(dapi, px[:, ::-1])
    assert on.mean() > 1.4 * swapped.mean()
    shifted, _ = _sample(dapi, px + 8)  # 8 px ≈ 13.5 µm, about one nucleus away
    assert on.mean() > 1.4 * shifted.mean()
    specs = json.loads((_fixture("xenium_sfe_toy") / "experiment.xenium").read_text())
    _, nominal_inside = _sample(dapi, np.asarray(xenium.tables["table"].obsm["spatial_um"]) / specs["pixel_size"])
    assert nominal_inside == 0.0


def test_xenium_nominal_pixel_size_is_refused():
    with pytest.raises(
        ValueError,
        match=r"526 of 526 cell centres fall outside image 'morphology_focus' \(237 × 237 px; at 0.2125 µm/px.*"
        r"image_mpp=.*image_origin_um=.*image_mpp≈1.7\d+, image_origin_um≈\(995, 996\).*check_placement=False",
    ):
        _quiet(stfm.io.read_xenium, _fixture("xenium_sfe_toy"), **XENIUM_KW)


def _linked_copy(src, dst, *, skip=(), real_dirs=()):
    """``dst`` holding symlinks to ``src``'s entries except ``skip``; ``real_dirs`` become folders of links."""
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.name in skip:
            continue
        if p.name in real_dirs:
            _linked_copy(p, dst / p.name, skip=skip)
        else:
            (dst / p.name).symlink_to(p)
    return dst


def test_xenium_missing_files(tmp_path):
    src = _fixture("xenium_sfe_toy")
    path = _linked_copy(src, tmp_path / "outs", skip=("experiment.xenium", "cells.zarr.zip", "transcripts.parquet"))
    with pytest.raises(
        FileNotFoundError,
        match=r"lacks files that spatialdata_io.xenium needs: \['experiment.xenium', 'cells.zarr.zip', "
        r"'transcripts.parquet'\]\. Found: \[.*'cells.parquet'.*\]\. Pass the Xenium Onboard Analysis output folder "
        r"\(`outs/`\); `transcripts=False` skips transcripts.parquet\.",
    ):
        stfm.io.read_xenium(path, **XENIUM_KW)
    # what it says works: skipping the optional file leaves only the required ones
    with pytest.raises(FileNotFoundError, match=r"needs: \['experiment.xenium', 'cells.zarr.zip'\]\. Found"):
        stfm.io.read_xenium(path, transcripts=False, **XENIUM_KW)


def test_xenium_image_without_pixel_size(tmp_path):
    src = _fixture("xenium_sfe_toy")
    path = _linked_copy(src, tmp_path / "outs", skip=("experiment.xenium",))
    specs = json.loads((src / "experiment.xenium").read_text())
    del specs["pixel_size"]
    (path / "experiment.xenium").write_text(json.dumps(specs))
    with pytest.raises(ValueError, match=r"experiment.xenium' gives no usable 'pixel_size' .*found None.*Add "):
        stfm.io.read_xenium(path, **XENIUM_KW)


# ---------------------------------------------------------------------------------------------------- MERSCOPE


def test_merscope_slots(merscope):
    root = _fixture("merscope_sfe_vizgen_toy")
    meta_csv = pd.read_csv(root / "cell_metadata.csv", index_col=0)
    genes = [
        c for c in pd.read_csv(root / "cell_by_gene.csv", index_col=0, nrows=1).columns if "blank" not in c.lower()
    ]
    table, shapes_key, entry = _entry(merscope, "table")
    assert table.shape == (len(meta_csv), len(genes)) == (1058, 49)
    meta_csv = meta_csv.loc[table.obs_names.astype(meta_csv.index.dtype)]
    manifest = json.loads((root / "images" / "manifest.json").read_text())
    bbox = manifest["bbox_microns"]
    # µm/px from the mosaic's own extent (300 µm over 695 px), independent of the stale 'microns_per_pixel'
    extent_mpp = (bbox[2] - bbox[0]) / manifest["mosaic_width_pixels"]
    sf, meta = entry["scalefactors"], entry["metadata"]
    assert sf["microns_per_pixel"] == pytest.approx(extent_mpp, rel=1e-3)
    assert manifest["microns_per_pixel"] == pytest.approx(0.108) and meta["nominal_microns_per_pixel"] == 0.108
    a = np.genfromtxt(root / "images" / "micron_to_mosaic_pixel_transform.csv")
    um = meta_csv[["center_x", "center_y"]].to_numpy()
    np.testing.assert_allclose(table.obsm["spatial"], um @ a[:2, :2].T + a[:2, 2])
    np.testing.assert_allclose(table.obsm["spatial_um"], um)
    image_key = "formats_merscope_sfe_vizgen_toy_z3"
    assert shapes_key == "formats_merscope_sfe_vizgen_toy_cell_circles" == meta["shapes_key"]
    assert meta["platform"] == "merscope" and meta["image_key"] == image_key and meta["table_key"] == "table"
    assert sorted(meta["image_channels"]) == [
        "Cellbound1",
        "Cellbound2",
        "Cellbound3",
        "DAPI",
        "PolyT",
    ]  # listdir order
    assert dict(meta["image_mpp"]) == pytest.approx({image_key: extent_mpp}, rel=1e-3)
    d = ((meta_csv.max_x - meta_csv.min_x) + (meta_csv.max_y - meta_csv.min_y)).to_numpy() / 2
    assert meta["spot_diameter_um"] == pytest.approx(np.median(d))
    from spatialdata.models import get_table_keys

    assert get_table_keys(table) == (shapes_key, "cells_region", "EntityID")
    circles = merscope.shapes[shapes_key].loc[table.obs["EntityID"]]
    np.testing.assert_allclose(circles["radius"], d / 2 / sf["microns_per_pixel"])


def test_merscope_stale_manifest_is_reported():
    with pytest.warns(UserWarning, match=r"manifest.json says 0.108 µm/px, but .* gives 0.432 µm/px"):
        stfm.io.read_merscope(_fixture("merscope_sfe_vizgen_toy"), **MERSCOPE_KW)


def test_merscope_cells_on_the_mosaic(merscope):
    """Mapped by the reported transformations the cells fill the mosaic and avoid its cell-free (DAPI-dark) hole;
    x↔y swapped or flipped they fall into it, and at the manifest's 0.108 µm/px most would leave the mosaic."""
    from scipy import ndimage

    image_key = "formats_merscope_sfe_vizgen_toy_z3"
    shapes_key = "formats_merscope_sfe_vizgen_toy_cell_circles"
    channels = list(merscope.images[image_key]["scale0"]["image"].coords["c"].values)
    dapi = _image(merscope, image_key, channels.index("DAPI"))
    dark = ndimage.gaussian_filter(dapi, 3) < 0.5 * np.median(dapi)
    assert 0.02 < dark.mean() < 0.1  # the fixture has a hole to fall into
    px, _ = _to_image_px(merscope, shapes_key, image_key, "global")
    in_dark, inside = _sample(dark, px)
    assert inside > 0.95 and in_dark.mean() < 0.005
    lo, hi = np.percentile(px, 1, axis=0), np.percentile(px, 99, axis=0)
    assert ((hi - lo) > 0.9 * np.array(dapi.shape[::-1])).all()  # the cells span the mosaic, not a quarter of it
    for wrong in (px[:, ::-1], np.c_[dapi.shape[1] - px[:, 0], px[:, 1]]):
        assert _sample(dark, wrong)[0].mean() > 0.02
    um = np.asarray(merscope.tables["table"].obsm["spatial_um"])
    stale = (um - um.min(0)) / 0.108
    assert _sample(dark, stale)[1] < 0.1


def test_merscope_mosaic_without_pixel_size(tmp_path):
    src = _fixture("merscope_sfe_vizgen_toy")
    path = _linked_copy(
        src, tmp_path / "region_0", skip=("micron_to_mosaic_pixel_transform.csv",), real_dirs=("images",)
    )
    with pytest.raises(FileNotFoundError, match=r"micron_to_mosaic_pixel_transform.csv' not found: .*no pixel size"):
        stfm.io.read_merscope(path, **MERSCOPE_KW)


# ---------------------------------------------------------------------------------------------------- CosMx


def test_cosmx_slots(cosmx):
    root = _fixture("cosmx_spacetrooper_dbkero_tiny")
    meta_csv = pd.read_csv(root / "DBKero_metadata_file.csv")
    expr = pd.read_csv(root / "DBKero_exprMat_file.csv", nrows=1)
    n_targets = expr.shape[1] - 2  # minus fov, cell_ID
    table, shapes_key, entry = _entry(cosmx, "table")
    assert table.shape == (len(meta_csv), n_targets) == (905, 1010)
    meta_csv.index = meta_csv["cell_ID"].astype(str) + "_" + meta_csv["fov"].astype(str)
    meta_csv = meta_csv.loc[table.obs_names]
    np.testing.assert_allclose(table.obsm["spatial"], meta_csv[["CenterX_global_px", "CenterY_global_px"]])
    np.testing.assert_allclose(table.obsm["spatial_fov"], meta_csv[["CenterX_local_px", "CenterY_local_px"]])
    np.testing.assert_allclose(table.obsm["spatial_um"], table.obsm["spatial"] * 0.12028)
    sf, meta = entry["scalefactors"], entry["metadata"]
    assert shapes_key == "DBKero_cell_circles" and meta["platform"] == "cosmx" and meta["n_fov"] == 1
    assert sf["microns_per_pixel"] == 0.12028
    d_px = 2 * np.sqrt(meta_csv["Area"].to_numpy() / np.pi)
    assert meta["spot_diameter_um"] == pytest.approx(np.median(d_px) * 0.12028)
    # no CellComposite image in this fixture: no image element, no image_key (nothing for extract_features)
    assert len(cosmx.images) == 0 and "image_key" not in meta and dict(meta["image_mpp"]) == {}
    from spatialdata.models import get_table_keys

    assert get_table_keys(table) == (shapes_key, "fov_labels", "instance_id")
    circles = cosmx.shapes[shapes_key].loc[table.obs["instance_id"]]
    np.testing.assert_allclose(np.c_[circles.geometry.x, circles.geometry.y], table.obsm["spatial"])
    np.testing.assert_allclose(circles["radius"], d_px / 2)


def test_cosmx_pixel_size_argument():
    sdata = _quiet(
        stfm.io.read_cosmx, _fixture("cosmx_spacetrooper_dbkero_tiny"), transcripts=False, pixel_size_um=0.18
    )
    table, _, entry = _entry(sdata, "table")
    assert entry["scalefactors"]["microns_per_pixel"] == 0.18
    np.testing.assert_allclose(table.obsm["spatial_um"], table.obsm["spatial"] * 0.18)
    with pytest.raises(ValueError, match=r"Expected `pixel_size_um` to be a finite number > 0, found -1"):
        stfm.io.read_cosmx(_fixture("cosmx_spacetrooper_dbkero_tiny"), transcripts=False, pixel_size_um=-1)


# ---------------------------------------------------------------------------------------------------- Visium HD


def test_visium_hd_slots(visium_hd):
    root = _fixture("visium_hd_visiumio_micro") / "binned_outputs" / "square_002um"
    pos = pd.read_parquet(root / "spatial" / "tissue_positions.parquet").set_index("barcode")
    sf_json = json.loads((root / "spatial" / "scalefactors_json.json").read_text())
    table, shapes_key, entry = _entry(visium_hd, "square_002um")
    assert table.shape == (len(pos), 10) == (10, 10)
    pos = pos.loc[table.obs_names]
    np.testing.assert_allclose(table.obsm["spatial"], pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]])
    # µm/px from the bin grid itself: pixel distance between bins over array distance × 2 µm
    design = np.c_[pos["array_col"], pos["array_row"], np.ones(len(pos))]
    coef = np.linalg.lstsq(design, pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(), rcond=None)[0]
    grid_mpp = 2.0 / np.sqrt(abs(np.linalg.det(coef[:2])))
    sf, meta = entry["scalefactors"], entry["metadata"]
    assert sf["microns_per_pixel"] == pytest.approx(grid_mpp, rel=2e-3)
    assert meta["grid_microns_per_pixel"] == pytest.approx(grid_mpp)
    assert meta["platform"] == "visium_hd" and meta["bin_size_um"] == 2.0 and meta["spot_diameter_um"] == 2.0
    dataset_id = "visium_hd_visiumio_micro"
    image_key = f"{dataset_id}_lowres_image"
    assert shapes_key == f"{dataset_id}_square_002um" and meta["table_key"] == "square_002um"
    assert meta["image_key"] == image_key and meta["image_rgb"] and meta["coordinate_system"] == dataset_id
    lowres_mpp = sf_json["microns_per_pixel"] / sf_json["tissue_lowres_scalef"]
    assert dict(meta["image_mpp"]) == pytest.approx({image_key: lowres_mpp})
    # bins: squares of 2 µm, i.e. 2 / (µm/px) full-resolution pixels a side, centred on the bins
    squares = visium_hd.shapes[shapes_key].loc[table.obs["location_id"]]
    b = squares.geometry.bounds
    side = 2.0 / sf_json["microns_per_pixel"]
    np.testing.assert_allclose(b["maxx"] - b["minx"], side)
    np.testing.assert_allclose(b["maxy"] - b["miny"], side)
    np.testing.assert_allclose(squares.geometry.area, side**2)
    np.testing.assert_allclose(np.c_[squares.centroid.x, squares.centroid.y], table.obsm["spatial"])
    assert sf["spot_diameter_fullres"] == pytest.approx(side)


def test_visium_hd_bins_on_tissue(visium_hd):
    """Bins mapped by the reported transformations fall on tissue in the lowres H&E; read as lowres pixels without
    the image's transformation (the full-resolution coordinates taken at face value) they leave the image."""
    dataset_id = "visium_hd_visiumio_micro"
    image_key = f"{dataset_id}_lowres_image"
    px, _ = _to_image_px(visium_hd, f"{dataset_id}_square_002um", image_key, dataset_id)
    rgb = np.stack([_image(visium_hd, image_key, c) for c in range(3)], -1)
    grey = rgb.mean(-1)
    background = np.median(grey[grey > np.percentile(grey, 60)])  # slide glass: the bright mode
    values, inside = _sample(grey, px)
    assert inside == 1.0 and (values < background - 20).all()
    assert _sample(grey, np.asarray(visium_hd.tables["square_002um"].obsm["spatial"]))[1] == 0.0


def test_visium_hd_extract_features(visium_hd, tmp_path):
    """The H&E case: `extract_features` accepts the reader's output with the element names it records."""
    table, shapes_key, entry = _entry(visium_hd, "square_002um")
    meta = entry["metadata"]
    kw = {"table_key": meta["table_key"], "shapes_key": meta["shapes_key"], "image_key": meta["image_key"]}
    # the fixture's only H&E is the lowres PNG (10.9 µm/px): refused at the encoder's 0.5 µm/px, with the way out
    with pytest.raises(ValueError, match=r"four times as coarse.*`tile_px=10`"):
        stfm.pp.extract_features(visium_hd, "efficientnet_lite0", inplace=False, cache=False, **kw)
    out = _quiet(stfm.pp.extract_features, visium_hd, "efficientnet_lite0", tile_px=10, tile_um=112.0, inplace=False,
                 cache=False, **kw)  # fmt: skip
    assert out.shape == (10, 1280) and np.isfinite(out).all()
    from stfm.pp._inputs import inputs_spatialdata

    inputs = inputs_spatialdata(
        visium_hd, table, image_key=None, shapes_key=shapes_key, spatial_key="spatial", slide_mpp=None
    )
    assert inputs.image == meta["image_key"]  # picked from metadata['image_key'] without being told
    assert inputs.slide_mpp == pytest.approx(meta["image_mpp"][meta["image_key"]])
    px, _ = _to_image_px(visium_hd, shapes_key, meta["image_key"], meta["coordinate_system"])
    np.testing.assert_allclose(inputs.xy, px, atol=1e-6)
    # the slots survive SpatialData.write
    import spatialdata as sd

    visium_hd.write(tmp_path / "hd.zarr")
    back = sd.read_zarr(tmp_path / "hd.zarr").tables["square_002um"]
    assert back.uns["spatial"][shapes_key]["metadata"]["image_key"] == meta["image_key"]
    assert back.uns["spatial"][shapes_key]["scalefactors"]["microns_per_pixel"] == pytest.approx(0.2738242950835738)


@pytest.mark.parametrize(("fixture", "shapes_key", "image_key"), [
    ("xenium", "cell_circles", "morphology_focus"),
    ("merscope", "formats_merscope_sfe_vizgen_toy_cell_circles", "formats_merscope_sfe_vizgen_toy_z3"),
])  # fmt: skip
def test_extract_features_reads_what_the_reader_reports(request, fixture, shapes_key, image_key):
    """Fluorescence-only runs (no H&E to embed): extract_features' input resolution still finds the same image,
    pixel positions and µm/px as the reader reports."""
    from stfm.pp._inputs import inputs_spatialdata

    sdata = request.getfixturevalue(fixture)
    table, _, entry = _entry(sdata, "table")
    inputs = inputs_spatialdata(
        sdata, table, image_key=None, shapes_key=shapes_key, spatial_key="spatial", slide_mpp=None
    )
    assert inputs.image == image_key and not entry["metadata"]["image_rgb"]
    assert inputs.slide_mpp == pytest.approx(entry["metadata"]["image_mpp"][image_key])
    np.testing.assert_allclose(inputs.xy, _to_image_px(sdata, shapes_key, image_key, "global")[0], atol=1e-6)
    assert inputs.spot_diameter_px == pytest.approx(entry["scalefactors"]["spot_diameter_fullres"])


def test_visium_hd_bin_size_not_in_run():
    path = _fixture("visium_hd_visiumio_micro")
    with pytest.raises(
        ValueError,
        match=r"`bin_size`=8 µm is not among the bins of this Visium HD run \(.*binned_outputs'\): it has 2 µm "
        r"\(square_002um\)\. Pass `bin_size=` one of \[2\]\.",
    ):
        stfm.io.read_visium_hd(path)  # the default, 8 µm
    with pytest.raises(ValueError, match=r"`bin_size`=16 µm is not among"):
        stfm.io.read_visium_hd(path, bin_size=16)


def test_visium_hd_bin_sizes_listed(tmp_path):
    src = _fixture("visium_hd_visiumio_micro")
    path = _linked_copy(src, tmp_path / "outs", real_dirs=("binned_outputs",))
    shutil.copytree(src / "binned_outputs" / "square_002um", path / "binned_outputs" / "square_016um", symlinks=True)
    with pytest.raises(ValueError, match=r"it has 2 µm \(square_002um\), 16 µm \(square_016um\)\. .* \[2, 16\]"):
        stfm.io.read_visium_hd(path, bin_size=8)


# ---------------------------------------------------------------------------------------------------- all readers


@pytest.mark.parametrize("reader", ["read_xenium", "read_merscope", "read_cosmx", "read_visium_hd"])
def test_path_that_does_not_exist(tmp_path, reader):
    missing = tmp_path / "no_such_run"
    with pytest.raises(FileNotFoundError, match=r"no_such_run' does not exist\. `stfm.io.read_\w+` expects the .* "
                       r"output folder that holds .*; check the path"):  # fmt: skip
        getattr(stfm.io, reader)(missing)


def test_readers_are_lazy():
    import subprocess
    import sys

    code = "import sys, stfm.io; stfm.io.read_xenium; print('spatialdata_io' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
