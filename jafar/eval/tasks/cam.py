"""``task=cam``: the faithfulness of Grad-CAMs computed from upsampled features (the paper's
Table 2 and appendix A.1), with the classifier, Grad-CAM and metrics of :mod:`jafar.eval.cam`."""

from __future__ import annotations

import logging
from typing import List, Tuple

import torch
from torch import nn

from ... import runs
from ..cam import (
    CamClassifier,
    CamMeter,
    _check_definition,
    build_cam_classifier,
    cam_row,
    draw_correct,
    grad_cam,
    score_explanations,
)
from ..report import Column
from . import DatasetSplits, EvalContext, Task, eval_device, picture_indices, register_task, trains_with_probe

log = logging.getLogger(__name__)


#: how the rows with train_with_probe are trained for task=cam (jafar.eval.cam.pooled_classifier_loss)
UPSAMPLER_TRAINING = ("pooled_classifier",)

#: data sets of the other tasks, refused by task=cam
_NOT_CLASSIFICATION = ("VOCSegmentation", "ADE20K", "Cityscapes", "COCOStuff", "DepthFolder")


class CamTask(Task):
    name = "cam"
    title = "Class activation maps (Grad-CAM from upsampled features)"
    columns = (Column("average_drop", "A.D", False, 100.0, 1), Column("average_increase", "A.I", True, 100.0, 1),
               Column("average_gain", "A.G", True, 100.0, 1), Column("coherency", "Coh.", True, 100.0, 1),
               Column("complexity", "Com.", False, 100.0, 1), Column("adcc", "ADCC", True, 100.0, 1))
    picture_kind = "heatmap"
    target_title = "Grad-CAM at the feature grid"
    needs_train = False
    trains_upsamplers = True  # task.upsampler_training: through the frozen classifier (ours; the paper gives none)

    def check(self, cfg) -> None:
        t = cfg.task
        u = t.get("upsampler_training")
        if u is None or str(u.get("protocol")) not in UPSAMPLER_TRAINING:
            raise ValueError(f"task.upsampler_training.protocol must be one of {', '.join(UPSAMPLER_TRAINING)}, "
                             f"got {None if u is None else u.get('protocol')!r}.")
        for key in ("steps", "batch_size", "checkpoint_every"):
            v = u.get(key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"task.upsampler_training.{key} must be a positive integer, got {v!r}.")
        runs.check_optimizer(u.optimizer, "task.upsampler_training.optimizer")
        if int(t.batch_size) < 1:
            raise ValueError(f"task.batch_size must be a positive integer, got {t.batch_size}.")
        if str(t.mask_space) not in ("normalized", "pixels"):
            raise ValueError(f"task.mask_space must be 'normalized' (the reference ADCC code) or 'pixels', "
                             f"got {t.mask_space!r}.")
        _check_definition(str(t.definition))
        images = t.get("images")
        if images is not None and (isinstance(images, bool) or not isinstance(images, int) or images < 1):
            raise ValueError(f"task.images must be a positive integer (the paper: 2000) or null (every correctly "
                             f"classified image), got {images!r}.")
        for key in t.datasets:
            target = str(cfg.dataset.get(key, {}).get("_target_", ""))
            if target.rsplit(".", 1)[-1] in _NOT_CLASSIFICATION:
                raise ValueError(f"task=cam needs images with a class label (e.g. dataset.imagenet); "
                                 f"{key} ({target.rsplit('.', 1)[-1]}) is not a classification data set.")
        if t.get("target_size") not in (None, t.image_size):
            raise ValueError(f"task=cam computes its maps at the image size: leave task.target_size null "
                             f"(got {t.target_size} for task.image_size={t.image_size}).")

    def table_notes(self, ctx: EvalContext) -> List[str]:
        from ...backbones import MobileNetV2Backbone

        clf = self.classifier(ctx)
        t = ctx.cfg.task
        space = "normalised" if t.mask_space == "normalized" else "[0, 1]"
        mask = "1[CAM > 0]" if t.definition == "paper" else "the CAM"
        drawn = ("every correctly classified image" if t.get("images") is None else
                 f"{int(t.images)} images drawn (seed {int(t.sample_seed)}) among the correctly classified ones, "
                 f"or all of them where there are fewer")
        notes = [f"Classifier {ctx.backbone.name}, Grad-CAM target: {clf.target}. Definitions: {t.definition} "
                 f"(explanation image = the {space} image x {mask}; Complexity = "
                 f"{'fraction of pixels with CAM > 0' if t.definition == 'paper' else 'mean |CAM|'}). "
                 f"Scores over {drawn} (counts in results.json)."]
        if isinstance(ctx.backbone, MobileNetV2Backbone):
            notes.append("No Strided row: MobileNetV2 is a CNN, with no patch embedding whose stride could be reduced.")
        return notes

    def classifier(self, ctx: EvalContext) -> CamClassifier:
        if "cam_classifier" not in ctx.extras:
            from omegaconf import OmegaConf

            ctx.extras["cam_classifier"] = build_cam_classifier(
                ctx.backbone, OmegaConf.to_container(ctx.cfg.backbone, resolve=True))
        return ctx.extras["cam_classifier"]

    def classified(self, ctx: EvalContext, data: DatasetSplits) -> Tuple[List[int], int]:
        """The indices of ``data.val`` the classifier gets right (top-1 = label) and the number of
        images classified: one pass per data set, shared by every row."""
        cache = ctx.extras.setdefault("cam_correct", {})
        if data.key not in cache:
            from torch.utils.data import DataLoader
            from tqdm.auto import tqdm

            t, device = ctx.cfg.task, eval_device(ctx.cfg)
            clf = self.classifier(ctx).to(device)
            ctx.backbone.to(device)
            loader = DataLoader(data.val, batch_size=int(t.batch_size), shuffle=False, num_workers=int(t.num_workers))
            correct, seen = [], 0
            for batch in tqdm(loader, desc=f"{data.key}: classifying",
                              disable=not bool(ctx.cfg.trainer.get("enable_progress_bar", True))):
                image01 = batch["image"].to(device)
                label = torch.as_tensor(batch["label"]).view(-1).long().to(device)
                keep = (clf.logits(ctx.backbone.normalize(image01)).argmax(1) == label).cpu()
                correct += [int(i) for i, k in zip(batch["index"].tolist(), keep.tolist()) if k]
                seen += int(label.numel())
            cache[data.key] = (correct, seen)
            log.info("%s: %d of %d images classified correctly", data.key, len(correct), seen)
        return cache[data.key]

    def evaluate(self, ctx: EvalContext, data: DatasetSplits, row: str, upsampler: nn.Module, out_dir) -> dict:
        import time

        from torch.utils.data import DataLoader, Subset
        from tqdm.auto import tqdm

        cfg, t = ctx.cfg, ctx.cfg.task
        definition, mask_space = str(t.definition), str(t.mask_space)
        scaling = "max" if definition == "paper" else "min_max"
        device = eval_device(cfg)
        start = time.time()
        correct, seen = self.classified(ctx, data)
        chosen = draw_correct(correct, t.get("images"), int(t.sample_seed))
        if t.get("images") is not None and len(chosen) < int(t.images):
            log.warning("%s: %d correctly classified images, fewer than task.images=%d: scoring them all.",
                        data.key, len(chosen), int(t.images))
        clf = self.classifier(ctx).to(device)
        ctx.backbone.to(device)
        extra = {}
        if trains_with_probe(cfg, row):
            upsampler, extra = self.train_upsampler(ctx, data, row, upsampler, out_dir, device)
        up = cam_row(clf, upsampler.to(device).eval())
        size = (int(t.image_size), int(t.image_size))
        wanted = {chosen[i] for i in picture_indices(len(chosen), int(t.pictures))}
        loader = DataLoader(Subset(data.val, chosen), batch_size=int(t.batch_size), shuffle=False,
                            num_workers=int(t.num_workers))
        meter, pictures = CamMeter(), []
        bar = tqdm(loader, desc=f"{data.key} / {row}", disable=not bool(cfg.trainer.get("enable_progress_bar", True)))
        for batch in bar:
            image01 = batch["image"].to(device)
            label = torch.as_tensor(batch["label"]).view(-1).long().to(device)
            x = ctx.backbone.normalize(image01)
            cam, low = grad_cam(clf, up, x, label, size, return_low_res=True, scaling=scaling)
            metrics = score_explanations(clf, x, image01, label, cam,
                                         lambda e: grad_cam(clf, up, e, label, size, scaling=scaling),
                                         ctx.backbone.normalize, definition, mask_space)
            meter.update(metrics)
            for j, i in enumerate(batch["index"].tolist()):
                if i in wanted:
                    pictures.append({"index": int(i), "name": batch["name"][j], "image": image01[j].cpu(),
                                     "target": low[j].cpu(), "prediction": cam[j].cpu()})
        metrics = meter.compute()
        metrics["classified_images"] = seen
        metrics["correct_images"] = len(correct)
        metrics["accuracy"] = len(correct) / max(seen, 1)
        if meter.images == 0:
            log.warning("%s / %s: no image was classified correctly; nothing to score.", data.key, row)
        return {"metrics": metrics, "pictures": pictures, "seconds": round(time.time() - start, 1),
                "val_images": len(data.val), **extra}

    def train_upsampler(self, ctx: EvalContext, data: DatasetSplits, row: str, upsampler: nn.Module, out_dir,
                        device) -> Tuple[nn.Module, dict]:
        """Train a copy of the row's upsampler through the frozen classifier (``task.upsampler_training``,
        module docstring of :mod:`jafar.eval.cam`); return it and what the result records. Resumed from
        ``upsampler_training.pt`` (written every ``checkpoint_every`` steps) when the run resumes."""
        import copy
        import time
        from pathlib import Path

        from torch.utils.data import DataLoader

        from ...runs.samplers import step_seed
        from ...utils import atomic_path
        from ..cam import pooled_classifier_loss
        from ..probes import EpochShuffleSampler, trainable_parameters

        cfg, t = ctx.cfg, ctx.cfg.task
        u = t.upsampler_training
        steps, every = int(u.steps), int(u.checkpoint_every)
        if data.train is None or len(data.train) < int(u.batch_size):
            raise ValueError(f"{row} trains through the classifier on dataset.{data.key}'s training split, which has "
                             f"{0 if data.train is None else len(data.train)} images, fewer than "
                             f"task.upsampler_training.batch_size={u.batch_size}.")
        up = copy.deepcopy(upsampler).to(device)  # the row's module is shared: each data set trains its own copy
        params = trainable_parameters(up)
        for param in params:
            param.requires_grad_(True)
        up.train()
        opt = runs.build_partial(u.optimizer)(params)
        state_file = Path(out_dir) / "upsampler_training.pt"
        step, losses = 0, []
        if ctx.resume and state_file.is_file():
            state = torch.load(state_file, map_location=device, weights_only=True)
            up.load_state_dict(state["upsampler"])
            opt.load_state_dict(state["optimizer"])
            step, losses = int(state["step"]), list(state["losses"])
            log.info("%s / %s: upsampler training resumed at step %d of %d", data.key, row, step, steps)
        clf = self.classifier(ctx)
        sampler = EpochShuffleSampler(len(data.train), step_seed(int(cfg.seed), 7))
        per_epoch = max(1, len(data.train) // int(u.batch_size))
        start = time.time()
        while step < steps:
            epoch, skip = divmod(step, per_epoch)
            sampler.set_epoch(epoch)
            loader = DataLoader(data.train, batch_size=int(u.batch_size), sampler=sampler, drop_last=True,
                                num_workers=int(t.num_workers))
            for i, batch in enumerate(loader):
                if i < skip:
                    continue
                label = torch.as_tensor(batch["label"]).view(-1).long().to(device)
                loss = pooled_classifier_loss(clf, up, ctx.backbone.normalize(batch["image"].to(device)), label)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(round(float(loss), 5))
                step += 1
                if step % every == 0 or step == steps:
                    with atomic_path(state_file) as tmp:
                        torch.save({"upsampler": up.state_dict(), "optimizer": opt.state_dict(), "step": step,
                                    "losses": losses}, tmp)
                if step >= steps:
                    break
        up.eval()
        weights = Path(out_dir) / "upsampler.pt"
        with atomic_path(weights) as tmp:
            torch.save({k: v.detach().cpu() for k, v in up.state_dict().items()}, tmp)
        log.info("%s / %s: upsampler trained for %d steps through the classifier (loss %.4f -> %.4f, %.0f s)",
                 data.key, row, steps, losses[0] if losses else float("nan"), losses[-1] if losses else float("nan"),
                 time.time() - start)
        return up, {"upsampler_weights": f"trained through the classifier ({u.protocol}, {steps} steps): {weights.name}",
                    "upsampler_training_loss": {"first": losses[0] if losses else None,
                                                "last": losses[-1] if losses else None}}


register_task(CamTask())
