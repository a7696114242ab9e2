"""The schema of ``configs/train_bev.yaml`` (Hydra structured config): every key and its type, so
that Hydra refuses a misspelt key or a wrong type before any work. Values live in the yamls
(``configs/train_bev.yaml``, ``model/``, ``data/``, ``upsampler/``, ``experiment/train_bev/``);
``bev.run.check_config`` checks what a type cannot say (ranges, choices)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig

from jafar import runs

ROOT = "train_bev"


@dataclass
class BevData:
    """``data/nuscenes.yaml``, ``data/synthetic.yaml``."""
    dataroot: str = MISSING
    version: str = MISSING
    train_split: str = MISSING
    val_split: str = MISSING
    scenes: Any = MISSING  # null, a list of scene names, {split: [names]}, or a JSON file
    cameras: List[str] = MISSING
    image_size: List[int] = MISSING
    image_augment: str = MISSING  # pointbev | bottom_crop | simplebev (bev.data.nuscenes.NuScenesBev.image_affines)
    augment: bool = MISSING
    scale_range: List[float] = MISSING
    crop_up_pct: float = MISSING
    zoom: List[float] = MISSING
    rotation_deg: List[float] = MISSING
    resize_lim: List[float] = MISSING
    resize_scale: Optional[float] = MISSING
    raster: str = MISSING  # pointbev | polygon | center (bev.data.targets.bev_targets)
    bev_augment: str = MISSING  # none | pointbev | simplebev (bev.data.nuscenes.NuScenesBev.bev_motion)
    bev_translation: List[float] = MISSING
    bev_yaw_deg: float = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    pin_memory: bool = MISSING
    cache_features: bool = MISSING
    prepare: Optional[Dict[str, Any]] = MISSING


@dataclass
class Grid:
    x_bounds: List[float] = MISSING
    y_bounds: List[float] = MISSING
    z_bounds: List[float] = MISSING
    resolution: float = MISSING
    z_bins: int = MISSING


@dataclass
class Encoder:
    output_scale: Optional[float] = MISSING
    output_size: Optional[List[int]] = MISSING
    guidance_size: Any = MISSING  # "output", null, or [H, W]
    freeze_upsampler: bool = MISSING
    cache_dir: Optional[str] = MISSING
    cache_dtype: str = MISSING  # float16 | float32 (as computed: exact)


@dataclass
class Loss:
    name: str = MISSING  # pointbev | simplebev (bev.losses.LOSSES)
    pos_weight: float = MISSING
    seg_scale: float = MISSING
    learned_weights: bool = MISSING


@dataclass
class BevConfig:
    name: str = MISSING
    seed: int = MISSING
    resume: Optional[str] = MISSING
    checkpoint_every: int = MISSING
    backbone: Dict[str, Any] = field(default_factory=dict)
    upsampler: Dict[str, Any] = field(default_factory=dict)
    model: Dict[str, Any] = field(default_factory=dict)  # the head's constructor arguments (model/<head>.yaml)
    data: BevData = field(default_factory=BevData)
    grid: Grid = field(default_factory=Grid)
    encoder: Encoder = field(default_factory=Encoder)
    min_visibility: int = MISSING
    loss: Loss = field(default_factory=Loss)
    #: ``_target_`` (a torch.optim class), ``_partial_: true``, ``lr`` and the class's own arguments
    optimizer: Dict[str, Any] = field(default_factory=dict)
    #: ``_target_`` (a torch.optim.lr_scheduler class), ``_partial_: true`` and its arguments; null: none
    scheduler: Optional[Dict[str, Any]] = None
    epochs: int = MISSING
    negative_control: Optional[str] = MISSING
    prior_baseline: bool = MISSING
    pictures: int = MISSING
    per_model: Dict[str, Any] = field(default_factory=dict)
    trainer: Dict[str, Any] = field(default_factory=dict)  # lightning.Trainer arguments (names checked by the run)


def register_configs() -> None:
    """The schema and the BeV experiments (``experiment=demo``), for Hydra."""
    runs.register_configs(ROOT, BevConfig)


def apply_per_model(cfg: DictConfig, overrides=()) -> DictConfig:
    """The experiment's settings for the chosen head (``per_model.<model.name>``) merged in, under
    the command line's ``overrides``."""
    return runs.apply_per_choice(cfg, "per_model", str(cfg.model.name), overrides)


def compose(*overrides: str) -> DictConfig:
    """``configs/train_bev.yaml`` with command-line ``overrides``, as ``tools/train_bev.py`` runs it."""
    register_configs()
    return apply_per_model(runs.compose(ROOT, overrides), overrides)
