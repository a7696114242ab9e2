"""BeV vehicle ground truth on the real key frame: the vehicles where they are, not mirrored."""

import numpy as np
import pytest

from bev.data.from_mmdet3d import write_tables
from bev.data.targets import bev_targets, fill_convex_lattice, footprint, footprint_lattice, rasterize_footprints
from bev.geometry import BevGrid, rotation_yaw, transform_matrix
from conftest import FIXTURES

nuscenes = pytest.importorskip("nuscenes")
ndimage = pytest.importorskip("scipy.ndimage")
INFO = FIXTURES / "nuscenes_frame" / "n015-2018-07-24-11-22-45+0800.pkl"


def test_an_axis_aligned_box_fills_exactly_its_cells():
    grid = BevGrid()
    # raster="center": a 2 m (w, along y) x 4 m (l, along x) box centred on a cell corner: 8 x 4 cells
    mask = rasterize_footprints([((10.0, -5.0), (2.0, 4.0), 0.0)], grid, raster="center")
    rows, cols = np.nonzero(mask)
    assert mask.sum() == 32
    assert (rows.min(), rows.max()) == (116, 123)  # x in [8, 12): rows (8 + 50) / 0.5 = 116 ..
    assert (cols.min(), cols.max()) == (88, 91)    # y in [-6, -4): cols 88 .. 91
    np.testing.assert_allclose(footprint((0, 0), (2, 4), np.pi / 2)[:, 1].max(), 2.0)  # rotated: l along y


def test_polygon_raster_of_a_box_by_hand():
    """PointBeV's rule on our cell-centre lattice: corners in cells from the first cell centre,
    rounded, the rectangle filled boundary included. By hand: x in [8.1, 12.1] m ->
    (x + 50) / 0.5 - 0.5 = 115.7 .. 123.7 -> rows 116 .. 124; y in [-6.1, -4.1] m -> 87.3 .. 91.3
    -> columns 87 .. 91: 9 x 5 = 45 cells. The centre rule keeps the cells whose centre
    (-50 + 0.5 (k + 0.5)) lies inside: rows 116 .. 123 (8.25 .. 11.75 m), columns 88 .. 91: 32."""
    grid = BevGrid()
    box = ((10.1, -5.1), (2.0, 4.0), 0.0)
    corners = footprint_lattice(*box, grid)
    assert sorted(map(tuple, corners.tolist())) == [(116, 87), (116, 91), (124, 87), (124, 91)]
    mask = rasterize_footprints([box], grid, raster="polygon")
    expected = np.zeros(grid.shape, dtype=np.uint8)
    expected[116:125, 87:92] = 1
    np.testing.assert_array_equal(mask, expected)
    centre = rasterize_footprints([box], grid, raster="center")
    expected[:] = 0
    expected[116:124, 88:92] = 1
    np.testing.assert_array_equal(centre, expected)
    # every target follows the footprint's cells: visibility on the 45 cells, offsets there only
    t = bev_targets([box + (3,)], grid, raster="polygon")
    assert (t["visibility"][0] == 3).sum() == 45 and (t["visibility"][0] > 0).sum() == 45
    assert (np.abs(t["offset"]).sum(0) > 0).sum() == 45 and t["offset"][:, 124, 87] == pytest.approx(
        [(10.1 + 50) / 0.5 - 124.5, (-5.1 + 50) / 0.5 - 87.5])
    with pytest.raises(ValueError, match="raster must be one of"):
        rasterize_footprints([box], grid, raster="corners")


def test_convex_fill_of_a_triangle_by_hand():
    """OpenCV's fillConvexPoly rule (8-connected outline, then scanlines of constant second
    coordinate b, rounded half up, the last one left to the outline) on the triangle
    (0, 0), (4, 1), (2, 4), worked by hand:
    outline (0,0)-(4,1): (0,0) (1,0) (2,0) (3,1) (4,1); (4,1)-(2,4), walked from (2,4): (2,4) (3,3)
    (3,2) (4,1); (2,4)-(0,0), walked from (0,0): (0,0) (0,1) (1,2) (1,3) (2,4).
    scanlines: the edges from the top vertex (0,0) move a by 4 and 0.5 per b; then (4,1)-(2,4) by
    -2/3: b=0: a 0..0; b=1: 0.5..4 -> 1..4; b=2: 1..3.33 -> 1..3; b=3: 1.5..2.67 -> 2..3."""
    expected = np.array([[1, 1, 0, 0, 0],
                         [1, 1, 1, 1, 0],
                         [1, 1, 1, 1, 1],
                         [0, 1, 1, 1, 0],
                         [0, 1, 0, 0, 0]], dtype=bool)
    got = fill_convex_lattice(np.array([[0, 0], [4, 1], [2, 4]]), (5, 5))
    np.testing.assert_array_equal(got, expected)
    # the same polygon listed the other way round
    np.testing.assert_array_equal(fill_convex_lattice(np.array([[2, 4], [4, 1], [0, 0]]), (5, 5)), expected)
    # in a mask of 3 x 5 cells, OpenCV clips the edge (0,0)-(4,1) to (0,0)-(2,1) first (the end
    # (4,1) moves to a = 2 and b by (2 - 4) / 4 = -0.5, truncated to 0): its cells become
    # (0,0) (1,0) (2,1), so (2,0) is no longer set
    clipped = expected[:3].copy()
    clipped[2, 0] = False
    np.testing.assert_array_equal(fill_convex_lattice(np.array([[0, 0], [4, 1], [2, 4]]), (3, 5)), clipped)


def test_convex_fill_matches_opencv():
    """Where OpenCV is installed: our fill is cv2.fillConvexPoly's on random rotated boxes, many
    across the image's border (points given as (a, b) = OpenCV's (x, y), so the mask is
    OpenCV's image transposed), and a window of it is the same window of the whole mask."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    window = (slice(5, 20), slice(3, 33))
    for _ in range(300):
        centre, size, yaw = rng.uniform(-3, 43, 2), rng.uniform(1, 12, 2), rng.uniform(-np.pi, np.pi)
        corners = np.round(footprint(centre, size, yaw)).astype(np.int32)
        image = np.zeros((40, 30), dtype=np.uint8)  # OpenCV: 40 rows (b), 30 columns (a)
        cv2.fillConvexPoly(image, corners, 1)
        ours = fill_convex_lattice(corners, (30, 40))
        np.testing.assert_array_equal(ours, image.T.astype(bool))
        np.testing.assert_array_equal(fill_convex_lattice(corners, (30, 40), window), ours[window])


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
    # PointBeV's polygon labels have 382 cells where the centre rule has 293 (with the scanlines
    # along ego x instead of ego y, OpenCV's rounding gives 383)
    assert rasterize_footprints(boxes, grid, raster="center").sum() == 293
    mask = rasterize_footprints(boxes, grid, raster="polygon")
    assert mask.sum() == 382
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
