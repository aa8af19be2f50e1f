"""Reader for the HER2+ breast cancer legacy-ST data set (Andersson et al., Nat Commun 2021)."""

from __future__ import annotations

import gzip
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import pandas as pd
from scipy import sparse

from .._logging import logger
from ._images import check_spots_in_image, downsample, read_image

if TYPE_CHECKING:
    from anndata import AnnData
    from spatialdata import SpatialData

__all__ = ["HER2ST_LABELS", "read_her2st"]

_SECTION = re.compile(r"^[A-H][1-6]$")
#: Pathologist annotation classes, in the order the authors list them.
HER2ST_LABELS = (
    "invasive cancer",
    "cancer in situ",
    "immune infiltrate",
    "breast glands",
    "connective tissue",
    "adipose tissue",
    "undetermined",
)
#: ST array geometry: spot diameter and centre-to-centre pitch, in µm.
ST_SPOT_DIAMETER_UM = 100.0
ST_SPOT_PITCH_UM = 200.0
#: Full-resolution size (width, height) of the sections whose only image is the viewer PNG.
VIEWER_ORIGINAL_SIZE = {"A1": (6954, 7435), "A2": (6966, 7441)}


def _layout(root: Path, section: str) -> dict[str, Path | None]:
    """Paths of one section's files in the original her2st repository layout (missing ones → None)."""
    patient = section[0]

    def existing(p: Path) -> Path | None:
        return p if p.is_file() else None

    jpgs = sorted((root / "data" / "ST-imgs" / patient / section).glob("*.jpg"))
    image = jpgs[0] if jpgs else existing(root / "app" / "www" / "imgs" / f"{section}_HE_image_dark.png")
    return {
        "counts": root / "data" / "ST-cnts" / f"{section}.tsv.gz",
        "spots": root / "data" / "ST-spotfiles" / f"{section}_selection.tsv",
        "image": image,
        "labels": existing(root / "data" / "ST-pat" / "lbl" / f"{section}_labeled_coordinates.tsv"),
        "clusters": existing(root / "res" / "ST-cluster" / "lbl" / f"{section}-cluster-annotation.tsv.gz"),
        "cluster_annotations": existing(root / "res" / "ST-cluster" / "motivation.csv"),
    }


def read_her2st(
    path_or_section: str | os.PathLike[str],
    section: str | None = None,
    *,
    counts: str | os.PathLike[str] | None = None,
    spots: str | os.PathLike[str] | None = None,
    image: str | os.PathLike[str] | Literal[False] | None = None,
    labels: str | os.PathLike[str] | Literal[False] | None = None,
    clusters: str | os.PathLike[str] | Literal[False] | None = None,
    cluster_annotations: str | os.PathLike[str] | Literal[False] | None = None,
    duplicate_genes: Literal["sum", "make_unique"] = "sum",
    hires_max_px: int = 2000,
    library_id: str | None = None,
    as_spatialdata: bool = False,
) -> AnnData | SpatialData:
    """Read one section of the HER2+ breast cancer ST data set :cite:p:`andersson2021`.

    Parameters
    ----------
    path_or_section
        The root of a clone of the original ``almaan/her2st`` repository (then pass ``section``), or the path of
        a counts file ``{section}.tsv.gz`` (then pass ``spots``). To fetch a section by id (local mirror at
        ``STFM_DATA_DIR`` or checksummed download) use :func:`stfm.datasets.her2st`, which calls this reader.
    section
        Section id when ``path_or_section`` is a repository root.
    counts, spots, image, labels, clusters, cluster_annotations
        Explicit file paths overriding the repository layout. ``False`` skips an optional part. The image
        is the original full-resolution JPG, or the viewer PNG ``{section}_HE_image_dark.png``.
    duplicate_genes
        A few gene symbols repeat as columns of the counts files. ``'sum'`` adds their counts into one
        column (the number merged is recorded in ``uns['her2st']['n_duplicate_genes']``); ``'make_unique'``
        keeps every column and suffixes repeats (``GENE-1``), as :meth:`anndata.AnnData.var_names_make_unique`.
    hires_max_px
        Longest side of the downsampled image kept in ``uns['spatial'][library_id]['images']['hires']``.
        The full-resolution file is referenced in ``['metadata']['source_image_path']`` (and becomes the
        ``{library_id}_full_image`` element with ``as_spatialdata=True``). The viewer PNG of A1 / A2 is drawn in
        another frame and at 3.2 µm/px: it is kept as the ``hires`` image only (``['metadata']['hires_image_path']``),
        never as the source image of ``obsm['spatial']``.
    library_id
        Key in ``uns['spatial']`` (default: the section id).
    as_spatialdata
        Return a :class:`~spatialdata.SpatialData` (see :func:`stfm.io.to_spatialdata`) instead.

    Returns
    -------
    An :class:`~anndata.AnnData` with raw UMI counts in ``X`` (CSR, int32), one row per spot under tissue:

    ``.obs['patient' | 'section']``
        Patient letter and section id (categorical).
    ``.obs['array_col' | 'array_row']``
        ST array coordinates (the counts files' ``{x}x{y}`` spot names).
    ``.obs['pathologist_label']``
        Categorical pathologist annotation, when the section has one (``NaN`` for unannotated spots).
    ``.obs['expression_cluster' | 'cluster_annotation']``
        The authors' expression clusters and their annotation, when available.
    ``.obsm['spatial']``
        Spot centres (x, y) in full-resolution pixels.
    ``.uns['spatial'][library_id]``
        ``images['hires']``, ``scalefactors`` (``tissue_hires_scalef``, ``spot_diameter_fullres``,
        ``microns_per_pixel``) and ``metadata`` (``source_image_path``, ``coordinate_frame``).
    """
    from anndata import AnnData

    if duplicate_genes not in ("sum", "make_unique"):
        msg = f"Expected `duplicate_genes` to be 'sum' or 'make_unique', found {duplicate_genes!r}."
        raise ValueError(msg)

    files = _resolve_files(path_or_section, section)
    section = files.pop("section")
    overrides = {
        "counts": counts,
        "spots": spots,
        "image": image,
        "labels": labels,
        "clusters": clusters,
        "cluster_annotations": cluster_annotations,
    }
    for part, value in overrides.items():
        if value is False:
            files[part] = None
        elif value is not None:
            files[part] = Path(value)
    for part in ("counts", "spots"):
        if files.get(part) is None or not Path(files[part]).is_file():
            msg = (
                f"The {part} file of her2st section {section} is missing (looked for {str(files.get(part))!r}). "
                f"Pass `{part}=` or fetch the section with `stfm.datasets.her2st({section!r})`."
            )
            raise FileNotFoundError(msg)
    library_id = library_id or section

    X, obs_names, genes, n_dup = _read_counts(files["counts"], duplicate_genes)
    spot_table = _read_spots(files["spots"])
    missing = obs_names.difference(spot_table.index)
    if len(missing):
        msg = (
            f"{len(missing)} spots of the counts file (e.g. {list(missing[:3])}) are absent from the spot file "
            f"{str(files['spots'])!r}; the two files belong to different sections."
        )
        raise ValueError(msg)
    if len(obs_names) == 0:
        msg = f"The counts file {str(files['counts'])!r} of section {section} holds no spot."
        raise ValueError(msg)
    spot_table = spot_table.loc[obs_names]

    obs = pd.DataFrame(index=pd.Index(obs_names))
    obs["patient"] = pd.Categorical([section[0]] * len(obs))
    obs["section"] = pd.Categorical([section] * len(obs))
    obs["array_col"] = spot_table["x"].to_numpy(dtype=np.int32)
    obs["array_row"] = spot_table["y"].to_numpy(dtype=np.int32)
    adata = AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes, name="gene_symbol")))
    xy = spot_table[["pixel_x", "pixel_y"]].to_numpy(dtype=np.float64)

    mpp = _microns_per_pixel(spot_table)
    if files.get("labels") is not None:
        adata.obs["pathologist_label"] = _read_labels(files["labels"], adata.obs)
    cluster_table = None
    if files.get("clusters") is not None:
        cluster_table = _read_clusters(files["clusters"], adata.obs)
        adata.obs["expression_cluster"] = pd.Categorical(cluster_table["label"].astype("Int64").astype(str).replace("<NA>", np.nan))
        ann_file = files.get("cluster_annotations")
        if ann_file is not None:
            adata.obs["cluster_annotation"] = _annotate_clusters(ann_file, section[0], adata.obs["expression_cluster"])

    frame = "original full-resolution H&E"
    img_arr = None
    img_path = files.get("image")
    scalefactors = {
        "spot_diameter_fullres": ST_SPOT_DIAMETER_UM / mpp,
        "microns_per_pixel": mpp,
    }
    if img_path is not None:
        img_arr = read_image(img_path)
        if Path(img_path).name.endswith("_HE_image_dark.png"):
            xy, scalef, frame = _viewer_frame(section, xy, img_arr.shape[:2], cluster_table)
            check_spots_in_image(xy * scalef, img_arr.shape[:2], what=str(img_path))
            hires, extra = downsample(img_arr, hires_max_px)
            scalefactors["tissue_hires_scalef"] = scalef * extra
            img_arr = None  # the PNG is a rendering, not a full-resolution image
        else:
            check_spots_in_image(xy, img_arr.shape[:2], what=str(img_path))
            hires, scalef = downsample(img_arr, hires_max_px)
            scalefactors["tissue_hires_scalef"] = scalef
    adata.obsm["spatial"] = xy
    spatial: dict = {"scalefactors": scalefactors, "metadata": {"coordinate_frame": frame, "platform": "ST (legacy)"}}
    if img_path is not None:
        spatial["images"] = {"hires": hires}
        if img_arr is not None:  # only an image in the frame of obsm['spatial'] may be the source image
            spatial["metadata"]["source_image_path"] = str(Path(img_path).resolve())
            spatial["metadata"]["fullres_shape"] = np.asarray(img_arr.shape[:2])
        else:  # the viewer PNG is a rendering in another frame: it is only the hires image
            spatial["metadata"]["hires_image_path"] = str(Path(img_path).resolve())
    else:
        spatial["images"] = {}
    adata.uns["spatial"] = {library_id: spatial}
    adata.uns["her2st"] = {"section": section, "n_duplicate_genes": n_dup, "duplicate_genes": duplicate_genes}
    logger.info("read her2st %s: %d spots × %d genes, %.3f µm/px", section, adata.n_obs, adata.n_vars, mpp)

    if as_spatialdata:
        from ._convert import to_spatialdata

        return to_spatialdata(adata, library_id=library_id, fullres_image=img_arr)
    return adata


def _resolve_files(path_or_section: str | os.PathLike[str], section: str | None) -> dict:
    text = os.fspath(path_or_section)
    path = Path(text)
    if _SECTION.match(text) and not path.exists():
        msg = (
            f"{text!r} is a her2st section id, not a path. Fetch and read it with `stfm.datasets.her2st({text!r})` "
            f"(local mirror or checksummed download), or pass the folder of a local copy with `section={text!r}`."
        )
        raise FileNotFoundError(msg)
    if path.is_dir():
        if section is None:
            msg = f"{text!r} is a directory: pass `section=` (one of {', '.join(_all_sections())})."
            raise ValueError(msg)
        _check_section(section)
        files = _layout(path, section)
        files["section"] = section
        return files
    if path.is_file():
        name = path.name.split(".")[0]
        sec = section or name
        if not _SECTION.match(sec):
            msg = f"Cannot infer the section id from {path.name!r}; pass `section=`."
            raise ValueError(msg)
        return {"counts": path, "spots": None, "image": None, "labels": None, "clusters": None,
                "cluster_annotations": None, "section": sec}  # fmt: skip
    _check_section(text)
    msg = f"{text!r} is neither a her2st section id, a directory nor a counts file."
    raise FileNotFoundError(msg)


#: The 36 section ids of the her2st data set (patients A–D: six sections each; E–H: three).
HER2ST_SECTIONS = tuple(f"{p}{i}" for p, n in zip("ABCDEFGH", (6, 6, 6, 6, 3, 3, 3, 3), strict=True) for i in range(1, n + 1))


def _all_sections() -> list[str]:
    return list(HER2ST_SECTIONS)


def _check_section(section: str) -> None:
    if section not in _all_sections():
        msg = f"Unknown her2st section {section!r}. Known sections: {', '.join(_all_sections())}."
        raise ValueError(msg)


def _read_counts(path: Path, duplicate_genes: str) -> tuple[sparse.csr_matrix, pd.Index, pd.Index, int]:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as fh:
        header = fh.readline().rstrip("\n").split("\t")
    genes = pd.Index(header[1:])
    table = pd.read_csv(path, sep="\t", header=None, skiprows=1, index_col=0, dtype={0: str}, engine="c")
    if table.shape[1] != len(genes):
        msg = f"Counts file {str(path)!r} has {len(genes)} gene names but {table.shape[1]} value columns."
        raise ValueError(msg)
    values = table.to_numpy()
    if not np.issubdtype(values.dtype, np.number) or (values < 0).any() or not np.all(np.mod(values, 1) == 0):
        msg = f"Counts file {str(path)!r} must hold non-negative integer UMI counts."
        raise ValueError(msg)
    X = sparse.csr_matrix(values.astype(np.int32))
    obs_names = pd.Index(table.index.astype(str)).rename(None)
    if obs_names.duplicated().any():
        dup = list(obs_names[obs_names.duplicated()][:3])
        msg = f"Counts file {str(path)!r} lists spots {dup} more than once; each spot must have one row."
        raise ValueError(msg)
    n_dup = int(genes.duplicated().sum())
    if n_dup and duplicate_genes == "sum":
        codes, uniques = pd.factorize(genes)
        merge = sparse.csr_matrix((np.ones(len(codes), dtype=np.int32), (np.arange(len(codes)), codes)))
        X = (X @ merge).tocsr()
        genes = pd.Index(uniques)
    elif n_dup:
        from anndata.utils import make_index_unique

        genes = make_index_unique(genes)
    return X, obs_names, genes, n_dup


def _read_spots(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path, sep="\t")
    need = {"x", "y", "new_x", "new_y", "pixel_x", "pixel_y", "selected"}
    if not need.issubset(table.columns):
        msg = f"Spot file {str(path)!r} lacks columns {sorted(need - set(table.columns))}; expected {sorted(need)}."
        raise ValueError(msg)
    numeric = table[sorted(need)].apply(pd.to_numeric, errors="coerce")
    bad = ~np.isfinite(numeric.to_numpy(dtype=np.float64)).all(axis=1)
    table = table[(numeric["selected"] == 1).to_numpy()]
    bad = bad[(numeric["selected"] == 1).to_numpy()]
    if table.empty:
        msg = f"Spot file {str(path)!r} selects no spot (no row has selected == 1); nothing lies under tissue."
        raise ValueError(msg)
    if bad.any():
        rows = [int(i) + 2 for i in np.flatnonzero(bad)[:3]]  # file line numbers (after the header)
        msg = (
            f"Spot file {str(path)!r} has missing or non-numeric values in {int(bad.sum())} selected rows (e.g. lines "
            f"{rows}); every column of {sorted(need)} must be a number."
        )
        raise ValueError(msg)
    table = table.copy()
    for col in need:
        table[col] = pd.to_numeric(table[col])
    table.index = table["x"].astype(int).astype(str) + "x" + table["y"].astype(int).astype(str)
    if table.index.duplicated().any():
        same = table.reset_index().drop_duplicates().set_index("index")
        if same.index.duplicated().any():
            dup = list(same.index[same.index.duplicated()][:3])
            msg = f"Spot file {str(path)!r} gives spots {dup} twice with different positions; each spot must have one row."
            raise ValueError(msg)
        table = same.rename_axis(None)
    return table


def _microns_per_pixel(spots: pd.DataFrame) -> float:
    """µm/px from the spot pitch: pixel position regressed on subpixel array position (200 µm a step)."""
    slopes = []
    for a, p in (("new_x", "pixel_x"), ("new_y", "pixel_y")):
        x, y = spots[a].to_numpy(float), spots[p].to_numpy(float)
        if np.ptp(x) > 0:
            slopes.append(abs(np.polyfit(x, y, 1)[0]))
    if not slopes:
        msg = "Cannot derive µm/px: all spots share one array coordinate."
        raise ValueError(msg)
    return ST_SPOT_PITCH_UM / float(np.mean(slopes))


def _read_labels(path: Path, obs: pd.DataFrame) -> pd.Categorical:
    table = pd.read_csv(path, sep="\t")
    if not {"x", "y", "label"}.issubset(table.columns):
        msg = f"Label file {str(path)!r} must have columns x, y, label; found {list(table.columns)}."
        raise ValueError(msg)
    key = table["x"].round().astype(int).astype(str) + "x" + table["y"].round().astype(int).astype(str)
    mapping = pd.Series(table["label"].to_numpy(), index=key)
    mapping = mapping[~mapping.index.duplicated()]
    labels = mapping.reindex(obs.index)
    cats = [c for c in HER2ST_LABELS if c in set(mapping)] + sorted(set(mapping) - set(HER2ST_LABELS))
    return pd.Categorical(labels.to_numpy(), categories=cats)


def _read_clusters(path: Path, obs: pd.DataFrame) -> pd.DataFrame:
    table = pd.read_csv(path, sep="\t", index_col=0)
    key = table["x"].round().astype(int).astype(str) + "x" + table["y"].round().astype(int).astype(str)
    table.index = key
    table = table[~table.index.duplicated()]
    return table.reindex(obs.index)


def _annotate_clusters(path: Path, patient: str, clusters: pd.Series) -> pd.Categorical:
    # The published CSV leaves commas inside fields unquoted ("immune : APC, B-cell, T-cell,Marker genes …"):
    # the annotation is whatever stands between the cluster id and the "based on" text (or empty fields).
    row = re.compile(r"^([A-Z]),(\d+),(.*?),(?:Marker genes|,|$)")
    mapping = {}
    with open(path) as fh:
        for line in fh:
            m = row.match(line.strip())
            if m and m.group(1) == patient:
                mapping[m.group(2)] = m.group(3).strip()
    values = clusters.astype(object).map(mapping)
    return pd.Categorical(values.to_numpy())


def _viewer_frame(
    section: str, xy: np.ndarray, png_shape: tuple[int, int], clusters: pd.DataFrame | None
) -> tuple[np.ndarray, float, str]:
    """Place spots on the viewer PNG: its frame is the authors' patient-aligned ('warped') frame.

    The warp is fitted as an affine map from pixel to warped coordinates on the spots that have both,
    so spots absent from the cluster file are placed too.
    """
    if section not in VIEWER_ORIGINAL_SIZE:
        msg = f"No known original image size for the viewer PNG of section {section}; pass the full-resolution image."
        raise ValueError(msg)
    scalef = png_shape[1] / VIEWER_ORIGINAL_SIZE[section][0]
    if clusters is None or clusters[["warped_x", "warped_y"]].isna().all().all():
        warnings.warn(
            f"The viewer PNG of {section} is drawn in the authors' warped frame, but no cluster file with "
            "warped coordinates was given; assuming the warped frame equals the pixel frame.",
            UserWarning,
            stacklevel=3,
        )
        return xy, scalef, "viewer PNG (pixel frame assumed)"
    ok = clusters[["warped_x", "warped_y"]].notna().all(axis=1).to_numpy()
    design = np.c_[xy[ok], np.ones(ok.sum())]
    coef, *_ = np.linalg.lstsq(design, clusters.loc[ok, ["warped_x", "warped_y"]].to_numpy(float), rcond=None)
    warped = np.c_[xy, np.ones(len(xy))] @ coef
    return warped, scalef, "viewer PNG (authors' warped frame)"
