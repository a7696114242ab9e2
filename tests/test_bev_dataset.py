"""NuScenesBev on the real key frame (scene-0061, converted to devkit tables), and the BeV targets."""

import json
import math
import pickle
import shutil
import warnings

import numpy as np
import pytest
import torch

from bev import geometry as G
from bev.data.from_mmdet3d import write_tables
from bev.data.tables import CAMERAS
from bev.data.targets import bev_targets, rasterize_footprints, visibility_mask
from conftest import FIXTURES

nuscenes = pytest.importorskip("nuscenes")
from nuscenes.nuscenes import NuScenes  # noqa: E402
from nuscenes.utils.geometry_utils import transform_matrix as devkit_transform  # noqa: E402
from nuscenes.utils.geometry_utils import view_points
from pyquaternion import Quaternion  # noqa: E402

from bev.data.nuscenes import NuScenesBev  # noqa: E402

INFO = FIXTURES / "nuscenes_frame" / "n015-2018-07-24-11-22-45+0800.pkl"
ORDER = ["CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"]
S = 476 / 1600  # default resize: W / W_raw
CROP_Y = 900 * S - 224  # the bottom 224 rows of the 267.75-row resized image are kept
# the named options these tests check by hand: labels on the cell-centre lattice in the full ego frame,
# the fixed-scale bottom crop (PointBeV's labels and images: tests/test_bev_pointbev_pipeline.py)
OURS = dict(raster="polygon", image_augment="bottom_crop")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nuscenes")
    write_tables(INFO, root)
    return root


@pytest.fixture(scope="module")
def nusc(root):
    return NuScenes("v1.0-mini", str(root), verbose=False)


@pytest.fixture(scope="module")
def ds(root):
    return NuScenesBev(root, "v1.0-mini", "train", **OURS)


@pytest.fixture(scope="module")
def sample(ds):
    return ds[0]


def _pose(record):
    return devkit_transform(record["translation"], Quaternion(record["rotation"]))


def _truck(nusc):
    """(annotation, ego-frame centre) of the truck at ego (16.2, 4.5), with the devkit's own transforms."""
    s = nusc.sample[0]
    ref = _pose(nusc.get("ego_pose", nusc.get("sample_data", s["data"]["LIDAR_TOP"])["ego_pose_token"]))
    for ann in (nusc.get("sample_annotation", t) for t in s["anns"]):
        centre = np.linalg.inv(ref) @ np.r_[ann["translation"], 1.0]
        if ann["category_name"] == "vehicle.truck" and np.hypot(centre[0] - 16.2, centre[1] - 4.5) < 0.5:
            return ann, centre[:3]
    raise AssertionError("the truck is not in the fixture")


def test_sample_keys_shapes_and_dtypes(ds, sample, nusc):
    assert len(ds) == 1 and ds.split == "mini_train" and ds.scenes == ["scene-0061"]
    assert list(ds.cameras) == list(CAMERAS) == ORDER
    expected = {"images": ((6, 3, 224, 476), torch.float32), "intrinsics": ((6, 3, 3), torch.float32),
                "cam2ego": ((6, 4, 4), torch.float32), "seg": ((1, 200, 200), torch.float32),
                "visibility": ((1, 200, 200), torch.uint8), "centerness": ((1, 200, 200), torch.float32),
                "offset": ((2, 200, 200), torch.float32), "valid_centerness": ((1, 200, 200), torch.bool)}
    assert set(sample) == set(expected) | {"token"}
    for key, (shape, dtype) in expected.items():
        assert tuple(sample[key].shape) == shape and sample[key].dtype == dtype, key
    assert sample["token"] == nusc.sample[0]["token"]
    images = sample["images"]
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.1
    # camera order: every image is its channel's JPEG, resized and cropped (bottom rows kept)
    from PIL import Image
    for k, channel in enumerate(ORDER):
        sd = nusc.get("sample_data", nusc.sample[0]["data"][channel])
        with Image.open(ds.dataroot / sd["filename"]) as im:
            ref = np.asarray(im.convert("RGB").resize((476, round(900 * S)), Image.BILINEAR), dtype=np.float32) / 255
        ours = images[k].permute(1, 2, 0).numpy()
        err = np.abs(ours - ref[-224:]).mean()
        others = [np.abs(images[j].permute(1, 2, 0).numpy() - ref[-224:]).mean() for j in range(6) if j != k]
        assert err < 0.03 and err < 0.5 * min(others), channel


def test_intrinsics_are_the_devkit_ones_resized_and_cropped(ds, sample, nusc):
    for k, channel in enumerate(ORDER):
        sd = nusc.get("sample_data", nusc.sample[0]["data"][channel])
        K = np.array(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])["camera_intrinsic"])
        expected = K * S
        expected[2, 2] = 1.0
        expected[1, 2] -= CROP_Y  # crop from the top; no horizontal slack (476 = 1600 * S)
        np.testing.assert_allclose(sample["intrinsics"][k].numpy(), expected, rtol=1e-6, atol=1e-4)


def test_cam2ego_is_exact_at_each_camera_timestamp(sample, nusc):
    s = nusc.sample[0]
    ref = _pose(nusc.get("ego_pose", nusc.get("sample_data", s["data"]["LIDAR_TOP"])["ego_pose_token"]))
    moved = []
    for k, channel in enumerate(ORDER):
        sd = nusc.get("sample_data", s["data"][channel])
        calibrated = _pose(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"]))
        exact = np.linalg.inv(ref) @ _pose(nusc.get("ego_pose", sd["ego_pose_token"])) @ calibrated
        np.testing.assert_allclose(sample["cam2ego"][k].numpy(), exact, atol=1e-5)
        moved.append(np.linalg.norm(exact[:3, 3] - calibrated[:3, 3]))
    # the ego moves between the LiDAR and the camera timestamps (the cameras fire in turn, the
    # back-left one with the LiDAR): the calibration alone is off by up to 0.4 m
    np.testing.assert_allclose(moved, [0.400, 0.330, 0.256, 0.005, 0.097, 0.186], atol=0.002)


def test_seg_shows_the_truck_where_it_is(ds, sample):
    ndimage = pytest.importorskip("scipy.ndimage")
    seg = sample["seg"][0].numpy()
    boxes = ds.boxes(0)
    assert len(boxes) == 13
    assert ((np.abs(boxes[:, 0]) < 50) & (np.abs(boxes[:, 1]) < 50)).sum() == 6
    np.testing.assert_array_equal(seg, rasterize_footprints(
        [((b[0], b[1]), (b[3], b[4]), b[6]) for b in boxes], G.BevGrid(), raster="polygon"))
    labels, _ = ndimage.label(seg > 0)
    truck = labels == labels[132, 109]
    assert labels[132, 109] > 0 and truck.sum() > 40
    rows, cols = np.nonzero(truck)
    x, y = -50 + 0.5 * (rows.mean() + 0.5), -50 + 0.5 * (cols.mean() + 0.5)  # rows follow x, columns y
    assert x == pytest.approx(16.2, abs=0.5) and y == pytest.approx(4.5, abs=0.5)
    assert seg[132, 91] == 0 and seg[67, 109] == 0  # mirrored across x or y: empty


def test_centerness_peaks_at_box_centres_and_offsets_point_to_them(ds, sample):
    cent, off, seg = sample["centerness"][0].numpy(), sample["offset"].numpy(), sample["seg"][0].numpy()
    assert cent.max() <= 1.0 and cent.min() >= 0.0
    for b in ds.boxes(0):
        ci, cj = (b[0] + 50) / 0.5, (b[1] + 50) / 0.5
        if not (0 <= ci < 200 and 0 <= cj < 200):
            continue
        i, j = int(ci), int(cj)
        assert cent[i, j] == pytest.approx(math.exp(-((ci - i - 0.5) ** 2 + (cj - j - 0.5) ** 2) / 18), abs=1e-6)
        assert cent[i, j] > 0.97 and cent[i, j] == cent[max(i - 3, 0):i + 4, max(j - 3, 0):j + 4].max()
    # by hand: the truck's centre (16.19, 4.53) m is at cell (132.38, 109.06); from cell (130, 108),
    # whose centre is (130.5, 108.5), the offset is (1.88, 0.56) cells
    truck = ds.boxes(0)[np.argmin(np.hypot(ds.boxes(0)[:, 0] - 16.2, ds.boxes(0)[:, 1] - 4.5))]
    ci, cj = (truck[0] + 50) / 0.5, (truck[1] + 50) / 0.5
    assert seg[130, 108] == 1
    np.testing.assert_allclose(off[:, 130, 108], [ci - 130.5, cj - 108.5], atol=1e-5)
    np.testing.assert_allclose(off[:, 130, 108], [1.88, 0.56], atol=0.02)
    assert (off[:, seg == 0] == 0).all() and np.abs(off[:, seg > 0]).max() > 1


def test_vehicle_box_projects_into_the_camera_that_sees_it(ds, sample, nusc):
    ann, centre_ego = _truck(nusc)
    k = ORDER.index("CAM_FRONT")
    K, cam2ego = sample["intrinsics"][k].double(), sample["cam2ego"][k].double()
    uv, depth = G.project_points(G.apply_transform(torch.linalg.inv(cam2ego), torch.tensor(centre_ego[None])), K)
    assert depth.item() > 0 and 0 <= uv[0, 0] < 476 and 0 <= uv[0, 1] < 224
    # the devkit's own projection into the raw 1600 x 900 image, then the resize and crop
    _, boxes, K_raw = nusc.get_sample_data(nusc.sample[0]["data"]["CAM_FRONT"], selected_anntokens=[ann["token"]])
    raw = view_points(boxes[0].center[:, None], K_raw, normalize=True)[:2, 0]
    np.testing.assert_allclose(uv[0].numpy(), [raw[0] * S, raw[1] * S - CROP_Y], atol=0.02)


def test_the_dataset_reads_the_same_sample_with_a_given_devkit_and_a_dict_grid(root, nusc, sample):
    small = NuScenesBev(root, "v1.0-mini", "train", **OURS, grid={"x_bounds": [-25, 25], "y_bounds": [-25, 25]},
                        cameras=["CAM_FRONT", "CAM_BACK"], nusc=nusc)
    s = small[0]
    assert s["seg"].shape == (1, 100, 100) and s["images"].shape == (2, 3, 224, 476)
    torch.testing.assert_close(s["seg"][0], sample["seg"][0, 50:150, 50:150])
    torch.testing.assert_close(s["cam2ego"], sample["cam2ego"][[1, 4]])


def test_targets_visibility_levels_and_mask_rule():
    grid = G.BevGrid()
    # box A: level 1, 2 m wide x 4 m long at (10, -5): rows 116..123, columns 88..91 (32 cells);
    # box B: level 3, 2 m x 2 m at (12, -5): rows 122..125, columns 88..91, overlapping A on rows 122..123
    # (raster="center"; the polygon rule's cells: tests/test_bev_targets.py)
    t = bev_targets([((10.0, -5.0), (2.0, 4.0), 0.0, 1), ((12.0, -5.0), (2.0, 2.0), 0.0, 3)], grid, raster="center")
    seg, vis, cent, off = t["seg"][0], t["visibility"][0], t["centerness"][0], t["offset"]
    assert t["seg"].dtype == np.float32 and vis.dtype == np.uint8 and off.shape == (2, 200, 200)
    assert seg.sum() == 32 + 8
    assert (vis[116:122, 88:92] == 1).all() and (vis[122:126, 88:92] == 3).all()
    assert (vis[seg == 0] == 0).all()
    valid2 = visibility_mask(seg, vis, 2)  # min_visibility = 2: the 0-40 % visible box is ignored
    assert not valid2[116:122, 88:92].any() and valid2[122:126, 88:92].all() and valid2[seg == 0].all()
    assert visibility_mask(seg, vis, 1).all()
    # centerness by hand: A's centre (10, -5) m is at cell (120, 90); cell (116, 88) has centre (116.5, 88.5)
    assert cent[116, 88] == pytest.approx(math.exp(-(3.5 ** 2 + 1.5 ** 2) / 18), rel=1e-6)
    assert cent[119, 89] == pytest.approx(math.exp(-(0.5 ** 2 + 0.5 ** 2) / 18), rel=1e-6)
    assert cent[0, 0] < 1e-30
    # offsets: (centre - cell centre) in cells; the overlap goes to the nearer centre (B's, cell (124, 90))
    np.testing.assert_allclose(off[:, 116, 88], [3.5, 1.5])
    np.testing.assert_allclose(off[:, 122, 91], [124 - 122.5, 90 - 91.5])
    np.testing.assert_allclose(off[:, 121, 91], [120 - 121.5, 90 - 91.5])
    assert (off[:, seg == 0] == 0).all()
    # no box: all zero
    empty = bev_targets([], grid)
    assert all(not v.any() for k, v in empty.items() if k != "valid_centerness") and empty["valid_centerness"].all()


def test_targets_refuse_bad_input():
    with pytest.raises(ValueError, match="sigma"):
        bev_targets([], G.BevGrid(), sigma=0)
    with pytest.raises(ValueError, match="center_xy"):
        bev_targets([((0, 0), (1, 1))], G.BevGrid())


def _blob_image(points_uv, size=(1600, 900), sigma=10.0):
    yy, xx = np.mgrid[0:size[1], 0:size[0]] + 0.5
    img = np.zeros(size[::-1])
    for u, v in points_uv:
        img = np.maximum(img, np.exp(-((xx - u) ** 2 + (yy - v) ** 2) / (2 * sigma ** 2)))
    return np.repeat((img * 255).round().astype(np.uint8)[..., None], 3, -1)


def _root_with_blobs(root, nusc, tmp_path):
    """A copy of the data root whose first CAM_FRONT image shows a blob at the raw projection of
    each of three ego points; returns the copy and the points."""
    from PIL import Image

    aug_root = tmp_path / "aug"
    shutil.copytree(root, aug_root)
    sd = nusc.get("sample_data", nusc.sample[0]["data"]["CAM_FRONT"])
    ref = _pose(nusc.get("ego_pose", nusc.get("sample_data", nusc.sample[0]["data"]["LIDAR_TOP"])["ego_pose_token"]))
    cam2ego = np.linalg.inv(ref) @ _pose(nusc.get("ego_pose", sd["ego_pose_token"])) @ _pose(
        nusc.get("calibrated_sensor", sd["calibrated_sensor_token"]))
    K_raw = np.array(nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])["camera_intrinsic"])
    points = np.array([[20.0, 0.0, 1.0], [12.0, -3.5, 0.0], [25.0, 5.0, 2.5]])
    cam = (np.linalg.inv(cam2ego) @ np.c_[points, np.ones(3)].T)[:3]
    raw_uv = view_points(cam, K_raw, normalize=True)[:2].T
    Image.fromarray(_blob_image(raw_uv)).save(aug_root / sd["filename"], quality=95)
    return aug_root, points


def _blob_centre(img, u, v):
    """The brightness-weighted centre of ``img`` within 9 px of (u, v), pixel centres at +0.5."""
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]] + 0.5
    w = (np.hypot(xx - u, yy - v) < 9) * np.clip(img - 0.02, 0, None)
    return np.array([(w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()])


@pytest.mark.parametrize("image_augment", ["bottom_crop", "pointbev", "simplebev"])
def test_augmented_images_and_intrinsics_agree(root, nusc, tmp_path, image_augment):
    """Blobs drawn at the raw projections of ego points land, after each pipeline's random resize,
    zoom, rotation and crop, at the projections through the returned intrinsics and cam2ego
    (measured: within 0.01 px; a half-pixel convention slip would be 0.35 px off)."""
    aug_root, points = _root_with_blobs(root, nusc, tmp_path)

    ds = NuScenesBev(aug_root, "v1.0-mini", "train", raster="polygon", image_augment=image_augment,
                     cameras=["CAM_FRONT"], augment=True, seed=7)
    seen = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        s = ds[0]
        seen.append(s["intrinsics"][0].numpy())
        uv, _ = G.project_points(G.apply_transform(torch.linalg.inv(s["cam2ego"][0].double()),
                                                    torch.tensor(points)), s["intrinsics"][0].double())
        img = s["images"][0].mean(0).numpy()
        for (u, v) in uv.numpy():
            assert 10 < u < 466 and 10 < v < 214
            found = _blob_centre(img, u, v)
            assert np.hypot(*(found - (u, v))) < 0.05, (epoch, found, (u, v))
    # the draws differ between epochs (zoom and rotation change K beyond a pixel), and repeat
    assert min(np.abs(seen[a] - seen[b]).max() for a in range(3) for b in range(a)) > 1.0
    ds.set_epoch(1)
    torch.testing.assert_close(ds[0]["intrinsics"][0], torch.from_numpy(seen[1]))
    again = NuScenesBev(aug_root, "v1.0-mini", "train", raster="polygon", image_augment=image_augment,
                        cameras=["CAM_FRONT"], augment=True, seed=7)
    again.set_epoch(1)
    torch.testing.assert_close(again[0]["images"], ds[0]["images"])
    rotations = []
    for epoch in range(3):
        ds.set_epoch(epoch)
        A = ds.image_affines(0)[0]
        rotations.append(math.degrees(math.atan2(A[1, 0], A[0, 0])))
    if image_augment == "simplebev":  # SimpleBEV: resize and crop, no rotation
        assert rotations == [0.0, 0.0, 0.0]
    else:
        assert all(-2.5 <= r <= 2.5 for r in rotations) and max(map(abs, rotations)) > 0.1


def test_pointbev_and_simplebev_image_affines_by_hand():
    """PointBeV's validation pipeline on a 1600 x 900 camera to 224 x 476 (scale 0.301, the mean of
    [0.294, 0.308]): resized to int(481.6) x int(270.9) = 481 x 270, int(0.17 * 270) = 45 sky rows
    cropped, the 481 x 225 rest stretched to 476 x 224 and centred: u' = 0.301 * 476 / 481 u +
    (476 - 1600 * 0.301 * 476 / 481) / 2, v' = 0.301 * 224 / 225 v + (224 - (270.9 + 45) * 224 /
    225) / 2. Training with zoom 1.05: floor(225 * -0.05 / 2) = -6 and floor(481 * -0.05 / 2) =
    -13 pixels each side, so the region is 455 x 213. SimpleBEV's validation: the whole image
    resized to 476 x 224."""
    A = G.pointbev_image_affine((900, 1600), (224, 476), 0.301, 0.83)
    sx, sy = 0.301 * 476 / 481, 0.301 * 224 / 225
    np.testing.assert_allclose(A, [[sx, 0, (476 - 1600 * sx) / 2], [0, sy, (224 - (270.9 + 45) * 224 / 225) / 2],
                                   [0, 0, 1]], rtol=1e-12, atol=1e-12)
    Z = G.pointbev_image_affine((900, 1600), (224, 476), 0.301, 0.83, zoom=1.05)
    np.testing.assert_allclose(np.diag(Z)[:2], [0.301 * 476 / 455, 0.301 * 224 / 213], rtol=1e-12)
    R = G.pointbev_image_affine((900, 1600), (224, 476), 0.301, 0.83, rotation_deg=2.0)
    centre = np.linalg.solve(A, [238, 112, 1])  # the raw pixel at the output's centre stays there
    np.testing.assert_allclose(R @ centre, [238, 112, 1], atol=1e-9)
    assert math.degrees(math.atan2(R[1, 0], R[0, 0])) == pytest.approx(-2.0)  # PIL's rotate(2): counter-clockwise
    np.testing.assert_allclose(G.simplebev_image_affine((900, 1600), (224, 476)),
                               [[476 / 1600, 0, 0], [0, 224 / 900, 0], [0, 0, 1]])
    # resize 1.1, shift (3, -4): 523 x 246, crop int(47 / 2) + 3 = 26, int(22 / 2) - 4 = 7
    np.testing.assert_allclose(G.simplebev_image_affine((900, 1600), (224, 476), 1.1, (3, -4)),
                               [[523 / 1600, 0, -26], [0, 246 / 900, -7], [0, 0, 1]])


def test_loader_with_workers_and_pinned_memory(ds, sample):
    ds2 = pickle.loads(pickle.dumps(ds))
    torch.testing.assert_close(ds2[0]["seg"], sample["seg"])
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, pin_memory=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pin_memory without an accelerator
        batches = list(loader)
    assert len(batches) == 1
    batch = batches[0]
    assert batch["images"].shape == (1, 6, 3, 224, 476) and batch["token"] == [sample["token"]]
    torch.testing.assert_close(batch["cam2ego"][0], sample["cam2ego"])


def test_scene_lists_and_split_files(root, tmp_path):
    assert len(NuScenesBev(root, "v1.0-mini", "val", scenes=["scene-0061"])) == 1
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"mine": ["scene-0061", "scene-9999"], "other": ["scene-0103"]}))
    ds = NuScenesBev(root, "v1.0-mini", "mine", scenes=splits)
    assert len(ds) == 1 and ds.missing_scenes == ["scene-9999"]
    assert len(NuScenesBev(root, "v1.0-mini", "all")) == 1
    with pytest.raises(ValueError, match=r"split 'nope' is not in the scenes file .*\['mine', 'other'\]"):
        NuScenesBev(root, "v1.0-mini", "nope", scenes=splits)
    with pytest.raises(ValueError, match=r"no scene of split 'other'.*scene-0103.*scene-0061"):
        NuScenesBev(root, "v1.0-mini", "other", scenes=splits)


def test_clear_errors(root, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataroot .*does_not_exist.* does not exist"):
        NuScenesBev(tmp_path / "does_not_exist", "v1.0-mini", "train")
    with pytest.raises(FileNotFoundError, match=r"version 'v1.0-trainval'.*versions found there: \['v1.0-mini'\]"):
        NuScenesBev(root, "v1.0-trainval", "train")
    with pytest.raises(ValueError, match=r"unknown nuScenes split 'tran'.*'mini_train'.*'train'"):
        NuScenesBev(root, "v1.0-mini", "tran")
    # official mini_val scenes are not in the one-scene tables: say which were looked for and which exist
    with pytest.raises(ValueError, match=r"no scene of split 'mini_val'.*scene-0103, scene-0916.*scene-0061"):
        NuScenesBev(root, "v1.0-mini", "val")
    with pytest.raises(ValueError, match="cameras must be"):
        NuScenesBev(root, "v1.0-mini", "train", cameras=["CAM_FRONT", "CAM_TOP"])
    with pytest.raises(ValueError, match="zoom"):
        NuScenesBev(root, "v1.0-mini", "train", zoom=(1.1, 0.9))


def test_bev_augment_moves_frame_labels_and_cameras_together(root, nusc, tmp_path):
    """data.bev_augment: blobs drawn at the raw projections of ego points land where the moved
    BeV frame's points project through the returned cam2ego and intrinsics (the same pixels as
    without BeV augmentation, or mirrored where SimpleBEV's flip turned the image); the labels
    are the boxes moved by the drawn motion; validation (augment=False) is never moved."""
    aug_root, points = _root_with_blobs(root, nusc, tmp_path)
    cameras = ["CAM_FRONT", "CAM_FRONT_LEFT", "CAM_BACK"]  # CAM_FRONT first: never SimpleBEV's reference camera
    plain = NuScenesBev(aug_root, "v1.0-mini", "train", **OURS, cameras=cameras, augment=True, seed=7)
    for mode in ("pointbev", "simplebev"):
        ds = NuScenesBev(aug_root, "v1.0-mini", "train", **OURS, cameras=cameras, augment=True, seed=7, bev_augment=mode)
        flipped_seen = set()
        for seed in range(4):
            s, base = ds.get(0, seed=seed), plain.get(0, seed=seed)
            M, flips = ds.bev_motion(0, seed=seed)
            inv = np.linalg.inv(M)
            assert not np.allclose(M, np.eye(4))
            flipped_seen.add(bool(flips[0]))
            if mode == "pointbev":  # PointBeV's ranges: |t| <= (30, 20, 0) m, |yaw| <= 20 degrees, no flip
                assert abs(M[0, 3]) <= 30 and abs(M[1, 3]) <= 20 and M[2, 3] == 0 and not flips.any()
                assert abs(math.degrees(math.atan2(M[1, 0], M[0, 0]))) <= 20
            # the cameras move with the frame: cam2ego' = M^-1 cam2ego
            np.testing.assert_allclose(s["cam2ego"].double().numpy(), inv @ base["cam2ego"].double().numpy(), atol=1e-4)
            moved = (inv @ np.c_[points, np.ones(3)].T)[:3].T  # the points in the BeV frame
            uv, _ = G.project_points(G.apply_transform(torch.linalg.inv(s["cam2ego"][0].double()),
                                                       torch.tensor(moved)), s["intrinsics"][0].double())
            uv0, _ = G.project_points(G.apply_transform(torch.linalg.inv(base["cam2ego"][0].double()),
                                                        torch.tensor(points)), base["intrinsics"][0].double())
            expected = uv0.numpy().copy()
            if flips[0]:
                expected[:, 0] = 476 - expected[:, 0]
            np.testing.assert_allclose(uv.numpy(), expected, atol=1e-3)
            img = s["images"][0].mean(0).numpy()
            for u, v in uv.numpy():
                found = _blob_centre(img, u, v)
                assert np.hypot(*(found - (u, v))) < 0.05, (mode, seed, found, (u, v))
            # the labels: every box moved by M^-1 (centre; heading by the rotation part), by hand
            moved_boxes = []
            for b in ds.boxes(0):
                c = inv @ np.r_[b[:3], 1.0]
                h = inv[:3, :3] @ np.array([math.cos(b[6]), math.sin(b[6]), 0.0])
                moved_boxes.append(((c[0], c[1]), (b[3], b[4]), math.atan2(h[1], h[0])))
            np.testing.assert_array_equal(s["seg"][0].numpy(), rasterize_footprints(moved_boxes, ds.grid, raster="polygon"))
            assert s["seg"].sum() > 0
        if mode == "simplebev":
            assert flipped_seen == {True, False}  # both draws met in four seeds
        # reproducible from (seed, index); off without augment (validation)
        np.testing.assert_array_equal(ds.bev_motion(0, seed=3)[0], ds.bev_motion(0, seed=3)[0])
        val = NuScenesBev(aug_root, "v1.0-mini", "train", **OURS, cameras=cameras, augment=False, bev_augment=mode)
        np.testing.assert_array_equal(val.bev_motion(0, seed=3)[0], np.eye(4))
    with pytest.raises(ValueError, match="bev_augment must be one of"):
        NuScenesBev(root, "v1.0-mini", "train", bev_augment="lss")
    with pytest.raises(ValueError, match="raster must be one of"):
        NuScenesBev(root, "v1.0-mini", "train", raster="corners")


def test_run_refuses_unknown_label_rule_or_bev_augment_before_any_work():
    pytest.importorskip("hydra")
    from bev.config import compose
    from bev.run import check_config

    for override, match in (("data.raster=corners", "data.raster must be one of"),
                            ("data.bev_augment=lss", "data.bev_augment must be one of"),
                            ("data.bev_yaw_deg=-5", "data.bev_yaw_deg")):
        with pytest.raises(ValueError, match=match):
            check_config(compose("experiment=demo", override))
    check_config(compose("experiment=demo"))  # the defaults pass
