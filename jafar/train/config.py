"""The schema of ``configs/pretrain.yaml`` (Hydra structured config): every key and its type, so
that Hydra refuses a misspelt key or a wrong type before any work. Values live in the yamls
(``configs/pretrain.yaml``, ``upsampler/jafar.yaml``, ``data/``, ``experiment/pretrain/``);
``jafar.train.run.check_config`` checks what a type cannot say (ranges)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from .. import runs

ROOT = "pretrain"
#: the OmegaConf resolver that names a run after its upsampler (``configs/pretrain.yaml``'s ``name``)
RUN_NAME_RESOLVER = "pretrain_run_name"


def run_name(base: str, upsampler: str) -> str:
    """``${pretrain_run_name:<base>,${upsampler.name}}``: ``base`` for JAFAR (its run names as they
    always were), ``<base>_<upsampler>`` for FeatUp and LiFT, so that runs of different upsamplers
    never share a run directory (Hydra places it from ``name`` before the run starts)."""
    return str(base) if upsampler == "jafar" else f"{base}_{upsampler}"


if not OmegaConf.has_resolver(RUN_NAME_RESOLVER):
    OmegaConf.register_new_resolver(RUN_NAME_RESOLVER, run_name)


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
class FeatUpObjective:
    """``featup:`` in ``configs/pretrain.yaml``: FeatUp's objective (``upsampler=featup``;
    :class:`jafar.train.objectives.FeatUpObjective`)."""
    n_jitters: int = MISSING
    max_pad: int = MISSING
    max_zoom: float = MISSING
    flips: bool = MISSING
    random_projection: Optional[int] = MISSING
    downsampler: str = MISSING  # attention | simple
    outlier_detection: bool = MISSING
    crf_weight: float = MISSING
    crf_samples: int = MISSING
    clip_steps: int = MISSING
    clip_norm: float = MISSING


@dataclass
class LiftObjective:
    """``lift:`` in ``configs/pretrain.yaml``: LiFT's objective (``upsampler=lift``;
    :class:`jafar.train.objectives.LiftObjective`)."""
    loss: str = MISSING  # cosine | l1 | l2
    color_jitter: float = MISSING


@dataclass
class PretrainConfig:
    name: str = MISSING
    seed: int = MISSING
    resume: Optional[str] = MISSING
    checkpoint_every: int = MISSING
    backbone: Dict[str, Any] = field(default_factory=dict)
    #: the upsampler group's node: jafar (its keys checked against :class:`JafarUpsampler` by the run),
    #: featup or lift (their own yamls)
    upsampler: Dict[str, Any] = field(default_factory=dict)
    data: ImageData = field(default_factory=ImageData)
    recipe: Recipe = field(default_factory=Recipe)
    loss: Loss = field(default_factory=Loss)
    #: ``_target_`` (a torch.optim class), ``_partial_: true``, ``lr`` and the class's own arguments
    optimizer: Dict[str, Any] = field(default_factory=dict)
    validation: Validation = field(default_factory=Validation)
    trainer: Dict[str, Any] = field(default_factory=dict)  # lightning.Trainer arguments (names checked by the run)
    featup: FeatUpObjective = field(default_factory=FeatUpObjective)
    lift: LiftObjective = field(default_factory=LiftObjective)
    #: settings of the config (whole keys) for one upsampler, merged over it when that upsampler is
    #: trained (jafar.runs.apply_per_choice): FeatUp's and LiFT's own recipes
    per_upsampler: Dict[str, Any] = field(default_factory=dict)


def register_configs() -> None:
    """The schema and the pretraining experiments (``experiment=demo``, ``official``, ...), for Hydra."""
    runs.register_configs(ROOT, PretrainConfig)


def compose(*overrides: str) -> DictConfig:
    """``configs/pretrain.yaml`` with command-line ``overrides``, as ``tools/pretrain_jafar.py`` sees it."""
    register_configs()
    return runs.compose(ROOT, overrides)
