"""LightningModule of BeV vehicle segmentation: encoder (frozen backbone + upsampler), a BeV head,
the loss (:mod:`bev.losses`: PointBeV's by default), IoU under the visibility mask, pictures, and
the best validation IoU kept with its weights.

The recipe (the paper's, which takes PointBeV's: github valeoai/PointBeV ``configs/model/
optimizer/adamW.yaml`` and ``configs/model/scheduler/onecycle.yaml``): AdamW, lr 3e-4, weight
decay 1e-7; OneCycle with ``div_factor=3``, ``final_div_factor=20``, ``pct_start=0.05``, linear
annealing, no momentum cycling, stepped every batch; gradients clipped at norm 5 (the
trainer's ``gradient_clip_val``).

IoU (PointBeV's metric, :class:`VisibleIoU`): intersection and union accumulated over the whole
validation set at threshold 0.5, on the cells the visibility mask keeps
(:func:`bev.data.targets.visibility_mask`), for ``min_visibility`` 1 (every box) and 2 (boxes
0-40 % visible ignored). The prior-map baseline (:func:`prior_baseline`) is scored with it too.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch import nn
from torchmetrics.classification import BinaryJaccardIndex

from .data.targets import visibility_mask
from .losses import PointBevLoss, SimpleBevLoss

log = logging.getLogger(__name__)

IGNORE = 255


class VisibleIoU(BinaryJaccardIndex):
    """IoU of the vehicle class: intersection over union of ``prob > 0.5`` and the labels,
    accumulated over every cell that :func:`visibility_mask` keeps at ``min_visibility`` (summed
    over all updates and, under DDP, all ranks), computed in float64 from the integer counts.

    ``update(prob, seg, visibility)``: probabilities (or 0/1 predictions), labels and visibility
    levels of one shape. An empty union gives 0.
    """

    def __init__(self, min_visibility: int, **kwargs):
        super().__init__(threshold=0.5, ignore_index=IGNORE, **kwargs)
        if int(min_visibility) not in (1, 2, 3, 4):
            raise ValueError(f"min_visibility must be a nuScenes visibility level 1..4, got {min_visibility}.")
        self.min_visibility = int(min_visibility)

    def update(self, prob: torch.Tensor, seg: torch.Tensor, visibility: torch.Tensor) -> None:
        target = seg.to(torch.int64)
        target = torch.where(visibility_mask(seg, visibility, self.min_visibility), target,
                             torch.full_like(target, IGNORE))
        super().update(prob, target)

    def compute(self) -> torch.Tensor:
        (_, fp), (fn, tp) = self.confmat.to(torch.float64)
        union = tp + fp + fn
        return tp / union if union > 0 else torch.zeros_like(union)


class BestValidation(L.Callback):
    """Keeps the weights of the best validation: after every validation whose ``key`` IoU (the
    trained visibility level's) beats the best so far (strictly: the earliest of equal ones
    stays), the full state is saved to ``<dirpath>/best.ckpt`` (atomic, like every checkpoint of
    the run; under DDP every rank has the same IoU, from counts summed over ranks, and rank 0
    writes). PointBeV's model selection (github valeoai/PointBeV ``configs/callbacks/
    default_pl.yaml``: ``ModelCheckpoint`` on the validation IoU, ``mode: max``, ``save_top_k: 1``;
    ``pointbev/train.py`` then evaluates ``best_model_path`` on the validation set).

    :attr:`best` (``{"step", "iou", "iou_vis1", ...}``) travels in every checkpoint (callback state,
    and ``checkpoint["best_validation"]`` for a reader of ``best.ckpt``). The step checkpoint of a
    validated step is written after its validation (:class:`jafar.runs.common.StepCheckpoint`
    ``validate_every``), so a resumed run knows the best of every step before it, and a run killed
    between ``best.ckpt`` and ``last.ckpt`` redoes that step and writes the same file again."""

    FILE = "best.ckpt"

    def __init__(self, dirpath, key: str):
        self.dirpath, self.key = Path(dirpath), str(key)
        self.best: Optional[dict] = None

    @property
    def state_key(self) -> str:
        return "BestValidation"

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict.get("best")

    @property
    def path(self) -> Path:
        return self.dirpath / self.FILE

    def _better(self, candidate: Optional[dict]) -> bool:
        return candidate is not None and (self.best is None or candidate["iou"] > self.best["iou"])

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.key not in pl_module.val_results:
            return
        candidate = {"step": int(trainer.global_step), "iou": float(pl_module.val_results[self.key]),
                     **{k: float(v) for k, v in pl_module.val_results.items()}}
        if self._better(candidate):
            self.best = candidate
            trainer.save_checkpoint(self.path)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["best_validation"] = self.best


class BevSegmentation(L.LightningModule):
    def __init__(self, encoder: nn.Module, head: nn.Module, loss: Optional[SimpleBevLoss] = None,
                 lr: float = 3e-4, weight_decay: float = 1e-7, betas: Sequence[float] = (0.9, 0.999),
                 scheduler: Optional[Callable] = None, total_steps: Optional[int] = None,
                 iou_visibilities: Sequence[int] = (1, 2), picture_dir: Optional[str] = None,
                 pictures: int = 2, optimizer: Optional[Callable] = None):
        super().__init__()
        self.encoder, self.head = encoder, head
        self.optimizer_factory = optimizer
        self.loss = loss or PointBevLoss()
        self.lr, self.weight_decay, self.betas = float(lr), float(weight_decay), tuple(betas)
        self.scheduler_factory = scheduler
        self.total_steps = total_steps
        self.iou_visibilities = tuple(int(v) for v in iou_visibilities)
        self.ious = nn.ModuleDict({f"vis{v}": VisibleIoU(v) for v in self.iou_visibilities})
        self.picture_dir = Path(picture_dir) if picture_dir else None
        self.num_pictures = int(pictures)
        self.val_results: Dict[str, float] = {}
        self.validated_at = -1  # the global step of the last validation
        self._picture_batches = []

    # ------------------------------------------------------------------ exact resume
    # The random state (dropout in BEVFormer, anything else drawn from the global generators) is
    # saved with every checkpoint and put back just before the first training step after a
    # resume, after Lightning has built its data iterators, so a killed run continues with the
    # draws of the uninterrupted one (tests/test_bev_train.py::test_killed_run_resumes_exactly).
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()  # as tensors and numbers: Lightning
        checkpoint["rng_states"] = {                                  # loads checkpoints weights_only
            "torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                      int(has_gauss), float(gauss)),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._resume_rng = checkpoint.get("rng_states")

    def on_train_batch_start(self, batch, batch_idx):
        states, self._resume_rng = getattr(self, "_resume_rng", None), None
        if states is not None:
            torch.set_rng_state(states["torch"])
            kind, keys, pos, has_gauss, gauss = states["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(states["python"])
            if states.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(states["cuda"])

    # ------------------------------------------------------------------ forward
    def forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        images = batch["images"]
        keys = batch.get("cache_keys")
        features = self.encoder(images, cache_keys=keys)
        return self.head(features, batch["intrinsics"], batch["cam2ego"], tuple(images.shape[-2:]))

    def _step_loss(self, batch, out):
        point_mask = out.get("point_mask")
        return self.loss(out, batch, point_mask=point_mask)

    def training_step(self, batch, batch_idx):
        out = self(batch)
        losses = self._step_loss(batch, out)
        if not torch.isfinite(losses["loss"].detach()).item():
            raise FloatingPointError(self._non_finite_sentence(batch, out, losses["loss"]))
        bs = batch["images"].shape[0]
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=bs)
        for k in ("bce", "center", "offset"):
            self.log(f"train/{k}", losses[k], batch_size=bs)
        return losses["loss"]

    @torch.no_grad()
    def _non_finite_sentence(self, batch, out, loss) -> str:
        """Which input of a non-finite training loss is non-finite first (computed only then)."""
        images = batch["images"]
        where = "none of the images, backbone features, upsampled features or logits (the targets or the loss)"
        if not torch.isfinite(images).all():
            where = "the images"
        else:
            enc = self.encoder
            feats = None
            if hasattr(enc, "backbone") and getattr(enc, "cache_dir", None) is None:
                feats = enc.backbone(enc.backbone.normalize(images.flatten(0, 1)))
            if feats is not None and not torch.isfinite(feats).all():
                where = "the backbone features"
            elif not torch.isfinite(enc(images, cache_keys=batch.get("cache_keys"))).all():
                where = "the upsampled features" if getattr(enc, "upsampler", None) is not None else "the features"
            elif not torch.isfinite(out["seg"]).all():
                where = "the logits"
        tokens = list(batch.get("token", []))
        return (f"training loss is {loss.item()} at step {self.global_step} (batch of samples {tokens}); "
                f"first non-finite input: {where}.")

    # ------------------------------------------------------------------ validation
    def on_validation_epoch_start(self):
        for m in self.ious.values():
            m.reset()
        self._picture_batches = []

    def validation_step(self, batch, batch_idx):
        out = self(batch)
        losses = self._step_loss(batch, out)
        self.log("val/loss", losses["loss"], batch_size=batch["images"].shape[0], sync_dist=True)
        prob = torch.sigmoid(out["seg"].float())
        for iou in self.ious.values():
            iou.update(prob, batch["seg"], batch["visibility"])
        if len(self._picture_batches) < self.num_pictures:
            self._picture_batches.append({"images": batch["images"][0].detach().cpu(),
                                          "seg": batch["seg"][0].detach().cpu(),
                                          "visibility": batch["visibility"][0].detach().cpu(),
                                          "prob": prob[0].detach().cpu()})

    def on_validation_epoch_end(self):
        results = {}
        for v in self.iou_visibilities:
            iou = float(self.ious[f"vis{v}"].compute())
            results[f"iou_vis{v}"] = iou
            self.log(f"val/iou_vis{v}", iou, prog_bar=True, sync_dist=False)
        self.val_results = results
        self.validated_at = self.global_step
        if self.picture_dir is not None and self.trainer.is_global_zero and self._picture_batches:
            from .viz import save_prediction_panels

            step = self.global_step
            save_prediction_panels(self._picture_batches, self.picture_dir / f"val_step{step:07d}.png")
            save_prediction_panels(self._picture_batches, self.picture_dir / "val_latest.png")

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        """``optimizer(params)`` when the module was given a factory (the tool: the config's
        ``optimizer``), else AdamW with ``lr``, ``weight_decay``, ``betas`` (PointBeV's); then, with
        a ``scheduler`` factory (the config's ``scheduler``), ``scheduler(optimizer)`` stepped every
        batch. A ``OneCycleLR`` factory is given what only the run knows: ``max_lr`` (the optimizer's
        learning rate), ``total_steps`` and a ``pct_start`` that keeps both phases non-empty
        (:func:`one_cycle_pct_start`)."""
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is not None:
            opt = self.optimizer_factory(params)
        else:
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)
        factory = self.scheduler_factory
        if factory is None:
            return opt
        if getattr(factory, "func", factory) is torch.optim.lr_scheduler.OneCycleLR:
            total = max(int(self.total_steps or self.trainer.estimated_stepping_batches), 2)
            pct = one_cycle_pct_start(float(getattr(factory, "keywords", {}).get("pct_start", 0.3)), total)
            sched = factory(opt, max_lr=opt.param_groups[0]["lr"], total_steps=total, pct_start=pct)
        else:
            sched = factory(opt)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def one_cycle_pct_start(pct_start: float, total_steps: int) -> float:
    """``pct_start`` for ``OneCycleLR`` over ``total_steps``. PyTorch's schedule divides by the
    length of each phase: the warm-up ends at step ``pct_start * total_steps - 1``, so where that
    is exactly 0 (0.05 x 20 steps, 0.1 x 10, ...) or exactly the last step, it raises
    ZeroDivisionError. There (and only there) the warm-up ends one step later (or earlier, at
    the last step; half-way for a 2-step run), said in the log; every other step count keeps
    ``pct_start`` and PyTorch's schedule exactly."""
    last = total_steps - 1
    end = pct_start * total_steps - 1
    if end != 0 and end != last:
        return pct_start
    new_end = min(1.0, last / 2) if end == 0 else max(last - 1.0, last / 2)
    adjusted = (new_end + 1) / total_steps
    log.warning("scheduler.pct_start=%g over %d steps gives OneCycleLR an empty phase; using pct_start=%g "
                "instead.", pct_start, total_steps, adjusted)
    return adjusted


class LabelCounts:
    """Per-cell counts of BeV label maps, accumulated one map at a time (memory O(cells), not
    O(samples x cells)): what the prior-map baseline needs from a whole split.

    ``samples``: maps added; ``seg``: ``(X, Y)`` int64, maps where the cell is a vehicle; for each
    level ``v`` of ``levels``: ``kept[v]`` maps where the cell counts at ``min_visibility=v``
    (:func:`visibility_mask`) and ``positive[v]`` maps where it counts and is a vehicle. Counts of
    disjoint parts of a split add up (:meth:`merge`), so workers may each count a share.
    """

    def __init__(self, shape: Sequence[int], levels: Sequence[int] = (1, 2)):
        self.shape, self.levels = tuple(int(s) for s in shape), tuple(sorted({int(v) for v in levels}))
        self.samples = 0
        self.seg = np.zeros(self.shape, dtype=np.int64)
        self.kept = {v: np.zeros(self.shape, dtype=np.int64) for v in self.levels}
        self.positive = {v: np.zeros(self.shape, dtype=np.int64) for v in self.levels}

    def add(self, seg: np.ndarray, visibility: np.ndarray) -> "LabelCounts":
        """Count one label map (``seg`` and ``visibility`` of shape ``(X, Y)``)."""
        seg, visibility = np.asarray(seg), np.asarray(visibility)
        if seg.shape != self.shape or visibility.shape != self.shape:
            raise ValueError(f"label maps of shape {seg.shape} / {visibility.shape} cannot be counted on the "
                             f"{self.shape} grid.")
        self.samples += 1
        positive = seg > 0
        self.seg += positive
        for v in self.levels:
            kept = visibility_mask(seg, visibility, v)
            self.kept[v] += kept
            self.positive[v] += positive & kept
        return self

    def merge(self, other: "LabelCounts") -> "LabelCounts":
        if other.shape != self.shape or other.levels != self.levels:
            raise ValueError(f"cannot merge counts of shape {other.shape} levels {other.levels} into "
                             f"{self.shape} levels {self.levels}.")
        self.samples += other.samples
        self.seg += other.seg
        for v in self.levels:
            self.kept[v] += other.kept[v]
            self.positive[v] += other.positive[v]
        return self

    def frequency(self) -> np.ndarray:
        """Per-cell frequency of vehicles (float64: the integer count over the number of maps)."""
        if self.samples == 0:
            raise ValueError("no label map was counted: the prior map of an empty split is undefined.")
        return self.seg / np.float64(self.samples)

    def iou(self, predicted: np.ndarray, level: int) -> float:
        """IoU of a fixed map ``predicted`` (bool ``(X, Y)``, the same for every sample) against every
        counted map at ``min_visibility=level`` (:class:`VisibleIoU`'s rule, float64 quotient of the
        integer counts; an empty union gives 0)."""
        pos, kept = self.positive[int(level)], self.kept[int(level)]
        tp = int(pos[predicted].sum())
        union = int(kept[predicted].sum()) + int(pos[~predicted].sum())
        return float(np.float64(tp) / np.float64(union)) if union > 0 else 0.0


def prior_map(counts: LabelCounts) -> np.ndarray:
    """Per-cell frequency of vehicles over the training label maps."""
    return counts.frequency()


def best_prior_threshold(freq: np.ndarray, counts: LabelCounts, level: int):
    """``(threshold, IoU)``: the threshold ``t`` of the map ``freq >= t`` with the best IoU against
    the counted maps at ``level``; candidates are the positive per-cell frequencies and 0.5, the
    smallest of equal best IoUs wins.

    All thresholds at once: with the cells sorted by decreasing frequency, the map ``freq >= t``
    is a prefix; on it the true positives are the prefix sum of ``positive``, the false positives
    ``kept - positive`` summed on it, the false negatives the ``positive`` after it, so
    ``IoU(t) = P(t) / (K(t) + P_total - P(t))`` with ``P``, ``K`` cumulative sums (integers, then
    one float64 division per candidate: the same quotients as counting each threshold's map)."""
    f = np.asarray(freq, dtype=np.float64).ravel()
    pos = counts.positive[int(level)].ravel()
    kept = counts.kept[int(level)].ravel()
    order = np.argsort(-f, kind="stable")
    f_sorted = f[order]
    cum_p = np.cumsum(pos[order])
    cum_k = np.cumsum(kept[order])
    total_p = int(pos.sum())
    candidates = np.unique(np.append(f[f > 0], 0.5))  # ascending
    # cells with freq >= t: the prefix of the descending order up to the last cell >= t
    prefix = np.searchsorted(-f_sorted, -candidates, side="right")
    tp = np.where(prefix > 0, cum_p[np.maximum(prefix - 1, 0)], 0)
    fp_and_tp = np.where(prefix > 0, cum_k[np.maximum(prefix - 1, 0)], 0)
    union = fp_and_tp + (total_p - tp)
    scores = np.where(union > 0, tp.astype(np.float64) / np.maximum(union, 1).astype(np.float64), 0.0)
    best = int(np.argmax(scores))  # first of the maxima: the smallest threshold
    return float(candidates[best]), float(scores[best])


def prior_baseline(train: LabelCounts, val: LabelCounts, visibilities: Sequence[int] = (1, 2),
                   min_visibility: int = 2) -> dict:
    """A model that knows only where vehicles usually are: the training labels' per-cell
    frequency, thresholded where it gives the best IoU on the *training* labels (so the
    validation set is not used to tune it), scored on the validation labels (:class:`VisibleIoU`'s
    rule). ``train`` and ``val`` are the splits' :class:`LabelCounts` (``train`` with
    ``min_visibility`` among its levels, ``val`` with ``visibilities``)."""
    freq = prior_map(train)
    threshold, train_iou = best_prior_threshold(freq, train, min_visibility)
    out = {"threshold": threshold, "train_iou": train_iou}
    predicted = freq >= threshold
    for v in visibilities:
        out[f"iou_vis{v}"] = val.iou(predicted, v)
    return out


def stacked_prior_baseline(train_seg, train_vis, val_seg, val_vis, visibilities=(1, 2), min_visibility=2):
    """:func:`prior_baseline` by its definition, from whole stacks of label maps (``(N, H, W)``
    arrays: memory grows with the number of samples, so runs use the streamed
    :func:`prior_baseline`): the float64 mean map, then every candidate threshold (the distinct
    positive frequencies and 0.5, ascending) scored by a fresh :class:`VisibleIoU` over the stacks,
    the first best kept. The reference the streamed version is tested against
    (``tests/test_bev_scale.py``) and measured beside (``tools/bench_bev_scale.py``)."""
    freq = np.asarray(train_seg, dtype=np.float64).mean(0)

    def scorer(seg, vis, level):
        seg, vis = torch.from_numpy(np.asarray(seg)), torch.from_numpy(np.asarray(vis))
        kept = visibility_mask(seg, vis, level)
        seg, vis = seg[kept], vis[kept]

        def score(t):
            metric = VisibleIoU(level, validate_args=False)
            metric.update(torch.from_numpy(freq >= t).expand(kept.shape)[kept], seg, vis)
            return float(metric.compute())
        return score

    train_iou = scorer(train_seg, train_vis, min_visibility)
    best_t, best = 0.5, -1.0
    for t in np.unique(np.concatenate([freq.ravel(), [0.5]])):
        if t <= 0:
            continue
        s = train_iou(t)
        if s > best:
            best_t, best = float(t), s
    out = {"threshold": best_t, "train_iou": best}
    for v in visibilities:
        out[f"iou_vis{v}"] = scorer(val_seg, val_vis, v)(best_t)
    return out
