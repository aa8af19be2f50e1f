"""her2st reader and data set: every section, image alignment, labels, bad input."""

from __future__ import annotations

import csv
import gzip
import shutil
from collections import Counter

import numpy as np
import pytest
from conftest import DATA_DIR, IMAGE_SECTIONS, load_section, needs_her2st

import stfm

pytestmark = needs_her2st


def _count_rows(section: str) -> list[str]:
    with gzip.open(DATA_DIR / "her2st" / "data" / "ST-cnts" / f"{section}.tsv.gz", "rt") as fh:
        return [line.split("\t", 1)[0] for line in fh][1:]


@pytest.mark.parametrize("section", stfm.datasets.her2st_sections())
def test_every_section_loads(section):
    adata = load_section(section, image=False, labels=False, clusters=False)
    rows = _count_rows(section)
    assert adata.n_obs == len(rows)
    assert list(adata.obs_names) == rows
    assert adata.n_vars > 10_000
    assert adata.X.dtype == np.int32
    assert adata.X.sum() > 0
    assert adata.obs["section"].iloc[0] == section
    assert adata.obs["patient"].iloc[0] == section[0]
    xy = adata.obsm["spatial"]
    assert xy.shape == (adata.n_obs, 2) and np.isfinite(xy).all()
    mpp = adata.uns["spatial"][section]["scalefactors"]["microns_per_pixel"]
    # checked independently of its derivation (a regression on subpixel array positions): spots one array step
    # apart in the same row sit 200 µm apart, so their median pixel distance × µm/px is 200 µm (a 5 % error fails)
    col = adata.obs["array_col"].to_numpy().astype(int)
    row = adata.obs["array_row"].to_numpy().astype(int)
    where = {(c, r): i for i, (c, r) in enumerate(zip(col, row, strict=True))}
    pairs = [(i, where[c + 1, r]) for i, (c, r) in enumerate(zip(col, row, strict=True)) if (c + 1, r) in where]
    step = np.median([np.linalg.norm(xy[i] - xy[j]) for i, j in pairs])
    assert step * mpp == pytest.approx(200.0, rel=0.03)
    # spot names are the array coordinates
    first = adata.obs.iloc[0]
    assert adata.obs_names[0] == f"{first['array_col']}x{first['array_row']}"


def test_sections_list():
    sections = stfm.datasets.her2st_sections()
    assert len(sections) == 36 and sections[0] == "A1" and sections[-1] == "H3"


def _tissue_fraction(img: np.ndarray, xy: np.ndarray) -> float:
    """Fraction of points landing on stained tissue (darker and more saturated than the glass)."""
    rgb = img.astype(float)
    sat = rgb.max(-1) - rgb.min(-1)
    tissue = (rgb.mean(-1) < 200) & (sat > 25)
    x = np.clip(np.round(xy[:, 0]).astype(int), 0, img.shape[1] - 1)
    y = np.clip(np.round(xy[:, 1]).astype(int), 0, img.shape[0] - 1)
    # a 5×5 neighbourhood: spot centres may sit on a pale gap inside tissue
    hits = [tissue[max(0, b - 2) : b + 3, max(0, a - 2) : a + 3].mean() > 0.2 for a, b in zip(x, y, strict=True)]
    return float(np.mean(hits))


@pytest.mark.parametrize("section", IMAGE_SECTIONS)
def test_image_lines_up_with_spots(section):
    adata = load_section(section)
    entry = adata.uns["spatial"][section]
    img = entry["images"]["hires"]
    h, w = entry["metadata"]["fullres_shape"]
    xy = adata.obsm["spatial"]
    assert (xy[:, 0] >= 0).all() and (xy[:, 0] < w).all() and (xy[:, 1] >= 0).all() and (xy[:, 1] < h).all()
    s = entry["scalefactors"]["tissue_hires_scalef"]
    on = _tissue_fraction(img, xy * s)
    # control: the same spot pattern mirrored left-right lands on glass much more often
    mirrored = np.c_[w - xy[:, 0], xy[:, 1]] * s
    assert on > 0.85, on
    assert on - _tissue_fraction(img, mirrored) > 0.2
    mpp = entry["scalefactors"]["microns_per_pixel"]
    assert 0.6 < mpp < 0.8  # the published full-resolution scans are about 0.69 µm/px


def test_a1_labels_join_the_right_spots():
    adata = load_section("A1")
    path = DATA_DIR / "her2st" / "data" / "ST-pat" / "lbl" / "A1_labeled_coordinates.tsv"
    with open(path) as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    by_spot = {f"{round(float(r['x']))}x{round(float(r['y']))}": r["label"] for r in rows}
    expected = Counter(by_spot[s] for s in adata.obs_names if s in by_spot)
    found = Counter(adata.obs["pathologist_label"].dropna())
    assert found == expected
    assert expected["invasive cancer"] > 200  # A1 is mostly invasive cancer
    # spot by spot, not just in total
    for spot in adata.obs_names[:50]:
        assert adata.obs.loc[spot, "pathologist_label"] == by_spot[spot]
    assert adata.obs["pathologist_label"].dtype == "category"


def test_a1_viewer_image_and_clusters():
    adata = load_section("A1")
    entry = adata.uns["spatial"]["A1"]
    assert "viewer PNG" in entry["metadata"]["coordinate_frame"]
    img = entry["images"]["hires"]
    # the viewer PNG is drawn for a 6954 px wide original (the hires copy is downsampled to ≤ 2000 px)
    assert entry["scalefactors"]["tissue_hires_scalef"] == pytest.approx(img.shape[1] / 6954, rel=1e-3)
    assert adata.obs["expression_cluster"].notna().mean() > 0.95
    assert "cancer 1" in set(adata.obs["cluster_annotation"].dropna())


def test_duplicate_gene_policy(tmp_path):
    src = DATA_DIR / "her2st" / "data" / "ST-cnts" / "B4.tsv.gz"
    with gzip.open(src, "rt") as fh:
        lines = fh.read().splitlines()
    header = lines[0].split("\t")
    header[2] = header[1]  # make the second gene a duplicate of the first
    dup = tmp_path / "B4.tsv.gz"
    with gzip.open(dup, "wt") as fh:
        fh.write("\n".join(["\t".join(header), *lines[1:]]) + "\n")
    spots = DATA_DIR / "her2st" / "data" / "ST-spotfiles" / "B4_selection.tsv"
    ref = stfm.io.read_her2st(src, spots=spots)
    summed = stfm.io.read_her2st(dup, spots=spots)
    unique = stfm.io.read_her2st(dup, spots=spots, duplicate_genes="make_unique")
    g = header[1]
    assert summed.n_vars == ref.n_vars - 1 and summed.uns["her2st"]["n_duplicate_genes"] == 1
    total = ref[:, [ref.var_names[0], ref.var_names[1]]].X.sum(1)
    np.testing.assert_array_equal(summed[:, g].X.toarray().ravel(), np.asarray(total).ravel())
    assert unique.n_vars == ref.n_vars and f"{g}-1" in unique.var_names


# -- bad input -------------------------------------------------------------------------------------


def test_unknown_section():
    with pytest.raises(ValueError, match=r"Unknown her2st section 'Z9'.*A1"):
        stfm.datasets.her2st("Z9")


def test_missing_spot_file():
    src = DATA_DIR / "her2st" / "data" / "ST-cnts" / "B4.tsv.gz"
    with pytest.raises(FileNotFoundError, match=r"spots file of her2st section B4 is missing.*spots="):
        stfm.io.read_her2st(src)


def test_missing_counts_in_layout(tmp_path):
    (tmp_path / "data" / "ST-spotfiles").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"counts file of her2st section B4 is missing"):
        stfm.io.read_her2st(tmp_path, "B4")


def test_offline_without_mirror_names_files_url_and_data_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(stfm.settings, "_data_dir", tmp_path / "empty")
    monkeypatch.setattr(stfm.settings, "_cache_dir", tmp_path / "cache")
    monkeypatch.setattr(stfm.settings, "offline", True)
    with pytest.raises(FileNotFoundError) as err:
        stfm.datasets.her2st("B4")
    msg = str(err.value)
    assert "data/ST-cnts/B4.tsv.gz" in msg and "data/ST-spotfiles/B4_selection.tsv" in msg
    assert "https://raw.githubusercontent.com/almaan/her2st/" in msg and "STFM_DATA_DIR" in msg


def test_image_disagreeing_with_spots(tmp_path):
    from PIL import Image

    small = tmp_path / "small.jpg"
    Image.new("RGB", (1000, 1000), "white").save(small)
    with pytest.raises(ValueError, match=r"spots fall outside the image.*1000 × 1000 px"):
        stfm.io.read_her2st(DATA_DIR / "her2st", "B4", image=small)


def test_unreadable_image(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=r"broken.jpg.*not a JPEG file"):
        stfm.io.read_her2st(DATA_DIR / "her2st", "B4", image=bad)


def test_empty_selection(tmp_path):
    src = DATA_DIR / "her2st" / "data" / "ST-spotfiles" / "B4_selection.tsv"
    lines = src.read_text().splitlines()
    zeroed = [lines[0]] + [line.rsplit("\t", 1)[0] + "\t0" for line in lines[1:]]
    spots = tmp_path / "B4_selection.tsv"
    spots.write_text("\n".join(zeroed) + "\n")
    with pytest.raises(ValueError, match=r"selects no spot"):
        stfm.io.read_her2st(DATA_DIR / "her2st" / "data" / "ST-cnts" / "B4.tsv.gz", spots=spots)


def test_checksum_mismatch_in_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    for rel in ("data/ST-cnts/B4.tsv.gz", "data/ST-spotfiles/B4_selection.tsv"):
        (mirror / "her2st" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA_DIR / "her2st" / rel, mirror / "her2st" / rel)
    with open(mirror / "her2st" / "data/ST-spotfiles/B4_selection.tsv", "a") as fh:
        fh.write("\n")
    monkeypatch.setattr(stfm.settings, "_data_dir", mirror)
    with pytest.raises(ValueError, match=r"Checksum mismatch .*B4_selection.tsv.*expected sha256"):
        stfm.datasets.her2st("B4", image=False)


def test_optional_parts_missing_warn(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    for rel in ("data/ST-cnts/B4.tsv.gz", "data/ST-spotfiles/B4_selection.tsv"):
        (mirror / "her2st" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA_DIR / "her2st" / rel, mirror / "her2st" / rel)
    monkeypatch.setattr(stfm.settings, "_data_dir", mirror)
    monkeypatch.setattr(stfm.settings, "_cache_dir", tmp_path / "cache")
    with pytest.warns(UserWarning, match=r"her2st B4: loading without .*image \(data/ST-imgs/B/B4/BT10737_D2_HE.jpg\)"):
        adata = stfm.datasets.her2st("B4")
    assert adata.n_obs == 283 and adata.uns["spatial"]["B4"]["images"] == {}


def test_fetch_section_reads_only_the_parts_asked_for():
    """`her2st(labels=False)` must not touch the label file (patients E–H's labels stay unread by design)."""
    from stfm.datasets._her2st import fetch_section

    some = fetch_section("B1", parts=("counts", "spots"))
    assert some["counts"].is_file() and some["spots"].is_file()
    assert {k for k, v in some.items() if v is not None} == {"counts", "spots"}
    with pytest.warns(UserWarning, match=r"loading without image \(no H&E image of B1 is published"):
        every = fetch_section("B1")  # B1 has no image in the repository: a warning that says so, not an error
    assert every["counts"] == some["counts"] and every["labels"] is not None and every["labels"].is_file()
    ad = stfm.datasets.her2st("B1", image=False, labels=False, clusters=False)
    assert "pathologist_label" not in ad.obs and "expression_cluster" not in ad.obs


def test_a_section_id_given_as_a_path_says_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no file called "A1" here
    with pytest.raises(FileNotFoundError, match=r"'A1' is a her2st section id, not a path.*stfm\.datasets\.her2st\('A1'\)"):
        stfm.io.read_her2st("A1")


def test_microns_per_pixel_from_a_crop_under_one_array_step_wide():
    """A crop of three spots whose subpixel array x spans 0.9 steps (one row): µm/px still comes from that axis, and a
    crop with no spread at all is an error that says why."""
    import pandas as pd

    from stfm.io._her2st import _microns_per_pixel

    spots = pd.DataFrame({"new_x": [1.0, 1.45, 1.9], "pixel_x": [250.0, 317.5, 385.0], "new_y": [5.0] * 3,
                          "pixel_y": [300.0] * 3})  # fmt: skip
    assert _microns_per_pixel(spots) == pytest.approx(200.0 / 150.0)
    with pytest.raises(ValueError, match="all spots share one array coordinate"):
        _microns_per_pixel(spots.assign(new_x=1.0))
