"""bev.geometry against nuscenes-devkit's own conventions, and on the real nuScenes key frame."""

import pickle

import numpy as np
import pytest
import torch

from bev import geometry as G
from conftest import FIXTURES

nusc_geom = pytest.importorskip("nuscenes.utils.geometry_utils")
from nuscenes.utils.data_classes import Box  # noqa: E402
from pyquaternion import Quaternion  # noqa: E402

RNG = np.random.default_rng(0)


def _random_quaternion():
    q = RNG.normal(size=4)
    return q / np.linalg.norm(q)


def test_quaternions_and_transforms_match_the_devkit():
    for _ in range(5):
        q, t = _random_quaternion(), RNG.normal(size=3) * 10
        np.testing.assert_allclose(G.quaternion_to_rotation(q), Quaternion(q).rotation_matrix, atol=1e-12)
        for inverse in (False, True):
            np.testing.assert_allclose(G.transform_matrix(t, q, inverse=inverse),
                                       nusc_geom.transform_matrix(t, Quaternion(q), inverse=inverse), atol=1e-10)
        T = G.transform_matrix(t, q)
        np.testing.assert_allclose(G.invert_rigid(T) @ T, np.eye(4), atol=1e-12)
        np.testing.assert_allclose(G.rotation_to_quaternion(Quaternion(q).rotation_matrix), q * np.sign(q[0]),
                                   atol=1e-12)
    yaw = 2.3
    assert G.rotation_yaw(G.quaternion_to_rotation(G.yaw_to_quaternion(yaw))) == pytest.approx(yaw)
    assert Quaternion(G.yaw_to_quaternion(yaw)).yaw_pitch_roll[0] == pytest.approx(yaw)


def test_projection_matches_view_points():
    K = np.array([[1266.4, 0, 816.3], [0, 1266.4, 491.5], [0, 0, 1]])
    pts = np.stack([RNG.uniform(-10, 10, 20), RNG.uniform(-3, 3, 20), RNG.uniform(1, 60, 20)])  # (3, N)
    ref = nusc_geom.view_points(pts, K, normalize=True)[:2].T
    uv, depth = G.project_points(torch.from_numpy(pts.T), torch.from_numpy(K))
    np.testing.assert_allclose(uv.numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(depth.numpy(), pts[2])


def test_box_corners_match_the_devkit_box():
    center, wlh, yaw = [3.0, -2.0, 0.8], [1.9, 4.5, 1.6], 0.7
    box = Box(center, wlh, Quaternion(axis=[0, 0, 1], angle=yaw))
    np.testing.assert_allclose(G.box_corners(center, wlh, yaw), box.corners().T, atol=1e-12)


def test_augmentation_affine_moves_projections_like_the_image():
    K = np.array([[1000.0, 0, 800], [0, 1000, 450], [0, 0, 1]])
    A = G.resize_crop_matrix((0.3, 0.3), crop_xy=(10, 46), rotation_deg=4.0, center=(240, 135))
    K2 = G.augment_intrinsics(K, A)
    p = np.array([2.0, -1.0, 12.0])
    uv = K @ p / p[2]
    uv2 = K2 @ p / p[2]
    np.testing.assert_allclose(uv2, A @ uv, atol=1e-9)
    # pure resize: the intrinsics scale per axis
    Ks = G.scale_intrinsics(torch.from_numpy(K), 0.5, 0.25).numpy()
    np.testing.assert_allclose(Ks, np.diag([0.5, 0.25, 1]) @ K)


def test_grid_orientation():
    grid = G.BevGrid()
    assert grid.shape == (200, 200)
    centers = grid.cell_centers()
    assert centers[0, 0].tolist() == [-49.75, -49.75] and centers[199, 0, 0] == 49.75  # rows follow x
    assert centers[0, 199, 1] == 49.75  # columns follow y
    ij = grid.to_cell(torch.tensor([[16.2, 4.5]], dtype=torch.float64))[0]
    assert ij.tolist() == pytest.approx([132.4, 109.0])
    with pytest.raises(ValueError, match="x_bounds must be"):
        G.BevGrid(x_bounds=(5, -5))


def test_real_frame_truck_projects_into_the_front_cameras():
    """scene-0061's first key frame: the truck at ego (16.2, +4.5) m is seen by CAM_FRONT."""
    path = FIXTURES / "nuscenes_frame" / "n015-2018-07-24-11-22-45+0800.pkl"
    info = pickle.load(open(path, "rb"))["data_list"][0]
    lidar2ego = np.asarray(info["lidar_points"]["lidar2ego"])
    trucks = [i for i in info["instances"] if i["bbox_label_3d"] == 1]
    centers = [(lidar2ego @ np.r_[i["bbox_3d"][:3], 1])[:3] for i in trucks]
    truck = min(centers, key=lambda c: np.hypot(c[0] - 16.2, c[1] - 4.5))
    assert truck[:2] == pytest.approx([16.19, 4.53], abs=0.02)
    cam = info["images"]["CAM_FRONT"]
    ego2cam = G.invert_rigid(np.asarray(cam["cam2ego"]))
    p = G.apply_transform(torch.from_numpy(ego2cam), torch.from_numpy(truck[None]))
    uv, depth = G.project_points(p, torch.from_numpy(np.asarray(cam["cam2img"])))
    assert depth.item() > 0 and 0 <= uv[0, 0] < 1600 and 0 <= uv[0, 1] < 900
    # left of the image centre: the truck is on the ego's left (y > 0)
    assert uv[0, 0] < 800
