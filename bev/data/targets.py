"""BeV ground truth rasterised from box footprints on a :class:`bev.geometry.BevGrid`."""

from __future__ import annotations

import math
from typing import Dict, Iterable, Sequence, Tuple

import numpy as np

from ..geometry import BevGrid, box_corners


def footprint(center_xy: Tuple[float, float], size_wl: Tuple[float, float], yaw: float) -> np.ndarray:
    """``(4, 2)`` ego ``(x, y)`` corners of a box's footprint (devkit corner order, bottom face)."""
    corners = box_corners((center_xy[0], center_xy[1], 0.0), (size_wl[0], size_wl[1], 1.0), yaw)
    return corners[[2, 3, 7, 6], :2]


def _box_cells(center_xy, size_wl, yaw, grid: BevGrid, centers: np.ndarray):
    """``(window slices, inside mask)`` of the cells whose centre lies inside a footprint (exact
    test in the box's frame: ``|dx| <= l/2`` and ``|dy| <= w/2``), or ``None`` off the grid."""
    (cx, cy), (w, l) = center_xy, size_wl
    res = grid.resolution
    reach = 0.5 * math.hypot(w, l)
    i0 = max(0, int(math.floor((cx - reach - grid.x_bounds[0]) / res)))
    i1 = min(grid.shape[0], int(math.ceil((cx + reach - grid.x_bounds[0]) / res)) + 1)
    j0 = max(0, int(math.floor((cy - reach - grid.y_bounds[0]) / res)))
    j1 = min(grid.shape[1], int(math.ceil((cy + reach - grid.y_bounds[0]) / res)) + 1)
    if i0 >= i1 or j0 >= j1:
        return None
    d = centers[i0:i1, j0:j1] - (cx, cy)
    c, s = math.cos(yaw), math.sin(yaw)
    along, across = d[..., 0] * c + d[..., 1] * s, -d[..., 0] * s + d[..., 1] * c
    inside = (np.abs(along) <= l / 2) & (np.abs(across) <= w / 2)
    return (slice(i0, i1), slice(j0, j1)), inside


def rasterize_footprints(boxes: Iterable[Tuple[Tuple[float, float], Tuple[float, float], float]],
                         grid: BevGrid) -> np.ndarray:
    """Binary ``grid.shape`` mask of the footprints ``(center_xy, (w, l), yaw)`` in the ego frame.

    A cell is set when its centre lies inside a footprint (exact test in the box's frame:
    ``|dx| <= l/2`` and ``|dy| <= w/2``). Rows follow x, columns follow y (``BevGrid``).
    """
    centers = grid.cell_centers().numpy()  # (X, Y, 2)
    mask = np.zeros(grid.shape, dtype=np.uint8)
    for center_xy, size_wl, yaw in boxes:
        hit = _box_cells(center_xy, size_wl, yaw, grid, centers)
        if hit is not None:
            mask[hit[0]] |= hit[1].astype(np.uint8)
    return mask


def bev_targets(boxes: Iterable[Sequence], grid: BevGrid, sigma: float = 3.0) -> Dict[str, np.ndarray]:
    """The BeV training targets of ego-frame boxes ``(center_xy, (w, l), yaw, visibility)``
    (``visibility`` the nuScenes level 1..4; a 3-tuple counts as level 4).

    Returns numpy arrays shaped like the dataset's sample dict (rows follow x, columns y):

    * ``seg`` float32 ``(1, X, Y)``: 1 where a footprint covers the cell centre
      (:func:`rasterize_footprints`), whatever the visibility;
    * ``visibility`` uint8 ``(1, X, Y)``: the highest level of the boxes covering the cell, 0 where
      none does; :func:`visibility_mask` turns ``seg`` and ``visibility`` into the cells that count;
    * ``centerness`` float32 ``(1, X, Y)``: max over boxes of ``exp(-d^2 / (2 sigma^2))``, ``d`` the
      distance in cells from the cell centre to the box centre (``sigma`` = 3 cells as
      github valeoai/PointBeV, ``pointbev/data/dataset/nuscenes_common.py`` ``SIGMA``);
    * ``offset`` float32 ``(2, X, Y)``: ``(box centre - cell centre)`` in cells, ``(d_row, d_col)``,
      on covered cells (towards the nearest centre among the boxes covering the cell), 0 elsewhere.
    """
    if not sigma > 0:
        raise ValueError(f"bev_targets needs sigma > 0 (cells), got {sigma}.")
    centers = grid.cell_centers().numpy()
    nx, ny = grid.shape
    rows = np.arange(nx, dtype=np.float64)[:, None] + 0.5
    cols = np.arange(ny, dtype=np.float64)[None, :] + 0.5
    seg = np.zeros((nx, ny), dtype=bool)
    vis = np.zeros((nx, ny), dtype=np.uint8)
    dist2 = np.full((nx, ny), np.inf)  # squared distance (cells) to the centre chosen for the offset
    offset = np.zeros((2, nx, ny), dtype=np.float64)
    log_centerness = np.full((nx, ny), -np.inf)
    for box in boxes:
        if len(box) == 3:
            (center_xy, size_wl, yaw), level = box, 4
        elif len(box) == 4:
            center_xy, size_wl, yaw, level = box
        else:
            raise ValueError(f"bev_targets expects boxes (center_xy, (w, l), yaw[, visibility]), got {box!r}.")
        ci = (float(center_xy[0]) - grid.x_bounds[0]) / grid.resolution  # box centre in cells
        cj = (float(center_xy[1]) - grid.y_bounds[0]) / grid.resolution
        d2 = (ci - rows) ** 2 + (cj - cols) ** 2
        np.maximum(log_centerness, -d2 / (2.0 * sigma ** 2), out=log_centerness)
        hit = _box_cells(center_xy, size_wl, float(yaw), grid, centers)
        if hit is None:
            continue
        win, inside = hit
        seg[win] |= inside
        vis[win] = np.where(inside, np.maximum(vis[win], np.uint8(int(level))), vis[win])
        nearer = inside & (d2[win] < dist2[win])
        dist2[win] = np.where(nearer, d2[win], dist2[win])
        for k, (c, grid_c) in enumerate(((ci, rows), (cj, cols))):
            delta = np.broadcast_to(c - grid_c, (nx, ny))[win]
            offset[k][win] = np.where(nearer, delta, offset[k][win])
    return {"seg": seg[None].astype(np.float32), "visibility": vis[None],
            "centerness": np.exp(log_centerness)[None].astype(np.float32),
            "offset": offset.astype(np.float32)}


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
