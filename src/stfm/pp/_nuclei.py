"""``stfm.pp.count_nuclei``: nucleus count and mean nucleus area per spot / tile, from the H&E image.

Method (``docs/nuclei.md``): haematoxylin optical density by Ruifrok–Johnston colour deconvolution, one threshold
per slide (Otsu over the tissue pixels of a sample of crops), hysteresis, hole filling, and a marker-controlled
watershed on the distance transform (plus a haematoxylin term) to split touching nuclei; nuclei are kept between
two areas in µm² and belong to the spot whose footprint holds their centroid.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .._containers import get_table, is_spatialdata, prepare_output
from .._logging import logger
from .._provenance import record
from .._settings import settings
from .._validation import assert_one_of, check_copy_inplace, check_positive, check_valid_key
from ._inputs import check_inside, check_orientation, inputs_anndata, inputs_spatialdata, resolve_table, warn

if TYPE_CHECKING:
    import pandas as pd
    from anndata import AnnData
    from spatialdata import SpatialData

    from ._inputs import Inputs

__all__ = ["count_nuclei"]

METHODS = ("watershed", "cellpose")
FOOTPRINTS = ("disk", "square")
#: Summed optical density (3 channels) above which a pixel is tissue (glass ≈ 0–0.2, pale stroma ≈ 0.3–0.5).
OD_TISSUE = 0.3
#: Lowest haematoxylin threshold (OD) Otsu may return: below it a slide has no stained nuclei to find.
MIN_THRESHOLD = 0.25
#: Hysteresis: a nucleus is grown down to ``HYSTERESIS × threshold`` from pixels above ``threshold``.
HYSTERESIS = 0.6
#: Gaussian σ (µm) applied to the haematoxylin channel and to the distance transform (stain texture, JPEG noise).
SMOOTH_UM = 0.7
#: Weight (µm per OD unit) of the haematoxylin term in the watershed landscape: pale gaps between nuclei that
#: touch in the mask become saddles as deep as ``8 µm × ΔOD``.
INTENSITY_UM_PER_OD = 8.0
#: Crops whose pixels set the slide's Otsu threshold (and the H&E check), spread over the slide.
N_SAMPLE = 64
#: Segmentation is run at ``max(slide µm/px, WORK_MPP)`` unless ``mpp=`` says otherwise.
WORK_MPP = 0.5
#: Coarsest ``images['hires']`` (µm/px) used when the full-resolution image is missing (with a warning).
MAX_HIRES_MPP = 1.0
#: Below this median brightness (0–255) the image is dark-field (fluorescence), not bright-field H&E.
DARK_LUMINANCE = 90.0
#: Above this share of tissue optical density outside the haematoxylin–eosin plane, the colours are not H&E.
MAX_RESIDUAL = 0.25


def count_nuclei(
    data: AnnData | SpatialData,
    *,
    method: Literal["watershed", "cellpose"] = "watershed",
    img: Any = None,
    library_id: str | None = None,
    spatial_key: str = "spatial",
    image_key: str | None = None,
    shapes_key: str | None = None,
    table_key: str | None = None,
    slide_mpp: float | None = None,
    crop_um: float | None = None,
    footprint: Literal["disk", "square"] | None = None,
    mpp: float | None = None,
    threshold: float | Literal["otsu"] = "otsu",
    min_area_um2: float = 8.0,
    max_area_um2: float = 300.0,
    split_um: float = 1.0,
    batch_size: int = 32,
    cellpose_kwargs: dict[str, Any] | None = None,
    show_progress_bar: bool | None = None,
    key_added: str | None = None,
    inplace: bool = True,
    copy: bool = False,
) -> AnnData | SpatialData | pd.DataFrame | None:
    """Count the nuclei in the H&E around each spot or tile, and measure their mean area in µm².

    Each observation's crop is read (lazily for tiled TIFF / zarr / SpatialData images, a batch at a time) with a
    margin of the largest nucleus radius, segmented, and a nucleus is assigned to the observation whose footprint
    (a disk or square of ``crop_um`` centred on it) holds its centroid. ``method='watershed'``:

    1. haematoxylin optical density by Ruifrok–Johnston colour deconvolution (the stain vectors of
       ``skimage.color.rgb2hed``), smoothed with a Gaussian of σ = 0.7 µm;
    2. one threshold per slide: Otsu over the tissue pixels (summed OD > 0.3) of up to 64 crops spread over the
       slide, not below 0.25 OD (``threshold=`` sets it); nuclei grow by hysteresis down to 0.6 × threshold, and
       their holes are filled;
    3. touching nuclei are split by a marker-controlled watershed on the distance transform (µm) plus
       8 µm/OD × haematoxylin (pale gaps between nuclei that touch in the mask); markers are the landscape's
       h-maxima of depth ``split_um``;
    4. each nucleus is measured at its half-maximum contour (pixels at least half-way from the slide's median
       tissue haematoxylin to the nucleus' peak), which moves neither with the threshold nor with blur; nuclei
       smaller than ``min_area_um2`` or larger than ``max_area_um2`` are dropped.

    All sizes are physical, so the result does not depend on the scan's µm/px; the crops are resampled to ``mpp``.
    On her2st B4 (0.69 µm/px JPEG) the counts of 60 µm crops are within ±20 % or ±3 nuclei of hand counts
    (``docs/nuclei.md``); pale spindle nuclei in stroma are missed. ``method='cellpose'`` segments the
    haematoxylin channel with cellpose instead.

    Parameters
    ----------
    data
        An AnnData with ``obsm[spatial_key]`` (x, y in full-resolution pixels) and ``uns['spatial'][library_id]``,
        or a SpatialData whose table annotates spot/tile shapes and whose images hold the H&E (as for
        :func:`stfm.pp.extract_features`).
    method
        ``'watershed'`` (above) or ``'cellpose'`` (needs ``pip install cellpose``; its ``'nuclei'`` model on the
        haematoxylin channel, on the GPU when torch sees one).
    img
        AnnData only: the full-resolution H&E in the frame of ``obsm[spatial_key]`` (array, PIL image, path or
        :class:`~stfm.data.ImageSource`); default ``uns['spatial'][library_id]['metadata']['source_image_path']``.
    library_id
        AnnData only: key of ``uns['spatial']`` (default: the only one).
    spatial_key
        Key of the coordinates in ``obsm``.
    image_key
        SpatialData only: the image element (default: ``'{library_id}_full_image'`` or the only image).
    shapes_key
        SpatialData only: the shapes the table annotates (a table ``f'{shapes_key}_table'`` is created if none does).
    table_key
        SpatialData only: the observation table.
    slide_mpp
        µm per full-resolution pixel (default: ``scalefactors['microns_per_pixel']``, else from the spot diameter).
    crop_um
        Side (square) or diameter (disk) of each observation's footprint in µm (default: the spot diameter, or the
        tile side for :func:`stfm.pp.make_tiles` tables). Footprints wider than the spot pitch overlap, and a
        nucleus in two footprints counts for both.
    footprint
        ``'disk'`` or ``'square'`` (default: ``'square'`` for tiles — make_tiles tables, polygon shapes — and
        ``'disk'`` for spots).
    mpp
        µm per pixel at which nuclei are segmented (default: the slide's, or 0.5 when the slide is finer).
    threshold
        Haematoxylin optical density above which a pixel is nucleus, or ``'otsu'`` (per slide, see above).
    min_area_um2
        Smallest nucleus kept (µm²; debris and noise below).
    max_area_um2
        Largest nucleus kept (µm²; folds, clumps and artefacts above).
    split_um
        Depth (µm of the watershed landscape) of the saddle needed to split two touching nuclei; smaller splits more.
    batch_size
        Crops read and segmented at a time (memory is O(batch)).
    cellpose_kwargs
        ``method='cellpose'`` only: keyword arguments of ``CellposeModel.eval`` (default diameter: 8 µm in pixels).
    show_progress_bar
        Show a progress bar (default: :attr:`stfm.settings.show_progress_bar`).
    key_added
        Name of the count column (default ``'n_nuclei'``); the area column is then ``f'{key_added}_area_um2'``.
    inplace
        Write into ``data``; ``False`` returns the columns as a DataFrame and leaves ``data`` untouched.
    copy
        Return a modified copy of ``data``.

    Returns
    -------
    `None` if `copy=False` and `inplace=True`; the updated copy if `copy=True`; a :class:`~pandas.DataFrame` with
    the two columns below, indexed by `obs_names`, if `inplace=False`. Sets the following fields (on `adata`, or
    on `sdata.tables[table_key]`):

    `.obs['n_nuclei' | key_added]` : int64
        Nuclei whose centroid lies in the observation's footprint.
    `.obs['nucleus_area_um2' | f'{key_added}_area_um2']` : float64
        Their mean area in µm² at the half-maximum contour (NaN where no nucleus was found).
    `.tables[f'{shapes_key}_table']` : :class:`~anndata.AnnData` (`n_shapes × 0`)
        SpatialData only, created when no table annotates `shapes_key`.
    `.uns['stfm']['n_nuclei' | key_added]` : :class:`dict`
        `method`, `threshold` (OD used; NaN for cellpose), `threshold_method` (`'otsu'`, `'user'`, `'cellpose'`),
        `otsu_threshold`, `min_threshold`, `hysteresis`, `h_background` (median tissue haematoxylin), `crop_um`,
        `footprint`, `margin_um`, `mpp` (µm/px of segmentation), `slide_mpp`, `level` (pyramid level read),
        `min_area_um2`, `max_area_um2`, `split_um`, `smooth_um`, `intensity_um_per_od`, `stain_vectors`,
        `he_check` (`median_luminance`, `residual`, `tissue_fraction`), `n_threshold_crops`, `image` (a file's
        name, never its folder), `library_id`, `n_obs`, `n_crops_padded`, `n_nuclei_total`, `seconds`,
        `crops_per_second`, plus `cellpose_kwargs` (cellpose) and `image_key`, `shapes_key`, `table_key`
        (SpatialData).

    Examples
    --------
    >>> adata = stfm.datasets.her2st("B4")
    >>> stfm.pp.count_nuclei(adata)
    >>> adata.obs[["n_nuclei", "nucleus_area_um2"]].describe()
    """
    t_start = time.perf_counter()
    check_copy_inplace(copy=copy, inplace=inplace)
    assert_one_of(method, METHODS, name="method")
    if footprint is not None:
        assert_one_of(footprint, FOOTPRINTS, name="footprint")
    count_key = check_valid_key(key_added) if key_added is not None else "n_nuclei"
    area_key = f"{key_added}_area_um2" if key_added is not None else "nucleus_area_um2"
    for name, value in (("slide_mpp", slide_mpp), ("crop_um", crop_um), ("mpp", mpp)):
        if value is not None:
            check_positive(value, name=name)
    check_positive(min_area_um2, name="min_area_um2", allow_zero=True)
    check_positive(max_area_um2, name="max_area_um2")
    check_positive(split_um, name="split_um")
    if max_area_um2 <= min_area_um2:
        msg = f"Expected `max_area_um2` > `min_area_um2`, found {max_area_um2!r} ≤ {min_area_um2!r}."
        raise ValueError(msg)
    number = isinstance(threshold, int | float | np.floating) and not isinstance(threshold, bool)
    if not (threshold == "otsu" or (number and math.isfinite(threshold) and threshold > 0)):
        msg = (
            f"Expected `threshold` to be 'otsu' or a haematoxylin optical density > 0 (e.g. 0.5), found {threshold!r}."
        )
        raise ValueError(msg)
    batch_size = int(check_positive(batch_size, name="batch_size"))
    progress = settings.show_progress_bar if show_progress_bar is None else bool(show_progress_bar)
    cellpose_models = _import_cellpose() if method == "cellpose" else None  # fails before any work

    # 1. Where to crop, from which image, at what µm/px (as extract_features).
    shapes = None
    if is_spatialdata(data):
        if img is not None:
            msg = "`img=` is for AnnData input; for a SpatialData object pass the image element name as `image_key=`."
            raise ValueError(msg)
        table, table_name, new_table = resolve_table(data, table_key, shapes_key)
        inputs = inputs_spatialdata(
            data, table, image_key=image_key, shapes_key=shapes_key, spatial_key=spatial_key, slide_mpp=slide_mpp
        )
        inputs.extra["table_key"] = table_name
        shapes = data.shapes.get(inputs.extra["shapes_key"])
    else:
        table = get_table(data)
        table_name, new_table = None, False
        try:  # a hires image is used only if it is at most MAX_HIRES_MPP
            inputs = inputs_anndata(
                table, img=img, library_id=library_id, spatial_key=spatial_key, slide_mpp=slide_mpp, mpp=MAX_HIRES_MPP
            )
        except ValueError as e:
            if "too coarse" not in str(e):
                raise
            msg = (
                f"{str(e).split(' Pass the full-resolution')[0]} Nuclei (5–10 µm across) cannot be segmented on it. "
                "Pass the full-resolution H&E as `img=` (array, PIL image or path), or set "
                "`uns['spatial'][library_id]['metadata']['source_image_path']`."
            )
            raise ValueError(msg) from e
    check_inside(inputs)

    # 2. Geometry: footprint, margin, working resolution.
    if crop_um is None:
        if inputs.spot_diameter_px is None:
            msg = (
                "The spot / tile size is unknown (`scalefactors['spot_diameter_fullres']` is missing), so the area "
                "each nucleus count covers cannot be chosen: pass `crop_um=` (e.g. 55 for Visium spots)."
            )
            raise ValueError(msg)
        crop_um = inputs.spot_diameter_px * inputs.slide_mpp
    crop_um = float(crop_um)
    footprint = footprint or _default_footprint(table, inputs, shapes)
    margin_um = math.sqrt(max_area_um2 / math.pi) + 1.0  # a nucleus centred in the footprint lies wholly in the crop
    work_mpp = float(mpp) if mpp is not None else max(inputs.slide_mpp, WORK_MPP)

    from ..data import TileDataset

    side_px = (crop_um + 2 * margin_um) / inputs.slide_mpp
    tile_px = max(8, round(side_px * inputs.slide_mpp / work_mpp))
    dataset = TileDataset(inputs.source, inputs.xy, side_px, tile_px)
    scale = dataset.crop_px / dataset.tile_px  # level pixels per segmentation pixel
    work_mpp = inputs.slide_mpp * dataset.downsample * scale
    check_orientation(inputs)

    # 3. One threshold per slide, and the H&E check, from a sample of crops.
    order = dataset.locality_order()
    sample = order[np.linspace(0, len(order) - 1, min(len(order), N_SAMPLE)).round().astype(int)]
    stats = _slide_stats(dataset, np.unique(sample), work_mpp)
    _check_he(stats, inputs)
    if method == "watershed":
        if threshold == "otsu":
            thr, thr_method = max(stats["otsu"], MIN_THRESHOLD), "otsu"
        else:
            thr, thr_method = float(threshold), "user"
        segment = _watershed_segmenter(work_mpp, thr, split_um)
    else:
        thr, thr_method = float("nan"), "cellpose"
        segment = _cellpose_segmenter(cellpose_models, work_mpp, cellpose_kwargs)

    # 4. Segment every crop, a batch at a time; count the nuclei whose centroid lies in the footprint.
    from tqdm.auto import tqdm

    from ._nuclei_kernels import nuclei_in_footprint

    n = len(dataset)
    counts = np.zeros(n, dtype=np.int64)
    area_px = np.zeros(n, dtype=np.float64)
    half = crop_um / 2 / work_mpp
    min_px, max_px = min_area_um2 / work_mpp**2, max_area_um2 / work_mpp**2
    starts = range(0, n, batch_size)
    for s in tqdm(starts, total=len(starts), disable=not progress, desc="count_nuclei", unit="batch"):
        idx = order[s : s + batch_size]
        crops = [dataset.read_tile(int(i)) for i in idx]
        for i, (labels, h) in zip(idx, segment(crops), strict=True):
            c, a, _ = nuclei_in_footprint(
                labels, centre=_centre_in_crop(dataset, int(i), scale), half=half, disk=footprint == "disk",
                min_px=min_px, max_px=max_px, h=h, background=stats["h_background"],
            )  # fmt: skip
            counts[i], area_px[i] = c, a
    total = int(counts.sum())
    if total == 0:
        how = (
            f"haematoxylin threshold {thr:.3g} OD ({thr_method}; Otsu on the slide gave {stats['otsu']:.3g}, floor "
            f"{MIN_THRESHOLD})"
            if method == "watershed"
            else "cellpose"
        )
        msg = (
            f"No nuclei found in any of the {n} crops ({crop_um:.0f} µm, {how}, sizes {min_area_um2:g}–{max_area_um2:g} "
            f"µm²). Expected an H&E image with haematoxylin-stained nuclei under the spots; found tissue in "
            f"{stats['tissue_fraction']:.0%} of the sampled pixels. Check the image and coordinates, or pass a lower "
            "`threshold=` / `min_area_um2=`."
        )
        raise ValueError(msg)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_area = np.where(counts > 0, area_px * work_mpp**2 / counts, np.nan)

    elapsed = time.perf_counter() - t_start
    from ._nuclei_kernels import RGB_FROM_HED

    prov = {
        "method": method,
        "threshold": thr,
        "threshold_method": thr_method,
        "otsu_threshold": stats["otsu"],
        "h_background": stats["h_background"],
        "min_threshold": MIN_THRESHOLD,
        "hysteresis": HYSTERESIS,
        "crop_um": crop_um,
        "footprint": footprint,
        "margin_um": margin_um,
        "mpp": work_mpp,
        "slide_mpp": inputs.slide_mpp,
        "level": dataset.level,
        "min_area_um2": float(min_area_um2),
        "max_area_um2": float(max_area_um2),
        "split_um": float(split_um),
        "smooth_um": SMOOTH_UM,
        "intensity_um_per_od": INTENSITY_UM_PER_OD,
        "stain_vectors": RGB_FROM_HED,
        "he_check": {k: stats[k] for k in ("median_luminance", "residual", "tissue_fraction")},
        "n_threshold_crops": len(np.unique(sample)),
        "image": Path(inputs.image).name if Path(inputs.image).is_absolute() else inputs.image,
        "library_id": inputs.library_id,
        "n_obs": n,
        "n_crops_padded": dataset.n_padded,
        "n_nuclei_total": total,
        "seconds": elapsed,
        "crops_per_second": n / elapsed if elapsed > 0 else float("inf"),
        **({"cellpose_kwargs": dict(cellpose_kwargs or {})} if method == "cellpose" else {}),
        **inputs.extra,
    }

    # 5. Output (nothing is written before this point).
    import pandas as pd

    frame = pd.DataFrame({count_key: counts, area_key: mean_area.astype(np.float64)}, index=table.obs_names.copy())
    if not inplace:
        return frame
    out = prepare_output(data, copy=copy)
    if new_table:
        out.tables[table_name] = table
    target = get_table(out, table_name) if table_name is not None else get_table(out)
    target.obs[count_key] = frame[count_key].to_numpy()
    target.obs[area_key] = frame[area_key].to_numpy()
    record(target, count_key, "pp.count_nuclei", **prov)
    logger.info("count_nuclei: %d nuclei in %d crops (%.1f crops/s)", total, n, n / max(elapsed, 1e-9))
    return out if copy else None


def _default_footprint(table: AnnData, inputs: Inputs, shapes: Any) -> str:
    """``'square'`` for tiles (make_tiles tables, polygon shapes), ``'disk'`` for spots."""
    if shapes is not None and len(shapes):
        return "disk" if shapes.geometry.iloc[0].geom_type == "Point" else "square"
    lib = inputs.library_id
    meta = table.uns.get("spatial", {}).get(lib, {}).get("metadata", {}) if lib is not None else {}
    made_by = table.uns.get("stfm", {}).get(lib, {}).get("function") if lib is not None else None
    return "square" if made_by == "pp.make_tiles" or "make_tiles" in str(meta.get("platform", "")) else "disk"


def _centre_in_crop(dataset: Any, i: int, scale: float) -> tuple[float, float]:
    """The observation's centre ``(y, x)`` in the pixels of its (resampled) crop."""
    x, y = dataset.xy[i] / dataset.downsample
    x0, y0 = dataset.boxes[i]
    # output pixel j covers level pixels [x0 - 0.5 + j·s, x0 - 0.5 + (j + 1)·s] (pixel centres on integers)
    return (y - y0 + 0.5) / scale - 0.5, (x - x0 + 0.5) / scale - 0.5


def _slide_stats(dataset: Any, idx: np.ndarray, work_mpp: float) -> dict[str, float]:
    """Otsu threshold and median (background) of the smoothed haematoxylin OD over the tissue pixels of a sample of
    crops, their median brightness, and the share of their optical density off the H–E plane."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_otsu

    from ._nuclei_kernels import RGB_FROM_HED, haematoxylin, od_table

    lut = od_table()
    h_vals, ods, lum = [], [], []
    rng = np.random.default_rng(0)
    for i in idx:
        rgb = dataset.read_tile(int(i))
        h, tissue = haematoxylin(rgb, od_tissue=OD_TISSUE)
        h = ndi.gaussian_filter(h, SMOOTH_UM / work_mpp)
        h_vals.append(h[tissue])
        flat = rgb.reshape(-1, 3)
        pick = rng.choice(len(flat), size=min(len(flat), 2000), replace=False)
        ods.append(lut[flat[pick]])
        lum.append(flat[pick].mean(axis=1))
    values = np.concatenate(h_vals)
    od = np.concatenate(ods).astype(np.float64)
    tissue = od.sum(axis=1) > OD_TISSUE
    frac = float(tissue.mean()) if len(od) else 0.0
    if values.size < 100 or frac < 0.01:
        msg = (
            f"No tissue found under the spots: {frac:.1%} of the pixels of {len(idx)} sampled crops have a summed "
            f"optical density above {OD_TISSUE} (expected stained tissue, found glass / blank image). Check that the "
            "image is the H&E the coordinates refer to (`img=` / `image_key=`) and that `obsm['spatial']` holds (x, y) "
            "pixels of it."
        )
        raise ValueError(msg)
    if values.size > 2_000_000:
        values = rng.choice(values, 2_000_000, replace=False)
    otsu = float(threshold_otsu(values)) if np.ptp(values) > 0 else float(values[0])
    background = float(np.median(values))
    # share of the tissue optical density outside the plane of the haematoxylin and eosin vectors
    he = RGB_FROM_HED[:2]
    t_od = od[tissue]
    coef, *_ = np.linalg.lstsq(he.T, t_od.T, rcond=None)
    resid = np.linalg.norm(t_od - (he.T @ coef).T, axis=1).sum() / max(np.linalg.norm(t_od, axis=1).sum(), 1e-12)
    return {
        "otsu": otsu,
        "h_background": background,
        "median_luminance": float(np.median(np.concatenate(lum))),
        "residual": float(resid),
        "tissue_fraction": frac,
    }


def _check_he(stats: dict[str, float], inputs: Inputs) -> None:
    """Warn when the image does not look like a bright-field H&E (dark background, or colours off the H–E plane)."""
    if stats["median_luminance"] < DARK_LUMINANCE:
        warn(
            f"The image {inputs.image!r} does not look like a bright-field H&E: the median brightness of the sampled "
            f"crops is {stats['median_luminance']:.0f}/255 (H&E glass and tissue are bright, above "
            f"{DARK_LUMINANCE:.0f}); a dark background suggests fluorescence or dark-field. count_nuclei deconvolves "
            "haematoxylin, so its counts are meaningless here: pass the H&E image, or segment nuclei on the DAPI "
            "channel with another tool."
        )
    elif stats["residual"] > MAX_RESIDUAL:
        warn(
            f"The colours of {inputs.image!r} are not haematoxylin and eosin: {stats['residual']:.0%} of the tissue's "
            f"optical density lies outside the H–E stain plane (H&E slides: under {MAX_RESIDUAL:.0%}). A greyscale, "
            "IHC (DAB) or inverted image gives unreliable nucleus counts; pass the H&E image."
        )


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` by labelling the background once (2–3× faster on crops)."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(~mask)
    hole = np.ones(n + 1, dtype=bool)
    hole[0] = False
    hole[lab[0]] = hole[lab[-1]] = hole[lab[:, 0]] = hole[lab[:, -1]] = False
    return mask | hole[lab]


def _watershed_segmenter(mpp: float, threshold: float, split_um: float) -> Any:
    """A function mapping a list of RGB crops to ``(labels, smoothed haematoxylin)`` pairs (see :func:`count_nuclei`)."""
    from scipy import ndimage as ndi
    from skimage.filters import apply_hysteresis_threshold
    from skimage.segmentation import watershed

    from ._nuclei_kernels import h_maxima, haematoxylin

    sigma = SMOOTH_UM / mpp

    def one(rgb: np.ndarray) -> np.ndarray:
        h, _ = haematoxylin(rgb, od_tissue=OD_TISSUE)
        h = ndi.gaussian_filter(h, sigma)
        mask = _fill_holes(apply_hysteresis_threshold(h, HYSTERESIS * threshold, threshold))
        if not mask.any():
            return np.zeros(mask.shape, dtype=np.int32), h
        dist = ndi.distance_transform_edt(mask).astype(np.float32) * np.float32(mpp)
        land = np.where(mask, dist + np.float32(INTENSITY_UM_PER_OD) * h, np.float32(0))
        markers, _ = ndi.label(h_maxima(land, split_um) & mask, structure=np.ones((3, 3)))
        return watershed(-land, markers, mask=mask).astype(np.int32), h

    def segment(crops: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [one(c) for c in crops]

    return segment


def _import_cellpose() -> Any:
    """``cellpose.models``, or an ImportError saying how to install it."""
    try:
        from cellpose import models
    except ImportError as e:
        msg = (
            "method='cellpose' needs the cellpose package, which is not installed: `pip install cellpose` (see "
            "https://cellpose.readthedocs.io for GPU set-up), or use method='watershed' (no extra dependency)."
        )
        raise ImportError(msg) from e
    return models


def _cellpose_segmenter(models: Any, mpp: float, kwargs: dict[str, Any] | None) -> Any:
    """cellpose's ``'nuclei'`` model on the haematoxylin channel (nuclei bright on a dark background)."""
    import torch

    from ._nuclei_kernels import haematoxylin

    model = models.CellposeModel(gpu=torch.cuda.is_available(), model_type="nuclei")
    opts = {"diameter": 8.0 / mpp, **dict(kwargs or {})}

    def segment(crops: list[np.ndarray]) -> list[tuple[np.ndarray, None]]:
        images = [np.clip(haematoxylin(c, od_tissue=OD_TISSUE)[0], 0, None) for c in crops]
        masks = model.eval(images, **opts)[0]
        return [(np.asarray(m, dtype=np.int32), None) for m in masks]

    return segment
