"""Compose a BeV training run from a Hydra config (``configs/bev/train_bev.yaml``): data, frozen
backbone + upsampler, BeV head, Lightning trainer; then the prior-map baseline and
``results.json``.

Entry point: ``tools/train_bev.py``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, default_collate

from jafar.train.data import StepBatchSampler, _mix
from jafar.train.run import AtomicCheckpointIO, resolve_resume
from jafar.utils import CONFIG_DIR, atomic_path, register_config_resolvers  # noqa: F401 (CONFIG_DIR: re-exported)

from .geometry import BevGrid
from .losses import SimpleBevLoss
from .module import BevSegmentation, prior_baseline

log = logging.getLogger(__name__)

HEADS = ("simplebev", "pointbev", "bevformer")
#: ``${jafar_configs:}``, the project's ``configs/`` folder, which ``configs/bev/train_bev.yaml``
#: adds to Hydra's search path for the shared groups (backbone/, upsampler/); one helper serves
#: every tool (jafar.utils)
register_resolvers = register_config_resolvers


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
        index, seed = item if isinstance(item, (tuple, list)) else (item, _mix(self.seed, item, 3))
        sample = self.dataset.get(int(index), seed=int(seed))
        if self.shuffle_extrinsics:
            sample = shuffle_extrinsics(sample, seed)
        return sample


def shuffle_extrinsics(sample: dict, seed: int) -> dict:
    """The negative control: every camera gets another camera's ``cam2ego`` (a random
    derangement drawn from ``seed``), so the images are lifted to the wrong places."""
    n = sample["cam2ego"].shape[0]
    gen = torch.Generator().manual_seed(_mix(int(seed), 5))
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
    generate(out=str(data_cfg.dataroot), version=str(data_cfg.version), **kwargs)


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
    up_cfg = OmegaConf.to_container(cfg.upsampler, resolve=True)
    if up_cfg.get("name") == "none":
        upsampler = None
    else:
        up_cfg["feature_dim"] = backbone.embed_dim
        upsampler = instantiate(up_cfg)
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
    """Refuse values that would fail (or silently misbehave) later, naming the key."""
    if int(cfg.min_visibility) not in (1, 2, 3, 4):
        raise ValueError(f"min_visibility must be a nuScenes visibility level 1..4, got {cfg.min_visibility}.")
    if int(cfg.data.batch_size) < 1:
        raise ValueError(f"data.batch_size must be a positive integer, got {cfg.data.batch_size}.")
    size = list(cfg.data.image_size)
    if len(size) != 2 or min(int(s) for s in size) < 8:
        raise ValueError(f"data.image_size must be [height, width] of at least 8 pixels, got {size}.")
    if cfg.negative_control not in (None, "shuffle_extrinsics"):
        raise ValueError(f"negative_control must be null or 'shuffle_extrinsics', got {cfg.negative_control!r}.")
    if cfg.trainer.get("max_steps") in (None, -1) and int(cfg.epochs) < 1:
        raise ValueError(f"epochs must be a positive integer when trainer.max_steps is not set, got {cfg.epochs}.")


def _write_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def run(cfg: DictConfig, run_dir: Path, callbacks: Optional[list] = None) -> dict:
    """Train, validate, score the prior-map baseline, write ``results.json``. ``callbacks``:
    extra Lightning callbacks (tests use one to interrupt a run)."""
    run_dir = Path(run_dir)
    check_config(cfg)
    grid = build_grid(cfg)
    data_cfg = cfg.data
    prepare_data(data_cfg)
    train_set = build_dataset(data_cfg, str(data_cfg.train_split), grid, augment=bool(data_cfg.augment))
    val_set = build_dataset(data_cfg, str(data_cfg.val_split), grid, augment=False)
    ckpt_dir = run_dir / "checkpoints"
    ckpt_path = resolve_resume(cfg.resume, ckpt_dir)
    log.info("%d training samples, %d validation samples; run directory %s", len(train_set), len(val_set), run_dir)

    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    encoder, head = build_model(cfg, grid)
    control = cfg.negative_control == "shuffle_extrinsics"
    train_items = SeededSamples(train_set, int(cfg.seed), shuffle_extrinsics=control)
    val_items = SeededSamples(val_set, int(cfg.seed) + 1, shuffle_extrinsics=control)

    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    max_steps = trainer_kwargs.pop("max_steps", None)
    every = int(cfg.checkpoint_every)
    loggers = [TensorBoardLogger(str(run_dir), name="tensorboard", version=""),
               CSVLogger(str(run_dir), name="csv", version="")]
    checkpointing = ModelCheckpoint(dirpath=ckpt_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                                    every_n_train_steps=max(1, every), save_last=True, save_top_k=1,
                                    monitor="step", mode="max")
    trainer = L.Trainer(**trainer_kwargs, max_steps=-1, max_epochs=-1, callbacks=[*(callbacks or []), checkpointing], logger=loggers,
                        plugins=[AtomicCheckpointIO()], default_root_dir=str(run_dir), use_distributed_sampler=False)
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

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen backbone
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
        _write_json(run_dir / "results.json", results)
        log.info("results: %s", json.dumps(results))
    return results
