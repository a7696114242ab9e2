"""The schema of ``configs/pretrain.yaml`` (Hydra structured config): every key and its type, so
that Hydra refuses a misspelt key or a wrong type before any work. Values live in the yamls
(``configs/pretrain.yaml``, ``upsampler/jafar.yaml``, ``data/``, ``experiment/pretrain/``);
``jafar.train.run.check_config`` checks what a type cannot say (ranges)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig

from .. import runs

ROOT = "pretrain"


@dataclass
class JafarUpsampler:
    """``upsampler/jafar.yaml``: the upsampler pretraining trains (its width comes from the backbone)."""
    _target_: str = MISSING
    name: str = MISSING
    checkpoint: Optional[str] = MISSING  # start from these weights (file or release name); null: random init
    qk_dim: int = MISSING
    num_heads: int = MISSING
    kernel_size: int = MISSING
    key_mode: str = MISSING  # sft | concat | linear | none (jafar.upsamplers.jafar.KEY_MODES; paper Table 5)
    rope: bool = MISSING  # the 2-D RoPE (paper Table 11)
    attention: str = MISSING
    memory_budget_mb: int = MISSING
    encoders: str = MISSING


@dataclass
class ImageData:
    """``data/imagefolder.yaml``, ``data/demo.yaml``."""
    root: str = MISSING
    val_root: Optional[str] = MISSING
    val_images: int = MISSING
    batch_size: int = MISSING
    num_workers: int = MISSING
    pin_memory: bool = MISSING
    random_crop: Optional[List[float]] = MISSING
    prepare: Optional[str] = MISSING


@dataclass
class Recipe:
    image_size: int = MISSING
    guidance_scale: float = MISSING
    lr_scale: List[float] = MISSING
    consistency_weight: float = MISSING
    consistency: str = MISSING  # official | pixel (jafar.train.module.CONSISTENCY)
    blur_prob: float = MISSING
    blur_kernel: int = MISSING
    blur_sigma: float = MISSING
    noise_prob: float = MISSING
    noise_std: float = MISSING


@dataclass
class Loss:
    cos_weight: float = MISSING
    mse: str = MISSING
    mse_weight: float = MISSING


@dataclass
class Validation:
    ratios: List[int] = MISSING


@dataclass
class PretrainConfig:
    name: str = MISSING
    seed: int = MISSING
    resume: Optional[str] = MISSING
    checkpoint_every: int = MISSING
    backbone: Dict[str, Any] = field(default_factory=dict)
    upsampler: JafarUpsampler = field(default_factory=JafarUpsampler)
    data: ImageData = field(default_factory=ImageData)
    recipe: Recipe = field(default_factory=Recipe)
    loss: Loss = field(default_factory=Loss)
    #: ``_target_`` (a torch.optim class), ``_partial_: true``, ``lr`` and the class's own arguments
    optimizer: Dict[str, Any] = field(default_factory=dict)
    validation: Validation = field(default_factory=Validation)
    trainer: Dict[str, Any] = field(default_factory=dict)  # lightning.Trainer arguments (names checked by the run)


def register_configs() -> None:
    """The schema and the pretraining experiments (``experiment=demo``, ``official``), for Hydra."""
    runs.register_configs(ROOT, PretrainConfig)


def compose(*overrides: str) -> DictConfig:
    """``configs/pretrain.yaml`` with command-line ``overrides``, as ``tools/pretrain_jafar.py`` sees it."""
    register_configs()
    return runs.compose(ROOT, overrides)
