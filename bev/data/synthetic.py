"""A synthetic nuScenes: devkit tables and six rendered cameras in which vehicles are learnable.

:func:`generate` writes scenes in the real v1.0 table layout (the thirteen JSON tables that
``nuscenes.NuScenes(version, dataroot)`` loads), JPEG camera images under
``samples/<CHANNEL>/``, a ``LIDAR_TOP`` sample_data per sample (without a file, as
:mod:`bev.data.from_mmdet3d` writes it), ``splits.json`` (``{"train": [scene names], "val":
[...]}``), ``synthetic_instances.json`` (each instance's category and base colour) and
``synthetic.json`` (the parameters; a directory whose parameters match is reused as it is).

The world and how it is drawn:

* the ground is the plane global ``z = 0``; every ego pose lies on it (``z = 0``, yaw only), so
  the cameras stand at the heights of their calibration (about 1.5 m);
* the six cameras are the real calibrated sensors of nuScenes scene-0061 (translation, rotation,
  intrinsics), their intrinsics scaled to the rendered size (``camera_intrinsic`` always matches
  the stored image);
* per scene, the ego drives a circular arc (random start, heading, speed 0-13 m/s, yaw rate);
  samples are 0.5 s apart (nuScenes' 2 Hz key frames); each camera fires 0-50 ms before its
  sample's LiDAR time and has its own ego pose in ``ego_pose``: the ego moves (up to 0.65 m)
  between the camera captures, so the exact per-camera pose matters;
* objects are static boxes standing on the ground (centre ``z = h/2``), each an instance
  annotated in every sample of its scene: vehicles (seven ``vehicle.*`` categories, sizes near
  nuScenes' category means) in lanes along the ego's path or at random, and distractors
  (pedestrians, traffic cones, barriers) with their own shapes and colours; footprints never
  overlap each other or the ego's swept path;
* each image is a sky and a textured ground (4 m tiles, lines every 10 m, haze with distance:
  the horizon and the ground's perspective carry the camera geometry), contact shadows under the
  objects, then the objects as solid cuboids, each face flat-shaded by its normal against the
  scene's sun, drawn with a per-pixel depth buffer (inverse depth is affine in the pixel
  coordinates on a plane) after clipping each face against the camera's near plane; then a
  brightness jitter and pixel noise;
* visibility: per sample, the fraction of each box's unoccluded silhouette pixels that stays
  visible, summed over the six cameras, binned to nuScenes' levels (``1``: 0-40 %, ``2``:
  40-60 %, ``3``: 60-80 %, ``4``: 80-100 %); a box that no camera sees gets ``1``. The
  ``num_lidar_pts`` field holds the visible pixel count (a proxy: there is no point cloud).

Every transform goes through :mod:`bev.geometry`; tokens hash the parameters, so two different
synthetic sets never share a token (feature caches are keyed by sample token).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import geometry as G
from .tables import CAMERAS, CATEGORY_NAMES, VISIBILITY, empty_tables, pose_record, token, usec, write_json_tables

#: bump when the output of the same parameters changes (a stored set with another one is regenerated)
FORMAT_VERSION = 1

#: default rendered size: 0.3 x nuScenes' 1600 x 900. The paper's BeV input is 224 x 476, which
#: nuScenes loaders get by resizing 1600 x 900 to about 476 x 268 and cropping 224 rows; 480 x 270
#: covers that without upsampling, with 11 times fewer pixels to render, store and decode.
DEFAULT_IMAGE_SIZE = (480, 270)
DEFAULT_SAMPLES_PER_SCENE = 10
SAMPLE_PERIOD = 0.5  # s, nuScenes' key frames are annotated at 2 Hz
MAX_CAMERA_DELAY = 0.05  # s, a camera fires up to 50 ms before its sample's LiDAR time
CALIBRATION_SIZE = (1600, 900)  # (W, H) of the images the calibration below belongs to

#: the six calibrated cameras of nuScenes scene-0061: ``(translation [m], rotation [w, x, y, z],
#: (fx, fy, cx, cy) at 1600 x 900)``, read from the frame's info (``cam2ego``, ``cam2img``) in
#: ``shared/fixtures/nuscenes_frame/n015-2018-07-24-11-22-45+0800.pkl``: nuScenes scene-0061,
#: mmdetection3d demo data, CC BY-NC-SA 4.0.
CAMERA_CALIBRATION = {
    "CAM_FRONT_LEFT": ((1.523878, 0.494631, 1.509328), (0.67572650, -0.67362665, 0.21214015, -0.21122827),
                       (1272.5979, 1272.5979, 826.6155, 479.7517)),
    "CAM_FRONT": ((1.700791, 0.015946, 1.510958), (0.49980156, -0.50303162, 0.49977980, -0.49737083),
                  (1266.4172, 1266.4172, 816.2670, 491.5071)),
    "CAM_FRONT_RIGHT": ((1.550848, -0.493405, 1.495748), (0.20603479, -0.20269405, 0.68245079, -0.67136108),
                        (1260.8474, 1260.8474, 807.9682, 495.3344)),
    "CAM_BACK_LEFT": ((1.035691, 0.484795, 1.590970), (0.69241856, -0.70316194, -0.11648343, 0.11203318),
                      (1256.7415, 1256.7415, 792.1126, 492.7757)),
    "CAM_BACK": ((0.028326, 0.003451, 1.579103), (0.50378726, -0.49740250, -0.49418502, 0.50454962),
                 (809.2210, 809.2210, 829.2196, 481.7784)),
    "CAM_BACK_RIGHT": ((1.014878, -0.480568, 1.562395), (0.12280980, -0.13240084, -0.70043058, 0.69049604),
                       (1259.5137, 1259.5137, 807.2529, 501.1958)),
}
#: the LiDAR of the same frame (``lidar_points.lidar2ego``); same source
LIDAR_CALIBRATION = ((0.943713, 0.0, 1.840230), (0.70779552, -0.00649224, 0.01064621, -0.70630731))


def _clockwise_bearing(channel: str) -> int:
    """The bearing of a camera's optical axis in the ego frame, clockwise from forward, in whole
    degrees in [0, 360)."""
    axis = G.transform_matrix(*CAMERA_CALIBRATION[channel][:2])[:3, 2]
    return round(-math.degrees(math.atan2(axis[1], axis[0]))) % 360


#: the order in which a scene renders and tabulates its cameras: clockwise from the front. A
#: scene's random draws follow it, so it is part of the synthetic format (``FORMAT_VERSION``);
#: the data set hands the cameras out in :data:`bev.data.tables.CAMERAS` order whatever it is.
RENDER_ORDER = tuple(sorted(CAMERAS, key=_clockwise_bearing))

#: category -> (mean [w, l, h] m, std [w, l, h], share among vehicles); sizes near nuScenes'
#: per-category means (rounded)
VEHICLES = {
    "vehicle.car": ((1.95, 4.62, 1.73), (0.12, 0.35, 0.15), 0.68),
    "vehicle.truck": ((2.50, 6.90, 2.85), (0.20, 1.20, 0.40), 0.10),
    "vehicle.bus.rigid": ((2.95, 11.0, 3.45), (0.10, 1.00, 0.20), 0.04),
    "vehicle.trailer": ((2.90, 12.0, 3.80), (0.15, 2.00, 0.30), 0.03),
    "vehicle.construction": ((2.80, 6.40, 3.20), (0.25, 1.20, 0.40), 0.03),
    "vehicle.motorcycle": ((0.77, 2.10, 1.45), (0.08, 0.20, 0.10), 0.07),
    "vehicle.bicycle": ((0.60, 1.70, 1.30), (0.08, 0.15, 0.10), 0.05),
}
DISTRACTORS = {
    "human.pedestrian.adult": ((0.67, 0.73, 1.77), (0.08, 0.10, 0.10)),
    "movable_object.trafficcone": ((0.41, 0.41, 1.07), (0.04, 0.04, 0.10)),
    "movable_object.barrier": ((2.50, 0.50, 0.98), (0.20, 0.05, 0.05)),
}
ATTRIBUTES = {"vehicle.parked": "Vehicle is stationary, with no driver or passengers.",
              "cycle.without_rider": "There is no rider on the bicycle or motorcycle.",
              "pedestrian.standing": "The human is standing."}

#: base colours (RGB): vehicles in car paints, distinct from the distractors' and the ground's
VEHICLE_RGB = ((170, 25, 25), (25, 55, 165), (25, 115, 55), (215, 175, 25), (20, 130, 140), (110, 30, 130),
               (225, 225, 230), (30, 30, 36), (200, 90, 20), (120, 20, 40))
PEDESTRIAN_RGB = ((110, 80, 60), (150, 120, 95), (70, 60, 55), (185, 150, 130), (95, 95, 110))
CONE_RGB = ((245, 120, 20),)
BARRIER_RGB = ((195, 195, 185), (210, 200, 120))

# devkit corner order (geometry.box_corners): 0-3 the front face (+x), 4-7 the back face
FACES = ((0, 1, 2, 3), (4, 5, 6, 7), (0, 3, 7, 4), (1, 2, 6, 5), (0, 4, 5, 1), (3, 2, 6, 7))
FACE_NORMALS = np.array([(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)], dtype=np.float64)
NEAR = 0.05  # m, the near clipping plane
HAZE = 150.0  # m, distance at which the haze hides 63 % of a surface's colour
EGO_DISCS = ((-0.2, 0.0), (1.4, 0.0), (3.0, 0.0))  # the ego's footprint (x in [-1, 3.8] m) as discs ...
EGO_RADIUS = 1.28  # ... of this radius


# ---------------------------------------------------------------------------------------------
# the world


def _ego_state(traj: dict, t: float) -> Tuple[float, float, float]:
    """``(x, y, yaw)`` of the ego at time ``t`` on its arc (constant speed and yaw rate)."""
    dt = t - traj["t0"]
    v, w, yaw0 = traj["speed"], traj["yaw_rate"], traj["yaw0"]
    if abs(w) < 1e-9:
        return traj["x0"] + v * dt * math.cos(yaw0), traj["y0"] + v * dt * math.sin(yaw0), yaw0
    yaw = yaw0 + w * dt
    return (traj["x0"] + v / w * (math.sin(yaw) - math.sin(yaw0)),
            traj["y0"] - v / w * (math.cos(yaw) - math.cos(yaw0)), yaw)


def ego_pose(traj: dict, t: float) -> np.ndarray:
    """4x4 ego -> global at time ``t``."""
    x, y, yaw = _ego_state(traj, t)
    return G.transform_matrix((x, y, 0.0), G.yaw_to_quaternion(yaw))


def _footprint_discs(x: float, y: float, w: float, length: float, yaw: float) -> np.ndarray:
    """``(n, 3)`` discs ``(x, y, r)`` covering a ``w x length`` footprint (length along ``yaw``)."""
    long_, short = max(w, length), min(w, length)
    axis = yaw if length >= w else yaw + math.pi / 2
    n = max(1, math.ceil(long_ / short))
    seg = long_ / n
    s = -long_ / 2 + seg * (np.arange(n) + 0.5)
    r = math.hypot(short / 2, seg / 2)
    return np.stack([x + s * math.cos(axis), y + s * math.sin(axis), np.full(n, r)], 1)


def _layout(rng: np.random.Generator, traj: dict, times: Sequence[float]) -> List[dict]:
    """Static objects of a scene: ``[{category, centre (3,), wlh (3,), yaw, rgb}]``."""
    # the ego's swept footprint, as discs every 0.1 s (cameras fire up to 50 ms early)
    sweep = []
    for t in np.arange(times[0] - 0.1, times[-1] + 0.1001, 0.1):
        x, y, yaw = _ego_state(traj, t)
        c, s = math.cos(yaw), math.sin(yaw)
        sweep += [(x + dx * c, y + dx * s, EGO_RADIUS) for dx, _ in EGO_DISCS]
    ego = np.array(sweep)
    taken = np.zeros((0, 3))
    objects: List[dict] = []

    def place(category, wlh, rgb, where):
        nonlocal taken
        for _ in range(30):
            x, y, yaw = where()
            discs = _footprint_discs(x, y, wlh[0], wlh[1], yaw)
            d_ego = np.linalg.norm(discs[:, None, :2] - ego[None, :, :2], axis=-1) - discs[:, None, 2] - ego[:, 2]
            d_obj = (np.linalg.norm(discs[:, None, :2] - taken[None, :, :2], axis=-1) - discs[:, None, 2]
                     - taken[:, 2])
            if d_ego.min() > 0.5 and (d_obj.size == 0 or d_obj.min() > 0.3):
                taken = np.concatenate([taken, discs])
                colour = np.clip(np.asarray(rgb, dtype=np.float64) + rng.normal(0, 6, 3), 0, 255)
                objects.append({"category": category, "centre": np.array([x, y, wlh[2] / 2]),
                                "wlh": np.asarray(wlh, dtype=np.float64), "yaw": yaw, "rgb": colour})
                return

    def along_path(lateral_choices, yaw_offset, yaw_noise):
        def where():
            x, y, h = _ego_state(traj, times[rng.integers(len(times))])
            s = rng.uniform(-45, 45)
            lat = rng.choice(lateral_choices) + rng.normal(0, 0.25)
            px = x + s * math.cos(h) - lat * math.sin(h)
            py = y + s * math.sin(h) + lat * math.cos(h)
            return px, py, h + yaw_offset() + rng.normal(0, yaw_noise)
        return where

    def anywhere():
        x, y, h = _ego_state(traj, times[rng.integers(len(times))])
        a, b = rng.uniform(-50, 50, 2)
        return x + a * math.cos(h) - b * math.sin(h), y + a * math.sin(h) + b * math.cos(h), rng.uniform(-math.pi,
                                                                                                           math.pi)

    def size(mean, std):
        return np.maximum(np.asarray(mean) + rng.normal(0, 1, 3) * np.asarray(std), 0.5 * np.asarray(mean))

    names = list(VEHICLES)
    shares = np.array([VEHICLES[n][2] for n in names])
    lanes = along_path([-14.0, -10.5, -7.0, -3.5, 0.0, 3.5, 7.0, 10.5, 14.0], lambda: math.pi * rng.integers(2), 0.05)
    for _ in range(rng.integers(20, 45)):
        name = names[rng.choice(len(names), p=shares / shares.sum())]
        mean, std, _ = VEHICLES[name]
        place(name, size(mean, std), VEHICLE_RGB[rng.integers(len(VEHICLE_RGB))],
              lanes if rng.random() < 0.6 else anywhere)
    for name, count, rgbs, where in (
            ("human.pedestrian.adult", rng.integers(4, 16), PEDESTRIAN_RGB, anywhere),
            ("movable_object.trafficcone", rng.integers(2, 12), CONE_RGB,
             along_path([-6.0, -4.5, -3.0, 3.0, 4.5, 6.0], lambda: rng.uniform(-math.pi, math.pi), 0.0)),
            ("movable_object.barrier", rng.integers(2, 12), BARRIER_RGB,
             along_path([-9.0, -6.5, -4.0, 4.0, 6.5, 9.0], lambda: math.pi / 2, 0.1))):
        mean, std = DISTRACTORS[name]
        for _ in range(count):
            place(name, size(mean, std), rgbs[rng.integers(len(rgbs))], where)
    return objects


def face_shades(yaw: np.ndarray, sun: np.ndarray, ambient: float = 0.42) -> np.ndarray:
    """``(N, 6)`` flat-shading factors of the six faces of boxes with yaws ``(N,)`` under a sun
    direction ``(3,)`` (global frame, pointing at the sun)."""
    c, s = np.cos(yaw), np.sin(yaw)
    n = FACE_NORMALS[None].repeat(len(yaw), 0)
    nx = n[..., 0] * c[:, None] - n[..., 1] * s[:, None]
    ny = n[..., 0] * s[:, None] + n[..., 1] * c[:, None]
    lambert = np.clip(nx * sun[0] + ny * sun[1] + n[..., 2] * sun[2], 0, None)
    return ambient + (1 - ambient) * lambert


# ---------------------------------------------------------------------------------------------
# rendering


def pixel_rays(intrinsics: np.ndarray, width: int, height: int) -> np.ndarray:
    """``(H, W, 3)`` camera-frame rays ``K^-1 [u, v, 1]`` (depth 1) through the pixel centres
    ``(j + 0.5, i + 0.5)``: the inverse of :func:`bev.geometry.project_points` at depth 1."""
    u, v = np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5)
    uv1 = np.stack([u, v, np.ones_like(u)], -1)
    return uv1 @ np.linalg.inv(intrinsics).T


def _clip_near(poly: np.ndarray, near: float) -> np.ndarray:
    """Sutherland-Hodgman: the part of a convex camera-frame polygon ``(n, 3)`` with ``z >= near``."""
    inside = poly[:, 2] >= near
    if inside.all():
        return poly
    out = []
    for k in range(len(poly)):
        a, b = poly[k], poly[(k + 1) % len(poly)]
        if inside[k]:
            out.append(a)
        if inside[k] != inside[(k + 1) % len(poly)]:
            out.append(a + (near - a[2]) / (b[2] - a[2]) * (b - a))
    return np.array(out).reshape(-1, 3)


def _project(polys: List[np.ndarray], intrinsics: np.ndarray) -> List[np.ndarray]:
    """Project camera-frame polygons (all in front of the near plane) in one call."""
    if not polys:
        return []
    uv, _ = G.project_points(torch.from_numpy(np.concatenate(polys)), torch.from_numpy(intrinsics))
    return np.split(uv.numpy(), np.cumsum([len(p) for p in polys])[:-1])


def _fill(uv: np.ndarray, width: int, height: int):
    """Rasterise a convex polygon of continuous pixel coordinates (pixel ``j`` spans ``[j, j+1)``):
    ``(rows slice, cols slice, bool mask)`` over its clipped bounding box, or None."""
    import cv2

    x0, y0 = max(int(math.floor(uv[:, 0].min())) - 1, 0), max(int(math.floor(uv[:, 1].min())) - 1, 0)
    x1, y1 = min(int(math.ceil(uv[:, 0].max())) + 1, width), min(int(math.ceil(uv[:, 1].max())) + 1, height)
    if x0 >= x1 or y0 >= y1:
        return None
    mask = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    # OpenCV puts pixel centres at integers: shift by -0.5; 4 fractional bits
    pts = np.round((uv - (x0 + 0.5, y0 + 0.5)) * 16).astype(np.int32)
    cv2.fillConvexPoly(mask, pts, 1, lineType=cv2.LINE_8, shift=4)
    return slice(y0, y1), slice(x0, x1), mask.astype(bool)


def rasterize_boxes(corners_cam: np.ndarray, intrinsics: np.ndarray, width: int, height: int,
                    face_rgb: Optional[np.ndarray] = None, near: float = NEAR) -> Dict[str, np.ndarray]:
    """Draw boxes given by their camera-frame corners ``(N, 8, 3)`` (devkit order) as solid cuboids.

    Each face that faces the camera is clipped against ``z >= near``, projected with
    :func:`bev.geometry.project_points`, filled, and kept where it is nearer than what was
    drawn (per-pixel inverse depth, affine in ``(u, v)`` on a plane). Returns ``ids`` (H, W)
    int32 (box index, -1 where none), ``inv_depth`` (H, W), ``rgb`` (H, W, 3) float32 (the
    face's ``face_rgb`` (N, 6, 3), if given) and ``area`` (N,): each box's silhouette in pixels,
    without occlusion by the others.
    """
    corners_cam = np.asarray(corners_cam, dtype=np.float64).reshape(-1, 8, 3)
    K = np.asarray(intrinsics, dtype=np.float64)
    n = len(corners_cam)
    ids = np.full((height, width), -1, dtype=np.int32)
    inv_depth = np.zeros((height, width))
    rgb = np.zeros((height, width, 3), dtype=np.float32) if face_rgb is not None else None
    area = np.zeros(n, dtype=np.int64)
    if n == 0:
        return {"ids": ids, "inv_depth": inv_depth, "rgb": rgb, "area": area}
    # cull boxes wholly behind the near plane or wholly beside the image
    uv, depth = G.project_points(torch.from_numpy(corners_cam), torch.from_numpy(K))
    uv, depth = uv.numpy(), depth.numpy()
    in_front = (depth >= near).all(1)
    outside = ((uv[..., 0] < 0).all(1) | (uv[..., 0] > width).all(1) | (uv[..., 1] < 0).all(1)
               | (uv[..., 1] > height).all(1))
    keep = np.flatnonzero((depth >= near).any(1) & ~(in_front & outside))
    faces = corners_cam[:, FACES]  # (N, 6, 4, 3)
    face_centre = faces.mean(2)
    normal = face_centre - corners_cam.mean(1)[:, None]  # outward (boxes are centred)
    offset = (normal * face_centre).sum(-1)  # plane: normal . X = offset; < 0 when facing the camera
    polys, which = [], []
    for i in keep:
        for f in np.flatnonzero(offset[i] < 0):
            poly = _clip_near(faces[i, f], near)
            if len(poly) >= 3:
                polys.append(poly)
                which.append((i, f))
    K_inv = np.linalg.inv(K)
    silhouettes: Dict[int, list] = {}
    for (i, f), uv_poly in zip(which, _project(polys, K)):
        filled = _fill(uv_poly, width, height)
        if filled is None:
            continue
        rows, cols, mask = filled
        g = K_inv.T @ normal[i, f] / offset[i, f]  # inverse depth = g . (u, v, 1)
        u = np.arange(cols.start, cols.stop) + 0.5
        v = np.arange(rows.start, rows.stop) + 0.5
        inv = g[0] * u[None, :] + g[1] * v[:, None] + g[2]
        nearer = mask & (inv > inv_depth[rows, cols])
        inv_depth[rows, cols][nearer] = inv[nearer]
        ids[rows, cols][nearer] = i
        if rgb is not None:
            rgb[rows, cols][nearer] = face_rgb[i, f]
        silhouettes.setdefault(i, []).append((rows, cols, mask))
    for i, parts in silhouettes.items():
        y0, y1 = min(p[0].start for p in parts), max(p[0].stop for p in parts)
        x0, x1 = min(p[1].start for p in parts), max(p[1].stop for p in parts)
        union = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        for rows, cols, mask in parts:
            union[rows.start - y0:rows.stop - y0, cols.start - x0:cols.stop - x0] |= mask
        area[i] = union.sum()
    return {"ids": ids, "inv_depth": inv_depth, "rgb": rgb, "area": area}


def _shadow_mask(footprints_cam: np.ndarray, intrinsics: np.ndarray, width: int, height: int) -> np.ndarray:
    """``(H, W)`` bool: pixels of the ground polygons ``(N, 4, 3)`` (camera frame)."""
    mask = np.zeros((height, width), dtype=bool)
    polys = [p for p in (_clip_near(fp, NEAR) for fp in footprints_cam) if len(p) >= 3]
    for uv in _project(polys, intrinsics):
        filled = _fill(uv, width, height)
        if filled is not None:
            rows, cols, m = filled
            mask[rows, cols] |= m
    return mask


class CameraView:
    """What a camera's images share within a scene: its rays, the ground pixels and where they
    hit the ground in the ego frame, the sky and the ground's haze.

    Ego poses have a yaw only and the ground is the plane z = 0, so a pixel's ray meets the ground
    at a fixed ego-frame point whatever the pose: the background of an image is that point set
    moved by the ego pose and textured in the global frame.
    """

    def __init__(self, intrinsics: np.ndarray, cam2ego: np.ndarray, width: int, height: int, style: dict):
        self.K, self.cam2ego, self.width, self.height = np.asarray(intrinsics, np.float64), cam2ego, width, height
        ray_e = pixel_rays(self.K, width, height).reshape(-1, 3) @ cam2ego[:3, :3].T  # ego-frame rays
        self.ray_len = np.linalg.norm(ray_e, axis=-1).reshape(height, width)
        down = ray_e[:, 2] < -1e-9
        self.ground_idx = np.flatnonzero(down)
        hit = cam2ego[2, 3] / -ray_e[down, 2]  # ray parameter at z = 0
        self.ground_xy = (cam2ego[:2, 3] + hit[:, None] * ray_e[down, :2]).astype(np.float32)
        haze = np.exp(-hit * self.ray_len.reshape(-1)[down] / HAZE)[:, None]
        # a ground pixel is haze * brightness * ground colour + (1 - haze) * horizon colour
        self.ground_lit = (haze * style["ground"]).astype(np.float32)
        self.ground_haze = ((1 - haze) * style["horizon"]).astype(np.float32)
        self.line_brightness = np.float32(np.mean(style["lines"]) / np.mean(style["ground"]))
        elevation = np.clip(ray_e[:, 2] / self.ray_len.reshape(-1), 0, 1)[:, None]
        self.sky = (style["horizon"] + (style["zenith"] - style["horizon"]) * np.minimum(1, 3 * elevation)).astype(
            np.float32)
        self.horizon = np.asarray(style["horizon"], dtype=np.float32)

    def render(self, world: dict, ego2global: np.ndarray, rng: np.random.Generator):
        """One image at an ego pose: ``(rgb uint8 (H, W, 3), ids (H, W), area (N,))`` (ids and area as
        :func:`rasterize_boxes` returns them for ``world["corners"]``)."""
        H, W = self.height, self.width
        global2cam = G.invert_rigid(ego2global @ self.cam2ego)
        R, t = global2cam[:3, :3], global2cam[:3, 3]
        image = self.sky.copy()  # (H * W, 3)
        # the ground, textured in the global frame: 4 m tiles, a line every 10 m, contact shadows
        g = self.ground_xy @ ego2global[:2, :2].T.astype(np.float32) + ego2global[:2, 3].astype(np.float32)
        tile = np.floor(g * np.float32(0.25)).astype(np.int64)
        brightness = np.where((tile[:, 0] + tile[:, 1]) & 1, np.float32(1.05), np.float32(0.95))
        near_line = np.abs(g - 10 * np.round(g * np.float32(0.1))) < 0.12
        brightness[near_line[:, 0] | near_line[:, 1]] = self.line_brightness
        shadow = _shadow_mask(world["shadows"] @ R.T + t, self.K, W, H).reshape(-1)[self.ground_idx]
        brightness[shadow] *= np.float32(0.55)
        image[self.ground_idx] = self.ground_lit * brightness[:, None] + self.ground_haze
        # the objects, hazy with distance
        drawn = rasterize_boxes(world["corners"] @ R.T + t, self.K, W, H, world["face_rgb"])
        on = np.flatnonzero(drawn["ids"].reshape(-1) >= 0)
        distance = self.ray_len.reshape(-1)[on] / drawn["inv_depth"].reshape(-1)[on]
        haze = np.exp(-distance / HAZE).astype(np.float32)[:, None]
        image[on] = haze * drawn["rgb"].reshape(-1, 3)[on] + (1 - haze) * self.horizon
        image = image * np.float32(rng.uniform(0.85, 1.15)) + rng.integers(-6, 7, image.shape, dtype=np.int16)
        return np.clip(image, 0, 255).astype(np.uint8).reshape(H, W, 3), drawn["ids"], drawn["area"]


def visibility_level(visible: float, total: float) -> str:
    """nuScenes visibility token of a box with ``visible`` of its ``total`` pixels in view."""
    if total <= 0:
        return "1"
    fraction = visible / total
    return "1" if fraction <= 0.4 else "2" if fraction <= 0.6 else "3" if fraction <= 0.8 else "4"


# ---------------------------------------------------------------------------------------------
# scenes and tables


def _intrinsics(channel: str, image_size: Tuple[int, int]) -> np.ndarray:
    fx, fy, cx, cy = CAMERA_CALIBRATION[channel][2]
    K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1.0]])
    scale = (image_size[0] / CALIBRATION_SIZE[0], image_size[1] / CALIBRATION_SIZE[1])
    return G.augment_intrinsics(K, G.resize_crop_matrix(scale))


def _scene(job: dict) -> Dict[str, list]:
    """Lay out, render and tabulate one scene (runs in a worker); writes its JPEGs under ``job["root"]``."""
    from PIL import Image

    ds, index, n_samples, image_size = job["ds"], job["index"], job["samples"], tuple(job["image_size"])
    root = Path(job["root"])
    rng = np.random.default_rng([job["seed"], index])
    width, height = image_size
    rows = {k: [] for k in ("instance", "calibrated_sensor", "ego_pose", "log", "scene", "sample", "sample_data",
                            "sample_annotation")}
    t0 = 1532402927.0 + 3600.0 * index  # 2018-07-24, as the real frame; an hour per scene
    times = [t0 + SAMPLE_PERIOD * k for k in range(n_samples)]
    moving = rng.random() < 0.85
    traj = {"t0": t0, "x0": rng.uniform(200, 1800), "y0": rng.uniform(200, 1800),
            "yaw0": rng.uniform(-math.pi, math.pi), "yaw_rate": rng.uniform(-0.12, 0.12),
            "speed": rng.uniform(3.0, 13.0) if moving else rng.uniform(0.0, 0.5)}
    objects = _layout(rng, traj, times)
    elevation, azimuth = rng.uniform(0.45, 1.2), rng.uniform(-math.pi, math.pi)
    sun = np.array([math.cos(elevation) * math.cos(azimuth), math.cos(elevation) * math.sin(azimuth),
                    math.sin(elevation)])
    grey = rng.uniform(85, 120)
    style = {"ground": grey + rng.normal(0, 4, 3), "lines": np.full(3, min(grey + 70, 215.0)),
             "horizon": np.array([200.0, 205.0, 212.0]) + rng.normal(0, 5, 3),
             "zenith": np.array([105.0, 145.0, 205.0]) + rng.normal(0, 12, 3)}
    yaw = np.array([o["yaw"] for o in objects])
    rgb = np.stack([o["rgb"] for o in objects])
    corners = np.stack([G.box_corners(o["centre"], o["wlh"], o["yaw"]) for o in objects])
    shadows = np.stack([G.box_corners((o["centre"][0], o["centre"][1], 0.0), o["wlh"] + (0.5, 0.5, 0), o["yaw"])[
        [2, 3, 7, 6]] for o in objects])
    shadows[..., 2] = 0.0
    world = {"corners": corners, "face_rgb": face_shades(yaw, sun)[..., None] * rgb[:, None, :], "shadows": shadows}

    logfile = f"synthetic-{ds}-{index:04d}"
    name = f"synthetic-{index:04d}"
    log_token, scene_token = token(ds, "log", index), token(ds, "scene", index)
    location = ("singapore-onenorth", "boston-seaport")[index % 2]
    rows["log"].append({"token": log_token, "logfile": logfile, "vehicle": "synthetic", "date_captured": "2018-07-24",
                        "location": location})
    sample_tokens = [token(ds, "sample", index, k) for k in range(n_samples)]
    channels = RENDER_ORDER + ("LIDAR_TOP",)
    cs_tokens = {ch: token(ds, "cs", index, ch) for ch in channels}
    intrinsics = {ch: _intrinsics(ch, image_size) for ch in CAMERAS}
    cam2ego = {ch: G.transform_matrix(*CAMERA_CALIBRATION[ch][:2]) for ch in CAMERAS}
    for ch in channels:
        calib = LIDAR_CALIBRATION if ch == "LIDAR_TOP" else CAMERA_CALIBRATION[ch][:2]
        rows["calibrated_sensor"].append({
            "token": cs_tokens[ch], "sensor_token": token("sensor", ch),
            "camera_intrinsic": [] if ch == "LIDAR_TOP" else intrinsics[ch].tolist(),
            **pose_record(G.transform_matrix(*calib))})
    views = {ch: CameraView(intrinsics[ch], cam2ego[ch], width, height, style) for ch in CAMERAS}
    ann_tokens = [[token(ds, "ann", index, k, j) for j in range(len(objects))] for k in range(n_samples)]
    sd_tokens = {ch: [token(ds, "sd", index, k, ch) for k in range(n_samples)] for ch in channels}
    for k, t_sample in enumerate(times):
        sample_token = sample_tokens[k]
        rows["sample"].append({"token": sample_token, "timestamp": usec(t_sample), "scene_token": scene_token,
                               "prev": sample_tokens[k - 1] if k else "",
                               "next": sample_tokens[k + 1] if k + 1 < n_samples else ""})
        visible = np.zeros(len(objects), dtype=np.int64)
        total = np.zeros(len(objects), dtype=np.int64)
        for ch in channels:
            stamp = t_sample if ch == "LIDAR_TOP" else t_sample - rng.uniform(0.0, MAX_CAMERA_DELAY)
            ego2global = ego_pose(traj, stamp)
            pose_token = token(ds, "pose", index, k, ch)
            rows["ego_pose"].append({"token": pose_token, "timestamp": usec(stamp), **pose_record(ego2global)})
            if ch == "LIDAR_TOP":
                filename = f"samples/LIDAR_TOP/{logfile}__LIDAR_TOP__{usec(stamp)}.pcd.bin"
                fileformat, w, h = "pcd", 0, 0
            else:
                image, ids, area = views[ch].render(world, ego2global, rng)
                visible += np.bincount(ids[ids >= 0], minlength=len(objects))
                total += area
                filename, fileformat, w, h = f"samples/{ch}/{logfile}__{ch}__{usec(stamp)}.jpg", "jpg", width, height
                Image.fromarray(image).save(root / filename, format="JPEG", quality=92)
            rows["sample_data"].append({
                "token": sd_tokens[ch][k], "sample_token": sample_token, "ego_pose_token": pose_token,
                "calibrated_sensor_token": cs_tokens[ch], "timestamp": usec(stamp), "fileformat": fileformat,
                "is_key_frame": True, "height": h, "width": w, "filename": filename,
                "prev": sd_tokens[ch][k - 1] if k else "", "next": sd_tokens[ch][k + 1] if k + 1 < n_samples else ""})
        for j, obj in enumerate(objects):
            box2global = G.transform_matrix(obj["centre"], G.yaw_to_quaternion(obj["yaw"]))
            rows["sample_annotation"].append({
                "token": ann_tokens[k][j], "sample_token": sample_token,
                "instance_token": token(ds, "instance", index, j),
                "visibility_token": visibility_level(visible[j], total[j]),
                "attribute_tokens": [token("attribute", a) for a in _attributes(obj["category"])],
                "size": obj["wlh"].tolist(), "prev": ann_tokens[k - 1][j] if k else "",
                "next": ann_tokens[k + 1][j] if k + 1 < n_samples else "", "num_lidar_pts": int(visible[j]),
                "num_radar_pts": 0, **pose_record(box2global)})
    colours = {}
    for j, obj in enumerate(objects):
        inst = token(ds, "instance", index, j)
        rows["instance"].append({"token": inst, "category_token": token("category", obj["category"]),
                                 "nbr_annotations": n_samples, "first_annotation_token": ann_tokens[0][j],
                                 "last_annotation_token": ann_tokens[-1][j]})
        colours[inst] = {"category": obj["category"], "rgb": [round(float(c), 2) for c in obj["rgb"]]}
    rows["scene"].append({"token": scene_token, "log_token": log_token, "nbr_samples": n_samples,
                          "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1], "name": name,
                          "description": f"synthetic: {len(objects)} static objects, ego at {traj['speed']:.1f} m/s, "
                                         f"yaw rate {traj['yaw_rate']:+.3f} rad/s"})
    return {"rows": rows, "colours": colours}


def _attributes(category: str) -> List[str]:
    if category in ("vehicle.motorcycle", "vehicle.bicycle"):
        return ["cycle.without_rider"]
    if category.startswith("vehicle."):
        return ["vehicle.parked"]
    if category.startswith("human.pedestrian"):
        return ["pedestrian.standing"]
    return []


def _check(scenes, samples_per_scene, image_size, version, seed, val_scenes, workers) -> Tuple[int, Tuple[int, int]]:
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if not is_int(scenes) or scenes < 1:
        raise ValueError(f"scenes must be an integer >= 1, got {scenes!r}.")
    if not is_int(samples_per_scene) or samples_per_scene < 1:
        raise ValueError(f"samples_per_scene must be an integer >= 1, got {samples_per_scene!r}.")
    try:
        size = tuple(int(v) for v in image_size)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) < 16 or any(int(v) != v for v in image_size):
        raise ValueError(f"image_size must be (width, height), integers >= 16, got {image_size!r}.")
    if not isinstance(version, str) or not version.startswith("v1.0-") or "/" in version or "\\" in version:
        raise ValueError(f"version must name a nuScenes table folder such as 'v1.0-mini', got {version!r}.")
    if not is_int(seed):
        raise ValueError(f"seed must be an integer, got {seed!r}.")
    if val_scenes is None:
        val_scenes = max(1, scenes // 5) if scenes >= 2 else 0
    if not is_int(val_scenes) or not 0 <= val_scenes < scenes:
        raise ValueError(f"val_scenes must be an integer in [0, scenes - 1] = [0, {scenes - 1}] (at least one "
                         f"training scene), got {val_scenes!r}.")
    if workers is not None and (not is_int(workers) or workers < 1):
        raise ValueError(f"workers must be an integer >= 1 or None (one per CPU core), got {workers!r}.")
    return int(val_scenes), size


def _stored_params(out: Path) -> Optional[dict]:
    try:
        return json.loads((out / "synthetic.json").read_text())["params"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def generate(out, scenes: int, samples_per_scene: int = DEFAULT_SAMPLES_PER_SCENE,
             image_size: Sequence[int] = DEFAULT_IMAGE_SIZE, version: str = "v1.0-mini", seed: int = 0,
             val_scenes: Optional[int] = None, workers: Optional[int] = None, verbose: bool = False,
             replace: bool = True) -> Path:
    """Write (or reuse) a synthetic nuScenes in ``out`` and return ``out``.

    ``scenes`` scenes of ``samples_per_scene`` key frames, six ``image_size = (W, H)`` cameras
    each; the last ``val_scenes`` scenes (default ``max(1, scenes // 5)``, 0 for one scene) form
    the ``"val"`` list of ``out/splits.json``, the others ``"train"``. The set is written into a
    temporary folder beside ``out`` and renamed into place when complete; if ``out`` already
    holds a set made with the same parameters (``out/synthetic.json``) it is returned untouched,
    and a set with other parameters is replaced (refused in one sentence with ``replace=False``,
    as ``tools/train_bev.py`` does: a shared data set is never deleted silently). ``workers``
    processes render the scenes (default: one per available core); the output does not depend on it.
    """
    val_scenes, image_size = _check(scenes, samples_per_scene, image_size, version, seed, val_scenes, workers)
    out = Path(out)
    params = {"format": FORMAT_VERSION, "scenes": int(scenes), "samples_per_scene": int(samples_per_scene),
              "image_size": list(image_size), "version": version, "seed": int(seed), "val_scenes": val_scenes}
    if out.exists():
        stored = _stored_params(out)
        if stored == params and (out / version).is_dir():
            return out
        if stored is not None and stored != params and not replace:
            diff = ", ".join(f"{k}={stored.get(k)!r} (asked {v!r})" for k, v in params.items() if stored.get(k) != v)
            raise ValueError(f"{out} holds a synthetic nuScenes made with other settings ({diff}); refusing to "
                             "replace it: give another data.dataroot for a new one, or delete the folder yourself.")
        if stored is None and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out} exists and is not a synthetic nuScenes (no synthetic.json); refusing to "
                             "overwrite it: pass an empty or new folder.")
    start = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        ds = token("synthetic", json.dumps(params, sort_keys=True))[:12]
        for ch in CAMERAS:
            (tmp / "samples" / ch).mkdir(parents=True)
        jobs = [{"ds": ds, "index": i, "samples": samples_per_scene, "image_size": image_size, "seed": seed,
                 "root": str(tmp)} for i in range(scenes)]
        n_workers = min(workers or len(os.sched_getaffinity(0)), scenes)
        if n_workers > 1:
            import multiprocessing as mp

            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ProcessPoolExecutor(n_workers, mp_context=ctx, initializer=torch.set_num_threads,
                                     initargs=(1,)) as pool:
                results = list(pool.map(_scene, jobs))
        else:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # the projections are tiny: threads only cost
            try:
                results = [_scene(job) for job in jobs]
            finally:
                torch.set_num_threads(threads)
        tables = empty_tables()
        tables["visibility"] = [{"token": t, "level": level, "description": d} for t, level, d in VISIBILITY]
        categories = sorted(set(CATEGORY_NAMES.values()))
        tables["category"] = [{"token": token("category", c), "name": c, "description": c} for c in categories]
        tables["attribute"] = [{"token": token("attribute", a), "name": a, "description": d}
                               for a, d in ATTRIBUTES.items()]
        tables["sensor"] = [{"token": token("sensor", ch), "channel": ch, "modality": "camera"}
                            for ch in RENDER_ORDER]
        tables["sensor"].append({"token": token("sensor", "LIDAR_TOP"), "channel": "LIDAR_TOP", "modality": "lidar"})
        colours = {}
        for result in results:
            for name, rows in result["rows"].items():
                tables[name] += rows
            colours.update(result["colours"])
        tables["map"] = [{"token": token(ds, "map", loc), "category": "semantic_prior", "filename": "",
                          "log_tokens": [log["token"] for log in tables["log"] if log["location"] == loc]}
                         for loc in sorted({log["location"] for log in tables["log"]})]
        write_json_tables(tmp / version, tables)
        names = [s["name"] for s in tables["scene"]]
        (tmp / "splits.json").write_text(json.dumps({"train": names[:scenes - val_scenes],
                                                     "val": names[scenes - val_scenes:]}, indent=1))
        (tmp / "synthetic_instances.json").write_text(json.dumps(colours, indent=0))
        seconds = time.time() - start
        (tmp / "synthetic.json").write_text(json.dumps({
            "params": params, "generator": "bev.data.synthetic", "seconds": round(seconds, 2),
            "workers": n_workers, "counts": {k: len(v) for k, v in tables.items()}}, indent=1))
        if out.exists():
            if _stored_params(out) == params:  # another process finished the same set meanwhile
                return out
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
            os.replace(out, old / "set")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        if verbose:
            print(f"synthetic nuScenes: {scenes} scenes x {samples_per_scene} samples x 6 cameras "
                  f"{image_size[0]}x{image_size[1]} in {seconds:.1f} s ({n_workers} workers) -> {out}")
        return out
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(out: Path) -> None:
    """Remove partial sets beside ``out`` left by killed runs (their process no longer exists)."""
    for path in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int(path.name[len(f".{out.name}.partial-"):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except (ValueError, PermissionError):
            continue
