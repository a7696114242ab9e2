"""BeV ground truth rasterised from box footprints on a :class:`bev.geometry.BevGrid`."""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..geometry import BevGrid, box_corners


def footprint(center_xy: Tuple[float, float], size_wl: Tuple[float, float], yaw: float) -> np.ndarray:
    """``(4, 2)`` ego ``(x, y)`` corners of a box's footprint (devkit corner order, bottom face)."""
    corners = box_corners((center_xy[0], center_xy[1], 0.0), (size_wl[0], size_wl[1], 1.0), yaw)
    return corners[[2, 3, 7, 6], :2]


#: the label rasterisation rules (:func:`rasterize_footprints`, :func:`bev_targets`, ``data.raster``)
RASTERS = ("pointbev", "polygon", "center")

#: PointBeV's centerness validity threshold: around a box seen less than ``min_visibility``, the
#: cells where its Gaussian is at least this are left out of the centerness loss
#: (github valeoai/PointBeV, ``pointbev/data/dataset/nuscenes_common.py`` ``THRESHOLD_VALID_CENTERNESS``)
VALID_CENTERNESS_THRESHOLD = 0.1


def _window(center_xy, size_wl, grid: BevGrid, margin: float):
    """Row and column slices of the cells a footprint can touch (``margin`` cells added), or
    ``None`` off the grid."""
    (cx, cy), (w, l) = center_xy, size_wl
    res = grid.resolution
    reach = 0.5 * math.hypot(w, l) + margin * res
    i0 = max(0, int(math.floor((cx - reach - grid.x_bounds[0]) / res)))
    i1 = min(grid.shape[0], int(math.ceil((cx + reach - grid.x_bounds[0]) / res)) + 1)
    j0 = max(0, int(math.floor((cy - reach - grid.y_bounds[0]) / res)))
    j1 = min(grid.shape[1], int(math.ceil((cy + reach - grid.y_bounds[0]) / res)) + 1)
    if i0 >= i1 or j0 >= j1:
        return None
    return slice(i0, i1), slice(j0, j1)


def _box_cells_center(center_xy, size_wl, yaw, grid: BevGrid, centers: np.ndarray):
    """``raster="center"``: ``(window slices, inside mask)`` of the cells whose centre lies inside
    a footprint (exact test in the box's frame: ``|dx| <= l/2`` and ``|dy| <= w/2``), or ``None``."""
    (cx, cy), (w, l) = center_xy, size_wl
    win = _window(center_xy, size_wl, grid, 0.0)
    if win is None:
        return None
    d = centers[win] - (cx, cy)
    c, s = math.cos(yaw), math.sin(yaw)
    along, across = d[..., 0] * c + d[..., 1] * s, -d[..., 0] * s + d[..., 1] * c
    inside = (np.abs(along) <= l / 2) & (np.abs(across) <= w / 2)
    return win, inside


_SHIFT = 16  # OpenCV's fixed-point fraction bits for polygon edges (drawing.cpp XY_SHIFT)


def _line_8(a0: int, b0: int, a1: int, b1: int) -> List[Tuple[int, int]]:
    """The cells of OpenCV's 8-connected line between two integer points (``cv::LineIterator``
    with ``leftToRight``, as ``Line`` draws it): from the endpoint of smaller ``a``, one cell per
    step along the longer axis, the other coordinate advancing when the running error
    ``major - 2 minor (+ 2 major per advance - 2 minor per step)`` is negative (ties stay)."""
    if a1 < a0:
        a0, b0, a1, b1 = a1, b1, a0, b0
    da, db = a1 - a0, abs(b1 - b0)
    sb = 1 if b1 >= b0 else -1
    a_major = da >= db
    major, minor = (da, db) if a_major else (db, da)
    err, m = major - 2 * minor, 0
    cells = []
    for k in range(major + 1):
        cells.append((a0 + k, b0 + sb * m) if a_major else (a0 + m, b0 + sb * k))
        if err < 0:
            m += 1
            err += 2 * major
        err -= 2 * minor
    return cells


def _c_div(n: int, d: int) -> int:
    """C's integer division (truncation towards zero)."""
    q = abs(n) // abs(d)
    return q if (n >= 0) == (d > 0) else -q


def _scanlines(poly: List[Tuple[int, int]]):
    """``[(b, a_first, a_last)]``: the spans OpenCV's ``FillConvexPoly`` fills (``shift=0``,
    8-connected): two walkers go down the polygon's edges from its first lowest-``b`` vertex, one
    each way; an edge from ``(as, bs)`` to ``(ae, be)`` advances ``a`` by
    ``trunc((2 (ae - as) 2^16 + n) / 2n)`` (``n = be - bs``) in 1/2^16 cells per scanline; each
    scanline is filled from the left walker's ``a`` to the right one's, both rounded half up
    (``(a + 2^15) >> 16``); the walk stops when no vertex lies below, before the last scanline
    (the outline covers it)."""
    n = len(poly)
    imin = min(range(n), key=lambda i: (poly[i][1], i))
    b_top, b_max = poly[imin][1], max(p[1] for p in poly)
    walkers = [{"idx": imin, "di": 1, "a": -(1 << _SHIFT), "da": 0, "end": b_top},
               {"idx": imin, "di": n - 1, "a": -(1 << _SHIFT), "da": 0, "end": b_top}]
    budget, b, spans = n, b_top, []
    while True:
        for w in walkers:
            if b < w["end"]:
                continue
            idx0 = w["idx"]
            idx = (idx0 + w["di"]) % n
            while True:
                budget -= 1
                if budget < 0:
                    break
                if poly[idx][1] > b:
                    rows = poly[idx][1] - b
                    a_start, a_end = poly[idx0][0] << _SHIFT, poly[idx][0] << _SHIFT
                    w.update(end=poly[idx][1], da=_c_div((a_end - a_start) * 2 + rows, 2 * rows), a=a_start, idx=idx)
                    break
                idx0, idx = idx, (idx + w["di"]) % n
        if budget < 0:
            break
        lo, hi = sorted((walkers[0]["a"], walkers[1]["a"]))
        half = 1 << (_SHIFT - 1)
        spans.append((b, (lo + half) >> _SHIFT, (hi + half) >> _SHIFT))
        for w in walkers:
            w["a"] += w["da"]
        b += 1
        if b > b_max:
            break
    return spans


def _clip_line(a0: int, b0: int, a1: int, b1: int, size: Tuple[int, int]):
    """OpenCV's ``clipLine`` (one Cohen-Sutherland pass, moves truncated towards zero) of a line
    to ``[0, size[0] - 1] x [0, size[1] - 1]``: the clipped endpoints, or ``None`` outside."""
    right, bottom = size[0] - 1, size[1] - 1

    def code(a, b, with_b=True):
        return (a < 0) + (a > right) * 2 + ((b < 0) * 4 + (b > bottom) * 8 if with_b else 0)

    c0, c1 = code(a0, b0), code(a1, b1)
    if (c0 & c1) == 0 and (c0 | c1) != 0:
        if c0 & 12:
            edge = 0 if c0 < 8 else bottom
            a0 += int((edge - b0) * (a1 - a0) / (b1 - b0))
            b0, c0 = edge, code(a0, 0, False)
        if c1 & 12:
            edge = 0 if c1 < 8 else bottom
            a1 += int((edge - b1) * (a1 - a0) / (b1 - b0))
            b1, c1 = edge, code(a1, 0, False)
        if (c0 & c1) == 0 and (c0 | c1) != 0:
            if c0:
                edge = 0 if c0 == 1 else right
                b0 += int((edge - a0) * (b1 - b0) / (a1 - a0))
                a0, c0 = edge, 0
            if c1:
                edge = 0 if c1 == 1 else right
                b1 += int((edge - a1) * (b1 - b0) / (a1 - a0))
                a1, c1 = edge, 0
    return (a0, b0, a1, b1) if (c0 | c1) == 0 else None


def fill_convex_lattice(polygon: np.ndarray, shape: Tuple[int, int],
                        window: Optional[Tuple[slice, slice]] = None) -> np.ndarray:
    """Boolean mask of the lattice cells that OpenCV's ``cv2.fillConvexPoly(img, pts, 1)``
    (8-connected lines, ``shift=0``) sets in an image of ``shape`` for a convex polygon with
    integer vertices ``(K, 2)`` ``(a, b)``: ``a`` is OpenCV's ``x`` (and indexes the mask's first
    axis), ``b`` its ``y`` (the second axis); scanlines are lines of constant ``b``. PointBeV
    hands OpenCV points ``(ego x, ego y)``, so its scanlines are lines of constant ego y, as
    here. ``window``: return only these slices of the mask (same cells; a box's neighbourhood).

    Our code, written from the algorithm of ``FillConvexPoly`` in opencv
    ``modules/imgproc/src/drawing.cpp``: every edge drawn as an 8-connected line
    (:func:`_line_8`, clipped to the image as ``clipLine`` does, :func:`_clip_line`), then the
    scanline spans (:func:`_scanlines`), boundary included, in OpenCV's fixed-point arithmetic.
    """
    poly = [(int(a), int(b)) for a, b in np.asarray(polygon, dtype=np.int64).reshape(-1, 2)]
    na, nb = shape
    if window is None:
        window = (slice(0, na), slice(0, nb))
    oa, ob = window[0].start, window[1].start
    mask = np.zeros((window[0].stop - oa, window[1].stop - ob), dtype=bool)

    def put(a, b):
        if 0 <= a - oa < mask.shape[0] and 0 <= b - ob < mask.shape[1]:
            mask[a - oa, b - ob] = True

    for k in range(len(poly)):
        ends = poly[k - 1] + poly[k]
        if not (0 <= ends[0] < na and 0 <= ends[2] < na and 0 <= ends[1] < nb and 0 <= ends[3] < nb):
            ends = _clip_line(*ends, (na, nb))
            if ends is None:
                continue
        for a, b in _line_8(*ends):
            put(a, b)
    if len(poly) >= 3:
        for b, a_lo, a_hi in _scanlines(poly):
            if 0 <= b < nb:
                a_lo, a_hi = max(a_lo, 0, oa), min(a_hi, na - 1, window[0].stop - 1)
                if a_lo <= a_hi and 0 <= b - ob < mask.shape[1]:
                    mask[a_lo - oa:a_hi + 1 - oa, b - ob] = True
    return mask


def footprint_lattice(center_xy, size_wl, yaw, grid: BevGrid) -> np.ndarray:
    """``(4, 2)`` integer corners of a footprint on the cell-centre lattice: ego ``(x, y)`` in
    cells relative to the first cell centre (cell ``[i, j]``'s centre is the lattice point
    ``(i, j)``), rounded with ``np.round`` as PointBeV (github valeoai/PointBeV,
    ``pointbev/data/dataset/nuscenes_common.py`` ``_process_bbox_region``), for
    ``raster="polygon"``. PointBeV itself rounds ``(x - x_min) / res`` (:func:`pointbev_lattice`),
    whose lattice point ``k`` is the corner of its cell ``k`` while its voxels sit at the cell
    centres: ``raster="pointbev"`` keeps that half-cell shift, this lattice removes it."""
    corners = footprint(center_xy, size_wl, yaw)
    ij = np.stack([(corners[:, 0] - grid.x_bounds[0]) / grid.resolution - 0.5,
                   (corners[:, 1] - grid.y_bounds[0]) / grid.resolution - 0.5], -1)
    return np.round(ij).astype(np.int64)


def _box_cells_polygon(center_xy, size_wl, yaw, grid: BevGrid, centers=None):
    """``raster="polygon"``: ``(window slices, mask)`` of the cells PointBeV's fill sets for a
    footprint on the cell-centre lattice (:func:`footprint_lattice`, :func:`fill_convex_lattice`),
    or ``None``."""
    win = _window(center_xy, size_wl, grid, 2.0)
    if win is None:
        return None
    return win, fill_convex_lattice(footprint_lattice(center_xy, size_wl, yaw, grid), grid.shape, win)


def _box_cells(center_xy, size_wl, yaw, grid: BevGrid, centers: np.ndarray, raster: str):
    if raster == "polygon":
        return _box_cells_polygon(center_xy, size_wl, yaw, grid)
    if raster == "center":
        return _box_cells_center(center_xy, size_wl, yaw, grid, centers)
    if raster == "pointbev":
        return _pointbev_cells(pointbev_lattice(footprint(center_xy, size_wl, yaw), grid), grid)
    raise ValueError(f"raster must be one of {RASTERS}, got {raster!r}.")


def pointbev_lattice(points_xy, grid: BevGrid) -> np.ndarray:
    """Ego ``(x, y)`` points (``(..., 2)``, metres) in PointBeV's label lattice, as its
    ``GeomScaler.pts_from_spatial_to_img`` computes them (github valeoai/PointBeV,
    ``pointbev/utils/geom.py``): ``(p - bx + dx / 2) / dx`` with ``dx`` the resolution and
    ``bx = min + dx / 2`` held in float32 (``gen_dx_bx``), i.e. ``(p - min) / dx``. Lattice point
    ``k`` is the *corner* ``min + k dx`` of cell ``k`` while PointBeV's voxels (its features) sit
    at the cell centres ``min + (k + 1/2) dx`` (``configs/model/net/projector/camprojector.yaml``:
    ``spatial_bounds`` -49.75 .. 49.75): its labels are the boxes moved by half a cell
    (+0.25 m) in x and y relative to its features, and so are ours under ``raster="pointbev"``."""
    res = float(grid.resolution)
    dx = np.float32(res)
    bx = np.array([grid.x_bounds[0] + res / 2.0, grid.y_bounds[0] + res / 2.0], dtype=np.float32)
    return (np.asarray(points_xy, dtype=np.float64) - bx + dx / 2.0) / dx


def _pointbev_cells(lattice_corners: np.ndarray, grid: BevGrid):
    """``(window slices, mask)`` of the cells PointBeV's ``_process_bbox_region`` fills for a
    footprint given in its lattice (:func:`pointbev_lattice`): the corners rounded half to even
    (``np.round``), then ``cv2.fillConvexPoly`` with points ``(x index, y index)``
    (:func:`fill_convex_lattice`); ``None`` when no cell can be set."""
    poly = np.round(lattice_corners).astype(np.int32)
    lo, hi = poly.min(0), poly.max(0)
    i0, j0 = max(0, int(lo[0])), max(0, int(lo[1]))
    i1, j1 = min(grid.shape[0], int(hi[0]) + 1), min(grid.shape[1], int(hi[1]) + 1)
    if i0 >= i1 or j0 >= j1:
        return None
    win = (slice(i0, i1), slice(j0, j1))
    return win, fill_convex_lattice(poly, grid.shape, win)


def rasterize_footprints(boxes: Iterable[Tuple[Tuple[float, float], Tuple[float, float], float]],
                         grid: BevGrid, raster: str = "pointbev") -> np.ndarray:
    """Binary ``grid.shape`` mask of the footprints ``(center_xy, (w, l), yaw)`` in the ego frame.
    Rows follow x, columns follow y (``BevGrid``).

    ``raster="pointbev"`` (the default: the labels of PointBeV's code, behind the paper's Tables 4
    and 14): the footprint's corners in PointBeV's lattice (:func:`pointbev_lattice`: cell
    corners, so the boxes land half a cell, +0.25 m, further along x and y than on the cell
    centres), rounded half to even, filled as OpenCV's ``fillConvexPoly`` fills them, boundary
    included (github valeoai/PointBeV ``pointbev/data/dataset/nuscenes_common.py``
    ``_process_bbox_region``). ``raster="polygon"``: the same fill with the corners on the
    cell-centre lattice (:func:`footprint_lattice`), labels aligned with the features; not
    PointBeV's, kept for that alignment. ``raster="center"``: a cell is set when its centre lies
    inside the footprint (exact test in the box's frame: ``|dx| <= l/2`` and ``|dy| <= w/2``);
    about 25 % fewer cells.
    """
    if raster not in RASTERS:
        raise ValueError(f"raster must be one of {RASTERS}, got {raster!r}.")
    centers = grid.cell_centers().numpy()  # (X, Y, 2)
    mask = np.zeros(grid.shape, dtype=np.uint8)
    for center_xy, size_wl, yaw in boxes:
        hit = _box_cells(center_xy, size_wl, yaw, grid, centers, raster)
        if hit is not None:
            mask[hit[0]] |= hit[1].astype(np.uint8)
    return mask


def _split_box(box):
    if len(box) == 3:
        (center_xy, size_wl, yaw), level = box, 4
    elif len(box) == 4:
        center_xy, size_wl, yaw, level = box
    else:
        raise ValueError(f"bev_targets expects boxes (center_xy, (w, l), yaw[, visibility]), got {box!r}.")
    return center_xy, size_wl, float(yaw), int(level)


def bev_targets(boxes: Iterable[Sequence], grid: BevGrid, sigma: float = 3.0, raster: str = "pointbev",
                min_visibility: int = 2, corners: Optional[Sequence[np.ndarray]] = None) -> Dict[str, np.ndarray]:
    """The BeV training targets of ego-frame boxes ``(center_xy, (w, l), yaw, visibility)``
    (``visibility`` the nuScenes level 1..4; a 3-tuple counts as level 4).

    Returns numpy arrays shaped like the dataset's sample dict (rows follow x, columns y):

    * ``seg`` float32 ``(1, X, Y)``: 1 on the cells of a footprint under ``raster``
      (:func:`rasterize_footprints`), whatever the visibility;
    * ``visibility`` uint8 ``(1, X, Y)``: the visibility level of the box covering the cell, 0 where
      none does; :func:`visibility_mask` turns ``seg`` and ``visibility`` into the cells that count;
    * ``centerness`` float32 ``(1, X, Y)``: max over boxes of ``exp(-d^2 / (2 sigma^2))``, ``d`` the
      distance in cells from the cell to the box centre (``sigma`` = 3 cells as
      github valeoai/PointBeV, ``pointbev/data/dataset/nuscenes_common.py`` ``SIGMA``);
    * ``offset`` float32 ``(2, X, Y)``: ``(box centre - cell)`` in cells, ``(d_row, d_col)``, on
      covered cells, 0 elsewhere;
    * ``valid_centerness`` bool ``(1, X, Y)``: False around the boxes seen less than
      ``min_visibility`` (where their Gaussian is >= :data:`VALID_CENTERNESS_THRESHOLD`), the cells
      PointBeV's centerness loss leaves out (``_process_bbox_region``).

    ``raster="pointbev"``: PointBeV's ``_process_bbox_region`` exactly, on its lattice
    (:func:`pointbev_lattice`): the footprints' bottom corners (``corners``, ``(4, 2)`` per box,
    the devkit's ``Box.bottom_corners()`` x and y; by default the flat footprint of each box)
    filled in the boxes' order, the *last* box covering a cell giving its visibility and offset;
    the centre is the mean of the four corners; offsets are rounded half to even (PointBeV stores
    ``cell - centre``, the negative of ours; an L1 loss is indifferent to the sign); centerness and
    offsets computed in float32 at the lattice points, as PointBeV's torch code does.
    ``raster="polygon"`` / ``"center"``: the visibility is the highest level of the boxes covering
    the cell, the offset points to the nearest centre among them, all at the cell centres.
    """
    if not sigma > 0:
        raise ValueError(f"bev_targets needs sigma > 0 (cells), got {sigma}.")
    if raster not in RASTERS:
        raise ValueError(f"raster must be one of {RASTERS}, got {raster!r}.")
    if int(min_visibility) not in (1, 2, 3, 4):
        raise ValueError(f"min_visibility must be a nuScenes visibility level 1..4, got {min_visibility}.")
    boxes = [_split_box(b) for b in boxes]
    if raster == "pointbev":
        if corners is None:
            corners = [footprint(c, s, y) for c, s, y, _ in boxes]
        if len(corners) != len(boxes):
            raise ValueError(f"bev_targets got {len(corners)} corner sets for {len(boxes)} boxes.")
        return _pointbev_targets([b[3] for b in boxes], corners, grid, sigma, int(min_visibility))
    centers = grid.cell_centers().numpy()
    nx, ny = grid.shape
    rows = np.arange(nx, dtype=np.float64)[:, None] + 0.5
    cols = np.arange(ny, dtype=np.float64)[None, :] + 0.5
    seg = np.zeros((nx, ny), dtype=bool)
    vis = np.zeros((nx, ny), dtype=np.uint8)
    valid_centerness = np.ones((nx, ny), dtype=bool)
    dist2 = np.full((nx, ny), np.inf)  # squared distance (cells) to the centre chosen for the offset
    offset = np.zeros((2, nx, ny), dtype=np.float64)
    log_centerness = np.full((nx, ny), -np.inf)
    log_threshold = math.log(VALID_CENTERNESS_THRESHOLD)
    for center_xy, size_wl, yaw, level in boxes:
        ci = (float(center_xy[0]) - grid.x_bounds[0]) / grid.resolution  # box centre in cells
        cj = (float(center_xy[1]) - grid.y_bounds[0]) / grid.resolution
        d2 = (ci - rows) ** 2 + (cj - cols) ** 2
        log_g = -d2 / (2.0 * sigma ** 2)
        np.maximum(log_centerness, log_g, out=log_centerness)
        if level < int(min_visibility):
            valid_centerness &= log_g < log_threshold
        hit = _box_cells(center_xy, size_wl, yaw, grid, centers, raster)
        if hit is None:
            continue
        win, inside = hit
        seg[win] |= inside
        vis[win] = np.where(inside, np.maximum(vis[win], np.uint8(level)), vis[win])
        nearer = inside & (d2[win] < dist2[win])
        dist2[win] = np.where(nearer, d2[win], dist2[win])
        for k, (c, grid_c) in enumerate(((ci, rows), (cj, cols))):
            delta = np.broadcast_to(c - grid_c, (nx, ny))[win]
            offset[k][win] = np.where(nearer, delta, offset[k][win])
    return {"seg": seg[None].astype(np.float32), "visibility": vis[None],
            "centerness": np.exp(log_centerness)[None].astype(np.float32),
            "offset": offset.astype(np.float32), "valid_centerness": valid_centerness[None]}


def _pointbev_targets(levels: Sequence[int], corners: Sequence[np.ndarray], grid: BevGrid, sigma: float,
                      min_visibility: int) -> Dict[str, np.ndarray]:
    """:func:`bev_targets` under ``raster="pointbev"``: github valeoai/PointBeV,
    ``pointbev/data/dataset/nuscenes_common.py`` ``get_bev_related_data`` and
    ``_process_bbox_region``, per box in order: the corners to the lattice and rounded; the
    visibility and instance maps filled (the last fill wins); ``off = centre - lattice point`` in
    float32; the offsets of the box's cells ``round(off)``; centerness ``max(., exp(-|off|^2 /
    (2 sigma^2)))``; a box below ``min_visibility`` clears ``valid_centerness`` where its Gaussian
    is >= 0.1. PointBeV keeps 255 for "no box" in its visibility and offset maps; here 0 and the
    ``seg`` map say it."""
    nx, ny = grid.shape
    rows = np.arange(nx, dtype=np.float32)[:, None]  # lattice points: PointBeV's meshgrid of indices
    cols = np.arange(ny, dtype=np.float32)[None, :]
    vis = np.zeros((nx, ny), dtype=np.uint8)
    offset = np.zeros((2, nx, ny), dtype=np.float32)
    centerness = np.zeros((nx, ny), dtype=np.float32)
    valid_centerness = np.ones((nx, ny), dtype=bool)
    two_sigma2 = np.float32(2.0 * sigma ** 2)
    for level, c4 in zip(levels, corners):
        c4 = np.asarray(c4, dtype=np.float64).reshape(4, 2)
        lattice = pointbev_lattice(c4, grid)
        xc, yc = pointbev_lattice(c4.mean(0), grid)  # PointBeV: the mean of the corners, then the lattice
        off_x = np.float32(xc) - rows  # (X, 1)
        off_y = np.float32(yc) - cols  # (1, Y)
        g = np.exp(-(off_x * off_x + off_y * off_y) / two_sigma2)  # float32 (X, Y)
        np.maximum(centerness, g, out=centerness)
        if int(level) < min_visibility:
            valid_centerness &= g < np.float32(VALID_CENTERNESS_THRESHOLD)
        hit = _pointbev_cells(lattice, grid)
        if hit is None:
            continue
        win, inside = hit
        vis[win] = np.where(inside, np.uint8(int(level)), vis[win])
        offset[0][win] = np.where(inside, np.round(np.broadcast_to(off_x, (nx, ny))[win]), offset[0][win])
        offset[1][win] = np.where(inside, np.round(np.broadcast_to(off_y, (nx, ny))[win]), offset[1][win])
    seg = vis > 0
    return {"seg": seg[None].astype(np.float32), "visibility": vis[None], "centerness": centerness[None],
            "offset": offset, "valid_centerness": valid_centerness[None]}


def visibility_mask(seg, visibility, min_visibility: int):
    """``True`` where a cell counts in the loss, the IoU and the pictures: background, or covered
    by a box at least ``min_visibility`` visible (nuScenes levels 1..4; 1 keeps every cell).

    The rule of PointBeV (``valid_binimg = visibility >= min_visibility``) and SimpleBEV
    (``valid_bev``): cells of boxes seen less well are ignored, not counted as background.
    ``seg`` and ``visibility`` are :func:`bev_targets`' maps (numpy arrays or tensors, any
    batch shape); the mask has their shape and type.
    """
    if int(min_visibility) not in (1, 2, 3, 4):
        raise ValueError(f"min_visibility must be a nuScenes visibility level 1..4, got {min_visibility}.")
    return ~((seg > 0) & (visibility < int(min_visibility)))
