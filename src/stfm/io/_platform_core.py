"""Shared machinery of the platform readers: µm/px from transformations, cell circles, placement checks, slots.

Every platform reader (:mod:`stfm.io._platforms`, :mod:`stfm.io._visium_hd`) delegates the reading to
spatialdata-io and then calls :func:`finish`, so all of them write the same slots:

- the table's ``obsm['spatial']``: (x, y) centres in the units of one coordinate system ``cs`` (the
  full-resolution pixel grid of the run), which is also the intrinsic frame of the shapes the table annotates;
- ``uns['spatial'][shapes_key]``: ``scalefactors['microns_per_pixel']`` (µm per ``cs`` unit, taken from the
  transformation that maps the run's µm coordinates into ``cs``) and ``metadata`` (platform, physical size,
  element names, µm/px of every image element);
- ``uns['stfm']['spatial']``: provenance.

That layout is what :func:`stfm.pp.extract_features` reads (``inputs_spatialdata``): it maps ``obsm['spatial']``
through the shapes' transformation into a coordinate system shared with the image, then into image pixels, and
multiplies ``microns_per_pixel`` by the image's scale in that coordinate system.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._logging import logger
from .._provenance import record, sanitize
from .._validation import assert_key_in, check_positive, check_spatial

if TYPE_CHECKING:
    import os

    from spatialdata import SpatialData

__all__ = [
    "affine_to",
    "annotate",
    "apply_affine",
    "cell_circles",
    "check_folder",
    "finish",
    "image_info",
    "override_um_to_cs",
    "pick_image",
    "scale_of",
    "set_um_transform",
    "warn",
]

#: Slot of ``uns['stfm']`` that the readers' provenance goes to (they write ``obsm['spatial']``/``uns['spatial']``).
PROVENANCE_SLOT = "spatial"


def warn(msg: str) -> None:
    """A :class:`UserWarning` pointing at the first frame outside stfm (the user's call)."""
    pkg = str(Path(__file__).resolve().parents[1])
    frame, level = sys._getframe(1), 2  # stacklevel 2 is the caller of warn()
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(pkg):
        frame, level = frame.f_back, level + 1
    warnings.warn(msg, UserWarning, stacklevel=level)


def check_folder(path: str | os.PathLike[str], *, platform: str, reader: str, holds: str) -> Path:
    """``path`` as a :class:`~pathlib.Path` when it is an existing folder, else a :class:`FileNotFoundError`."""
    path = Path(path)
    if not path.exists():
        msg = (
            f"{str(path)!r} does not exist. `{reader}` expects the {platform} output folder that holds {holds}; "
            "check the path (relative paths start from the current directory, "
            f"{str(Path.cwd())!r})."
        )
        raise FileNotFoundError(msg)
    if not path.is_dir():
        msg = (
            f"{str(path)!r} is a file; `{reader}` expects the {platform} output folder that holds {holds}: "
            f"pass {str(path.parent)!r}?"
        )
        raise NotADirectoryError(msg)
    return path


def affine_to(element: Any, cs: str) -> np.ndarray | None:
    """The (x, y) affine matrix (3 × 3) from ``element``'s intrinsic frame to ``cs``; ``None`` when it has none."""
    from spatialdata.transformations import get_transformation

    transforms = get_transformation(element, get_all=True)
    if cs not in transforms:
        return None
    matrix = transforms[cs].to_affine_matrix(input_axes=("x", "y"), output_axes=("x", "y"))
    return np.asarray(matrix, dtype=np.float64)


def scale_of(matrix: np.ndarray) -> float:
    """Isotropic scale of an affine matrix: ``sqrt(|det|)`` of its linear part (units out per unit in)."""
    return float(math.sqrt(abs(np.linalg.det(matrix[:2, :2]))))


def apply_affine(matrix: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """``xy`` (n × 2, x then y) mapped through a 3 × 3 affine matrix."""
    xy = np.asarray(xy, dtype=np.float64)[:, :2]
    return xy @ matrix[:2, :2].T + matrix[:2, 2]


def override_um_to_cs(
    reported: np.ndarray, *, image_mpp: float | None, image_origin_um: Sequence[float] | None
) -> tuple[np.ndarray, bool]:
    """The µm → pixel-grid affine to use: ``reported`` (what spatialdata-io set), or one rebuilt from a user's
    ``image_mpp`` (µm per pixel) and ``image_origin_um`` (µm position of the image's top-left corner).

    Returns the matrix and whether it was overridden.
    """
    if image_mpp is None and image_origin_um is None:
        return reported, False
    mpp = 1.0 / scale_of(reported) if image_mpp is None else check_positive(image_mpp, name="image_mpp")
    if image_origin_um is None:
        origin = -np.linalg.solve(reported[:2, :2], reported[:2, 2])  # µm position that maps to pixel (0, 0)
    else:
        origin = np.asarray(image_origin_um, dtype=np.float64).ravel()
        if origin.shape != (2,) or not np.isfinite(origin).all():
            msg = f"Expected `image_origin_um` to be two finite numbers (x, y) in µm, found {image_origin_um!r}."
            raise ValueError(msg)
    matrix = np.array([[1 / mpp, 0.0, -origin[0] / mpp], [0.0, 1 / mpp, -origin[1] / mpp], [0.0, 0.0, 1.0]])
    return matrix, True


def set_um_transform(sdata: SpatialData, matrix: np.ndarray, cs: str) -> list[str]:
    """Give every points and shapes element (the elements spatialdata-io keeps in µm) ``matrix`` as its
    transformation to ``cs``; returns their names."""
    from spatialdata.transformations import Affine, set_transformation

    names = []
    for kind in ("points", "shapes"):
        for name, element in getattr(sdata, kind).items():
            if affine_to(element, cs) is not None:
                set_transformation(element, Affine(matrix, input_axes=("x", "y"), output_axes=("x", "y")), cs)
                names.append(name)
    return names


def level0(element: Any) -> Any:
    """The finest level of an image element (a DataArray; multiscale DataTrees hold it at ``scale0``)."""
    if type(element).__name__ == "DataArray":
        return element
    first = sorted(element.keys(), key=lambda k: int("".join(c for c in str(k) if c.isdigit()) or 0))[0]
    node = element[first]
    return node["image"] if "image" in node else next(iter(node.values()))


def image_info(sdata: SpatialData, cs: str, um_per_unit: float) -> dict[str, dict[str, Any]]:
    """Per image element: µm/px (``um_per_unit`` × the image's scale into ``cs``; ``None`` when it has no
    transformation to ``cs``), level-0 (height, width), channel names and whether it looks like an RGB H&E."""
    info = {}
    for name, element in sdata.images.items():
        arr = level0(element)
        m = affine_to(element, cs)
        channels = [str(c) for c in arr.coords["c"].values] if "c" in arr.coords else []
        n_c = int(arr.sizes.get("c", 1))
        info[name] = {
            "mpp": None if m is None else um_per_unit * scale_of(m),
            "shape": (int(arr.sizes["y"]), int(arr.sizes["x"])),
            "channels": channels,
            "rgb": n_c == 3 and np.dtype(arr.dtype) == np.uint8,
            "to_cs": m,
        }
    return info


def pick_image(sdata: SpatialData, image_key: str | None, preferred: Sequence[str]) -> str | None:
    """``image_key`` (checked), else the first of ``preferred`` present, else the only image, else ``None``."""
    images = list(sdata.images.keys())
    if image_key is not None:
        assert_key_in(image_key, images, where="sdata.images", hint="Pass one of them as `image_key=` (or None).")
        return image_key
    for name in preferred:
        if name in sdata.images:
            return name
    return images[0] if len(images) == 1 else None


def cell_circles(xy: np.ndarray, radius: np.ndarray, index: Any, cs: str) -> Any:
    """A ShapesModel of circles at ``xy`` (units of ``cs``) with ``radius`` (same units), Identity to ``cs``."""
    import pandas as pd
    from spatialdata.models import ShapesModel
    from spatialdata.transformations import Identity

    return ShapesModel.parse(
        np.asarray(xy, dtype=np.float64),
        geometry=0,
        radius=np.asarray(radius, dtype=np.float64),
        index=pd.Index(np.asarray(index), name="instance_id"),
        transformations={cs: Identity()},
    )


def annotate(sdata: SpatialData, table_key: str, shapes_key: str, instance_key: str) -> None:
    """Make ``sdata.tables[table_key]`` annotate ``sdata.shapes[shapes_key]`` through ``obs[instance_key]``."""
    import pandas as pd
    from spatialdata.models import get_table_keys

    table = sdata.tables[table_key]
    region_key = get_table_keys(table)[1]
    table.obs[region_key] = pd.Categorical([shapes_key] * table.n_obs)
    sdata.set_table_annotates_spatialelement(
        table_key, region=shapes_key, region_key=region_key, instance_key=instance_key
    )


def _placement(
    info: dict[str, Any],
    image_key: str,
    xy: np.ndarray,
    *,
    what: str,
    xy_um: np.ndarray | None,
    fix: str,
    check: bool,
    suggest: bool,
) -> dict[str, Any]:
    """Map the centres (units of ``cs``) into ``image_key``'s pixels and count those inside it.

    Fewer than half inside means the image and the cells are not in the same frame (a wrong pixel size or
    origin): a :class:`ValueError` when ``check``. Any outside: a warning (their tiles would be padded).
    """
    h, w = info["shape"]
    px = apply_affine(np.linalg.inv(info["to_cs"]), xy)
    inside = np.isfinite(px).all(1) & (px[:, 0] >= 0) & (px[:, 1] >= 0) & (px[:, 0] < w) & (px[:, 1] < h)
    n, n_in = len(px), int(inside.sum())
    out = {"n_inside_image": n_in, "n_outside_image": n - n_in}
    if n == 0 or n_in == n:
        return out
    lo_px, hi_px = np.nanmin(px, axis=0), np.nanmax(px, axis=0)
    span = f"x ∈ [{lo_px[0]:.0f}, {hi_px[0]:.0f}], y ∈ [{lo_px[1]:.0f}, {hi_px[1]:.0f}]"
    head = (
        f"{n - n_in} of {n} {what} centres fall outside image {image_key!r} ({w} × {h} px; at {info['mpp']:.4g} "
        f"µm/px the centres span {span} px)"
    )
    if n_in >= n / 2 or not check:
        warn(f"{head}; tiles around them reach past the image border and would be padded by `extract_features`.")
        return out
    hint = ""
    if suggest and xy_um is not None and len(xy_um):
        lo, hi = np.nanmin(xy_um, axis=0), np.nanmax(xy_um, axis=0)
        est = float(max((hi[0] - lo[0]) / w, (hi[1] - lo[1]) / h))
        hint = (
            f" The {what}s span x {lo[0]:.0f}–{hi[0]:.0f} µm, y {lo[1]:.0f}–{hi[1]:.0f} µm; if the image covers "
            f"exactly that area, `image_mpp≈{est:.4g}, image_origin_um≈({lo[0]:.0f}, {lo[1]:.0f})` would place "
            "them."
        )
    msg = (
        f"{head}: the image and the {what}s are not in the same frame under the transformation the data carry, "
        f"so the image's µm/px or origin is wrong (a downsampled or cropped export?). {fix}{hint} Pass "
        "`check_placement=False` to read the run anyway."
    )
    raise ValueError(msg)


def finish(
    sdata: SpatialData,
    *,
    platform: str,
    function: str,
    table_key: str,
    shapes_key: str,
    instance_key: str,
    cs: str,
    um_per_unit: float,
    xy: np.ndarray,
    diameter_um: np.ndarray | float,
    image_key: str | None,
    xy_um: np.ndarray | None = None,
    mpp_source: str,
    nominal_mpp: float | None = None,
    what: str = "cell",
    fix: str = "",
    check_placement: bool = True,
    suggest_override: bool = False,
    scalefactors: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
) -> SpatialData:
    """Write the slots every platform reader shares into ``sdata.tables[table_key]`` (see the module docstring).

    ``xy`` are the centres in ``cs`` units (the intrinsic frame of ``shapes[shapes_key]``), ``um_per_unit`` the
    µm per ``cs`` unit, ``diameter_um`` the physical cell/bin size (per observation, or one number), ``xy_um`` the
    centres in the platform's µm frame (default ``xy × um_per_unit``). ``suggest_override``: the placement error
    suggests ``image_mpp`` / ``image_origin_um`` values (readers that take them).
    """
    table = sdata.tables[table_key]
    xy = np.asarray(xy, dtype=np.float64)
    xy_um = xy * um_per_unit if xy_um is None else np.asarray(xy_um, dtype=np.float64)[:, :2]
    table.obsm["spatial"] = xy
    table.obsm["spatial_um"] = xy_um
    check_spatial(table, purpose=f"placing the {what}s", where=f"sdata.tables[{table_key!r}]")
    info = image_info(sdata, cs, um_per_unit)
    placement: dict[str, Any] = {}
    if image_key is not None:
        entry = info[image_key]
        if entry["mpp"] is None:
            msg = (
                f"Image {image_key!r} has no transformation to coordinate system {cs!r}, where the {what}s are, so its "
                f"pixel size (µm/px) and its position are unknown. Its coordinate systems: "
                f"{sorted(_systems(sdata.images[image_key]))}. Give it one, e.g. `spatialdata.transformations."
                f"set_transformation(sdata.images[{image_key!r}], Scale(...), {cs!r})`, or pass `image_key=` (one "
                f"of {sorted(k for k, v in info.items() if v['mpp'] is not None)})."
            )
            raise ValueError(msg)
        placement = _placement(
            entry, image_key, xy, what=what, xy_um=xy_um, fix=fix, check=check_placement, suggest=suggest_override
        )
    d_um = np.asarray(diameter_um, dtype=np.float64)
    spot_um = float(np.nanmedian(d_um)) if d_um.size else float("nan")
    image_mpp = {k: float(v["mpp"]) for k, v in info.items() if v["mpp"] is not None}
    sf = {
        **(scalefactors or {}),
        "microns_per_pixel": float(um_per_unit),
        "spot_diameter_fullres": spot_um / um_per_unit,
    }
    meta: dict[str, Any] = {
        "platform": platform,
        "spot_diameter_um": spot_um,
        "shapes_key": shapes_key,
        "table_key": table_key,
        "instance_key": instance_key,
        "coordinate_system": cs,
        "image_mpp": image_mpp,
        "mpp_source": mpp_source,
        **(metadata or {}),
    }
    if image_key is not None:
        meta["image_key"] = image_key
        meta["image_rgb"] = bool(info[image_key]["rgb"])
        meta["image_channels"] = info[image_key]["channels"]
    if nominal_mpp is not None:
        meta["nominal_microns_per_pixel"] = float(nominal_mpp)
    table.uns["spatial"] = {shapes_key: {"scalefactors": sanitize(sf), "metadata": sanitize(meta)}}
    import spatialdata_io

    record(
        table,
        PROVENANCE_SLOT,
        function,
        platform=platform,
        spatialdata_io_version=spatialdata_io.__version__,
        image_key=image_key,
        shapes_key=shapes_key,
        table_key=table_key,
        coordinate_system=cs,
        microns_per_pixel=float(um_per_unit),
        image_mpp=image_mpp,
        mpp_source=mpp_source,
        **placement,
        **(params or {}),
    )
    logger.info(
        "read %s: %d %ss × %d genes; image %r at %s µm/px", platform, table.n_obs, what, table.n_vars, image_key,
        f"{image_mpp[image_key]:.4g}" if image_key in image_mpp else "?",
    )  # fmt: skip
    return sdata


def _systems(element: Any) -> list[str]:
    from spatialdata.transformations import get_transformation

    return list(get_transformation(element, get_all=True).keys())
