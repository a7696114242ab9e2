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
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, default_collate

from jafar import runs
from jafar.runs.samplers import ShardSampler, StepBatchSampler
from jafar.utils import derive_seed

from .config import ROOT, BevConfig, apply_per_model
from .geometry import BevGrid
from .heads import HEADS, build_head
from .losses import LOSSES, build_loss
from .module import BestValidation, BevSegmentation, LabelCounts, prior_baseline

log = logging.getLogger(__name__)

#: keys that do not change a BeV run's result (besides :data:`jafar.runs.NOT_IDENTITY`): where the
#: data and the feature cache are, how the data are loaded
NOT_IDENTITY = ("data.dataroot", "data.num_workers", "data.pin_memory", "encoder.cache_dir")


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

class SeededSamples(Dataset):
    """Items ``(index, seed)`` from :class:`jafar.runs.samplers.StepBatchSampler` -> the sample drawn
    with that seed (augmentation and the negative control are functions of it: a resumed run
    replays the same draws). Plain integer indices (validation) use ``seed`` and the index."""

    def __init__(self, dataset, seed: int = 0, shuffle_extrinsics: bool = False, cache_keys: bool = False):
        self.dataset, self.seed, self.shuffle_extrinsics = dataset, int(seed), bool(shuffle_extrinsics)
        self.cache_keys = bool(cache_keys)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item if isinstance(item, (tuple, list)) else (item, derive_seed(self.seed, item, 3))
        sample = self.dataset.get(int(index), seed=int(seed))
        if self.shuffle_extrinsics:
            sample = shuffle_extrinsics(sample, seed)
        if self.cache_keys:
            sample["cache_key"] = feature_cache_key(self.dataset, int(index))
        return sample


def feature_cache_key(dataset, index: int) -> str:
    """The feature-cache file name of sample ``index`` (un-augmented): its token and a hash of what
    makes its camera images, in order: the camera names, the image files, and each camera's pixel
    affine raw -> network input (which holds the image size, the resize scale and the crop). The
    encoder's cache folder adds the rest (backbone name and weights, input size, stored dtype:
    :meth:`bev.encoder.MultiCameraEncoder.cache_fingerprint`), so no setting that changes the
    features can read another setting's file."""
    import hashlib

    affines = np.round(np.asarray(dataset.image_affines(index), dtype=np.float64), 9)
    view = json.dumps({"cameras": list(dataset.cameras), "files": list(dataset._paths[index]),
                       "image_size": list(dataset.image_size), "affines": affines.tolist()})
    return f"{dataset.tokens[index]}-{hashlib.sha256(view.encode()).hexdigest()[:16]}"


def shuffle_extrinsics(sample: dict, seed: int) -> dict:
    """The negative control: every camera gets another camera's ``cam2ego`` (a random
    derangement drawn from ``seed``), so the images are lifted to the wrong places."""
    n = sample["cam2ego"].shape[0]
    gen = torch.Generator().manual_seed(derive_seed(int(seed), 5))
    perm = torch.arange(n)
    while n > 1 and (perm == torch.arange(n)).any():
        perm = torch.randperm(n, generator=gen)
    return {**sample, "cam2ego": sample["cam2ego"][perm]}


def collate(items):
    keys = [item.pop("cache_key") for item in items if "cache_key" in item]
    batch = default_collate(items)
    if keys:
        batch["cache_keys"] = keys
    return batch


def build_datasets(data_cfg: DictConfig, grid: BevGrid, min_visibility: int = 2):
    """``(train, val)`` data sets from one load of the devkit tables per process
    (:func:`bev.data.nuscenes.load_tables`): the tables are dropped once both sets have taken
    their compact per-sample arrays, which are all the loader workers receive."""
    from .data.nuscenes import NuScenesBev, check_tables, load_tables

    check_tables(str(data_cfg.dataroot), str(data_cfg.version))
    for split in (data_cfg.train_split, data_cfg.val_split):  # a bad split or scenes file: refused before the load
        NuScenesBev.check_split(str(data_cfg.version), str(split), _split_scenes(data_cfg, str(split)))
    nusc = load_tables(str(data_cfg.dataroot), str(data_cfg.version), checked=True)
    train = build_dataset(data_cfg, str(data_cfg.train_split), grid, augment=bool(data_cfg.augment), nusc=nusc,
                          min_visibility=min_visibility)
    val = build_dataset(data_cfg, str(data_cfg.val_split), grid, augment=False, nusc=nusc, min_visibility=min_visibility)
    del nusc
    return train, val


def _split_scenes(data_cfg: DictConfig, split: str):
    """``data.scenes`` for ``split``: null, a list of scene names, or a JSON file's path."""
    scenes = data_cfg.get("scenes")
    if scenes is not None and not isinstance(scenes, str):
        scenes = OmegaConf.to_container(scenes, resolve=True)
        if isinstance(scenes, dict):
            scenes = scenes[split]
    return scenes


def build_dataset(data_cfg: DictConfig, split: str, grid: BevGrid, augment: bool, nusc=None, min_visibility: int = 2):
    from .data.nuscenes import NuScenesBev

    return NuScenesBev(
        dataroot=str(data_cfg.dataroot), version=str(data_cfg.version), split=split,
        scenes=_split_scenes(data_cfg, split),
        cameras=list(data_cfg.cameras), grid=grid, image_size=tuple(data_cfg.image_size),
        resize_scale=data_cfg.get("resize_scale"), augment=augment, image_augment=str(data_cfg.image_augment),
        scale_range=tuple(data_cfg.scale_range), crop_up_pct=float(data_cfg.crop_up_pct),
        resize_lim=tuple(data_cfg.resize_lim), min_visibility=int(min_visibility),
        zoom=tuple(data_cfg.zoom), rotation_deg=tuple(data_cfg.rotation_deg),
        raster=str(data_cfg.raster), bev_augment=str(data_cfg.bev_augment),  # BeV motion: training only (augment)
        bev_translation=tuple(data_cfg.bev_translation), bev_yaw_deg=float(data_cfg.bev_yaw_deg), nusc=nusc)


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


class _CountChunks(Dataset):
    """Chunk ``k`` of a data set -> the :class:`bev.module.LabelCounts` of its samples' labels (no
    image decoded when the data set gives targets alone): what each loader worker sends back."""

    def __init__(self, dataset, shape, levels, chunk: int):
        self.dataset, self.shape, self.levels, self.chunk = dataset, tuple(shape), tuple(levels), int(chunk)

    def __len__(self):
        return math.ceil(len(self.dataset) / self.chunk)

    def __getitem__(self, k):
        counts = LabelCounts(self.shape, self.levels)
        for i in range(k * self.chunk, min((k + 1) * self.chunk, len(self.dataset))):
            t = self.dataset.targets(i) if hasattr(self.dataset, "targets") else self.dataset.get(i, seed=0)
            counts.add(np.asarray(t["seg"])[0], np.asarray(t["visibility"])[0])
        return counts


def label_counts(dataset, shape, levels=(1, 2), num_workers: int = 0, chunk: int = 256) -> LabelCounts:
    """The per-cell :class:`bev.module.LabelCounts` of every sample's BeV labels, streamed: each
    of ``num_workers`` loader processes counts chunks of ``chunk`` samples and sends back only the
    counts (memory O(cells) whatever the number of samples)."""
    loader = DataLoader(_CountChunks(dataset, shape, levels, chunk), batch_size=None, shuffle=False,
                        num_workers=int(num_workers), collate_fn=lambda c: c)
    total = LabelCounts(shape, levels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the labels' small tensor ops only lose to threads (loader workers use one too)
    try:
        for part in loader:
            total.merge(part)
    finally:
        torch.set_num_threads(threads)
    return total


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------

def build_grid(cfg: DictConfig) -> BevGrid:
    g = OmegaConf.to_container(cfg.grid, resolve=True)
    return BevGrid(**{k: tuple(v) if isinstance(v, list) else v for k, v in g.items()})


#: ``encoder.cache_dtype`` -> the stored dtype (None: as computed, float32 outside autocast: exact)
CACHE_DTYPES = {"float16": torch.float16, "float32": None}


def feature_cache_dir(cfg: DictConfig) -> Optional[Path]:
    """Where the frozen backbone's features are cached: None without ``data.cache_features``;
    ``encoder.cache_dir``, or by default ``<data.dataroot>/cache/bev_features`` (said in the log).
    A folder that cannot be created is refused in one sentence."""
    if not cfg.data.get("cache_features"):
        return None
    given = cfg.encoder.get("cache_dir")
    folder = Path(str(given) if given else Path(str(cfg.data.dataroot)) / "cache" / "bev_features").expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        writable = os.access(folder, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise ValueError(f"data.cache_features=true but the feature cache folder {str(folder)!r} cannot be written "
                         f"({'encoder.cache_dir' if given else 'the default under data.dataroot'}): set "
                         "encoder.cache_dir to a writable folder, or data.cache_features=false.")
    if not given:
        log.info("data.cache_features=true without encoder.cache_dir: caching features under %s", folder)
    return folder


def cache_size_sentence(encoder, data_cfg, samples: int) -> str:
    """The feature cache's size, estimated before the first epoch."""
    h, w = (int(v) for v in data_cfg.image_size)
    patch = int(getattr(encoder.backbone, "patch_size", 1) or 1)
    per_camera = int(encoder.backbone.embed_dim) * (h // patch) * (w // patch)
    nbytes = 2 if encoder.cache_dtype == torch.float16 else 4
    total = samples * len(data_cfg.cameras) * per_camera * nbytes
    return (f"feature cache at {encoder.cache_dir}: {samples} samples x {len(data_cfg.cameras)} cameras x "
            f"{int(encoder.backbone.embed_dim)} x {h // patch} x {w // patch} x {nbytes} bytes = "
            f"{total / 1e9:.2f} GB ({'float16' if nbytes == 2 else 'float32'}; training samples only when "
            f"data.augment is false)")


def build_model(cfg: DictConfig, grid: BevGrid, cache_dir: Optional[Path] = None):
    """``(encoder, head)`` from the config groups ``backbone``, ``upsampler``, ``model``; the
    backbone's features cached in ``cache_dir`` (:func:`feature_cache_dir`) when given."""
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
    enc["cache_dir"] = cache_dir
    enc["cache_dtype"] = CACHE_DTYPES[str(enc.pop("cache_dtype", "float16"))]
    encoder = build_multicamera_encoder(backbone, upsampler, **enc)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    head = build_head(model_cfg.pop("name"), encoder.out_channels, grid, **model_cfg)
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
    from .data.nuscenes import check_label_options

    check_label_options(cfg.data.raster, cfg.data.bev_augment, cfg.data.bev_translation, cfg.data.bev_yaw_deg,
                        prefix="data.", image_augment=cfg.data.image_augment, scale_range=cfg.data.scale_range,
                        crop_up_pct=cfg.data.crop_up_pct, resize_lim=cfg.data.resize_lim)
    if str(cfg.loss.name) not in LOSSES:
        raise ValueError(f"loss.name must be one of {sorted(LOSSES)}, got {cfg.loss.name!r}.")
    if cfg.negative_control not in (None, "shuffle_extrinsics"):
        raise ValueError(f"negative_control must be null or 'shuffle_extrinsics', got {cfg.negative_control!r}.")
    max_steps = cfg.trainer.get("max_steps")
    if max_steps not in (None, -1) and int(max_steps) < 1:
        raise ValueError(f"trainer.max_steps must be a positive number of training steps (or -1 to train "
                         f"for epochs), got {max_steps}.")
    if int(cfg.checkpoint_every) < 1:
        raise ValueError(f"checkpoint_every must be a positive number of steps, got {cfg.checkpoint_every}.")
    runs.check_optimizer(cfg.optimizer)
    if cfg.scheduler:
        runs.check_partial(cfg.scheduler, "scheduler", torch.optim.lr_scheduler.LRScheduler,
                           "torch.optim.lr_scheduler.LRScheduler", "torch.optim.lr_scheduler.OneCycleLR")
    if cfg.trainer.get("max_steps") in (None, -1) and int(cfg.epochs) < 1:
        raise ValueError(f"epochs must be a positive integer when trainer.max_steps is not set, got {cfg.epochs}.")
    HEADS.get(str(cfg.model.get("name")))  # an unknown head: the registry's sentence
    if str(cfg.encoder.get("cache_dtype")) not in CACHE_DTYPES:
        raise ValueError(f"encoder.cache_dtype must be one of {sorted(CACHE_DTYPES)}, got {cfg.encoder.get('cache_dtype')!r}.")
    every = cfg.trainer.get("val_check_interval")
    if every is not None and not ((isinstance(every, int) and not isinstance(every, bool) and every >= 1)
                                  or (isinstance(every, float) and 0 < every <= 1)):
        raise ValueError(f"trainer.val_check_interval must be null (once per epoch), a fraction of an epoch in "
                         f"(0, 1] or a positive number of steps, got {every!r}.")


def result_config(cfg: DictConfig) -> dict:
    """The configuration a BeV run directory belongs to (:func:`jafar.runs.result_config`); a
    scene list given as a file is a path (its scenes are the data's)."""
    identity = runs.result_config(cfg, NOT_IDENTITY)
    if isinstance(identity["data"].get("scenes"), str):
        del identity["data"]["scenes"]
    return identity


class BevTraining(runs.Tool):
    """``tools/train_bev.py`` (:func:`jafar.runs.run` owns the protocol): the data sets built from
    one load of the devkit tables, the frozen backbone, upsampler and head built, then training,
    validation, the prior-map baseline and ``results.json``."""

    root, schema, script = ROOT, BevConfig, "tools/train_bev.py"
    not_identity = NOT_IDENTITY
    checkpoint_keys = ("encoder.", "head.")

    def configure(self, cfg: DictConfig, overrides) -> DictConfig:
        return apply_per_model(cfg, overrides)

    def check(self, cfg: DictConfig) -> None:
        check_config(cfg)

    def identity(self, cfg: DictConfig) -> dict:
        return result_config(cfg)

    def prepare(self, cfg: DictConfig, run_dir: Path) -> dict:
        grid = build_grid(cfg)
        prepare_data(cfg.data)
        cache_dir = feature_cache_dir(cfg)
        train_set, val_set = build_datasets(cfg.data, grid, int(cfg.min_visibility))
        log.info("%d training samples, %d validation samples; run directory %s", len(train_set), len(val_set), run_dir)
        return {"grid": grid, "cache_dir": cache_dir, "train": train_set, "val": val_set}

    def build(self, cfg: DictConfig, run_dir: Path, data: dict):
        return build_model(cfg, data["grid"], data["cache_dir"])

    def execute(self, job: runs.Job) -> dict:
        cfg, run_dir, data_cfg = job.cfg, job.run_dir, job.cfg.data
        (encoder, head), grid = job.model, job.data["grid"]
        train_set, val_set = job.data["train"], job.data["val"]
        control = cfg.negative_control == "shuffle_extrinsics"
        cache = encoder.cache_dir is not None
        train_items = SeededSamples(train_set, int(cfg.seed), shuffle_extrinsics=control,
                                    cache_keys=cache and not data_cfg.augment)
        val_items = SeededSamples(val_set, int(cfg.seed) + 1, shuffle_extrinsics=control, cache_keys=cache)
        if cache and runs.is_global_zero():
            log.info(cache_size_sentence(encoder, data_cfg, (0 if data_cfg.augment else len(train_set)) + len(val_set)))

        trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
        max_steps = trainer_kwargs.pop("max_steps", None)
        val_every = trainer_kwargs.pop("val_check_interval", None)
        trainer_kwargs["sync_batchnorm"] = sync_batchnorm_applies(trainer_kwargs)
        checkpointing = runs.step_checkpoints(job.checkpoint_dir, cfg.checkpoint_every)
        trained = int(cfg.min_visibility)
        best = BestValidation(job.checkpoint_dir, f"iou_vis{trained}")
        trainer = runs.make_trainer(run_dir, trainer_kwargs, checkpointing=checkpointing,
                                    callbacks=[best, *job.callbacks],
                                    run_config=job.identity, tool=self.script, max_steps=-1, max_epochs=-1,
                                    use_distributed_sampler=False)
        bs = int(data_cfg.batch_size)
        world = int(trainer.world_size)
        steps_per_epoch = math.ceil(len(train_set) / (bs * world))
        if max_steps in (None, -1):
            max_steps = int(cfg.epochs) * steps_per_epoch
        trainer.fit_loop.epoch_loop.max_steps = int(max_steps)  # known only now: it depends on the world size
        # The sampler's one pass (Lightning's "epoch") is the whole run: validation steps are counted here.
        trainer.val_check_interval = validation_interval(val_every, steps_per_epoch, int(max_steps))
        checkpointing.validate_every = trainer.val_check_interval  # checkpoints of validated steps: after validation
        if world > 1 and trainer.is_global_zero:
            log.warning(devices_sentence(world, bs, len(train_set), steps_per_epoch, int(max_steps), cfg))
        if len(val_set) < world:
            raise ValueError(f"{len(val_set)} validation samples cannot be shared among {world} processes (each "
                             f"validates its own samples): use fewer devices or a larger validation split.")

        module = BevSegmentation(
            encoder, head, build_loss(**cfg.loss, min_visibility=int(cfg.min_visibility)),
            optimizer=runs.build_partial(cfg.optimizer),
            scheduler=runs.build_partial(cfg.scheduler) if cfg.scheduler else None,
            total_steps=int(max_steps), iou_visibilities=(1, 2), picture_dir=str(run_dir / "pictures"),
            pictures=int(cfg.pictures))

        workers = int(data_cfg.num_workers)
        loader_kw = dict(num_workers=workers, pin_memory=bool(data_cfg.pin_memory), persistent_workers=False)
        if workers > 0:
            loader_kw["prefetch_factor"] = 2
        sampler = StepBatchSampler(len(train_set), bs, int(max_steps), int(cfg.seed),
                                   start_step=lambda: trainer.global_step,
                                   rank=trainer.global_rank, world_size=world)
        train_loader = DataLoader(train_items, batch_sampler=sampler, collate_fn=collate, **loader_kw)
        val_loader = DataLoader(val_items, batch_size=bs, sampler=ShardSampler(len(val_set), trainer.global_rank, world),
                                collate_fn=collate, **loader_kw)

        with runs.quiet_lightning():
            trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=job.resume_from)
            if module.validated_at != trainer.global_step:  # the final weights not validated yet
                trainer.validate(module, dataloaders=val_loader, verbose=False)

        results = {"val": {"iou": module.val_results.get(f"iou_vis{trained}"), **module.val_results,
                           "trained_min_visibility": trained, "step": trainer.global_step},
                   "best": {**(best.best or {}), "trained_min_visibility": trained,
                            "checkpoint": str(best.path.relative_to(run_dir)) if best.path.is_relative_to(run_dir)
                            else str(best.path)},
                   "model": str(cfg.model.name), "upsampler": str(cfg.upsampler.name),
                   "backbone": str(cfg.backbone.name), "negative_control": cfg.negative_control,
                   "min_visibility": trained, "step": trainer.global_step,
                   "train_samples": len(train_set), "val_samples": len(val_set)}
        if not trainer.is_global_zero:  # the prior baseline and results.json: the first process alone
            return results
        if cfg.prior_baseline:
            shape = tuple(int(v) for v in grid.shape)
            tr = label_counts(train_set, shape, levels=(trained,), num_workers=workers)
            va = label_counts(val_set, shape, levels=(1, 2), num_workers=workers)
            results["prior"] = prior_baseline(tr, va, visibilities=(1, 2), min_visibility=trained)
            results["prior"]["iou"] = results["prior"][f"iou_vis{trained}"]
            results["prior"]["trained_min_visibility"] = trained
        runs.write_results(run_dir, results, job.identity)
        log.info("results: %s", json.dumps(results))
        return results


#: the BeV training tool (``tools/train_bev.py`` is ``jafar.runs.main(BEV_TRAINING)``)
BEV_TRAINING = BevTraining()


def run(cfg: DictConfig, run_dir: Path, callbacks: Optional[list] = None) -> dict:
    """:func:`jafar.runs.run` of :data:`BEV_TRAINING`: train, validate, score the prior-map
    baseline, write ``results.json`` in ``run_dir``. ``callbacks``: extra Lightning callbacks
    (tests use one to interrupt a run)."""
    return runs.run(BEV_TRAINING, cfg, run_dir, callbacks)


def validation_interval(value, steps_per_epoch: int, max_steps: int) -> int:
    """``trainer.val_check_interval`` in training steps: null -> once per epoch (PointBeV:
    ``check_val_every_n_epoch: 1``, github valeoai/PointBeV ``configs/trainer/ddp_pl.yaml``), a
    float in (0, 1] -> that fraction of an epoch, an integer -> every that many steps; never beyond
    the run's last step (which is validated anyway)."""
    if value is None:
        steps = steps_per_epoch
    elif isinstance(value, float):
        steps = max(1, round(value * steps_per_epoch))
    else:
        steps = int(value)
    return max(1, min(steps, max_steps))


def sync_batchnorm_applies(trainer_kwargs: dict) -> bool:
    """``trainer.sync_batchnorm`` as it can run: PyTorch's ``SyncBatchNorm`` synchronises GPU (and
    XPU/HPU) tensors only, so on the CPU (``accelerator: cpu``, or ``auto`` without a GPU) each
    process normalises its own batch and the key is turned off, said in the log."""
    wanted = bool(trainer_kwargs.get("sync_batchnorm", False))
    accel = str(trainer_kwargs.get("accelerator", "auto"))
    on_cpu = accel == "cpu" or (accel == "auto" and not torch.cuda.is_available())
    if wanted and on_cpu:
        log.info("trainer.sync_batchnorm is off on the CPU (torch.nn.SyncBatchNorm synchronises GPU tensors "
                 "only): under DDP each process normalises its own batch.")
        return False
    return wanted


def devices_sentence(world: int, batch: int, samples: int, steps_per_epoch: int, max_steps: int, cfg) -> str:
    """What more than one process changes (said once, before training): the global batch, the
    steps, and that the learning rate is not scaled."""
    return runs.global_batch_sentence(
        world, batch, "samples", f"an epoch of {samples} samples is {steps_per_epoch} steps and the run {max_steps} "
        f"steps (1/{world} of one process's)", float(cfg.optimizer.lr),
        "PointBeV's setting is trainer.devices=1, batch 1")
