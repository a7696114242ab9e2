"""BeV ground truth rasterised from box footprints on a :class:`bev.geometry.BevGrid`."""

from __future__ import annotations

import math
from typing import Iterable, Tuple

import numpy as np

from ..geometry import BevGrid, box_corners


def footprint(center_xy: Tuple[float, float], size_wl: Tuple[float, float], yaw: float) -> np.ndarray:
    """``(4, 2)`` ego ``(x, y)`` corners of a box's footprint (devkit corner order, bottom face)."""
    corners = box_corners((center_xy[0], center_xy[1], 0.0), (size_wl[0], size_wl[1], 1.0), yaw)
    return corners[[2, 3, 7, 6], :2]


def rasterize_footprints(boxes: Iterable[Tuple[Tuple[float, float], Tuple[float, float], float]],
                         grid: BevGrid) -> np.ndarray:
    """Binary ``grid.shape`` mask of the footprints ``(center_xy, (w, l), yaw)`` in the ego frame.

    A cell is set when its centre lies inside a footprint (exact test in the box's frame:
    ``|dx| <= l/2`` and ``|dy| <= w/2``). Rows follow x, columns follow y (``BevGrid``).
    """
    centers = grid.cell_centers().numpy()  # (X, Y, 2)
    mask = np.zeros(grid.shape, dtype=np.uint8)
    res = grid.resolution
    for (cx, cy), (w, l), yaw in boxes:
        reach = 0.5 * math.hypot(w, l)
        i0 = max(0, int(math.floor((cx - reach - grid.x_bounds[0]) / res)))
        i1 = min(grid.shape[0], int(math.ceil((cx + reach - grid.x_bounds[0]) / res)) + 1)
        j0 = max(0, int(math.floor((cy - reach - grid.y_bounds[0]) / res)))
        j1 = min(grid.shape[1], int(math.ceil((cy + reach - grid.y_bounds[0]) / res)) + 1)
        if i0 >= i1 or j0 >= j1:
            continue
        d = centers[i0:i1, j0:j1] - (cx, cy)
        c, s = math.cos(yaw), math.sin(yaw)
        along, across = d[..., 0] * c + d[..., 1] * s, -d[..., 0] * s + d[..., 1] * c
        inside = (np.abs(along) <= l / 2) & (np.abs(across) <= w / 2)
        mask[i0:i1, j0:j1] |= inside.astype(np.uint8)
    return mask
