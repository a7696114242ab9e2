"""Devkit tables at the size of nuScenes v1.0-trainval, without rendering: what table loading,
data-set construction, label building, the prior baseline and memory cost at the real scale can
be measured on (``tools/make_synthetic_nuscenes.py --tables-only``, ``tools/bench_bev_scale.py``).

What is written (:func:`write_trainval_tables`), at the full size by default:

* the 850 scenes of the official splits, under their real names (``nuscenes.utils.splits.
  create_splits_scenes``: 700 ``train`` + 150 ``val``), so ``split="train"``/``"val"`` select
  them as on the real data; 28,130 training and 6,019 validation key frames (40 or 41 per
  scene), the counts of v1.0-trainval;
* per sample 12 key-frame ``sample_data`` (six cameras, ``LIDAR_TOP``, five radars) and 64 sweeps
  (five per camera at 12 Hz, nine LiDAR at 20 Hz, five per radar), each with its own ``ego_pose``:
  2,595,324 of each (v1.0-trainval: about 2.6 M), chained ``prev``/``next`` per sensor;
* per scene 20-48 static objects (34 on average, as nuScenes' 1.17 M annotations over 34,149
  samples), each annotated in every sample of its scene: vehicles and distractors with the
  categories, sizes and placement (lanes along the ego's path, or anywhere within 50 m) of
  :mod:`bev.data.synthetic`, visibility levels drawn with nuScenes' frequencies;
* the ego on a circular arc per scene, the six cameras and the LiDAR at the calibration of
  :data:`bev.data.synthetic.CAMERA_CALIBRATION` (nuScenes scene-0061, 1600 x 900), the cameras
  firing up to 50 ms before the LiDAR, as the rendered synthetic set;
* every camera ``sample_data`` names one shared image per camera (``samples/<CHANNEL>/...``:
  ``images`` given, e.g. the real key frame of ``shared/fixtures/nuscenes_frame``, are copied
  there), so the file checks and the data loaders work on real-size JPEGs.

``scale`` < 1 keeps the first ``round(scale x 700)`` training and ``round(scale x 150)``
validation scenes (CI uses a few scenes). Tokens hash the scale and seed.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from .synthetic import CAMERA_CALIBRATION, DISTRACTORS, LIDAR_CALIBRATION, VEHICLES
from .tables import CAMERAS, TABLE_NAMES, VISIBILITY, token, usec

#: v1.0-trainval's key frames per split (nuScenes' paper and devkit, ``nusc.list_scenes()``)
TRAIN_SAMPLES, VAL_SAMPLES = 28130, 6019
RADARS = ("RADAR_FRONT", "RADAR_FRONT_LEFT", "RADAR_FRONT_RIGHT", "RADAR_BACK_LEFT", "RADAR_BACK_RIGHT")
#: sweeps between two key frames per sensor kind (cameras 12 Hz, LiDAR 20 Hz, radars ~13 Hz)
SWEEPS = {"camera": 5, "lidar": 9, "radar": 5}
#: nuScenes' share of annotations per visibility level 1..4 (v1.0-trainval, rounded)
VISIBILITY_SHARES = (0.17, 0.09, 0.12, 0.62)
LOCATIONS = ("singapore-onenorth", "boston-seaport", "singapore-queenstown", "singapore-hollandvillage")
LOGS = 68  # v1.0-trainval's logs


def _per_scene(total: int, scenes: int) -> list:
    """``total`` samples spread over ``scenes``: the first ``total % scenes`` get one more."""
    base, extra = divmod(total, scenes)
    return [base + (1 if i < extra else 0) for i in range(scenes)]


class _JsonList:
    """A JSON list written one record at a time (the big tables never sit in memory)."""

    def __init__(self, path: Path):
        self.f, self.n = open(path, "w"), 0

    def add(self, record: dict):
        self.add_text(json.dumps(record))

    def add_text(self, text: str):
        """A record already formatted as JSON (the big tables format theirs with f-strings: 4x faster)."""
        self.f.write(("[\n" if self.n == 0 else ",\n") + text)
        self.n += 1

    def close(self):
        self.f.write("[]" if self.n == 0 else "\n]")
        self.f.close()


def _yaw_quaternion(yaw: float) -> list:
    return [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]


def write_trainval_tables(out, version: str = "v1.0-trainval", scale: float = 1.0, seed: int = 0,
                          images: Optional[Dict[str, str]] = None, verbose: bool = False) -> dict:
    """Write the thirteen tables of a trainval-sized nuScenes under ``out/version`` (and the shared
    camera images under ``out/samples``); returns the record counts. See the module docstring."""
    from nuscenes.utils.splits import create_splits_scenes

    if not 0 < float(scale) <= 1:
        raise ValueError(f"scale must be in (0, 1] (the share of v1.0-trainval's scenes), got {scale!r}.")
    out = Path(out)
    official = create_splits_scenes(verbose=False)
    n_train = max(1, round(scale * len(official["train"])))
    n_val = max(1, round(scale * len(official["val"])))
    names = list(official["train"][:n_train]) + list(official["val"][:n_val])
    samples = (_per_scene(TRAIN_SAMPLES, len(official["train"]))[:n_train]
               + _per_scene(VAL_SAMPLES, len(official["val"]))[:n_val])
    ds = token("trainval-tables", float(scale), int(seed))[:12]
    rng = np.random.default_rng(int(seed))
    start = time.time()
    table_dir = out / version
    table_dir.mkdir(parents=True, exist_ok=True)

    # the shared image files: one per camera
    filenames = {}
    for ch in CAMERAS:
        src = (images or {}).get(ch)
        name = Path(src).name if src else f"{ch}.jpg"
        filenames[ch] = f"samples/{ch}/{name}"
        (out / "samples" / ch).mkdir(parents=True, exist_ok=True)
        if src:
            shutil.copyfile(src, out / filenames[ch])

    # small tables
    small = {name: [] for name in TABLE_NAMES}
    small["visibility"] = [{"token": t, "level": level, "description": d} for t, level, d in VISIBILITY]
    categories = list(VEHICLES) + list(DISTRACTORS)
    small["category"] = [{"token": token("category", c), "name": c, "description": c} for c in categories]
    attributes = {"vehicle.parked": "Vehicle is stationary.", "cycle.without_rider": "No rider.",
                  "pedestrian.standing": "The human is standing."}
    small["attribute"] = [{"token": token("attribute", a), "name": a, "description": d} for a, d in attributes.items()]
    channels = CAMERAS + ("LIDAR_TOP",) + RADARS
    modality = {ch: "camera" if ch in CAMERAS else "lidar" if ch == "LIDAR_TOP" else "radar" for ch in channels}
    small["sensor"] = [{"token": token("sensor", ch), "channel": ch, "modality": modality[ch]} for ch in channels]
    logs = [{"token": token(ds, "log", i), "logfile": f"trainval-log-{i:02d}", "vehicle": "synthetic",
             "date_captured": "2018-07-24", "location": LOCATIONS[i % len(LOCATIONS)]} for i in range(LOGS)]
    small["log"] = logs
    small["map"] = [{"token": token(ds, "map", loc), "category": "semantic_prior", "filename": "",
                     "log_tokens": [log["token"] for log in logs if log["location"] == loc]} for loc in LOCATIONS]

    big = {name: _JsonList(table_dir / f"{name}.json") for name in ("ego_pose", "sample_data", "sample_annotation")}
    vehicle_names = list(VEHICLES)
    shares = np.array([VEHICLES[n][2] for n in vehicle_names])
    shares = shares / shares.sum()
    dist_names = list(DISTRACTORS)
    vis_p = np.array(VISIBILITY_SHARES) / sum(VISIBILITY_SHARES)
    intrinsics = {}
    for ch in CAMERAS:
        fx, fy, cx, cy = CAMERA_CALIBRATION[ch][2]
        intrinsics[ch] = [[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]]
    t_base = 1.5e9
    for si, (name, n_samples) in enumerate(zip(names, samples)):
        scene_token = token(ds, "scene", si)
        t0 = t_base + 1000.0 * si
        traj = {"x0": rng.uniform(300, 1700), "y0": rng.uniform(300, 1700), "yaw0": rng.uniform(-math.pi, math.pi),
                "speed": rng.uniform(0.0, 13.0), "yaw_rate": rng.uniform(-0.05, 0.05)}

        def state(t):
            dt, v, w, yaw0 = t - t0, traj["speed"], traj["yaw_rate"], traj["yaw0"]
            yaw = yaw0 + w * dt
            if abs(w) < 1e-9:
                return traj["x0"] + v * dt * math.cos(yaw0), traj["y0"] + v * dt * math.sin(yaw0), yaw0
            return (traj["x0"] + v / w * (math.sin(yaw) - math.sin(yaw0)),
                    traj["y0"] - v / w * (math.cos(yaw) - math.cos(yaw0)), yaw)

        # calibrated sensors of the scene (one per channel, as nuScenes: 12 per scene)
        cs = {ch: token(ds, "cs", si, ch) for ch in channels}
        for ch in channels:
            if ch in CAMERAS:
                calib, K = CAMERA_CALIBRATION[ch][:2], intrinsics[ch]
            elif ch == "LIDAR_TOP":
                calib, K = LIDAR_CALIBRATION, []
            else:
                calib, K = ((3.4, 0.0, 0.5), (1.0, 0.0, 0.0, 0.0)), []
            small["calibrated_sensor"].append({"token": cs[ch], "sensor_token": token("sensor", ch),
                                               "translation": list(calib[0]), "rotation": list(calib[1]),
                                               "camera_intrinsic": K})
        # static objects, placed as bev.data.synthetic places them (lanes along the path, or anywhere)
        n_obj = int(rng.integers(20, 49))
        objects = []
        for j in range(n_obj):
            if rng.random() < 0.55:
                cat = vehicle_names[rng.choice(len(vehicle_names), p=shares)]
                mean, std = VEHICLES[cat][:2]
            else:
                cat = dist_names[rng.integers(len(dist_names))]
                mean, std = DISTRACTORS[cat]
            wlh = np.maximum(np.asarray(mean) + rng.normal(0, 1, 3) * np.asarray(std), 0.5 * np.asarray(mean))
            x, y, h = state(t0 + 0.5 * rng.integers(n_samples))
            if rng.random() < 0.6:
                s, lat = rng.uniform(-45, 45), rng.choice([-10.5, -7.0, -3.5, 3.5, 7.0, 10.5]) + rng.normal(0, 0.25)
                px, py = x + s * math.cos(h) - lat * math.sin(h), y + s * math.sin(h) + lat * math.cos(h)
                yaw = h + math.pi * rng.integers(2) + rng.normal(0, 0.05)
            else:
                a, b = rng.uniform(-50, 50, 2)
                px, py, yaw = x + a * math.cos(h) - b * math.sin(h), y + a * math.sin(h) + b * math.cos(h), \
                    rng.uniform(-math.pi, math.pi)
            attr = ("cycle.without_rider" if cat in ("vehicle.motorcycle", "vehicle.bicycle") else
                    "vehicle.parked" if cat.startswith("vehicle.") else
                    "pedestrian.standing" if cat.startswith("human.") else None)
            objects.append({"category": cat, "translation": [px, py, float(wlh[2]) / 2], "size": wlh.tolist(),
                            "rotation": _yaw_quaternion(yaw), "attrs": [token("attribute", attr)] if attr else []})
        for obj in objects:  # the fields an object's annotations share, formatted once
            obj["json"] = json.dumps({k: obj[k] for k in ("translation", "size", "rotation")})[1:-1] + \
                f', "attribute_tokens": {json.dumps(obj["attrs"])}'
        inst_tokens = [token(ds, "inst", si, j) for j in range(n_obj)]
        sample_tokens = [token(ds, "sample", si, k) for k in range(n_samples)]
        ann = [[token(ds, "ann", si, k, j) for j in range(n_obj)] for k in range(n_samples)]
        for j, obj in enumerate(objects):
            small["instance"].append({"token": inst_tokens[j], "category_token": token("category", obj["category"]),
                                      "nbr_annotations": n_samples, "first_annotation_token": ann[0][j],
                                      "last_annotation_token": ann[-1][j]})
        # sample_data and ego poses, per channel in time order (key frame, then its sweeps)
        for ch in channels:
            kind = modality[ch]
            times = []
            for k in range(n_samples):
                tk = t0 + 0.5 * k
                key_t = tk if ch == "LIDAR_TOP" else tk - rng.uniform(0.0, 0.05)
                times.append((key_t, k, True))
                period = {"camera": 1 / 12, "lidar": 1 / 20, "radar": 1 / 13}[kind]
                times += [(key_t + period * (m + 1), k, False) for m in range(SWEEPS[kind])]
            tokens = [token(ds, "sd", si, ch, i) for i in range(len(times))]
            for i, (t, k, key) in enumerate(times):
                x, y, yaw = state(t)
                pose = token(ds, "pose", si, ch, i)
                qw, qz = math.cos(yaw / 2), math.sin(yaw / 2)
                big["ego_pose"].add_text(
                    f'{{"token": "{pose}", "timestamp": {usec(t)}, "rotation": [{qw!r}, 0.0, 0.0, {qz!r}], '
                    f'"translation": [{x!r}, {y!r}, 0.0]}}')
                if kind == "camera":
                    fname, fmt, w, h = filenames[ch], "jpg", 1600, 900
                else:
                    fname, fmt, w, h = f"samples/{ch}/{ch}.pcd", "pcd", 0, 0
                prev, nxt = tokens[i - 1] if i else "", tokens[i + 1] if i + 1 < len(times) else ""
                big["sample_data"].add_text(
                    f'{{"token": "{tokens[i]}", "sample_token": "{sample_tokens[k]}", "ego_pose_token": "{pose}", '
                    f'"calibrated_sensor_token": "{cs[ch]}", "timestamp": {usec(t)}, "fileformat": "{fmt}", '
                    f'"is_key_frame": {"true" if key else "false"}, "height": {h}, "width": {w}, '
                    f'"filename": "{fname}", "prev": "{prev}", "next": "{nxt}"}}')
        for k in range(n_samples):
            small["sample"].append({"token": sample_tokens[k], "timestamp": usec(t0 + 0.5 * k), "scene_token": scene_token,
                                    "prev": sample_tokens[k - 1] if k else "",
                                    "next": sample_tokens[k + 1] if k + 1 < n_samples else ""})
            levels = rng.choice(4, size=n_obj, p=vis_p) + 1
            for j, obj in enumerate(objects):
                prev, nxt = ann[k - 1][j] if k else "", ann[k + 1][j] if k + 1 < n_samples else ""
                big["sample_annotation"].add_text(
                    f'{{"token": "{ann[k][j]}", "sample_token": "{sample_tokens[k]}", '
                    f'"instance_token": "{inst_tokens[j]}", "visibility_token": "{int(levels[j])}", '
                    f'{obj["json"]}, "prev": "{prev}", "next": "{nxt}", "num_lidar_pts": 10, "num_radar_pts": 0}}')
        small["scene"].append({"token": scene_token, "log_token": logs[si % LOGS]["token"], "nbr_samples": n_samples,
                               "first_sample_token": sample_tokens[0], "last_sample_token": sample_tokens[-1],
                               "name": name, "description": "trainval-sized tables (no images rendered)"})
        if verbose and (si + 1) % 50 == 0:
            print(f"  {si + 1}/{len(names)} scenes, {time.time() - start:.0f} s", flush=True)
    counts = {}
    for name, writer in big.items():
        writer.close()
        counts[name] = writer.n
    for name in TABLE_NAMES:
        if name not in big:
            (table_dir / f"{name}.json").write_text(json.dumps(small[name]))
            counts[name] = len(small[name])
    (out / "trainval_tables.json").write_text(json.dumps(
        {"scale": scale, "seed": seed, "version": version, "seconds": round(time.time() - start, 1),
         "counts": counts, "train_scenes": n_train, "val_scenes": n_val}, indent=1))
    return counts
