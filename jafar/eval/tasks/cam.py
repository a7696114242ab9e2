"""``task=cam``: the faithfulness of Grad-CAMs computed from upsampled features (the paper's
Table 2 and appendix A.1), with the classifier, Grad-CAM and metrics of :mod:`jafar.eval.cam`."""

from __future__ import annotations

import logging
from typing import List, Tuple

import torch
from torch import nn

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
from . import DatasetSplits, EvalContext, Task, eval_device, picture_indices, register_task

log = logging.getLogger(__name__)


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

    def check(self, cfg) -> None:
        t = cfg.task
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
                "val_images": len(data.val)}


register_task(CamTask())
