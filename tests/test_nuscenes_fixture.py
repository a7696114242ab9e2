"""The real key frame, converted to devkit tables, read back through nuscenes-devkit."""

import pickle

import numpy as np
import pytest
import torch

from bev import geometry as G
from bev.data.from_mmdet3d import write_tables
from conftest import FIXTURES

nuscenes = pytest.importorskip("nuscenes")
INFO = FIXTURES / "nuscenes_frame" / "n015-2018-07-24-11-22-45+0800.pkl"


@pytest.fixture(scope="module")
def nusc(tmp_path_factory):
    root = tmp_path_factory.mktemp("nuscenes")
    write_tables(INFO, root)
    return nuscenes.NuScenes("v1.0-mini", str(root), verbose=False)


@pytest.fixture(scope="module")
def info():
    with open(INFO, "rb") as fh:
        return pickle.load(fh)["data_list"][0]


def test_devkit_loads_the_frame(nusc, info):
    sample = nusc.sample[0]
    assert sample["token"] == info["token"]
    assert set(sample["data"]) == {"LIDAR_TOP", *info["images"]}
    assert len(sample["anns"]) == sum(i["bbox_label_3d"] >= 0 for i in info["instances"]) == 68
    assert nusc.get("scene", sample["scene_token"])["name"] == "scene-0061"


def test_devkit_boxes_project_where_mmdet3d_projected_them(nusc, info):
    """Camera ego poses are exact: the devkit's global -> camera chain reproduces mmdet3d's
    ``center_2d`` (computed from lidar2cam at capture) for every box CAM_FRONT sees."""
    sd = nusc.get("sample_data", nusc.sample[0]["data"]["CAM_FRONT"])
    _, boxes, K = nusc.get_sample_data(sd["token"])
    ours = {}
    for box in boxes:
        uv, depth = G.project_points(torch.tensor(box.center[None]), torch.tensor(K))
        ours[round(float(depth[0]), 2)] = uv[0].numpy()
    matched = 0
    for inst in info["cam_instances"]["CAM_FRONT"]:
        key = round(float(inst["depth"]), 2)
        if key in ours:
            np.testing.assert_allclose(ours[key], inst["center_2d"], atol=0.05)
            matched += 1
    assert matched >= 10


def test_truck_is_at_its_ego_position(nusc):
    sample = nusc.sample[0]
    lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
    pose = nusc.get("ego_pose", lidar["ego_pose_token"])
    global2ego = G.transform_matrix(pose["translation"], pose["rotation"], inverse=True)
    trucks = [nusc.get("sample_annotation", t) for t in sample["anns"]]
    trucks = [a for a in trucks if a["category_name"] == "vehicle.truck"]
    centres = [(global2ego @ np.r_[a["translation"], 1])[:2] for a in trucks]
    nearest = min(centres, key=lambda c: np.hypot(c[0] - 16.2, c[1] - 4.5))
    assert nearest == pytest.approx([16.19, 4.53], abs=0.02)


def test_dataset_labels_of_each_raster(nusc):
    """NuScenesBev(root, "v1.0-mini", split="all") on the real key frame: PointBeV's labels by
    default (raster="pointbev"; tests/test_bev_pointbev_pipeline.py checks them cell for cell), its
    fill on the cell-centre lattice with raster="polygon" (382 cells; tests/test_bev_targets.py
    derives the rule), the centre rule with raster="center" (293 cells), the truck's footprint at
    ego (16.2, +4.5) m in each."""
    from scipy import ndimage

    from bev.data.nuscenes import NuScenesBev

    root = nusc.dataroot
    counts = {}
    for raster in ("pointbev", "polygon", "center"):
        kwargs = {} if raster == "pointbev" else {"raster": raster}
        seg = NuScenesBev(root, "v1.0-mini", split="all", nusc=nusc, **kwargs).targets(0)["seg"][0]
        counts[raster] = int(seg.sum())
        labels, _ = ndimage.label(seg > 0)
        truck = labels == labels[132, 109]  # ego (16.2, 4.5) m -> cell (132.4, 109.0)
        rows, cols = np.nonzero(truck)
        assert labels[132, 109] > 0
        assert -50 + 0.5 * (rows.mean() + 0.5) == pytest.approx(16.2, abs=0.3)
        assert -50 + 0.5 * (cols.mean() + 0.5) == pytest.approx(4.5, abs=0.3)
        assert seg[132, 91] == 0 and seg[67, 109] == 0  # not mirrored
    assert counts == {"pointbev": 403, "polygon": 382, "center": 293}
