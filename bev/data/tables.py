"""The nuScenes names (cameras, tables) and the pieces shared by the writers of nuScenes v1.0 devkit
tables (``from_mmdet3d``, ``synthetic``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List

import numpy as np

from .. import geometry as G

#: the thirteen tables ``nuscenes.NuScenes`` loads, in its order
TABLE_NAMES = ("category", "attribute", "visibility", "instance", "sensor", "calibrated_sensor", "ego_pose", "log",
               "scene", "sample", "sample_data", "sample_annotation", "map")

#: the six nuScenes cameras, in the order the BeV data and models use (front row left to right,
#: then back row left to right: LSS, SimpleBEV, PointBeV ``configs/data/nuscenes.yaml`` ``cams``)
CAMERAS = ("CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT")

#: mmdetection3d's nuScenes classes -> a nuScenes category (the usual member of each class)
CATEGORY_NAMES = {
    0: "vehicle.car", 1: "vehicle.truck", 2: "vehicle.trailer", 3: "vehicle.bus.rigid",
    4: "vehicle.construction", 5: "vehicle.bicycle", 6: "vehicle.motorcycle", 7: "human.pedestrian.adult",
    8: "movable_object.trafficcone", 9: "movable_object.barrier",
}
#: nuScenes' visibility table: (token, level, description)
VISIBILITY = [("1", "v0-40", "visibility of whole object is between 0 and 40%"),
              ("2", "v40-60", "visibility of whole object is between 40 and 60%"),
              ("3", "v60-80", "visibility of whole object is between 60 and 80%"),
              ("4", "v80-100", "visibility of whole object is between 80 and 100%")]


def token(*parts) -> str:
    """A deterministic 32-hex token."""
    return hashlib.md5("/".join(str(p) for p in parts).encode()).hexdigest()


def pose_record(T: np.ndarray) -> dict:
    """``{"translation", "rotation"}`` (quaternion ``[w, x, y, z]``) of a 4x4 rigid transform."""
    return {"translation": T[:3, 3].tolist(), "rotation": G.rotation_to_quaternion(T[:3, :3]).tolist()}


def usec(seconds: float) -> int:
    """A nuScenes timestamp (integer microseconds) of a time in seconds."""
    return int(round(float(seconds) * 1e6))


def empty_tables() -> Dict[str, List[dict]]:
    return {name: [] for name in TABLE_NAMES}


def write_json_tables(table_dir, tables: Dict[str, List[dict]]) -> Path:
    """Write ``<table_dir>/<name>.json`` for each of the thirteen tables."""
    missing = [n for n in TABLE_NAMES if n not in tables]
    if missing:
        raise ValueError(f"tables {missing} are missing; the devkit expects all of {list(TABLE_NAMES)}.")
    table_dir = Path(table_dir)
    table_dir.mkdir(parents=True, exist_ok=True)
    for name in TABLE_NAMES:
        (table_dir / f"{name}.json").write_text(json.dumps(tables[name], indent=1))
    return table_dir
