"""nuScenes key frames as BeV vehicle-segmentation samples, through nuscenes-devkit.

:class:`NuScenesBev` reads the devkit tables once, in its constructor, and keeps per sample
only what ``__getitem__`` needs (image paths, intrinsics, exact camera -> reference-ego
transforms, vehicle boxes in the reference ego frame), as numpy arrays. The devkit object is
dropped afterwards, so the dataset is small, picklable and cheap to send to DataLoader workers.

The reference ego frame of a sample is the ego pose of its ``LIDAR_TOP`` sample_data; each
camera's ``cam2ego`` is ``inv(ego_ref2global) @ ego_cam2global @ cam2ego_calibrated``, with the
ego pose at the camera's own timestamp (the ego moves 0.1-0.4 m during the camera sweep).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .. import geometry as G
from .tables import CAMERAS, TABLE_NAMES
from .targets import RASTERS, bev_targets

#: ``data.bev_augment``: the random BeV-frame motions of training (:meth:`NuScenesBev.bev_motion`)
BEV_AUGMENTS = ("none", "pointbev", "simplebev")

#: ``data.image_augment``: the camera image pipelines (:meth:`NuScenesBev.image_affines`)
IMAGE_AUGMENTS = ("pointbev", "bottom_crop", "simplebev")

#: a split name that selects every scene in the tables (not an official split)
ALL_SCENES = "all"


def _version_folders(root: Path) -> List[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / "sample.json").is_file())


def _official_splits() -> Dict[str, List[str]]:
    from nuscenes.utils.splits import create_splits_scenes

    return create_splits_scenes(verbose=False)


def _short(names: Sequence[str], n: int = 12) -> str:
    names = list(names)
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def check_tables(dataroot, version: str) -> None:
    """Refuse, in one sentence, a dataroot or version without the thirteen devkit tables."""
    dataroot = Path(dataroot).expanduser()
    if not dataroot.is_dir():
        raise FileNotFoundError(f"nuScenes dataroot {str(dataroot)!r} does not exist "
                                "(expected the folder that holds samples/ and the version folders).")
    if not all((dataroot / version / f"{t}.json").is_file() for t in TABLE_NAMES):
        found = _version_folders(dataroot)
        raise FileNotFoundError(
            f"nuScenes version {version!r} has no complete tables under {str(dataroot)!r} "
            f"(expected {version}/sample.json and the other devkit tables); versions found there: "
            f"{found or 'none'}.")


def load_tables(dataroot, version: str, checked: bool = False):
    """The devkit's ``nuscenes.NuScenes`` of ``version`` (after :func:`check_tables` unless
    ``checked``). Load it once per process and hand it to every :class:`NuScenesBev` built from it
    (``nusc=``): ``bev.run`` builds the training and validation sets from one load (each data
    set keeps only its compact per-sample arrays; the tables are dropped once both are built)."""
    from nuscenes.nuscenes import NuScenes

    dataroot = Path(dataroot).expanduser()
    if not checked:
        check_tables(dataroot, version)
    try:
        return NuScenes(version=str(version), dataroot=str(dataroot), verbose=False)
    except json.JSONDecodeError:
        raise ValueError(_bad_table_sentence(dataroot, version)) from None


def _bad_table_sentence(dataroot: Path, version: str) -> str:
    """Names the devkit table that is not valid JSON (looked for only after the devkit failed)."""
    for name in TABLE_NAMES:
        path = dataroot / version / f"{name}.json"
        try:
            json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            why = f"{err.msg} at line {err.lineno}" if isinstance(err, json.JSONDecodeError) else "not UTF-8"
            return (f"nuScenes table {str(path)} is not valid JSON ({why}), likely truncated: restore it "
                    "from the nuScenes archive.")
    return f"a nuScenes table under {str(dataroot / version)} is not valid JSON."


def check_label_options(raster: str, bev_augment: str, bev_translation: Sequence[float], bev_yaw_deg: float,
                        prefix: str = "", image_augment: str = "pointbev", scale_range: Sequence[float] = (0.294, 0.308),
                        crop_up_pct: float = 0.83, resize_lim: Sequence[float] = (0.8, 1.2)) -> None:
    """Refuse, in one sentence, a label rule, image pipeline (or its ranges) or BeV augmentation
    :class:`NuScenesBev` does not know (``prefix``: how the caller names the keys, e.g. ``"data."``)."""
    if str(raster) not in RASTERS:
        raise ValueError(f"{prefix}raster must be one of {list(RASTERS)}, got {raster!r}.")
    if str(image_augment) not in IMAGE_AUGMENTS:
        raise ValueError(f"{prefix}image_augment must be one of {list(IMAGE_AUGMENTS)}, got {image_augment!r}.")
    for name, lo_hi in (("scale_range", scale_range), ("resize_lim", resize_lim)):
        lo_hi = [float(v) for v in lo_hi]
        if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1]:
            raise ValueError(f"{prefix}{name} must be a range [low, high] with 0 < low <= high, got {lo_hi}.")
    if not 0 < float(crop_up_pct) <= 1:
        raise ValueError(f"{prefix}crop_up_pct must be the kept fraction of the image height in (0, 1], "
                         f"got {crop_up_pct}.")
    if str(bev_augment) not in BEV_AUGMENTS:
        raise ValueError(f"{prefix}bev_augment must be one of {list(BEV_AUGMENTS)}, got {bev_augment!r}.")
    trans = [float(v) for v in bev_translation]
    if len(trans) != 3 or min(trans) < 0 or not float(bev_yaw_deg) >= 0:
        raise ValueError(f"{prefix}bev_translation must be 3 ranges (x, y, z) >= 0 in metres and {prefix}bev_yaw_deg "
                         f"a range >= 0 in degrees, got {trans} and {bev_yaw_deg}.")


class NuScenesBev(torch.utils.data.Dataset):
    """nuScenes key frames for BeV vehicle segmentation.

    Each item is a dict (``torch.utils.data.default_collate`` batches it):

    * ``images`` float32 ``(N, 3, H, W)``, RGB in [0, 1]; ``intrinsics`` float32 ``(N, 3, 3)`` in
      the pixel frame of ``images``; ``cam2ego`` float32 ``(N, 4, 4)``, camera -> reference ego;
    * ``seg``, ``visibility``, ``centerness``, ``offset``: :func:`bev.data.targets.bev_targets` of
      the sample's ``vehicle.*`` boxes (every visibility level; ``min_visibility`` is kept as an
      attribute for :func:`bev.data.targets.visibility_mask`, the cells the loss and IoU count),
      rasterised by ``raster``, in the BeV frame of the sample (the reference ego frame, or the
      randomly moved one of ``bev_augment``), and ``valid_centerness`` (the cells PointBeV's
      centerness loss counts at ``min_visibility``);
    * ``token``: the sample token.

    Args:
        dataroot: the nuScenes folder (holding ``samples/`` and the version folders).
        version: the folder under ``dataroot`` holding the tables (``v1.0-trainval``, ``v1.0-mini``...).
        split: an official split of ``nuscenes.utils.splits.create_splits_scenes`` (for a
            ``*-mini`` version, ``train``/``val`` mean ``mini_train``/``mini_val``), ``"all"`` for
            every scene in the tables, or a key of the ``scenes`` JSON file.
        scenes: an explicit list of scene names (overrides ``split``), or the path of a JSON file
            ``{split_name: [scene names]}`` from which ``split`` is picked.
        cameras: camera channels, in the order of the outputs.
        grid: a :class:`bev.geometry.BevGrid` or a dict of its fields.
        min_visibility: the visibility level below which boxes are ignored by the loss and IoU.
        image_size: ``(H, W)`` of the returned images (default 224 x 476, the paper's input
            without upsampler, a multiple of the ViT's 14-pixel patch).
        image_augment: the camera image pipeline (:meth:`image_affines`): ``"pointbev"`` (PointBeV's,
            :func:`bev.geometry.pointbev_image_affine`: a random resize in ``scale_range``, the sky
            crop ``crop_up_pct``, a zoom about the centre, a rotation), ``"bottom_crop"`` (a fixed
            ``resize_scale``, the bottom rows kept, a random horizontal crop position, a zoom
            anchored at the bottom edge, a rotation: :func:`bev.geometry.image_affine`) or
            ``"simplebev"`` (SimpleBEV's: the whole image resized to ``image_size`` times a random
            factor in ``resize_lim``, a randomly shifted centre crop:
            :func:`bev.geometry.simplebev_image_affine`). Validation takes each pipeline's fixed
            setting.
        scale_range: ``"pointbev"``'s resize factor of the raw images, uniform in the range while
            augmenting, its mean otherwise (github valeoai/PointBeV ``configs/data/augs/
            scale_0_3.yaml`` ``scale`` = [0.294, 0.308]).
        crop_up_pct: ``"pointbev"``'s fraction of the resized height kept below the sky crop (same
            file: 0.83).
        resize_lim: ``"simplebev"``'s range of the random resize (github aharley/simple_bev
            ``train_nuscenes.py``: [0.8, 1.2]; its crop shift is ``int(H (1 - resize_lim[0]))``).
        resize_scale: ``"bottom_crop"``'s resize factor of the raw images; None means ``W / W_raw``
            (476 / 1600).
        augment: draw the pipeline's random parts (off: its validation setting).
        zoom: the range of the random zoom (github valeoai/PointBeV,
            ``configs/data/augs/scale_0_3.yaml`` ``zoom_lim``; ``"pointbev"`` and ``"bottom_crop"``).
        rotation_deg: the range of the random in-plane rotation in degrees (same file, ``rot_lim``).
        seed: augmentation draws come from ``np.random.default_rng([seed, epoch, index])``, so a
            sample's augmentation depends only on (seed, epoch, index), in any worker. Call
            :meth:`set_epoch` each epoch (with ``persistent_workers=True`` the workers keep the
            epoch they were started with).
        sigma: the centerness Gaussian's standard deviation in cells.
        raster: the label rule (:func:`bev.data.targets.bev_targets`): ``"pointbev"`` (the
            default), PointBeV's labels exactly: its lattice, rounding, fill and overlap rule, from
            the boxes' bottom corners in PointBeV's yaw-only ego frame
            (:func:`bev.geometry.yaw_only_pose` of the LiDAR ego pose; the cameras' ``cam2ego`` are
            given in that frame too); ``"polygon"``, the same fill on the cell-centre lattice
            (labels aligned with the features) in the full ego frame; or ``"center"``, the cells
            whose centre lies inside the footprint.
        bev_augment: the random motion of the BeV frame while augmenting (``augment=True``; off
            otherwise, so off at validation), :meth:`bev_motion`: ``"none"``, ``"pointbev"``
            (a random translation and yaw of the BeV frame) or ``"simplebev"`` (SimpleBEV's
            random reference camera and flips). The labels are built in the moved frame and every
            ``cam2ego`` is moved with it, so the task stays consistent.
        bev_translation: PointBeV's translation range ``(x, y, z)`` in metres: each component
            uniform in ``[-r, r]`` (github valeoai/PointBeV ``configs/data/nuscenes.yaml``
            ``coeffs.bev_aug.trans_rot[:3]`` = 30, 20, 0).
        bev_yaw_deg: PointBeV's yaw range in degrees, uniform in ``[-r, r]``
            (``trans_rot[3]`` = 20; its pitch and roll ranges are 0).
        nusc: an already loaded ``nuscenes.NuScenes`` of ``version`` to read instead of loading it.
    """

    def __init__(self, dataroot: Union[str, os.PathLike] = "data/nuscenes", version: str = "v1.0-trainval",
                 split: str = "train", scenes: Union[None, str, os.PathLike, Sequence[str]] = None,
                 cameras: Sequence[str] = CAMERAS, grid: Union[G.BevGrid, dict, None] = None,
                 min_visibility: int = 2, image_size: Sequence[int] = (224, 476),
                 resize_scale: Optional[float] = None, augment: bool = False,
                 zoom: Sequence[float] = (0.95, 1.05), rotation_deg: Sequence[float] = (-2.5, 2.5),
                 image_augment: str = "pointbev", scale_range: Sequence[float] = (0.294, 0.308),
                 crop_up_pct: float = 0.83, resize_lim: Sequence[float] = (0.8, 1.2),
                 seed: int = 0, sigma: float = 3.0, raster: str = "pointbev", bev_augment: str = "none",
                 bev_translation: Sequence[float] = (30.0, 20.0, 0.0), bev_yaw_deg: float = 20.0, nusc=None):
        self.dataroot = Path(dataroot).expanduser()
        self.version = str(version)
        self.cameras = tuple(cameras)
        self.grid = self._grid(grid)
        self.min_visibility = int(min_visibility)
        self.image_size = tuple(int(v) for v in image_size)
        self.resize_scale = None if resize_scale is None else float(resize_scale)
        self.augment = bool(augment)
        self.zoom = tuple(float(v) for v in zoom)
        self.rotation_deg = tuple(float(v) for v in rotation_deg)
        self.image_augment = str(image_augment)
        self.scale_range = tuple(float(v) for v in scale_range)
        self.crop_up_pct = float(crop_up_pct)
        self.resize_lim = tuple(float(v) for v in resize_lim)
        self.seed = int(seed)
        self.sigma = float(sigma)
        self.raster = str(raster)
        self.bev_augment = str(bev_augment)
        self.bev_translation = tuple(float(v) for v in bev_translation)
        self.bev_yaw_deg = float(bev_yaw_deg)
        self.epoch = 0
        self._check_arguments()

        # files and split, before the devkit (whose asserts say little)
        if not self.dataroot.is_dir():
            raise FileNotFoundError(f"nuScenes dataroot {str(self.dataroot)!r} does not exist "
                                    "(expected the folder that holds samples/ and the version folders).")
        if nusc is None:
            check_tables(self.dataroot, self.version)
        self.split, wanted = self._wanted_scenes(split, scenes)

        if nusc is None:
            nusc = load_tables(self.dataroot, self.version, checked=True)
        present = {s["name"]: s for s in nusc.scene}
        if wanted is None:
            wanted = sorted(present)
        self.scenes = [name for name in wanted if name in present]
        self.missing_scenes = [name for name in wanted if name not in present]
        if not self.scenes:
            raise ValueError(
                f"no scene of split {self.split!r} is in the {self.version} tables under {str(self.dataroot)!r}: "
                f"looked for {_short(wanted)}; the tables hold {_short(sorted(present))}.")
        self._read(nusc, [present[name] for name in self.scenes])
        self._check_files()

    def _check_files(self) -> None:
        """Every camera file of every sample exists (one stat per file), before any training: 0.004 s
        for the demo's 300 x 6 files, 0.5 s for 34,149 x 6 (a trainval-sized list, warm cache)."""
        missing = [(i, rel) for i, paths in enumerate(self._paths) for rel in paths
                   if not os.path.isfile(self.dataroot / rel)]
        if missing:
            i, rel = missing[0]
            raise FileNotFoundError(
                f"camera image {str(self.dataroot / rel)} of sample {self.tokens[i]} does not exist, and "
                f"{len(missing)} of the {sum(map(len, self._paths))} camera files of split {self.split!r} are "
                f"missing (the {self.version} tables name them; are the samples/ blobs unpacked?).")

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _grid(grid) -> G.BevGrid:
        if grid is None:
            return G.BevGrid()
        if isinstance(grid, G.BevGrid):
            return grid
        try:
            fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in dict(grid).items()}
            return G.BevGrid(**fields)
        except TypeError as err:
            raise ValueError(f"grid must be a BevGrid or a dict of its fields "
                             f"(x_bounds, y_bounds, z_bounds, resolution, z_bins), got {grid!r}.") from err

    def _check_arguments(self):
        unknown = [c for c in self.cameras if c not in CAMERAS]
        if not self.cameras or unknown or len(set(self.cameras)) != len(self.cameras):
            raise ValueError(f"cameras must be distinct names among {list(CAMERAS)}, got {list(self.cameras)}.")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ValueError(f"image_size must be (H, W) with positive sides, got {self.image_size}.")
        if self.resize_scale is not None and not self.resize_scale > 0:
            raise ValueError(f"resize_scale must be > 0 or None, got {self.resize_scale}.")
        if len(self.zoom) != 2 or not 0 < self.zoom[0] <= self.zoom[1]:
            raise ValueError(f"zoom must be a range (low, high) with 0 < low <= high, got {self.zoom}.")
        if len(self.rotation_deg) != 2 or not self.rotation_deg[0] <= self.rotation_deg[1]:
            raise ValueError(f"rotation_deg must be a range (low, high) with low <= high, got {self.rotation_deg}.")
        if self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed}.")
        if not 1 <= self.min_visibility <= 4:
            raise ValueError(f"min_visibility must be a nuScenes visibility level 1..4, got {self.min_visibility}.")
        check_label_options(self.raster, self.bev_augment, self.bev_translation, self.bev_yaw_deg,
                            image_augment=self.image_augment, scale_range=self.scale_range,
                            crop_up_pct=self.crop_up_pct, resize_lim=self.resize_lim)

    @classmethod
    def check_split(cls, version: str, split: str, scenes=None) -> None:
        """Refuse a bad ``split`` / ``scenes`` in one sentence without loading the tables (the
        constructor's own check, for callers that load the tables once for several sets)."""
        probe = cls.__new__(cls)
        probe.version = str(version)
        probe._wanted_scenes(split, scenes)

    def _wanted_scenes(self, split: str, scenes) -> Tuple[str, Optional[List[str]]]:
        """(split name, scene names or None for every scene in the tables)."""
        split = str(split)
        if scenes is not None and not isinstance(scenes, (str, os.PathLike)):
            names = [str(s) for s in scenes]
            if not names:
                raise ValueError("scenes is an empty list; give scene names (e.g. ['scene-0061']) or None.")
            return split, names
        if scenes is not None:
            path = Path(scenes).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"scenes file {str(path)!r} does not exist "
                                        "(expected a JSON file {split_name: [scene names]}).")
            table = json.loads(path.read_text())
            if not isinstance(table, dict) or split not in table:
                keys = sorted(table) if isinstance(table, dict) else "not a JSON object"
                raise ValueError(f"split {split!r} is not in the scenes file {str(path)!r}; its splits: {keys}.")
            return split, [str(s) for s in table[split]]
        if split == ALL_SCENES:
            return split, None
        official = _official_splits()
        if self.version.endswith("mini") and split in ("train", "val"):
            split = f"mini_{split}"
        if split not in official:
            raise ValueError(f"unknown nuScenes split {split!r}; valid splits: {sorted(official) + [ALL_SCENES]} "
                             "(or give scenes=[names] or a JSON file of splits).")
        return split, list(official[split])

    def _read(self, nusc, scenes: List[dict]):
        """Per sample: token, image paths, raw sizes, intrinsics, cam2ego and the boxes (and their
        bottom corners) in the reference frame: the LiDAR ego pose, with its pitch and roll dropped
        under ``raster="pointbev"`` as PointBeV does (:func:`bev.geometry.yaw_only_pose`)."""
        self.tokens: List[str] = []
        self._paths: List[Tuple[str, ...]] = []
        sizes, intrinsics, cam2ego, boxes, corners, starts = [], [], [], [], [], [0]
        local = G.box_corners((0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 0.0)[[2, 3, 7, 6]]  # Box.bottom_corners(), unit box
        for scene in scenes:
            token = scene["first_sample_token"]
            while token:
                sample = nusc.get("sample", token)
                lidar = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
                ref = nusc.get("ego_pose", lidar["ego_pose_token"])
                if self.raster == "pointbev":
                    global2ref = G.invert_rigid(G.yaw_only_pose(ref["translation"], ref["rotation"]))
                else:
                    global2ref = G.transform_matrix(ref["translation"], ref["rotation"], inverse=True)
                paths = []
                for channel in self.cameras:
                    if channel not in sample["data"]:
                        raise ValueError(f"sample {token} of {scene['name']} has no {channel} image.")
                    sd = nusc.get("sample_data", sample["data"][channel])
                    cs = nusc.get("calibrated_sensor", sd["calibrated_sensor_token"])
                    pose = nusc.get("ego_pose", sd["ego_pose_token"])
                    cam2ego.append(global2ref @ G.transform_matrix(pose["translation"], pose["rotation"])
                                   @ G.transform_matrix(cs["translation"], cs["rotation"]))
                    intrinsics.append(np.asarray(cs["camera_intrinsic"], dtype=np.float64))
                    sizes.append((sd["height"], sd["width"]))
                    paths.append(sd["filename"])
                for ann_token in sample["anns"]:
                    ann = nusc.get("sample_annotation", ann_token)
                    if not ann["category_name"].startswith("vehicle."):
                        continue
                    try:
                        level = int(ann["visibility_token"])
                    except (TypeError, ValueError):
                        raise ValueError(f"annotation {ann_token} has visibility_token {ann['visibility_token']!r}, "
                                         "expected a level '1'..'4'.") from None
                    T = global2ref @ G.transform_matrix(ann["translation"], ann["rotation"])
                    w, l, h = ann["size"]
                    boxes.append([T[0, 3], T[1, 3], T[2, 3], w, l, h, G.rotation_yaw(T[:3, :3]), level])
                    if self.raster == "pointbev":  # the devkit's Box(...).bottom_corners() moved to the frame
                        corners.append(((local * np.array([l, w, h])) @ T[:3, :3].T + T[:3, 3])[:, :2])
                starts.append(len(boxes))
                self.tokens.append(token)
                self._paths.append(tuple(paths))
                token = sample["next"]
        n, c = len(self.tokens), len(self.cameras)
        self._sizes = np.asarray(sizes, dtype=np.int64).reshape(n, c, 2)
        self._intrinsics = np.stack(intrinsics).reshape(n, c, 3, 3)
        self._cam2ego = np.stack(cam2ego).reshape(n, c, 4, 4)
        self._boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 8)
        # 64 bytes per box, kept only for the rule that reads them
        self._corners = np.asarray(corners, dtype=np.float64).reshape(-1, 4, 2) if self.raster == "pointbev" else None
        self._box_start = np.asarray(starts, dtype=np.int64)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.tokens)

    def set_epoch(self, epoch: int):
        """Select the augmentation draws of ``epoch``."""
        self.epoch = int(epoch)

    def boxes(self, index: int) -> np.ndarray:
        """``(M, 8)`` vehicle boxes of sample ``index`` in its reference ego frame:
        ``[x, y, z, w, l, h, yaw, visibility level]`` (metres, radians)."""
        return self._boxes[self._box_start[index]:self._box_start[index + 1]].copy()

    def image_affines(self, index: int, seed: Optional[int] = None) -> np.ndarray:
        """``(N, 3, 3)`` pixel affines raw image -> returned image of sample ``index`` under
        ``image_augment`` (when augmenting: the draws of ``seed`` if given, else this epoch's; one
        draw per camera, as PointBeV and SimpleBEV draw them)."""
        size = self.image_size
        if not self.augment:
            rng = None
        elif seed is not None:
            rng = np.random.default_rng([int(seed), int(index)])
        else:
            rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        out = []
        for raw in self._sizes[index]:
            raw = (int(raw[0]), int(raw[1]))
            if self.image_augment == "pointbev":
                if rng is None:
                    out.append(G.pointbev_image_affine(raw, size, float(np.mean(self.scale_range)), self.crop_up_pct))
                else:
                    out.append(G.pointbev_image_affine(raw, size, rng.uniform(*self.scale_range), self.crop_up_pct,
                                                       zoom=rng.uniform(*self.zoom),
                                                       rotation_deg=rng.uniform(*self.rotation_deg)))
            elif self.image_augment == "simplebev":
                if rng is None:
                    out.append(G.simplebev_image_affine(raw, size))
                else:
                    reach = int(size[0] * (1 - self.resize_lim[0]))
                    resize = rng.uniform(*self.resize_lim)
                    shift = (int(rng.uniform(-reach, reach)), int(rng.uniform(-reach, reach)))
                    out.append(G.simplebev_image_affine(raw, size, resize, shift))
            else:  # bottom_crop
                scale = self.resize_scale if self.resize_scale is not None else size[1] / raw[1]
                if rng is None:
                    out.append(G.image_affine(raw, size, scale))
                else:
                    out.append(G.image_affine(raw, size, scale, zoom=rng.uniform(*self.zoom),
                                              rotation_deg=rng.uniform(*self.rotation_deg), crop_x_frac=rng.uniform()))
        return np.stack(out)

    def bev_motion(self, index: int, seed: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """``(M, flips)``: the BeV frame of sample ``index`` as a ``4 x 4`` transform BeV frame ->
        reference ego (identity when not augmenting, or with ``bev_augment="none"``), and the
        ``(N,)`` booleans of the cameras whose image is flipped left-right. Drawn from
        ``(seed, index)`` if ``seed`` is given, else from ``(self.seed, epoch, index)``, on a stream
        of its own (the image draws of :meth:`image_affines` stay the same).

        * ``"pointbev"``: a translation uniform in ``[-r, r]`` per axis (``bev_translation``) and
          a yaw uniform in ``[-r, r]`` (``bev_yaw_deg``), ``M = [[R_z(yaw), t], [0, 1]]``: PointBeV's
          ``get_random_ref_matrix`` (``pointbev/utils/geom.py``), whose matrix maps the query
          (BeV) frame to the ego frame (``pointbev/models/projector/common.py``
          ``from_spatial_to_seqaug`` applies it to the voxels; the labels get its inverse,
          ``nuscenes_common.py`` ``_prepare_points_to_gtimg``).
        * ``"simplebev"``: SimpleBEV's random reference camera (github aharley/simple_bev,
          ``nuscenesdataset.py`` ``__getitem__``: one of the cameras but the first,
          ``randint(1, len(cams))``; at validation ours stays the ego frame) as a level frame: the
          camera's ground position and the heading of its optical axis (our heights stay the
          ego's, the grid's ``z_bounds`` being ego heights); then SimpleBEV's flips
          (``nets/segnet.py`` ``rand_flip``): the BeV mirrored across each of its two axes with
          probability 1/2 each (about the grid's centre), and each camera image flipped
          left-right with probability 1/2. SimpleBEV flips the lifted features and the image
          features inside the network and flips them back; we flip the data instead (the mirrored
          frame and the flipped image's intrinsics), which sets the same problem to every
          head.
        """
        n = len(self.cameras)
        flips = np.zeros(n, dtype=bool)
        if not self.augment or self.bev_augment == "none":
            return np.eye(4), flips
        if seed is not None:
            rng = np.random.default_rng([int(seed), int(index), 1])
        else:
            rng = np.random.default_rng([self.seed, self.epoch, int(index), 1])
        if self.bev_augment == "pointbev":
            t = (rng.random(3) * 2 - 1) * np.asarray(self.bev_translation)
            yaw = math.radians((rng.random() * 2 - 1) * self.bev_yaw_deg)
            return G.transform_matrix(t, G.yaw_to_quaternion(yaw)), flips
        # simplebev
        ref = int(rng.integers(1, n)) if n > 1 else 0
        cam2ego = self._cam2ego[index, ref]
        axis = cam2ego[:3, 2]  # the optical axis in the ego frame
        pose = G.transform_matrix((cam2ego[0, 3], cam2ego[1, 3], 0.0),
                                  G.yaw_to_quaternion(math.atan2(axis[1], axis[0])))
        mirror = np.where(rng.random(2) < 0.5, -1.0, 1.0)
        centre = np.array([sum(self.grid.x_bounds) / 2, sum(self.grid.y_bounds) / 2])
        F = np.eye(4)
        F[0, 0], F[1, 1] = mirror
        F[:2, 3] = centre - mirror * centre  # the mirror about the grid's centre
        flips = rng.random(n) < 0.5
        return pose @ F, flips

    def _moved_boxes(self, index: int, motion: np.ndarray) -> list:
        """The boxes of sample ``index`` as ``bev_targets`` takes them, in the frame ``motion``
        (BeV frame -> reference ego) maps to the ego: centres by its inverse, headings by its
        rotation part (a mirror turns a footprint into the mirrored footprint)."""
        inv = np.linalg.inv(motion)
        out = []
        for b in self.boxes(index):
            x, y = (inv @ np.array([b[0], b[1], b[2], 1.0]))[:2]
            h = inv[:3, :3] @ np.array([math.cos(b[6]), math.sin(b[6]), 0.0])
            out.append(((x, y), (b[3], b[4]), math.atan2(h[1], h[0]), int(b[7])))
        return out

    def corners(self, index: int, motion: Optional[np.ndarray] = None) -> np.ndarray:
        """``(M, 4, 2)`` bottom corners ``(x, y)`` of the boxes of sample ``index`` (the devkit's
        ``Box.bottom_corners()`` order) in the reference frame or, given ``motion``, in the frame it
        maps to the reference (its inverse applied; PointBeV ``_prepare_points_to_gtimg``). Kept
        under ``raster="pointbev"`` only."""
        if self._corners is None:
            raise ValueError(f"the boxes' corners are kept under raster='pointbev' only, this data set has "
                             f"raster={self.raster!r}.")
        c = self._corners[self._box_start[index]:self._box_start[index + 1]]
        if motion is None:
            return c.copy()
        inv = np.linalg.inv(np.asarray(motion, dtype=np.float64))
        return c @ inv[:2, :2].T + inv[:2, 3]

    def targets(self, index: int, motion: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
        """The BeV targets of sample ``index`` alone (no image is read): ``seg``, ``visibility``,
        ``centerness``, ``offset``, ``valid_centerness`` as numpy arrays, in the reference frame
        or, given ``motion`` (:meth:`bev_motion`), in the moved BeV frame."""
        motion = np.eye(4) if motion is None else np.asarray(motion, dtype=np.float64)
        corners = self.corners(index, motion) if self.raster == "pointbev" else None
        return bev_targets(self._moved_boxes(index, motion), self.grid, self.sigma, raster=self.raster,
                           min_visibility=self.min_visibility, corners=corners)

    def __getitem__(self, index: int) -> Dict[str, Union[torch.Tensor, str]]:
        return self.get(index)

    def get(self, index: int, seed: Optional[int] = None) -> Dict[str, Union[torch.Tensor, str]]:
        """Sample ``index``; with ``seed``, the augmentation draws are a function of
        ``(seed, index)`` alone (the training loop passes a per-step seed, so a resumed run
        replays the same draws)."""
        from PIL import Image

        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for {len(self)} samples.")
        index = index % len(self)
        affines = self.image_affines(index, seed)
        motion, flips = self.bev_motion(index, seed)
        width = float(self.image_size[1])
        for k in np.flatnonzero(flips):  # a left-right flip of the returned image: u -> W - u
            affines[k] = np.array([[-1.0, 0.0, width], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ affines[k]
        images = []
        for rel, A in zip(self._paths[index], affines):
            path = self.dataroot / rel
            if not path.is_file():
                raise FileNotFoundError(f"camera image {str(path)} of sample {self.tokens[index]} does not exist "
                                        f"(the {self.version} tables name it; are the samples/ blobs unpacked?).")
            try:
                with Image.open(path) as im:
                    warped = G.warp_image(im, A, self.image_size)
            except (OSError, SyntaxError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
                raise ValueError(f"camera image {str(path)} of sample {self.tokens[index]} cannot be decoded "
                                 f"({type(err).__name__}); replace the file from the nuScenes archive.") from None
            images.append(torch.from_numpy(np.asarray(warped, dtype=np.uint8).copy()).permute(2, 0, 1))
        targets = self.targets(index, motion)
        sample = {
            "images": torch.stack(images).float().div_(255.0),
            "intrinsics": torch.from_numpy(G.augment_intrinsics(self._intrinsics[index], affines)).float(),
            # camera -> BeV frame: the moved frame's inverse after camera -> reference ego
            "cam2ego": torch.from_numpy(np.linalg.inv(motion) @ self._cam2ego[index]).float(),
        }
        sample.update({k: torch.from_numpy(v) for k, v in targets.items()})
        sample["token"] = self.tokens[index]
        return sample

    def __repr__(self) -> str:
        return (f"NuScenesBev({len(self)} samples, {self.version} {self.split!r}, {len(self.scenes)} scenes, "
                f"{len(self.cameras)} cameras, images {self.image_size}, augment={self.augment}, "
                f"image_augment={self.image_augment!r}, raster={self.raster!r}, bev_augment={self.bev_augment!r})")
