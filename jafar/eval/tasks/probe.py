"""The linear-probe tasks: ``seg`` (semantic segmentation) and ``depth`` (depth estimation), a
probe (:mod:`jafar.eval.probes`) trained on the training split and scored on the validation split,
the backbone frozen (the paper's section 4.3 and appendix A.2)."""

from __future__ import annotations

import copy
import time
import warnings

import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Subset

from ... import runs
from ...utils import atomic_path
from ..report import Column
from . import DatasetSplits, EvalContext, Task, picture_indices, register_task, trains_with_probe


class ProbeTask(Task):
    """A linear probe trained on the training split and scored on the validation split; rows with
    ``train_with_probe`` train their upsampler with it (:class:`jafar.eval.probes.LinearProbe`)."""

    trains_upsamplers = True

    @staticmethod
    def epochs(cfg: DictConfig, data: DatasetSplits) -> int:
        """The probe's epochs on ``data``: the data set's own ``epochs`` (the paper: 5 on COCO-Stuff,
        ``configs/dataset/coco.yaml``), else the task's ``probe.epochs``."""
        return int(data.epochs) if data.epochs is not None else int(cfg.task.probe.epochs)

    def probe_kwargs(self, ctx: EvalContext, data: DatasetSplits, row: str) -> dict:
        t = ctx.cfg.task
        p = t.probe
        return dict(target_size=int(t.target_size or t.image_size), optimizer=runs.build_partial(p.optimizer),
                    epochs=self.epochs(ctx.cfg, data),
                    scheduler=str(p.scheduler), hflip=float(p.hflip), normalize_input=bool(t.normalize_input),
                    seed=int(ctx.cfg.seed), picture_indices=picture_indices(len(data.val), int(t.pictures)),
                    cache_features=bool(p.get("cache_features", False)),
                    train_upsampler=trains_with_probe(ctx.cfg, row),
                    upsampler_lr=None if p.get("upsampler_lr") is None else float(p.upsampler_lr))

    def build_probe(self, ctx: EvalContext, data: DatasetSplits, row: str, upsampler, feature_dim: int):
        raise NotImplementedError

    def check(self, cfg: DictConfig) -> None:
        p = cfg.task.probe
        if int(p.epochs) < 1:
            raise ValueError(f"task.probe.epochs must be a positive integer, got {p.epochs}.")
        if int(p.batch_size) < 1 or int(p.val_batch_size) < 1:
            raise ValueError(f"task.probe.batch_size and val_batch_size must be positive, got "
                             f"{p.batch_size}, {p.val_batch_size}.")
        from ..probes import SCHEDULERS

        if str(p.scheduler) not in SCHEDULERS:
            raise ValueError(f"task.probe.scheduler must be official (the official code: T_max=epochs stepped per "
                             f"batch), naf (T_max=all steps, per batch) or per_epoch, got {p.scheduler!r}.")
        if not isinstance(cfg.task.get("normalize_input"), bool):
            raise ValueError(f"task.normalize_input must be true (the backbone's mean/std) or false (the image in "
                             f"[0, 1], the official depth run), got {cfg.task.get('normalize_input')!r}.")
        for key in cfg.task.datasets:
            e = cfg.dataset.get(key, {}).get("epochs")
            if e is not None and (not isinstance(e, int) or isinstance(e, bool) or e < 1):
                raise ValueError(f"dataset.{key}.epochs must be a positive integer or null (the task's "
                                 f"probe.epochs), got {e!r}.")
        if not 0 <= float(p.hflip) <= 1:
            raise ValueError(f"task.probe.hflip must be a probability, got {p.hflip}.")
        runs.check_optimizer(p.optimizer, "task.probe.optimizer")
        lr = p.get("upsampler_lr")
        if lr is not None and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0):
            raise ValueError(f"task.probe.upsampler_lr must be a positive number or null (the probe's lr), got {lr!r}.")

    def evaluate(self, ctx, data, row, upsampler, out_dir):
        cfg, p = ctx.cfg, ctx.cfg.task.probe
        epochs = self.epochs(cfg, data)
        feature_dim = int(ctx.backbone.embed_dim)
        trained = trains_with_probe(cfg, row)
        if trained:  # the row's module is shared by the data sets: each trains its own copy from the same start
            upsampler = copy.deepcopy(upsampler)
        module = self.build_probe(ctx, data, row, upsampler, feature_dim)
        from ..probes import EpochShuffleSampler

        workers = int(p.num_workers)
        loader_kw = dict(num_workers=workers, pin_memory=bool(p.get("pin_memory", False)), persistent_workers=False)
        train = DataLoader(data.train, batch_size=int(p.batch_size), sampler=EpochShuffleSampler(len(data.train), cfg.seed),
                           drop_last=False, **loader_kw)
        val = DataLoader(data.val, batch_size=int(p.val_batch_size), shuffle=False, **loader_kw)
        ckpt_dir = out_dir / "checkpoints"
        last = ckpt_dir / "last.ckpt"
        trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
        fit_kwargs = {**trainer_kwargs, "limit_val_batches": 0, "num_sanity_val_steps": 0}  # scored once, after
        trainer = runs.make_trainer(out_dir, fit_kwargs, checkpointing=runs.epoch_checkpoints(ckpt_dir),
                                    run_config=ctx.pair_configs.get((data.key, row)), max_epochs=epochs)
        start = time.time()
        with runs.quiet_lightning(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*validation_step` but have no `val_dataloader.*")  # scored after
            trainer.fit(module, train_dataloaders=train,
                        ckpt_path=str(last) if (ctx.resume and last.is_file()) else None)
            fit_s = time.time() - start
            val_trainer = runs.make_trainer(out_dir, trainer_kwargs, log=False)
            val_trainer.validate(module, dataloaders=val, verbose=False)
        module._cache.clear()  # the cached features of this pair are not needed any more
        extra = {}
        if trained:  # the jointly trained upsampler, loadable as the row's checkpoint (upsamplers.<row>.checkpoint)
            weights = out_dir / "upsampler.pt"
            with atomic_path(weights) as tmp:
                torch.save({k: v.detach().cpu() for k, v in module.upsampler.state_dict().items()}, tmp)
            extra["upsampler_weights"] = f"trained with the probe: {weights.name}"
        return {"metrics": module.val_results, "pictures": module.pictures, "train_seconds": round(fit_s, 1), **extra,
                "seconds": round(time.time() - start, 1), "epochs": epochs,
                "train_images": len(data.train), "val_images": len(data.val)}


class SegTask(ProbeTask):
    name = "seg"
    title = "Semantic segmentation (linear probe)"
    columns = (Column("miou", "mIoU", True, 100.0, 2), Column("accuracy", "Acc.", True, 100.0, 2))
    picture_kind = "seg"

    def build_probe(self, ctx, data, row, upsampler, feature_dim):
        from ..probes import SegmentationProbe

        if not data.num_classes:
            raise ValueError(f"dataset.{data.key}.num_classes must be set for task=seg.")
        return SegmentationProbe(ctx.backbone, upsampler, num_classes=int(data.num_classes), feature_dim=feature_dim,
                                 **self.probe_kwargs(ctx, data, row))


class DepthTask(ProbeTask):
    name = "depth"
    title = "Depth estimation (linear probe)"
    columns = (Column("d1", "δ1", True, 100.0, 2), Column("rmse", "RMSE", False, 1.0, 3))
    picture_kind = "depth"

    def check(self, cfg):
        super().check(cfg)
        t = cfg.task
        if not 0 <= float(t.min_depth) < float(t.max_depth):
            raise ValueError(f"task.min_depth and task.max_depth must satisfy 0 <= min < max, got "
                             f"{t.min_depth}, {t.max_depth}.")
        if str(t.global_token) not in ("cls", "mean", "none"):
            raise ValueError(f"task.global_token must be cls, mean or none, got {t.global_token!r}.")
        if t.get("pseudo_labels") not in (None, "auto", "depth_anything"):
            raise ValueError(f"task.pseudo_labels must be auto, depth_anything or null (the data set's depth maps), "
                             f"got {t.pseudo_labels!r}.")

    @staticmethod
    def has_depth(data: DatasetSplits) -> bool:
        base = [d.dataset if isinstance(d, Subset) else d for d in (data.train, data.val) if d is not None]
        return all(all(p is not None for _, p in getattr(d, "items", [(None, None)])) for d in base)

    def labeler(self, ctx, data: DatasetSplits):
        t = ctx.cfg.task
        mode = t.get("pseudo_labels")
        if mode is None or (mode == "auto" and self.has_depth(data)):
            return None
        if "labeler" not in ctx.extras:
            from ..pseudo_depth import DepthAnythingLabeler

            ctx.extras["labeler"] = DepthAnythingLabeler(str(t.pseudo_model))
        return ctx.extras["labeler"]

    def build_probe(self, ctx, data, row, upsampler, feature_dim):
        from ..probes import DepthProbe

        t = ctx.cfg.task
        return DepthProbe(ctx.backbone, upsampler, min_depth=float(t.min_depth), max_depth=float(t.max_depth),
                          bins=int(t.bins), global_token=str(t.global_token), gradient_weight=float(t.gradient_weight),
                          warm_up_steps=int(t.warm_up_steps), pseudo_labeler=self.labeler(ctx, data),
                          feature_dim=feature_dim, **self.probe_kwargs(ctx, data, row))


register_task(SegTask())
register_task(DepthTask())
