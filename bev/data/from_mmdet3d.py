"""Write nuScenes devkit tables for key frames given in mmdetection3d's info format (v1.1).

The real key frame in ``shared/fixtures/nuscenes_frame/`` (scene-0061's first sample) comes as
an mmdetection3d info pickle and six JPEGs, without the thirteen JSON tables that
``nuscenes.NuScenes`` reads. :func:`write_tables` writes them (and copies the images to
``samples/<CHANNEL>/``) so that the devkit, and everything built on it, reads the frame like any
nuScenes sample.

What the info holds and how it is mapped:

* each camera's ego pose is the exact one, ``ego2global @ lidar2ego @ inv(lidar2cam) @
  inv(cam2ego)`` (the ego moves 0.1-0.4 m between the LiDAR and camera timestamps); so the
  devkit's global -> camera chain equals the info's ``lidar2cam`` chain;
* boxes: ``bbox_3d = [x, y, z, l, w, h, yaw]`` in the LiDAR frame -> global translation,
  rotation and nuScenes size ``[w, l, h]``; class index -> a nuScenes category name (the
  detection classes' usual members); boxes labelled -1 (outside the 10 classes) are dropped;
* not in the info, hence written as placeholders: visibility (level ``"4"``, 80-100 %, for
  every box), attributes (none), instance tracks (one instance per box), the log's date and
  location (read from the log name / scene-0061), the map (a record without an image).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from typing import Dict, List

import numpy as np

from .. import geometry as G
from .tables import CAMERAS, CATEGORY_NAMES, VISIBILITY, empty_tables, pose_record, token, usec, write_json_tables

__all__ = ["write_tables"]


def write_tables(info_path, out_root, version: str = "v1.0-mini", image_dir=None,
                 scene_name: str = "scene-0061", location: str = "singapore-onenorth") -> Path:
    """Write ``<out_root>/<version>/*.json`` and ``<out_root>/samples/<CHANNEL>/*.jpg``."""
    from PIL import Image

    info_path = Path(info_path)
    with open(info_path, "rb") as fh:
        data = pickle.load(fh)
    frames = data["data_list"]
    if not frames:
        raise ValueError(f"{info_path} holds no key frame.")
    image_dir = Path(image_dir) if image_dir else info_path.parent
    out_root = Path(out_root)
    logfile = info_path.stem
    tables: Dict[str, List[dict]] = empty_tables()

    log_token = token("log", logfile)
    tables["log"].append({"token": log_token, "logfile": logfile, "vehicle": logfile.split("-")[0],
                          "date_captured": "-".join(logfile.split("-")[1:4]), "location": location})
    tables["map"].append({"token": token("map", location), "log_tokens": [log_token], "category": "semantic_prior",
                          "filename": ""})
    for level_token, level, description in VISIBILITY:
        tables["visibility"].append({"token": level_token, "level": level, "description": description})
    for name in CATEGORY_NAMES.values():
        tables["category"].append({"token": token("category", name), "name": name, "description": name})
    for channel in CAMERAS + ("LIDAR_TOP",):
        tables["sensor"].append({"token": token("sensor", channel), "channel": channel,
                                 "modality": "lidar" if channel == "LIDAR_TOP" else "camera"})

    scene_token = token("scene", scene_name)
    sample_tokens = [f["token"] for f in frames]
    for n, frame in enumerate(frames):
        sample_token = frame["token"]
        ego2global = np.asarray(frame["ego2global"], dtype=np.float64)
        lidar2ego = np.asarray(frame["lidar_points"]["lidar2ego"], dtype=np.float64)
        tables["sample"].append({
            "token": sample_token, "timestamp": usec(frame["timestamp"]), "scene_token": scene_token,
            "prev": sample_tokens[n - 1] if n else "", "next": sample_tokens[n + 1] if n + 1 < len(frames) else ""})
        # the LiDAR: its ego pose is the info's ego2global
        lidar_cs, lidar_pose = token("cs", sample_token, "LIDAR_TOP"), token("pose", sample_token, "LIDAR_TOP")
        tables["calibrated_sensor"].append({"token": lidar_cs, "sensor_token": token("sensor", "LIDAR_TOP"),
                                            "camera_intrinsic": [], **pose_record(lidar2ego)})
        tables["ego_pose"].append({"token": lidar_pose, "timestamp": usec(frame["timestamp"]),
                                   **pose_record(ego2global)})
        lidar_path = Path(frame["lidar_points"].get("lidar_path", f"{logfile}__LIDAR_TOP__0.pcd.bin")).name
        tables["sample_data"].append({
            "token": token("sd", sample_token, "LIDAR_TOP"), "sample_token": sample_token,
            "ego_pose_token": lidar_pose, "calibrated_sensor_token": lidar_cs,
            "timestamp": usec(frame["timestamp"]), "fileformat": "pcd", "is_key_frame": True, "height": 0,
            "width": 0, "filename": f"samples/LIDAR_TOP/{lidar_path}", "prev": "", "next": ""})
        for channel in CAMERAS:
            cam = frame["images"][channel]
            cam2ego = np.asarray(cam["cam2ego"], dtype=np.float64)
            lidar2cam = np.asarray(cam["lidar2cam"], dtype=np.float64)
            ego2global_cam = ego2global @ lidar2ego @ G.invert_rigid(lidar2cam) @ G.invert_rigid(cam2ego)
            cs, pose = token("cs", sample_token, channel), token("pose", sample_token, channel)
            tables["calibrated_sensor"].append({
                "token": cs, "sensor_token": token("sensor", channel),
                "camera_intrinsic": np.asarray(cam["cam2img"], dtype=np.float64)[:3, :3].tolist(),
                **pose_record(cam2ego)})
            tables["ego_pose"].append({"token": pose, "timestamp": usec(cam["timestamp"]),
                                       **pose_record(ego2global_cam)})
            src = image_dir / cam["img_path"]
            dst = out_root / "samples" / channel / Path(cam["img_path"]).name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not src.is_file():
                raise FileNotFoundError(f"camera image {src} named by the info does not exist.")
            shutil.copyfile(src, dst)
            with Image.open(src) as im:
                width, height = im.size
            tables["sample_data"].append({
                "token": cam.get("sample_data_token") or token("sd", sample_token, channel),
                "sample_token": sample_token, "ego_pose_token": pose, "calibrated_sensor_token": cs,
                "timestamp": usec(cam["timestamp"]), "fileformat": "jpg", "is_key_frame": True,
                "height": height, "width": width, "filename": f"samples/{channel}/{dst.name}", "prev": "", "next": ""})
        lidar2global = ego2global @ lidar2ego
        for k, inst in enumerate(frame["instances"]):
            label = int(inst["bbox_label_3d"])
            if label not in CATEGORY_NAMES:
                continue
            x, y, z, length, width, height, yaw = (float(v) for v in inst["bbox_3d"])
            box = lidar2global @ G.transform_matrix((x, y, z), G.yaw_to_quaternion(yaw))
            ann_token, inst_token = token("ann", sample_token, k), token("instance", sample_token, k)
            tables["instance"].append({"token": inst_token, "category_token": token("category", CATEGORY_NAMES[label]),
                                       "nbr_annotations": 1, "first_annotation_token": ann_token,
                                       "last_annotation_token": ann_token})
            tables["sample_annotation"].append({
                "token": ann_token, "sample_token": sample_token, "instance_token": inst_token,
                "visibility_token": "4", "attribute_tokens": [], "size": [width, length, height],
                "prev": "", "next": "", "num_lidar_pts": int(inst.get("num_lidar_pts", 0)),
                "num_radar_pts": int(inst.get("num_radar_pts", 0)), **pose_record(box)})

    tables["scene"].append({"token": scene_token, "log_token": log_token, "nbr_samples": len(frames),
                            "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1],
                            "name": scene_name, "description": f"converted from {info_path.name}"})
    return write_json_tables(out_root / version, tables)
