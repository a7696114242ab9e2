"""BeV vehicle ground truth on the real key frame: the vehicles where they are, not mirrored."""

import numpy as np
import pytest

from bev.data.from_mmdet3d import write_tables
from bev.data.targets import footprint, rasterize_footprints
from bev.geometry import BevGrid, rotation_yaw, transform_matrix
from conftest import FIXTURES

nuscenes = pytest.importorskip("nuscenes")
ndimage = pytest.importorskip("scipy.ndimage")
INFO = FIXTURES / "nuscenes_frame" / "n015-2018-07-24-11-22-45+0800.pkl"


def test_an_axis_aligned_box_fills_exactly_its_cells():
    grid = BevGrid()
    # a 2 m (w, along y) x 4 m (l, along x) box centred on a cell corner: 8 x 4 cells
    mask = rasterize_footprints([((10.0, -5.0), (2.0, 4.0), 0.0)], grid)
    rows, cols = np.nonzero(mask)
    assert mask.sum() == 32
    assert (rows.min(), rows.max()) == (116, 123)  # x in [8, 12): rows (8 + 50) / 0.5 = 116 ..
    assert (cols.min(), cols.max()) == (88, 91)    # y in [-6, -4): cols 88 .. 91
    np.testing.assert_allclose(footprint((0, 0), (2, 4), np.pi / 2)[:, 1].max(), 2.0)  # rotated: l along y


def test_real_frame_vehicles_in_the_grid(tmp_path):
    write_tables(INFO, tmp_path)
    nusc = nuscenes.NuScenes("v1.0-mini", str(tmp_path), verbose=False)
    sample = nusc.sample[0]
    pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
    global2ego = transform_matrix(pose["translation"], pose["rotation"], inverse=True)
    boxes = []
    for ann in (nusc.get("sample_annotation", t) for t in sample["anns"]):
        if not ann["category_name"].startswith("vehicle."):
            continue
        T = global2ego @ transform_matrix(ann["translation"], ann["rotation"])
        boxes.append(((T[0, 3], T[1, 3]), (ann["size"][0], ann["size"][1]), rotation_yaw(T[:3, :3])))
    grid = BevGrid()
    inside = [b for b in boxes if abs(b[0][0]) < 50 and abs(b[0][1]) < 50]
    assert len(inside) == 6
    mask = rasterize_footprints(boxes, grid)
    labels, n = ndimage.label(mask)
    # six vehicles with their centres in the grid, plus the rear of the bus centred at
    # x = -52.9 m (6.9 m long, heading along x), which reaches into the first rows
    assert n == 7
    assert mask[0].any() and not mask[-1].any()
    # the truck: footprint centred at ego (16.2, +4.5) -> cell (132.4, 109.0); its mirror image
    # across the x axis (y = -4.5, column 91) and across y (x = -16.2, row 67) are empty
    assert mask[132, 109] == 1 and mask[132, 91] == 0 and mask[67, 109] == 0
    truck = [b for b in inside if b[1][1] > 8][0]
    assert truck[0] == pytest.approx((16.19, 4.53), abs=0.02)


def test_frame_picture_is_written(tmp_path):
    from PIL import Image

    from bev.viz import draw_sample

    write_tables(INFO, tmp_path / "data")
    nusc = nuscenes.NuScenes("v1.0-mini", str(tmp_path / "data"), verbose=False)
    path = draw_sample(nusc, nusc.sample[0]["token"], tmp_path / "frame.png", width=160)
    with Image.open(path) as im:
        assert im.size == (3 * 160 + 2 * 90, 180)
        # the BeV panel holds vehicles (white cells) on black
        bev = np.asarray(im.convert("L"))[:, 3 * 160:]
        assert (bev == 255).sum() > 0 and (bev == 0).mean() > 0.9
