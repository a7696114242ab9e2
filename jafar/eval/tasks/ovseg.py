"""``task=ovseg``: training-free open-vocabulary segmentation with MaskCLIP (the paper's Table 3),
the segmentation itself in :mod:`jafar.eval.ovseg`."""

from __future__ import annotations

import logging
import time
from typing import List

import torch
from torch import nn

from ..metrics import segmentation_metrics
from ..ovseg import never_labelled, segment
from ..report import Column
from . import DatasetSplits, EvalContext, Task, eval_device, picture_indices, register_task

log = logging.getLogger(__name__)


class OVSegTask(Task):
    name = "ovseg"
    title = "Open-vocabulary segmentation (MaskCLIP, training-free)"
    columns = (Column("miou", "mIoU", True, 100.0, 2), Column("accuracy", "Acc.", True, 100.0, 2))
    picture_kind = "seg"
    needs_train = False

    def check(self, cfg) -> None:
        t = cfg.task
        if "maskclip" not in str(cfg.backbone.get("_target_", "")):
            raise ValueError(f"task=ovseg needs a CLIP backbone through MaskCLIP (backbone=maskclip_vitb16), got "
                             f"backbone {cfg.backbone.get('name')!r}.")
        templates = list(t.templates or [])
        if not templates or any("{}" not in str(x) for x in templates):
            raise ValueError(f"task.templates must be a non-empty list of prompts holding '{{}}' for the class "
                             f"name, got {templates}.")
        if int(t.batch_size) < 1:
            raise ValueError(f"task.batch_size must be a positive integer, got {t.batch_size}.")
        for key in t.datasets:
            d = cfg.dataset.get(key, {})
            if str(d.get("_target_", "")).endswith(("DepthFolder", "ImageNetFolder")):
                raise ValueError(f"task=ovseg needs a segmentation data set with class names; {key} is not one.")
            if str(d.get("_target_", "")).endswith("ADE20K") and not d.get("skip_other_class"):
                raise ValueError(f"task=ovseg on ADE20K scores its 150 named classes: set dataset.{key}.skip_other_class"
                                 f"=true (id 0 'other' ignored, as open-vocabulary ADE20K-150 is scored), got false.")

    def table_notes(self, ctx: EvalContext) -> List[str]:
        bb, t = ctx.backbone, ctx.cfg.task
        notes = [f"MaskCLIP features of {bb.name} ({bb.embed_dim} channels at stride {bb.patch_size}); "
                 f"{len(t.templates)} prompt template(s), e.g. {t.templates[0]!r}; argmax over the class names."]
        if not getattr(bb, "pretrained", True):
            notes.insert(0, "**Smoke test: the CLIP weights are randomly initialised (no CLIP weights are "
                            "available offline), so these scores measure nothing but the plumbing.**")
        return notes

    def text(self, ctx: EvalContext, data: DatasetSplits) -> torch.Tensor:
        key = ("ovseg_text", data.key)
        if key not in ctx.extras:
            names = data.class_names
            if not names:
                raise ValueError(f"dataset.{data.key} has no class names: task=ovseg prompts CLIP with them "
                                 f"(set dataset.{data.key}.class_names).")
            ctx.extras[key] = ctx.backbone.text_embeddings([str(n) for n in names], list(ctx.cfg.task.templates))
        return ctx.extras[key]

    def evaluate(self, ctx: EvalContext, data: DatasetSplits, row: str, upsampler: nn.Module, out_dir) -> dict:
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        cfg, t = ctx.cfg, ctx.cfg.task
        device = eval_device(cfg)
        ctx.backbone.to(device)
        upsampler = upsampler.to(device).eval()
        text = self.text(ctx, data)
        num_classes = int(data.num_classes or len(text))
        if len(text) != num_classes:
            raise ValueError(f"dataset.{data.key}: {len(text)} class names for {num_classes} classes.")
        metrics = segmentation_metrics(num_classes).to(device)
        absent = never_labelled(data.val, num_classes)
        wanted = set(picture_indices(len(data.val), int(t.pictures)))
        size = int(t.target_size or t.image_size)
        loader = DataLoader(data.val, batch_size=int(t.batch_size), shuffle=False, num_workers=int(t.num_workers))
        pictures, start = [], time.time()
        for batch in tqdm(loader, desc=f"{data.key} / {row}",
                          disable=not bool(cfg.trainer.get("enable_progress_bar", True))):
            image, label = batch["image"].to(device), batch["label"].to(device)
            scores = segment(ctx.backbone, upsampler, image, text, label.shape[-2:])
            if absent:  # classes no label id maps to (ADE20K's "other" when skipped) are never predicted
                scores[:, absent] = float("-inf")
            pred = scores.argmax(1)
            metrics.update(pred, label.long())
            for j, index in enumerate(batch["index"].tolist()):
                if index in wanted:
                    pictures.append({"index": index, "name": batch["name"][j], "image": image[j].cpu(),
                                     "target": label[j].cpu(), "prediction": pred[j].to(torch.uint8).cpu()})
        out = {k: float(v) for k, v in metrics.compute().items()}
        return {"metrics": out, "pictures": pictures, "seconds": round(time.time() - start, 1),
                "val_images": len(data.val), "size": size}


register_task(OVSegTask())
