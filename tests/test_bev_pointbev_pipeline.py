"""raster="pointbev": our labels against a transcription of PointBeV's own code, cell for cell.

The reference below is written in this test from github valeoai/PointBeV (commit c7eded7),
``pointbev/data/dataset/nuscenes_common.py`` (``get_bev_related_data``,
``_get_bbox_region_in_image``, ``_prepare_points_to_gtimg``, ``_process_bbox_region``, constants
``SIGMA`` and ``THRESHOLD_VALID_CENTERNESS``), ``pointbev/utils/geom.py`` (``gen_dx_bx``,
``GeomScaler.pts_from_spatial_to_img``, ``get_yawtransfmat_from_mat``, ``invert_homogenous``) and
``pointbev/utils/imgs.py`` (``prepare_img_axis``), with OpenCV, torch, pyquaternion and the devkit's
``Box`` as PointBeV uses them; nothing of ``bev.data.targets`` is used to build it.

Layouts: PointBeV's maps are images with rows = ego y index and columns = ego x index (OpenCV's
points are ``(x index, y index)``), then ``prepare_img_axis`` transposes and flips both axes; its
voxels are flipped the same way (``pointbev/models/common.py``, ``dense_vox_coords ... .flip(1,
2)``), so the flip only reorders cells: our maps (rows = x, columns = y, no flip) are its raw
maps transposed. PointBeV keeps 255 where no box is (visibility, offsets) and stores offsets as
``cell - centre``; ours keep 0 there (``seg`` says where boxes are) and ``centre - cell``.
"""

import math

import numpy as np
import pytest
import torch

from bev.data.targets import bev_targets
from bev.geometry import BevGrid
from conftest import FIXTURES

cv2 = pytest.importorskip("cv2")
nuscenes = pytest.importorskip("nuscenes")
from nuscenes.utils.data_classes import Box  # noqa: E402
from pyquaternion import Quaternion  # noqa: E402

INFO = FIXTURES / "nuscenes_frame" / "n015-2018-07-24-11-22-45+0800.pkl"
SIGMA = 3
THRESHOLD_VALID_CENTERNESS = 0.1


@pytest.fixture(autouse=True)
def one_thread():
    """The reference's small torch ops on a 200 x 200 map: one thread is 100x faster than two
    busy ones (measured 10 ms against 1.4 s per 12 boxes on 2 loaded cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pointbev_maps(boxes, min_vis, xbound=(-50.0, 50.0, 0.5), ybound=(-50.0, 50.0, 0.5)):
    """PointBeV's BeV maps of ``boxes`` = ``[(bottom corners (4, 2) ego x y, visibility level)]``,
    in the order given, as its raw images (rows = y index, columns = x index): binimg, visibility
    (255: none), offsets (255: none), centerness, valid_centerness."""
    dx = torch.Tensor([xbound[2], ybound[2]]).numpy()  # gen_dx_bx: torch.Tensor -> numpy float32
    bx = torch.Tensor([xbound[0] + xbound[2] / 2.0, ybound[0] + ybound[2] / 2.0]).numpy()

    def pts_from_spatial_to_img(points):
        return (points - bx + dx / 2.0) / dx

    h = int((xbound[1] - xbound[0]) / xbound[2])
    w = int((ybound[1] - ybound[0]) / ybound[2])
    visibility = np.full((h, w), 255, dtype=np.uint8)
    instance = np.zeros((h, w), dtype=np.int32)
    offsets = torch.full((2, h, w), fill_value=255.0, dtype=torch.float32)
    valid_centerness = np.ones((h, w), dtype=np.bool_)
    x, y = torch.meshgrid(torch.arange(h, dtype=torch.float), torch.arange(w, dtype=torch.float), indexing="xy")
    centerness = torch.zeros(1, h, w)
    for k, (bbox_img, level) in enumerate(boxes):
        is_visible = int(level) >= min_vis
        center_img = np.mean(bbox_img, axis=0)
        poly_region_img_rd = np.round(pts_from_spatial_to_img(bbox_img)).astype(np.int32)
        cv2.fillConvexPoly(visibility, poly_region_img_rd, int(level))
        inst_value = k + 1
        cv2.fillConvexPoly(instance, poly_region_img_rd, inst_value)
        xc, yc = pts_from_spatial_to_img(center_img)
        off_x = xc - x
        off_y = yc - y
        instance_mask = torch.from_numpy(instance == inst_value)
        offsets[0, instance_mask] = -off_x[instance_mask].round()
        offsets[1, instance_mask] = -off_y[instance_mask].round()
        g = torch.exp(-(off_x ** 2 + off_y ** 2) / (2 * SIGMA ** 2))
        centerness[0] = torch.maximum(centerness[0], g)
        if not is_visible:
            valid_centerness[(g >= THRESHOLD_VALID_CENTERNESS).numpy()] = 0
    binimg = np.floor(1 - visibility // 255)
    return binimg, visibility, offsets.numpy(), centerness[0].numpy(), valid_centerness


def assert_same_as_pointbev(ours, ref, where=""):
    """Our targets (rows = x) against PointBeV's raw maps (rows = y): transpose, then compare."""
    binimg, vis, off, cent, valid_c = ref
    seg = ours["seg"][0]
    np.testing.assert_array_equal(seg, binimg.T, err_msg=f"seg {where}")
    np.testing.assert_array_equal(np.where(seg > 0, ours["visibility"][0], 255), vis.T, err_msg=f"visibility {where}")
    for c in range(2):
        np.testing.assert_array_equal(np.where(seg > 0, -ours["offset"][c], 255), off[c].T, err_msg=f"offset {where}")
        assert (ours["offset"][c][seg == 0] == 0).all()
    np.testing.assert_allclose(ours["centerness"][0], cent.T, rtol=0, atol=2e-7, err_msg=f"centerness {where}")
    np.testing.assert_array_equal(ours["valid_centerness"][0], valid_c.T, err_msg=f"valid_centerness {where}")


def test_random_box_sets_equal_pointbev_cell_for_cell():
    """400 random sets of 1-12 boxes (centres up to 60 m, so many cross the grid's border; random
    headings; overlaps; every visibility level): every map equal to PointBeV's code's, the boxes'
    corners taken by the devkit's Box.bottom_corners() on the reference side."""
    rng = np.random.default_rng(0)
    grid = BevGrid()
    boxes_filled = 0
    for n_set in range(400):
        boxes, ref_boxes = [], []
        for _ in range(int(rng.integers(1, 13))):
            if rng.random() < 0.3 and boxes:  # a box overlapping the previous one
                centre = np.asarray(boxes[-1][0]) + rng.uniform(-2, 2, 2)
            else:
                centre = rng.uniform(-60, 60, 2)
            w, length = rng.uniform(1.5, 3.0), rng.uniform(3.0, 12.0)
            yaw, level = rng.uniform(-math.pi, math.pi), int(rng.integers(1, 5))
            box = Box([centre[0], centre[1], rng.uniform(-1, 1)], [w, length, 1.7], Quaternion(axis=[0, 0, 1], angle=yaw))
            boxes.append(((centre[0], centre[1]), (w, length), yaw, level))
            ref_boxes.append((box.bottom_corners()[:2].T, level))
        min_vis = int(rng.integers(1, 5))
        ours = bev_targets(boxes, grid, raster="pointbev", min_visibility=min_vis)
        assert_same_as_pointbev(ours, pointbev_maps(ref_boxes, min_vis), f"set {n_set}")
        boxes_filled += int(ours["seg"].sum() > 0)
    assert boxes_filled > 300  # most sets reach the grid


def test_a_box_by_hand_lands_half_a_cell_further():
    """An axis-aligned 4 m x 2 m box centred at (10.1, -5.1) m: corners x 8.1 .. 12.1 m ->
    (x + 50) / 0.5 = 116.2 .. 124.2 -> rows 116 .. 124; y -6.1 .. -4.1 m -> 87.8 .. 91.8 ->
    columns 88 .. 92 (raster="polygon", the cell-centre lattice, gives columns 87 .. 91: the
    labels sit half a cell further along y). Offsets: centre (120.2, 89.8) in the lattice, so cell
    (116, 88) gets round(4.2), round(1.8) = (4, 2); centerness at lattice points."""
    grid = BevGrid()
    t = bev_targets([((10.1, -5.1), (2.0, 4.0), 0.0, 3)], grid, raster="pointbev")
    expected = np.zeros(grid.shape, dtype=np.float32)
    expected[116:125, 88:93] = 1
    np.testing.assert_array_equal(t["seg"][0], expected)
    assert (t["visibility"][0][116:125, 88:93] == 3).all()
    np.testing.assert_array_equal(t["offset"][:, 116, 88], [4.0, 2.0])
    np.testing.assert_array_equal(t["offset"][:, 124, 92], [-4.0, -2.0])
    assert t["centerness"][0, 120, 90] == pytest.approx(math.exp(-(0.2 ** 2 + 0.2 ** 2) / 18), rel=1e-6)
    assert t["valid_centerness"].all()  # level 3 >= 2
    low = bev_targets([((10.1, -5.1), (2.0, 4.0), 0.0, 1)], grid, raster="pointbev", min_visibility=2)
    # the Gaussian >= 0.1 within sqrt(2 * 9 * ln 10) = 6.44 cells of the centre: cleared there only
    assert not low["valid_centerness"][0, 120, 90] and not low["valid_centerness"][0, 114, 90]
    assert low["valid_centerness"][0, 113, 90] and low["valid_centerness"][0, 120, 97]


def test_last_box_wins_where_boxes_overlap():
    grid = BevGrid()
    a, b = ((0.0, 0.0), (2.0, 4.0), 0.0, 4), ((1.0, 0.0), (2.0, 4.0), 0.0, 1)
    ab = bev_targets([a, b], grid, raster="pointbev")
    ba = bev_targets([b, a], grid, raster="pointbev")
    shared = (bev_targets([a], grid, raster="pointbev")["seg"][0] > 0) & (bev_targets([b], grid, raster="pointbev")["seg"][0] > 0)
    assert shared.sum() > 10
    assert (ab["visibility"][0][shared] == 1).all() and (ba["visibility"][0][shared] == 4).all()
    # polygon / center keep the highest level there
    assert (bev_targets([a, b], grid, raster="polygon")["visibility"][0] >= 0).all()


def _devkit_sample(nusc, rec=None):
    """PointBeV's inputs for sample ``rec`` (the first by default): its yaw-only LiDAR ego frame
    and the vehicle annotations' bottom corners in it (``_get_ego_to_global``,
    ``get_yawtransfmat_from_mat``, ``_get_bbox_region_in_image``), in the annotations' order."""
    rec = nusc.sample[0] if rec is None else rec
    pose = nusc.get("ego_pose", nusc.get("sample_data", rec["data"]["LIDAR_TOP"])["ego_pose_token"])
    mat = np.eye(4, dtype=np.float64)
    mat[:3, :3] = Quaternion(pose["rotation"]).rotation_matrix
    mat[:3, -1] = np.array(pose["translation"])
    yaw = Quaternion._from_matrix(mat[:3, :3]).yaw_pitch_roll[0]
    ego_pout_to_global = np.eye(4)
    ego_pout_to_global[:3, :3] = Quaternion(scalar=np.cos(yaw / 2), vector=[0, 0, np.sin(yaw / 2)]).rotation_matrix
    ego_pout_to_global[:3, -1] = mat[:3, -1]
    R, t = ego_pout_to_global[:3, :3], ego_pout_to_global[:3, 3]
    inverse = np.eye(4)
    inverse[:3, :3], inverse[:3, 3] = R.T, -R.T @ t
    anns = []
    for tok in rec["anns"]:
        inst = nusc.get("sample_annotation", tok)
        if "vehicle" not in inst["category_name"]:
            continue
        points = Box(inst["translation"], inst["size"], Quaternion(inst["rotation"])).bottom_corners()
        homog = np.ones((4, 4))
        homog[:3, :] = points
        anns.append((inverse @ homog, int(inst["visibility_token"])))
    return anns


def _gtimg(bev_aug, homog_points):
    """PointBeV's ``_prepare_points_to_gtimg`` (``to_cam_ref`` false)."""
    Rquery = bev_aug[:3, :3].T
    tquery = (np.array([-1, -1, 1]) * bev_aug[:3, 3])[:, None]
    return (Rquery @ (homog_points[:3, :] + tquery))[[0, 1]].T


@pytest.fixture(scope="module")
def frame(tmp_path_factory):
    from nuscenes.nuscenes import NuScenes

    from bev.data.from_mmdet3d import write_tables

    root = tmp_path_factory.mktemp("nuscenes")
    write_tables(INFO, root)
    return root, NuScenes("v1.0-mini", str(root), verbose=False)


def test_real_key_frame_equals_pointbev_cell_for_cell(frame):
    """The real key frame (scene-0061): NuScenesBev's default labels equal PointBeV's dataset
    path on the devkit tables, every map, at min_visibility 1 and 2, in the reference frame and in
    three frames moved by PointBeV's BeV augmentation."""
    from bev.data.nuscenes import NuScenesBev

    root, nusc = frame
    anns = _devkit_sample(nusc)
    assert len(anns) == 13
    for min_vis in (1, 2):
        ds = NuScenesBev(root, "v1.0-mini", "all", nusc=nusc, min_visibility=min_vis)
        assert ds.raster == "pointbev"
        ref = pointbev_maps([(_gtimg(np.eye(4), h), lvl) for h, lvl in anns], min_vis)
        ours = ds.targets(0)
        assert_same_as_pointbev(ours, ref, f"min_visibility {min_vis}")
        assert ours["seg"].sum() == 403
    aug = NuScenesBev(root, "v1.0-mini", "all", nusc=nusc, augment=True, bev_augment="pointbev")
    for seed in range(3):
        motion, _ = aug.bev_motion(0, seed=seed)
        ref = pointbev_maps([(_gtimg(motion, h), lvl) for h, lvl in anns], 2)
        assert_same_as_pointbev(aug.targets(0, motion), ref, f"moved by seed {seed}")
        assert aug.get(0, seed=seed)["seg"].sum() > 0


def test_pointbev_frame_drops_pitch_and_roll_for_labels_and_cameras(frame):
    """raster="pointbev" takes the yaw-only LiDAR ego frame for the boxes and the cameras alike
    (so the lifting stays exact in the labels' frame); raster="polygon" the full ego frame."""
    from bev.data.nuscenes import NuScenesBev
    from bev.geometry import quaternion_yaw

    root, nusc = frame
    rec = nusc.sample[0]
    pose = nusc.get("ego_pose", nusc.get("sample_data", rec["data"]["LIDAR_TOP"])["ego_pose_token"])
    q = Quaternion(pose["rotation"])
    assert quaternion_yaw(pose["rotation"]) == pytest.approx(q.yaw_pitch_roll[0], abs=1e-12)
    assert max(abs(q.yaw_pitch_roll[1]), abs(q.yaw_pitch_roll[2])) > 1e-3  # this frame has pitch or roll
    yaw_frame = NuScenesBev(root, "v1.0-mini", "all", nusc=nusc)
    full = NuScenesBev(root, "v1.0-mini", "all", nusc=nusc, raster="polygon")
    # the two frames differ by the ego's pitch and roll only: cam2ego_yaw = D @ cam2ego_full
    D = yaw_frame._cam2ego[0, 0] @ np.linalg.inv(full._cam2ego[0, 0])
    for k in range(6):
        np.testing.assert_allclose(yaw_frame._cam2ego[0, k], D @ full._cam2ego[0, k], atol=1e-9)
    yaw_only = Quaternion(axis=[0, 0, 1], angle=q.yaw_pitch_roll[0]).rotation_matrix
    np.testing.assert_allclose(D[:3, :3], yaw_only.T @ q.rotation_matrix, atol=1e-9)
    np.testing.assert_allclose(D[:3, 3], 0, atol=1e-9)


def test_synthetic_nuscenes_labels_follow_the_same_rule(synthetic_root):
    """The synthetic nuScenes (the demo's data) is read by the same NuScenesBev: its labels equal
    the transcription of PointBeV's path on its own devkit tables, sample by sample."""
    from nuscenes.nuscenes import NuScenes

    from bev.data.nuscenes import NuScenesBev

    nusc = NuScenes("v1.0-mini", str(synthetic_root), verbose=False)
    ds = NuScenesBev(synthetic_root, "v1.0-mini", "all", nusc=nusc)
    assert len(ds) == len(nusc.sample) >= 4
    order = {s["token"]: s for s in nusc.sample}
    for i, token in enumerate(ds.tokens):
        anns = _devkit_sample(nusc, order[token])
        ref = pointbev_maps([(_gtimg(np.eye(4), h), lvl) for h, lvl in anns], 2)
        assert_same_as_pointbev(ds.targets(i), ref, f"synthetic sample {i}")
