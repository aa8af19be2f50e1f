"""numba kernels of :func:`stfm.pp.count_nuclei`: watershed markers, colour deconvolution, per-crop aggregation.

All run once per pixel of every crop. The hot one, found by profiling B4 (``docs/nuclei.md``), is the search for
watershed markers: ``skimage.morphology.h_maxima`` reconstructs by dilation through a full ``argsort`` of the image
(40 % of the run time); :func:`h_maxima` does the same reconstruction with Vincent's (1993) hybrid raster-scan +
FIFO algorithm in linear time and returns the same mask. The deconvolution fuses what numpy does in four passes
with float64 temporaries (uint8 → optical density via a 256-entry table, then the dot product with the
haematoxylin column of the inverse stain matrix); the aggregation replaces three ``np.bincount`` passes plus the
centroid test with two passes over the label image (the per-nucleus peak, then its half-maximum pixels).
"""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["HED_FROM_RGB", "RGB_FROM_HED", "h_maxima", "haematoxylin", "nuclei_in_footprint", "od_table"]

#: Ruifrok & Johnston (2001) stain vectors (rows: haematoxylin, eosin, DAB as the residual), exactly as
#: ``skimage.color.rgb_from_hed``. Optical density = ``-log10(max(I, 1) / 255)`` per channel, so the haematoxylin
#: channel here is 6 × that of ``skimage.color.rgb2hed`` (which divides natural logs by ``log(1e-6)``).
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)


def od_table() -> np.ndarray:
    """Optical density ``-log10(max(I, 1) / 255)`` of every uint8 intensity (float32, 256 entries)."""
    return (-np.log10(np.maximum(np.arange(256, dtype=np.float64), 1.0) / 255.0)).astype(np.float32)


@numba.njit(cache=True, nogil=True)
def _haematoxylin_kernel(rgb, lut, w, od_tissue, h_out, tissue_out):  # pragma: no cover - compiled
    ny, nx = rgb.shape[0], rgb.shape[1]
    for y in range(ny):
        for x in range(nx):
            r = lut[rgb[y, x, 0]]
            g = lut[rgb[y, x, 1]]
            b = lut[rgb[y, x, 2]]
            h_out[y, x] = r * w[0] + g * w[1] + b * w[2]
            tissue_out[y, x] = (r + g + b) > od_tissue


def haematoxylin(rgb: np.ndarray, *, od_tissue: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Haematoxylin optical density and a tissue mask of an ``(h, w, 3)`` uint8 RGB crop.

    Returns ``(h, tissue)``: float32 haematoxylin OD (Ruifrok–Johnston deconvolution: 6 × the ``H`` channel of
    ``skimage.color.rgb2hed`` before its clipping at 0), and ``tissue`` = summed OD of the three channels above
    ``od_tissue`` (glass is near 0; pale stroma about 0.3–0.5).
    """
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h = np.empty(rgb.shape[:2], dtype=np.float32)
    tissue = np.empty(rgb.shape[:2], dtype=np.bool_)
    w = np.ascontiguousarray(HED_FROM_RGB[:, 0], dtype=np.float32)
    _haematoxylin_kernel(rgb, od_table(), w, np.float32(od_tissue), h, tissue)
    return h, tissue


@numba.njit(cache=True, nogil=True)
def _footprint_kernel(labels, h, use_h, background, n, cy, cx, half, disk, min_px, max_px):  # pragma: no cover
    ny, nx = labels.shape
    peak = np.full(n + 1, -np.inf)
    if use_h:
        for y in range(ny):
            for x in range(nx):
                lab = labels[y, x]
                if lab > 0 and h[y, x] > peak[lab]:
                    peak[lab] = h[y, x]
    area = np.zeros(n + 1, dtype=np.int64)
    sy = np.zeros(n + 1, dtype=np.float64)
    sx = np.zeros(n + 1, dtype=np.float64)
    for y in range(ny):
        for x in range(nx):
            lab = labels[y, x]
            if lab > 0 and (not use_h or h[y, x] >= 0.5 * (background + peak[lab])):
                area[lab] += 1
                sy[lab] += y
                sx[lab] += x
    count = 0
    area_sum = 0
    kept = np.zeros(n + 1, dtype=np.bool_)
    for lab in range(1, n + 1):
        a = area[lab]
        if a == 0 or a < min_px or a > max_px:
            continue
        dy = sy[lab] / a - cy
        dx = sx[lab] / a - cx
        # squares are half-open, so that abutting tiles share no nucleus
        inside = (dy * dy + dx * dx <= half * half) if disk else (-half <= dy < half and -half <= dx < half)
        if inside:
            count += 1
            area_sum += a
            kept[lab] = True
    return count, area_sum, kept


def nuclei_in_footprint(
    labels: np.ndarray,
    *,
    centre: tuple[float, float],
    half: float,
    disk: bool,
    min_px: float,
    max_px: float,
    h: np.ndarray | None = None,
    background: float = 0.0,
) -> tuple[int, int, np.ndarray]:
    """Count the labelled nuclei whose centroid lies in the spot's footprint, and sum their areas.

    ``labels`` is an ``(h, w)`` integer image with nuclei ``1..labels.max()``; ``centre`` the spot centre ``(y, x)``
    in its pixels; ``half`` the half side (square, half-open: ``[-half, half)``) or the radius (``disk=True``) in
    pixels. With ``h`` (the haematoxylin image), a nucleus is its pixels at or above half its peak over
    ``background`` — the half-maximum contour, which does not move with the threshold or with blur — and its area
    and centroid are those pixels'; without, all its pixels. Nuclei outside ``[min_px, max_px]`` pixels are
    ignored. Returns ``(count, summed area in pixels, kept)``, ``kept[label]`` ``True`` for every nucleus counted.
    """
    lab = np.ascontiguousarray(labels, dtype=np.int32)
    n = int(lab.max()) if lab.size else 0
    use_h = h is not None
    hh = np.ascontiguousarray(h, dtype=np.float32) if use_h else np.zeros((1, 1), dtype=np.float32)
    cy, cx = centre
    count, area_sum, kept = _footprint_kernel(
        lab,
        hh,
        use_h,
        float(background),
        n,
        float(cy),
        float(cx),
        float(half),
        bool(disk),
        float(min_px),
        float(max_px),
    )
    return int(count), int(area_sum), kept


@numba.njit(cache=True, nogil=True)
def _reconstruct_dilation(marker, mask):  # pragma: no cover - compiled
    """Grey reconstruction by dilation of ``marker`` under ``mask`` (8-connectivity), Vincent's hybrid algorithm."""
    ny, nx = mask.shape
    j = np.minimum(marker, mask)
    # 1. raster scan: the already visited neighbours are up-left, up, up-right, left
    for y in range(ny):
        for x in range(nx):
            v = j[y, x]
            for dy, dx in ((-1, -1), (-1, 0), (-1, 1), (0, -1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < ny and 0 <= xx < nx and j[yy, xx] > v:
                    v = j[yy, xx]
            j[y, x] = min(v, mask[y, x])
    # 2. anti-raster scan; pixels that can still raise a neighbour go to the FIFO
    cap = ny * nx + 16
    qy = np.empty(cap, dtype=np.int64)
    qx = np.empty(cap, dtype=np.int64)
    head = 0
    size = 0
    for y in range(ny - 1, -1, -1):
        for x in range(nx - 1, -1, -1):
            v = j[y, x]
            for dy, dx in ((1, 1), (1, 0), (1, -1), (0, 1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < ny and 0 <= xx < nx and j[yy, xx] > v:
                    v = j[yy, xx]
            v = min(v, mask[y, x])
            j[y, x] = v
            for dy, dx in ((1, 1), (1, 0), (1, -1), (0, 1)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < ny and 0 <= xx < nx and j[yy, xx] < v and j[yy, xx] < mask[yy, xx]:
                    qy[(head + size) % cap] = y
                    qx[(head + size) % cap] = x
                    size += 1
                    break
    # 3. propagation
    while size > 0:
        y = qy[head]
        x = qx[head]
        head = (head + 1) % cap
        size -= 1
        v = j[y, x]
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                yy, xx = y + dy, x + dx
                if (dy == 0 and dx == 0) or not (0 <= yy < ny and 0 <= xx < nx):
                    continue
                if j[yy, xx] < v and mask[yy, xx] != j[yy, xx]:
                    j[yy, xx] = min(v, mask[yy, xx])
                    if size == cap:  # grow the ring buffer (rare: a pixel queued several times)
                        ny_ = np.empty(2 * cap, dtype=np.int64)
                        nx_ = np.empty(2 * cap, dtype=np.int64)
                        for k in range(size):
                            ny_[k] = qy[(head + k) % cap]
                            nx_[k] = qx[(head + k) % cap]
                        qy, qx, head, cap = ny_, nx_, 0, 2 * cap
                    qy[(head + size) % cap] = yy
                    qx[(head + size) % cap] = xx
                    size += 1
    return j


def h_maxima(image: np.ndarray, h: float) -> np.ndarray:
    """The maxima of ``image`` at least ``h`` high (boolean), as ``skimage.morphology.h_maxima`` (8-connectivity).

    A maximum is kept when every path to a higher one dips by at least ``h``: the regional maxima of the
    reconstruction by dilation of ``image - h`` under ``image``. Computed in float64.
    """
    f = np.ascontiguousarray(image, dtype=np.float64)
    if f.size == 0 or h > np.ptp(f):
        return np.zeros(f.shape, dtype=np.bool_)
    resolution = 2 * np.finfo(np.float64).resolution * np.abs(f)  # as skimage: marker strictly h below image
    rec = _reconstruct_dilation(f - h - resolution, f)
    return (f - rec) >= h
