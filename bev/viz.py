"""Pictures of a nuScenes sample: the six cameras with projected boxes, and the BeV ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from jafar.utils import atomic_path

from .data.tables import CAMERAS
from .data.targets import rasterize_footprints, visibility_mask
from .geometry import BevGrid, project_points, rotation_yaw, transform_matrix

# the 12 edges of a box, as pairs of indices into the devkit's corner order
_EDGES = [(0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7)]


def vehicle_boxes_ego(nusc, sample_token: str):
    """``[(center_xy, (w, l), yaw)]`` of the sample's ``vehicle.*`` boxes in the LiDAR's ego frame."""
    sample = nusc.get("sample", sample_token)
    pose = nusc.get("ego_pose", nusc.get("sample_data", sample["data"]["LIDAR_TOP"])["ego_pose_token"])
    global2ego = transform_matrix(pose["translation"], pose["rotation"], inverse=True)
    out = []
    for ann in (nusc.get("sample_annotation", t) for t in sample["anns"]):
        if ann["category_name"].startswith("vehicle."):
            T = global2ego @ transform_matrix(ann["translation"], ann["rotation"])
            out.append(((T[0, 3], T[1, 3]), (ann["size"][0], ann["size"][1]), rotation_yaw(T[:3, :3])))
    return out


def draw_sample(nusc, sample_token: str, path, grid: BevGrid = BevGrid(), width: int = 480) -> Path:
    """Save ``path``: the six cameras (vehicles in red, other boxes in yellow) and the BeV
    vehicle mask drawn with the ego's forward (+x) up and its left (+y) to the left."""
    from PIL import Image, ImageDraw

    sample = nusc.get("sample", sample_token)
    panels = []
    for channel in CAMERAS:
        sd_path, boxes, K = nusc.get_sample_data(sample["data"][channel])
        im = Image.open(sd_path).convert("RGB")
        scale = width / im.width
        im = im.resize((width, round(im.height * scale)))
        draw = ImageDraw.Draw(im)
        for box in boxes:
            uv, depth = project_points(torch.tensor(box.corners().T), torch.tensor(K))
            if (depth <= 0.1).any():
                continue
            uv = (uv.numpy() * scale).tolist()
            colour = (255, 40, 40) if box.name.startswith("vehicle.") else (255, 220, 0)
            for a, b in _EDGES:
                draw.line([tuple(uv[a]), tuple(uv[b])], fill=colour, width=2)
        draw.text((6, 4), channel, fill=(255, 255, 255))
        panels.append(im)
    h = panels[0].height
    mask = rasterize_footprints(vehicle_boxes_ego(nusc, sample_token), grid)
    # rows follow x and columns follow y: flip both so that forward is up and left is left
    bev = Image.fromarray((mask[::-1, ::-1] * 255).astype(np.uint8)).convert("RGB").resize((2 * h, 2 * h), 0)
    d = ImageDraw.Draw(bev)
    c = h  # the ego at the centre, an arrow pointing forward
    d.polygon([(c, c - 10), (c - 6, c + 6), (c + 6, c + 6)], fill=(0, 160, 255))
    d.text((6, 4), "BeV vehicles (forward up)", fill=(0, 160, 255))
    canvas = Image.new("RGB", (3 * width + 2 * h, 2 * h), "black")
    for k, panel in enumerate(panels):  # CAMERAS: the front row left to right, then the back row
        canvas.paste(panel, ((k % 3) * width, (k // 3) * h))
    canvas.paste(bev, (3 * width, 0))
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


def bev_to_image(array: np.ndarray) -> np.ndarray:
    """A ``(X, Y)`` BeV array (rows along x, columns along y) as an image with the ego's forward
    up and its left to the left."""
    return np.ascontiguousarray(np.asarray(array)[::-1, ::-1])


def save_prediction_panels(samples, path, min_visibility: int = 2, camera_width: int = 160) -> Path:
    """Save ``path``: one row per sample with its cameras (model order, two rows of three), the
    ground truth and the predicted probability in the BeV (forward up, left left).

    ``samples``: dicts with ``images`` (N, 3, H, W) in [0, 1], ``seg`` (1, X, Y), ``visibility``
    (1, X, Y) and ``prob`` (1, X, Y). Ground truth: vehicles white, cells ignored at
    ``min_visibility`` grey; prediction: probability as grey levels, ground-truth outline in red.
    """
    from PIL import Image, ImageDraw

    rows = []
    for s in samples:
        images = s["images"].float().clamp(0, 1)
        n, _, h, w = images.shape
        ch = max(1, round(h * camera_width / w))
        cams = Image.new("RGB", (3 * camera_width, 2 * ch), "black")
        for k in range(n):
            arr = (images[k].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            cams.paste(Image.fromarray(arr).resize((camera_width, ch)), ((k % 3) * camera_width, (k // 3) * ch))
        side = 2 * ch
        seg = s["seg"][0].numpy() > 0
        ignored = ~visibility_mask(s["seg"][0].numpy(), s["visibility"][0].numpy(), min_visibility)
        gt = np.where(seg, 255, 0).astype(np.uint8)
        gt[ignored] = 110
        prob = (s["prob"][0].float().numpy() * 255).astype(np.uint8)
        pred = np.stack([prob] * 3, -1)
        edge = seg & ~(np.roll(seg, 1, 0) & np.roll(seg, -1, 0) & np.roll(seg, 1, 1) & np.roll(seg, -1, 1))
        pred[edge] = (255, 40, 40)
        panels = [Image.fromarray(bev_to_image(gt)).convert("RGB"), Image.fromarray(bev_to_image(pred))]
        row = Image.new("RGB", (cams.width + 2 * side + 8, side), "black")
        row.paste(cams, (0, 0))
        for k, (panel, title) in enumerate(zip(panels, ("ground truth", "prediction"))):
            panel = panel.resize((side, side), Image.NEAREST)
            ImageDraw.Draw(panel).text((4, 2), title, fill=(0, 160, 255))
            row.paste(panel, (cams.width + 4 + k * (side + 4), 0))
        rows.append(row)
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "black")
    y = 0
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG")
    return path
