"""Compose a BeV training run from a Hydra config (``configs/train_bev.yaml``; schema in
:mod:`bev.config`): data, frozen backbone + upsampler, BeV head, Lightning trainer; then the
prior-map baseline and ``results.json``. The trainer, checkpoints, resume, run identity and
seeding are the tools' shared ones (:mod:`jafar.runs`).

Entry point: ``tools/train_bev.py``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, default_collate

from jafar import runs
from jafar.utils import derive_seed
from jafar.train.data import StepBatchSampler

from .config import apply_per_model
from .geometry import BevGrid
from .losses import SimpleBevLoss
from .module import BevSegmentation, prior_baseline

log = logging.getLogger(__name__)

HEADS = ("simplebev", "pointbev", "bevformer")
#: keys that do not change a BeV run's result (besides :data:`jafar.runs.NOT_IDENTITY`): where the
#: data and the feature cache are, how the data are loaded
NOT_IDENTITY = ("data.dataroot", "data.num_workers", "data.pin_memory", "encoder.cache_dir")
#: lightning.Trainer arguments the run sets itself
TRAINER_RESERVED = ("max_epochs", "callbacks", "logger", "plugins", "default_root_dir", "use_distributed_sampler")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

class SeededSamples(Dataset):
    """Items ``(index, seed)`` from :class:`jafar.train.data.StepBatchSampler` -> the sample drawn
    with that seed (augmentation and the negative control are functions of it: a resumed run
    replays the same draws). Plain integer indices (validation) use ``seed`` and the index."""

    def __init__(self, dataset, seed: int = 0, shuffle_extrinsics: bool = False):
        self.dataset, self.seed, self.shuffle_extrinsics = dataset, int(seed), bool(shuffle_extrinsics)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, (tuple, list)) else (item, derive_seed(self.seed, item, 3))
        sample = self.dataset.get(int(index), seed=int(seed))
        if self.shuffle_extrinsics:
            sample = shuffle_extrinsics(sample, seed)
        return sample


def shuffle_extrinsics(sample: dict, seed: int) -> dict:
    """The negative control: every camera gets another camera's ``cam2ego`` (a random
    derangement drawn from ``seed``), so the images are lifted to the wrong places."""
    n = sample["cam2ego"].shape[0]
    gen = torch.Generator().manual_seed(derive_seed(int(seed), 5))
    perm = torch.arange(n)
    while n > 1 and (perm == torch.arange(n)).any():
        perm = torch.randperm(n, generator=gen)
    return {**sample, "cam2ego": sample["cam2ego"][perm]}


def collate(items, cache: bool = False):
    batch = default_collate(items)
    if cache:
        batch["cache_keys"] = list(batch["token"])
    return batch


def build_dataset(data_cfg: DictConfig, split: str, grid: BevGrid, augment: bool):
    from .data.nuscenes import NuScenesBev

    scenes = data_cfg.get("scenes")
    if scenes is not None and not isinstance(scenes, str):
        scenes = OmegaConf.to_container(scenes, resolve=True)
        if isinstance(scenes, dict):
            scenes = scenes[split]
    return NuScenesBev(
        dataroot=str(data_cfg.dataroot), version=str(data_cfg.version), split=split, scenes=scenes,
        cameras=list(data_cfg.cameras), grid=grid, image_size=tuple(data_cfg.image_size),
        resize_scale=data_cfg.get("resize_scale"), augment=augment,
        zoom=tuple(data_cfg.zoom), rotation_deg=tuple(data_cfg.rotation_deg))


def prepare_data(data_cfg: DictConfig) -> None:
    """Generate the synthetic nuScenes set when the data config asks for it (reused if present)."""
    prep = data_cfg.get("prepare")
    if not prep:
        return
    from .data.synthetic import generate

    kwargs = OmegaConf.to_container(prep, resolve=True)
    if kwargs.pop("kind", "synthetic") != "synthetic":
        raise ValueError(f"data.prepare.kind must be 'synthetic', got {prep.kind!r}.")
    if kwargs.get("image_size") is not None:
        kwargs["image_size"] = tuple(kwargs["image_size"])
    generate(out=str(data_cfg.dataroot), version=str(data_cfg.version), replace=False, **kwargs)


def label_maps(dataset) -> tuple:
    """``(seg, visibility)`` stacks of every sample's BeV labels (no images decoded when the
    dataset can give targets alone)."""
    segs, vis = [], []
    for i in range(len(dataset)):
        t = dataset.targets(i) if hasattr(dataset, "targets") else dataset.get(i, seed=0)
        segs.append(np.asarray(t["seg"])[0])
        vis.append(np.asarray(t["visibility"])[0])
    return np.stack(segs), np.stack(vis)


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------

def build_grid(cfg: DictConfig) -> BevGrid:
    g = OmegaConf.to_container(cfg.grid, resolve=True)
    return BevGrid(**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()})


def build_model(cfg: DictConfig, grid: BevGrid):
    """``(encoder, head)`` from the config groups ``backbone``, ``upsampler``, ``model``."""
    from .encoder import build_multicamera_encoder

    backbone = instantiate(cfg.backbone)
    # the width of the upsampled features is the backbone's
    upsampler = None
    if cfg.upsampler.name != "none":
        upsampler = instantiate(cfg.upsampler, feature_dim=int(backbone.embed_dim))
    enc = OmegaConf.to_container(cfg.encoder, resolve=True)
    for key in ("output_size", "guidance_size"):
        if enc.get(key) is not None and enc[key] != "output":
            enc[key] = tuple(enc[key])
    encoder = build_multicamera_encoder(backbone, upsampler, **enc)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    name = model_cfg.pop("name")
    if name not in HEADS:
        raise ValueError(f"model={name!r} is not a BeV head; expected one of {HEADS}.")
    head_class = get_class(model_cfg.pop("_target_"))  # called directly: Hydra would turn the BevGrid dataclass into a config
    head = head_class(in_channels=encoder.out_channels, grid=grid, **model_cfg)
    return encoder, head


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------

def check_config(cfg: DictConfig) -> None:
    """Refuse values that would fail (or silently misbehave) later, naming the key (the types
    and key names are the schema's, :mod:`bev.config`)."""
    if int(cfg.min_visibility) not in (1, 2, 3, 4):
        raise ValueError(f"min_visibility must be a nuScenes visibility level 1..4, got {cfg.min_visibility}.")
    if int(cfg.data.batch_size) < 1:
        raise ValueError(f"data.batch_size must be a positive integer, got {cfg.data.batch_size}.")
    size = list(cfg.data.image_size)
    if len(size) != 2 or min(int(s) for s in size) < 8:
        raise ValueError(f"data.image_size must be [height, width] of at least 8 pixels, got {size}.")
    if cfg.negative_control not in (None, "shuffle_extrinsics"):
        raise ValueError(f"negative_control must be null or 'shuffle_extrinsics', got {cfg.negative_control!r}.")
    max_steps = cfg.trainer.get("max_steps")
    if max_steps not in (None, -1) and int(max_steps) < 1:
        raise ValueError(f"trainer.max_steps must be a positive number of training steps (or -1 to train "
                         f"for epochs), got {max_steps}.")
    if int(cfg.checkpoint_every) < 1:
        raise ValueError(f"checkpoint_every must be a positive number of steps, got {cfg.checkpoint_every}.")
    if not float(cfg.optimizer.lr) > 0:
        raise ValueError(f"optimizer.lr must be a positive learning rate, got {cfg.optimizer.lr}.")
    if cfg.trainer.get("max_steps") in (None, -1) and int(cfg.epochs) < 1:
        raise ValueError(f"epochs must be a positive integer when trainer.max_steps is not set, got {cfg.epochs}.")
    if str(cfg.model.get("name")) not in HEADS:
        raise ValueError(f"model={cfg.model.get('name')!r} is not a BeV head; expected one of {HEADS}.")
    runs.check_trainer(cfg.trainer, TRAINER_RESERVED)


def result_config(cfg: DictConfig) -> dict:
    """The configuration a BeV run directory belongs to (:func:`jafar.runs.result_config`); a
    scene list given as a file is a path (its scenes are the data's)."""
    identity = runs.result_config(cfg, NOT_IDENTITY)
    if isinstance(identity["data"].get("scenes"), str):
        del identity["data"]["scenes"]
    return identity


def run(cfg: DictConfig, run_dir: Path, callbacks: Optional[list] = None) -> dict:
    """Train, validate, score the prior-map baseline, write ``results.json``. ``callbacks``:
    extra Lightning callbacks (tests use one to interrupt a run). ``run_dir`` belongs to one
    configuration (:func:`jafar.runs.check_run_dir`)."""
    run_dir = Path(run_dir)
    cfg = apply_per_model(cfg, runs.command_line_overrides())
    check_config(cfg)
    identity = result_config(cfg)
    runs.check_run_dir(run_dir, identity, cfg.resume)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_path = runs.resolve_resume(cfg.resume, ckpt_dir, expected_keys=("encoder.", "head."))
    grid = build_grid(cfg)
    data_cfg = cfg.data
    prepare_data(data_cfg)
    train_set = build_dataset(data_cfg, str(data_cfg.train_split), grid, augment=bool(data_cfg.augment))
    val_set = build_dataset(data_cfg, str(data_cfg.val_split), grid, augment=False)
    runs.claim_run_dir(run_dir, identity, cfg.resume)
    log.info("%d training samples, %d validation samples; run directory %s", len(train_set), len(val_set), run_dir)

    runs.seed_everything(cfg.seed)
    encoder, head = build_model(cfg, grid)
    control = cfg.negative_control == "shuffle_extrinsics"
    train_items = SeededSamples(train_set, int(cfg.seed), shuffle_extrinsics=control)
    val_items = SeededSamples(val_set, int(cfg.seed) + 1, shuffle_extrinsics=control)

    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    max_steps = trainer_kwargs.pop("max_steps", None)
    checkpointing = runs.step_checkpoints(ckpt_dir, cfg.checkpoint_every)
    trainer = runs.make_trainer(run_dir, trainer_kwargs, checkpointing=checkpointing, callbacks=callbacks or [],
                                run_config=identity, max_steps=-1, max_epochs=-1, use_distributed_sampler=False)
    bs = int(data_cfg.batch_size)
    if max_steps in (None, -1):
        max_steps = int(cfg.epochs) * math.ceil(len(train_set) / (bs * trainer.world_size))
    trainer.fit_loop.epoch_loop.max_steps = int(max_steps)  # known only now: it depends on the world size
    if trainer_kwargs.get("val_check_interval") is not None and isinstance(trainer_kwargs["val_check_interval"], int):
        trainer.val_check_interval = min(int(trainer_kwargs["val_check_interval"]), int(max_steps))

    module = BevSegmentation(
        encoder, head, SimpleBevLoss(**cfg.loss, min_visibility=int(cfg.min_visibility)), **cfg.optimizer,
        scheduler=OmegaConf.to_container(cfg.scheduler, resolve=True) if cfg.scheduler else None,
        total_steps=int(max_steps), iou_visibilities=(1, 2), picture_dir=str(run_dir / "pictures"),
        pictures=int(cfg.pictures))

    cache = bool(data_cfg.get("cache_features"))
    workers = int(data_cfg.num_workers)
    loader_kw = dict(num_workers=workers, pin_memory=bool(data_cfg.pin_memory), persistent_workers=False)
    if workers > 0:
        loader_kw["prefetch_factor"] = 2
    sampler = StepBatchSampler(len(train_set), bs, int(max_steps), int(cfg.seed),
                               start_step=lambda: trainer.global_step,
                               rank=trainer.global_rank, world_size=trainer.world_size)
    train_loader = DataLoader(train_items, batch_sampler=sampler,
                              collate_fn=lambda b: collate(b, cache and not data_cfg.augment), **loader_kw)
    val_loader = DataLoader(val_items, batch_size=bs, shuffle=False, collate_fn=lambda b: collate(b, cache),
                            **loader_kw)

    with runs.quiet_lightning():
        trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt_path)
        if module.validated_at != trainer.global_step:  # the final weights not validated yet
            trainer.validate(module, dataloaders=val_loader, verbose=False)

    results = {"val": {"iou": module.val_results.get(f"iou_vis{int(cfg.min_visibility)}"), **module.val_results},
               "model": str(cfg.model.name), "upsampler": str(cfg.upsampler.name),
               "backbone": str(cfg.backbone.name), "negative_control": cfg.negative_control,
               "min_visibility": int(cfg.min_visibility), "step": trainer.global_step,
               "train_samples": len(train_set), "val_samples": len(val_set)}
    if cfg.prior_baseline:
        tr_seg, tr_vis = label_maps(train_set)
        va_seg, va_vis = label_maps(val_set)
        results["prior"] = prior_baseline(tr_seg, tr_vis, va_seg, va_vis, min_visibility=int(cfg.min_visibility))
        results["prior"]["iou"] = results["prior"][f"iou_vis{int(cfg.min_visibility)}"]
    if trainer.is_global_zero:
        runs.write_results(run_dir, results, identity)
        log.info("results: %s", json.dumps(results))
    return results
