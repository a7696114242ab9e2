"""Compose a pretraining run from a Hydra config: data, backbone, JAFAR, Lightning trainer.

Entry point: ``tools/pretrain_jafar.py`` (``configs/pretrain.yaml``).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Optional

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from ..upsamplers.jafar import save_checkpoint
from ..upsamplers import build_upsampler
from ..utils import atomic_path
from .data import ImageFiles, StepBatchSampler, find_images, make_loader, split_holdout, write_demo_photos
from .losses import CosineMSELoss
from .module import JafarPretraining

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed: a kill never leaves a
    truncated ``last.ckpt``."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


class PretrainData(L.LightningDataModule):
    """Training batches indexed by step (resumable), validation on held-out images."""

    def __init__(self, train_files, val_files, cfg: DictConfig, image_size: int, total_steps: int, seed: int):
        super().__init__()
        self.train_files, self.val_files = train_files, val_files
        self.cfg, self.image_size, self.total_steps, self.seed = cfg, int(image_size), int(total_steps), int(seed)

    def train_dataloader(self):
        crop = self.cfg.get("random_crop")
        data = ImageFiles(self.train_files, self.image_size, tuple(crop) if crop else None)
        trainer = self.trainer
        sampler = StepBatchSampler(len(data), self.cfg.batch_size, self.total_steps, self.seed,
                                   start_step=lambda: trainer.global_step,
                                   rank=trainer.global_rank, world_size=trainer.world_size)
        return make_loader(data, sampler, num_workers=self.cfg.num_workers, pin_memory=self.cfg.pin_memory)

    def val_dataloader(self):
        # every rank validates every held-out image: a few images, and DDP needs every rank to run
        # the same number of forward passes
        files = self.val_files
        return make_loader(ImageFiles(files, self.image_size), batch_size=self.cfg.batch_size,
                           num_workers=min(self.cfg.num_workers, len(files)), pin_memory=self.cfg.pin_memory)


def _write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def resolve_resume(resume, checkpoint_dir: Path) -> Optional[str]:
    if resume in (None, False, "none", "null"):
        return None
    if resume == "auto":
        last = checkpoint_dir / "last.ckpt"
        return str(last) if last.is_file() else None
    path = Path(str(resume))
    if not path.is_file():
        raise FileNotFoundError(f"resume={str(resume)!r} is not a checkpoint file (use resume=auto to continue "
                                f"from {checkpoint_dir / 'last.ckpt'} when it exists).")
    return str(path)


def check_config(cfg: DictConfig) -> None:
    """Refuse values that would fail (or silently misbehave) later, naming the key."""
    r = cfg.recipe
    lo, hi = (float(x) for x in r.lr_scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"recipe.lr_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(r.lr_scale)}.")
    if not 0 < float(r.guidance_scale) <= 4:
        raise ValueError(f"recipe.guidance_scale must be in (0, 4], got {r.guidance_scale}.")
    if int(r.image_size) < 16:
        raise ValueError(f"recipe.image_size must be at least 16 pixels, got {r.image_size}.")
    if int(cfg.data.batch_size) < 1:
        raise ValueError(f"data.batch_size must be a positive integer, got {cfg.data.batch_size}.")
    if not cfg.validation.ratios or any(int(x) < 1 for x in cfg.validation.ratios):
        raise ValueError(f"validation.ratios must be a list of positive integers, got {cfg.validation.ratios}.")
    if float(r.consistency_weight) < 0:
        raise ValueError(f"recipe.consistency_weight must be >= 0, got {r.consistency_weight}.")


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train, validate on the held-out images, export ``jafar.safetensors`` and ``results.json``."""
    run_dir = Path(run_dir)
    recipe, data_cfg = cfg.recipe, cfg.data
    total_steps = int(cfg.trainer.max_steps)
    if total_steps <= 0:
        raise ValueError(f"trainer.max_steps must be a positive number of steps, got {total_steps}.")

    # ---- inputs first: one clear sentence before any work
    check_config(cfg)
    if data_cfg.get("prepare") == "demo_photos":
        write_demo_photos(data_cfg.root)
    files = find_images(data_cfg.root)
    if data_cfg.get("val_root"):
        train_files, val_files = files, find_images(data_cfg.val_root)
    else:
        train_files, val_files = split_holdout(files, int(data_cfg.val_images), int(cfg.seed))
    ckpt_dir = run_dir / "checkpoints"
    ckpt_path = resolve_resume(cfg.resume, ckpt_dir)
    log.info("%d training images, %d validation images; run directory %s", len(train_files), len(val_files), run_dir)

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    backbone = instantiate(cfg.backbone)
    up_cfg = OmegaConf.to_container(cfg.upsampler, resolve=True)
    init = up_cfg.pop("init", None)
    upsampler = build_upsampler("jafar", feature_dim=backbone.embed_dim, checkpoint=init, **up_cfg)
    module = JafarPretraining(
        backbone, upsampler, CosineMSELoss(**cfg.loss), **cfg.optimizer,
        guidance_scale=recipe.guidance_scale, lr_scale=tuple(recipe.lr_scale),
        consistency_weight=recipe.consistency_weight, blur_prob=recipe.blur_prob, blur_kernel=recipe.blur_kernel,
        blur_sigma=recipe.blur_sigma, noise_prob=recipe.noise_prob, noise_std=recipe.noise_std,
        seed=int(cfg.seed), val_ratios=tuple(cfg.validation.ratios), picture_dir=str(run_dir / "pictures"))
    datamodule = PretrainData(train_files, val_files, data_cfg, recipe.image_size, total_steps, int(cfg.seed))

    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if val_files and trainer_kwargs.get("val_check_interval"):
        trainer_kwargs["val_check_interval"] = min(int(trainer_kwargs["val_check_interval"]), total_steps)
    if not val_files:
        trainer_kwargs["limit_val_batches"] = 0
    every = max(1, min(int(cfg.checkpoint_every), total_steps))
    checkpointing = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                                    every_n_train_steps=every, save_last=True, save_top_k=1,
                                    monitor="step", mode="max")
    loggers = [TensorBoardLogger(str(run_dir), name="tensorboard", version=""),
               CSVLogger(str(run_dir), name="csv", version="")]
    # use_distributed_sampler=False: StepBatchSampler and val_dataloader already give each rank its share
    trainer = L.Trainer(**trainer_kwargs, max_epochs=-1, callbacks=[checkpointing], logger=loggers,
                        plugins=[AtomicCheckpointIO()], default_root_dir=str(run_dir), use_distributed_sampler=False)
    with warnings.catch_warnings():
        # the training batches are a function of the step (StepBatchSampler), so resuming
        # mid-epoch is exact even though the DataLoader itself holds no state
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if val_files:
            trainer.validate(module, datamodule=datamodule, verbose=False)

    results = {**module.val_results, "step": trainer.global_step, "train_images": len(train_files),
               "val_images": len(val_files), "skipped_images": module.skipped}
    if trainer.is_global_zero:
        meta = {"backbone": str(cfg.backbone.name), "steps": str(trainer.global_step),
                "recipe": json.dumps(OmegaConf.to_container(recipe, resolve=True))}
        save_checkpoint(upsampler, run_dir / "jafar.safetensors", metadata=meta)
        _write_json(run_dir / "results.json", results)
        if module.skipped:
            log.warning("%d unreadable images were skipped: %s", len(module.skipped), ", ".join(module.skipped))
        log.info("results: %s", json.dumps({k: v for k, v in results.items() if k.startswith("x")}))
    return results
