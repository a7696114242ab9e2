"""Metrics of the 2-D probes.

Segmentation: mean IoU over classes and pixel accuracy, with torchmetrics, pixels labelled
``ignore_index`` (255) left out. The official evaluation (github PaulCouairon/JAFAR @ 94d4d54,
``evaluation/train_probes.py``) drops the 255 pixels itself and then calls
``JaccardIndex(task="multiclass", num_classes)`` and ``Accuracy(task="multiclass", num_classes)``
with their defaults: macro-averaged IoU over the classes present in the prediction or the
target, and micro-averaged (pixel) accuracy. ``ignore_index=255`` gives the same numbers.

Depth: the official ``eval_metrics`` of the same file, per image: pixels with
``min_depth < gt < max_depth`` only; ``delta_1`` is the fraction with
``max(gt / pred, pred / gt) < 1.25``, RMSE is ``sqrt(mean((gt - pred)^2))``; the official code
averages each metric over validation batches of one image, so we average per image.
"""

from __future__ import annotations

from typing import Dict

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

IGNORE_INDEX = 255

#: the per-image depth errors of the official ``eval_metrics``, in its order
DEPTH_METRICS = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log_10", "silog")


def segmentation_metrics(num_classes: int, ignore_index: int = IGNORE_INDEX) -> MetricCollection:
    """``{"miou": macro IoU, "accuracy": pixel accuracy}`` over ``num_classes`` classes.

    ``update(preds, target)`` takes logits/probabilities ``(B, K, H, W)`` or class maps
    ``(B, H, W)`` and integer targets ``(B, H, W)``; ``ignore_index`` pixels do not count.
    """
    if int(num_classes) < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}.")
    kw = dict(num_classes=int(num_classes), ignore_index=ignore_index)
    return MetricCollection({"miou": MulticlassJaccardIndex(average="macro", **kw),
                             "accuracy": MulticlassAccuracy(average="micro", **kw)})


def depth_errors(pred: torch.Tensor, gt: torch.Tensor, min_depth: float = 1e-3,
                 max_depth: float = 10.0) -> Dict[str, float]:
    """The official per-image depth errors between ``pred`` and ``gt`` (same shape), on the
    pixels where ``min_depth < gt < max_depth``; an empty dict when there is none.

    ``pred`` must be positive there (the probes' predictions are).
    """
    if pred.shape != gt.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and gt {tuple(gt.shape)} must have the same shape.")
    mask = (gt > min_depth) & (gt < max_depth)
    if not bool(mask.any()):
        return {}
    g, p = gt[mask].double(), pred[mask].double()
    thresh = torch.maximum(g / p, p / g)
    err = torch.log(p) - torch.log(g)
    return {
        "d1": (thresh < 1.25).double().mean().item(),
        "d2": (thresh < 1.25 ** 2).double().mean().item(),
        "d3": (thresh < 1.25 ** 3).double().mean().item(),
        "abs_rel": ((g - p).abs() / g).mean().item(),
        "sq_rel": ((g - p) ** 2 / g).mean().item(),
        "rmse": ((g - p) ** 2).mean().sqrt().item(),
        "rmse_log": (err ** 2).mean().sqrt().item(),
        "log_10": (torch.log10(g) - torch.log10(p)).abs().mean().item(),
        "silog": ((err ** 2).mean() - err.mean() ** 2).clamp_min(0).sqrt().item() * 100,
    }


class DepthMetrics(Metric):
    """Per-image :func:`depth_errors`, averaged over the images that have valid pixels.

    ``update(pred, gt)`` takes ``(B, H, W)`` or ``(B, 1, H, W)`` batches; ``compute()`` returns
    a dict of :data:`DEPTH_METRICS` (NaN when no image had a valid pixel) and ``images``.
    """

    full_state_update = False

    def __init__(self, min_depth: float = 1e-3, max_depth: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= float(min_depth) < float(max_depth):
            raise ValueError(f"need 0 <= min_depth < max_depth, got {min_depth}, {max_depth}.")
        self.min_depth, self.max_depth = float(min_depth), float(max_depth)
        self.add_state("sums", default=torch.zeros(len(DEPTH_METRICS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("images", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, gt: torch.Tensor) -> None:
        pred = pred[:, 0] if pred.dim() == 4 else pred
        gt = gt[:, 0] if gt.dim() == 4 else gt
        for p, g in zip(pred.detach(), gt.detach()):
            errors = depth_errors(p, g, self.min_depth, self.max_depth)
            if errors:
                self.sums += torch.tensor([errors[k] for k in DEPTH_METRICS], dtype=torch.float64,
                                          device=self.sums.device)
                self.images += 1

    def compute(self) -> Dict[str, torch.Tensor]:
        n = self.images
        means = self.sums / n if n > 0 else torch.full_like(self.sums, float("nan"))
        return {**{k: means[i] for i, k in enumerate(DEPTH_METRICS)}, "images": n}
