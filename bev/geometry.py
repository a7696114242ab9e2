"""Every camera / ego / BeV transform of the project, in one place.

Conventions (those of nuScenes and its devkit, ``nuscenes/utils/geometry_utils.py``):

* quaternions are ``[w, x, y, z]`` (pyquaternion's order, the order of the nuScenes tables);
* a pose ``(translation, rotation)`` of frame A in frame B is the 4x4 ``A -> B`` transform
  ``[[R, t], [0, 1]]`` (``transform_matrix``); ``cam2ego`` maps camera to ego coordinates;
* the ego frame: x forward, y left, z up (metres); the camera frame: x right, y down, z forward;
* boxes: centre, size ``[w, l, h]`` (nuScenes' order) and yaw about z; their 8 corners are in the
  devkit's ``Box.corners()`` order;
* the BeV grid (:class:`BevGrid`): cell ``[i, j]`` covers ``x in [x_min + i*res, ...)`` and
  ``y in [y_min + j*res, ...)``: rows follow x (forward), columns follow y (left). Drawn as an
  image, row 0 is the rear and column 0 the right side of the ego vehicle.

Functions take and return ``torch`` tensors (any leading batch dimensions) or numpy arrays
where noted, so that the data pipeline, the heads and the tests share them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Tuple, Union

import numpy as np
import torch

ArrayLike = Union[np.ndarray, Sequence[float], torch.Tensor]


def quaternion_to_rotation(q: ArrayLike) -> np.ndarray:
    """3x3 rotation matrix of a unit quaternion ``[w, x, y, z]`` (normalised first)."""
    w, x, y, z = (np.asarray(q, dtype=np.float64) / np.linalg.norm(np.asarray(q, dtype=np.float64))).tolist()
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def rotation_to_quaternion(rotation: np.ndarray) -> np.ndarray:
    """``[w, x, y, z]`` (``w >= 0``) of a 3x3 rotation matrix (Shepperd's method)."""
    m = np.asarray(rotation, dtype=np.float64)
    tr = np.trace(m)
    if tr > 0:
        s = 2.0 * math.sqrt(tr + 1.0)
        q = [0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s]
    else:
        i = int(np.argmax(np.diag(m)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * math.sqrt(max(1.0 + m[i, i] - m[j, j] - m[k, k], 0.0))
        q = [0.0] * 4
        q[0] = (m[k, j] - m[j, k]) / s
        q[1 + i] = 0.25 * s
        q[1 + j] = (m[j, i] + m[i, j]) / s
        q[1 + k] = (m[k, i] + m[i, k]) / s
    q = np.asarray(q)
    q = q / np.linalg.norm(q)
    return -q if q[0] < 0 else q


def yaw_to_quaternion(yaw: float) -> np.ndarray:
    """``[w, x, y, z]`` of a rotation by ``yaw`` radians about z."""
    return np.array([math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)])


def quaternion_yaw(q: ArrayLike) -> float:
    """The yaw of pyquaternion's ``Quaternion.yaw_pitch_roll`` (z-y'-x'' Tait-Bryan angles) of a
    ``[w, x, y, z]`` quaternion, normalised first: ``atan2(2 (w z - x y), 1 - 2 (y^2 + z^2))``.
    PointBeV's yaw-only ego frame takes this angle (github valeoai/PointBeV, ``pointbev/utils/
    geom.py`` ``get_yawtransfmat_from_mat``); with pitch or roll it differs slightly from
    :func:`rotation_yaw` (the heading of the rotated x axis)."""
    w, x, y, z = (np.asarray(q, dtype=np.float64) / np.linalg.norm(np.asarray(q, dtype=np.float64))).tolist()
    return float(np.arctan2(2 * (w * z - x * y), 1 - 2 * (y ** 2 + z ** 2)))


def yaw_only_pose(translation: ArrayLike, rotation: ArrayLike) -> np.ndarray:
    """4x4 transform of a pose with its pitch and roll dropped: the rotation about z by
    :func:`quaternion_yaw` and the full translation (github valeoai/PointBeV, ``pointbev/utils/
    geom.py`` ``get_yawtransfmat_from_mat``, applied to the ego pose of the LiDAR sample in
    ``pointbev/data/dataset/nuscenes_temporal.py``): the frame of PointBeV's labels."""
    return transform_matrix(translation, yaw_to_quaternion(quaternion_yaw(rotation)))


def rotation_yaw(rotation: np.ndarray) -> float:
    """Yaw (about z) of a rotation matrix, as the devkit's ``quaternion_yaw``: the angle of the
    rotated x axis projected on the xy plane."""
    v = rotation[:, 0]
    return float(math.atan2(v[1], v[0]))


def transform_matrix(translation: ArrayLike = (0, 0, 0), rotation: ArrayLike = (1, 0, 0, 0),
                     inverse: bool = False) -> np.ndarray:
    """4x4 rigid transform from a translation and a ``[w, x, y, z]`` quaternion (or 3x3 matrix)."""
    rot = np.asarray(rotation, dtype=np.float64)
    rot = quaternion_to_rotation(rot) if rot.shape == (4,) else rot
    t = np.asarray(translation, dtype=np.float64)
    out = np.eye(4)
    if inverse:
        out[:3, :3] = rot.T
        out[:3, 3] = -rot.T @ t
    else:
        out[:3, :3] = rot
        out[:3, 3] = t
    return out


def invert_rigid(T: np.ndarray) -> np.ndarray:
    """Inverse of a 4x4 rigid transform (``R^T``, ``-R^T t``)."""
    return transform_matrix(T[:3, 3], T[:3, :3], inverse=True)


def apply_transform(T: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``(..., 4, 4) x (..., N, 3) -> (..., N, 3)``."""
    return points @ T[..., :3, :3].transpose(-1, -2) + T[..., None, :3, 3]


def project_points(points_cam: torch.Tensor, intrinsics: torch.Tensor, eps: float = 1e-6):
    """Pinhole projection of camera-frame points: ``(..., N, 3), (..., 3, 3) -> (uv (..., N, 2),
    depth (..., N))``, like the devkit's ``view_points(points, K, normalize=True)``. Points with
    ``depth <= eps`` get ``uv`` from a clamped depth; mask them with ``depth > eps``."""
    depth = points_cam[..., 2]
    xyz = points_cam @ intrinsics.transpose(-1, -2)
    uv = xyz[..., :2] / depth.clamp_min(eps)[..., None]
    return uv, depth


def box_corners(center: ArrayLike, size_wlh: ArrayLike, yaw: float) -> np.ndarray:
    """``(8, 3)`` corners of a box, in the devkit's ``Box.corners()`` order (x along the length)."""
    w, l, h = (float(v) for v in size_wlh)
    x = l / 2 * np.array([1, 1, 1, 1, -1, -1, -1, -1])
    y = w / 2 * np.array([1, -1, -1, 1, 1, -1, -1, 1])
    z = h / 2 * np.array([1, 1, -1, -1, 1, 1, -1, -1])
    c, s = math.cos(yaw), math.sin(yaw)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    return (rot @ np.stack([x, y, z])).T + np.asarray(center, dtype=np.float64)


def resize_crop_matrix(scale: Tuple[float, float], crop_xy: Tuple[float, float] = (0.0, 0.0),
                       rotation_deg: float = 0.0, center: Tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """3x3 pixel affine of an image augmentation: scale ``(sx, sy)``, then a rotation by
    ``rotation_deg`` about ``center`` (pixels of the scaled image), then a crop whose top-left
    corner is ``crop_xy``. A pixel ``p`` of the original lands at ``A @ [p, 1]``; the camera's
    new intrinsics are ``A @ K`` (:func:`augment_intrinsics`)."""
    sx, sy = scale
    S = np.diag([sx, sy, 1.0])
    a = math.radians(rotation_deg)
    c, s = math.cos(a), math.sin(a)
    cx, cy = center
    R = np.array([[c, -s, cx - c * cx + s * cy], [s, c, cy - s * cx - c * cy], [0, 0, 1.0]])
    C = np.array([[1, 0, -crop_xy[0]], [0, 1, -crop_xy[1]], [0, 0, 1.0]])
    return C @ R @ S


def augment_intrinsics(K: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Intrinsics after an image affine (``resize_crop_matrix``): ``A @ K``."""
    return np.asarray(affine, dtype=np.float64) @ np.asarray(K, dtype=np.float64)


def scale_intrinsics(K: torch.Tensor, sx: float, sy: float) -> torch.Tensor:
    """Intrinsics of an image (or feature map) resized by ``(sx, sy)`` per axis, pixel-corner
    convention (``F.interpolate(align_corners=False)``): ``u' = sx * u``."""
    S = torch.diag(torch.tensor([sx, sy, 1.0], dtype=K.dtype, device=K.device))
    return S @ K


def invert_rigid_torch(T: torch.Tensor) -> torch.Tensor:
    """Inverse of rigid ``(..., 4, 4)`` transforms (``R^T``, ``-R^T t``), any leading dims; the
    torch twin of :func:`invert_rigid` (e.g. ``ego2cam = invert_rigid_torch(cam2ego)``)."""
    rot_t = T[..., :3, :3].transpose(-1, -2)
    out = torch.zeros_like(T)
    out[..., :3, :3] = rot_t
    out[..., :3, 3] = -(rot_t @ T[..., :3, 3:4])[..., 0]
    out[..., 3, 3] = 1
    return out


def pixels_to_grid_sample(uv: torch.Tensor, size_hw: Tuple[int, int]) -> torch.Tensor:
    """Pixel-corner coordinates ``(..., 2)`` ``(u, v)`` in an image or feature map of size
    ``(h, w)`` (pixel ``k`` spans ``[k, k + 1)``, the convention of :func:`scale_intrinsics`)
    -> the normalised ``(x, y)`` of ``F.grid_sample(..., align_corners=False)``: ``2u/w - 1``,
    ``2v/h - 1`` (-1 and 1 are the outer edges of the border pixels; pixel centres ``k + 0.5``
    land exactly on the samples)."""
    h, w = size_hw
    return torch.stack([2.0 * uv[..., 0] / w - 1.0, 2.0 * uv[..., 1] / h - 1.0], -1)


def inside_image(uv: torch.Tensor, size_hw: Tuple[int, int]) -> torch.Tensor:
    """``(...)`` bool: ``0 <= u <= w`` and ``0 <= v <= h`` (pixel-corner coordinates)."""
    h, w = size_hw
    return (uv[..., 0] >= 0) & (uv[..., 0] <= w) & (uv[..., 1] >= 0) & (uv[..., 1] <= h)


@dataclass(frozen=True)
class BevGrid:
    """The ego-frame bird's-eye-view grid: by default 200 x 200 cells of 0.5 m over [-50, 50] m
    in x and y (PointBeV's and SimpleBEV's grid) and 8 height bins over [-4, 6] m, whose centres
    are PointBeV's voxel heights (github valeoai/PointBeV, ``configs/model/net/projector/
    camprojector.yaml``: ``spatial_bounds`` z from -3.375 to 5.375 m in 8 steps of 1.25 m)."""

    x_bounds: Tuple[float, float] = (-50.0, 50.0)
    y_bounds: Tuple[float, float] = (-50.0, 50.0)
    z_bounds: Tuple[float, float] = (-4.0, 6.0)
    resolution: float = 0.5
    z_bins: int = 8

    def __post_init__(self):
        for name in ("x_bounds", "y_bounds", "z_bounds"):
            lo, hi = getattr(self, name)
            if not hi > lo:
                raise ValueError(f"BevGrid.{name} must be (low, high) with high > low, got {(lo, hi)}.")
        if self.resolution <= 0 or self.z_bins < 1:
            raise ValueError(f"BevGrid needs resolution > 0 and z_bins >= 1, got {self.resolution}, {self.z_bins}.")

    @property
    def shape(self) -> Tuple[int, int]:
        """``(rows along x, columns along y)``."""
        return (int(round((self.x_bounds[1] - self.x_bounds[0]) / self.resolution)),
                int(round((self.y_bounds[1] - self.y_bounds[0]) / self.resolution)))

    def cell_centers(self) -> torch.Tensor:
        """``(X, Y, 2)`` ego ``(x, y)`` of every cell centre."""
        nx, ny = self.shape
        xs = self.x_bounds[0] + (torch.arange(nx, dtype=torch.float64) + 0.5) * self.resolution
        ys = self.y_bounds[0] + (torch.arange(ny, dtype=torch.float64) + 0.5) * self.resolution
        return torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1)

    def z_centers(self) -> torch.Tensor:
        lo, hi = self.z_bounds
        return lo + (torch.arange(self.z_bins, dtype=torch.float64) + 0.5) * (hi - lo) / self.z_bins

    def voxel_centers(self) -> torch.Tensor:
        """``(X, Y, Z, 3)`` ego ``(x, y, z)`` of every voxel centre."""
        xy = self.cell_centers()
        z = self.z_centers()
        nx, ny = self.shape
        return torch.cat([xy[:, :, None, :].expand(nx, ny, self.z_bins, 2),
                          z[None, None, :, None].expand(nx, ny, self.z_bins, 1)], -1)

    def to_cell(self, xy: torch.Tensor) -> torch.Tensor:
        """Continuous ``(i, j)`` cell coordinates of ego ``(x, y)`` points (cell ``k`` spans
        ``[k, k+1)``)."""
        return torch.stack([(xy[..., 0] - self.x_bounds[0]) / self.resolution,
                            (xy[..., 1] - self.y_bounds[0]) / self.resolution], -1)

    def polygon_to_cells(self, polygon_xy: np.ndarray) -> np.ndarray:
        """``(K, 2)`` ego polygon -> ``(K, 2)`` polygon in ``(col, row)`` pixel coordinates (the
        order of image rasterisers such as OpenCV's ``fillPoly``), cell centres at ``k + 0.5``."""
        ij = self.to_cell(torch.as_tensor(polygon_xy, dtype=torch.float64)).numpy()
        return ij[:, ::-1]


def image_affine(raw_hw: Tuple[int, int], out_hw: Tuple[int, int], scale: float, zoom: float = 1.0,
                 rotation_deg: float = 0.0, crop_x_frac: float = 0.5) -> np.ndarray:
    """3x3 affine (:func:`resize_crop_matrix`) that turns a ``raw_hw`` camera image into the
    ``out_hw`` network input: resize by ``scale * zoom``, keep the bottom rows (the crop is taken
    from the top, as LSS's and PointBeV's ``crop_up``), place the crop horizontally at
    ``crop_x_frac`` of the slack (0.5 centres it; a negative slack pads both sides), then rotate
    by ``rotation_deg`` about the centre of the output image. Pixel-corner coordinates."""
    s = float(scale) * float(zoom)
    if not s > 0:
        raise ValueError(f"image_affine needs scale * zoom > 0, got scale={scale}, zoom={zoom}.")
    (h_raw, w_raw), (h, w) = raw_hw, out_hw
    crop = (crop_x_frac * (w_raw * s - w), h_raw * s - h)
    centre = (crop[0] + w / 2, crop[1] + h / 2)
    return resize_crop_matrix((s, s), crop, rotation_deg, centre)


def warp_image(image, affine: np.ndarray, out_hw: Tuple[int, int]):
    """Apply a pixel affine (``p_out = affine @ p_in``, pixel corners) to a PIL image and return
    the ``out_hw`` RGB PIL image, bilinear, black outside the source.

    Downscaling is antialiased: the image is first resized (JPEG draft decoding, then PIL's
    filtered resize) to about the affine's scale, and the remaining near-identity affine is
    applied with ``Image.transform``. The composition is exactly ``affine``, so the intrinsics
    :func:`augment_intrinsics` gives stay exact."""
    from PIL import Image

    A = np.asarray(affine, dtype=np.float64)
    w_raw, h_raw = image.size
    sx, sy = float(np.linalg.norm(A[:2, 0])), float(np.linalg.norm(A[:2, 1]))
    w0, h0 = max(1, round(w_raw * sx)), max(1, round(h_raw * sy))
    if w0 < w_raw and h0 < h_raw:
        image.draft("RGB", (w0, h0))  # decode a JPEG at 1/2, 1/4 or 1/8 when that is still >= (w0, h0)
        image = image.convert("RGB").resize((w0, h0), Image.BILINEAR)
        A = A @ np.diag([w_raw / w0, h_raw / h0, 1.0])
    else:
        image = image.convert("RGB")
    inv = np.linalg.inv(A)
    return image.transform((int(out_hw[1]), int(out_hw[0])), Image.AFFINE, tuple(inv[:2].ravel()),
                           resample=Image.BILINEAR)


def pointbev_image_affine(raw_hw: Tuple[int, int], out_hw: Tuple[int, int], scale: float,
                          crop_up_pct: float, zoom: float = 1.0, rotation_deg: float = 0.0) -> np.ndarray:
    """3x3 affine raw camera image -> network input of PointBeV's image pipeline (github
    valeoai/PointBeV, ``pointbev/data/dataset/nuscenes_common.py`` ``_sample_augmentation`` and
    ``pointbev/utils/imgs.py`` ``get_affinity_matrix_from_augm``), written from that code:
    resize by ``scale`` (``newW, newH = int(W scale), int(H scale)``); crop the top
    ``crop_h = int((1 - crop_up_pct) newH)`` rows (the sky); a zoom about the centre of what is
    left (``(1 - zoom) / 2`` of its width and height floored on each side: ``zoom > 1`` pads);
    that region stretched to ``out_hw`` (width and height each by its own factor) and centred
    horizontally; then a rotation by ``rotation_deg`` about the output's centre (``theta = -deg``
    in PointBeV's matrix; an image rotated by PIL's ``rotate(deg)``). No flip. At validation
    PointBeV takes the mean scale, ``zoom = 1`` and no rotation. Pixel-corner coordinates, as
    PIL's ``Image.transform`` that PointBeV (and :func:`warp_image`) apply it with."""
    (h_raw, w_raw), (h, w) = raw_hw, out_hw
    new_w, new_h = int(w_raw * scale), int(h_raw * scale)
    crop_h = int((1 - crop_up_pct) * new_h)
    zoom_h, zoom_w = ((new_h - crop_h) * (1 - zoom)) // 2, (new_w * (1 - zoom)) // 2
    region_w, region_h = new_w + 2 * zoom_w, new_h - crop_h + 2 * zoom_h
    if not (region_w > 0 and region_h > 0):
        raise ValueError(f"pointbev_image_affine: scale={scale}, crop_up_pct={crop_up_pct}, zoom={zoom} leave no "
                         f"image of a {w_raw}x{h_raw} camera.")
    sx, sy = w / region_w, h / region_h
    A = np.array([[scale * sx, 0.0, (w - w_raw * scale * sx) / 2],
                  [0.0, scale * sy, (h - (h_raw * scale + crop_h) * sy) / 2],
                  [0.0, 0.0, 1.0]])
    theta = -float(rotation_deg) * math.pi / 180
    c, s = math.cos(theta), math.sin(theta)
    x, y = w / 2, h / 2
    R = np.array([[c, -s, -x * c + y * s + x], [s, c, -x * s - y * c + y], [0.0, 0.0, 1.0]])
    return R @ A


def simplebev_image_affine(raw_hw: Tuple[int, int], out_hw: Tuple[int, int], resize: float = 1.0,
                           crop_shift: Tuple[int, int] = (0, 0)) -> np.ndarray:
    """3x3 affine raw camera image -> network input of SimpleBEV's image pipeline (github
    aharley/simple_bev, ``nuscenesdataset.py`` ``sample_augmentation`` and ``get_image_data``):
    the whole image resized to ``(int(w resize), int(h resize))`` (each axis its own factor), then
    a crop of ``out_hw`` centred (``int((new - out) / 2)``) and moved by ``crop_shift``
    ``(dx, dy)`` pixels (SimpleBEV draws ``int(U(-o, o))`` per axis, ``o = int(h (1 - 0.8))``,
    ``train_nuscenes.py``). At validation: ``resize = 1``, no shift (the image resized to
    ``out_hw``). Pixel-corner coordinates."""
    (h_raw, w_raw), (h, w) = raw_hw, out_hw
    new_w, new_h = int(w * resize), int(h * resize)
    crop_w = int((new_w - w) / 2) + int(crop_shift[0])
    crop_h = int((new_h - h) / 2) + int(crop_shift[1])
    return np.array([[new_w / w_raw, 0.0, -crop_w], [0.0, new_h / h_raw, -crop_h], [0.0, 0.0, 1.0]])
