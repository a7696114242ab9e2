"""SimpleBEV's losses and their learned weighting, with the visibility mask.

Facts taken from SimpleBEV (github aharley/simple_bev, ``train_nuscenes.py`` and
``nets/segnet.py``), also used by PointBeV (github valeoai/PointBeV, ``configs/train.yaml``:
``pos_weight: 2.13``, ``weights_kwargs.mode: learned``):

* segmentation: ``BCEWithLogits(pos_weight=2.13)``, mean over the valid cells;
* centerness: the "balanced" MSE, the mean of the squared error over cells with target > 0.5 and
  over cells with target < 0.5, averaged (the head ends in a sigmoid);
* offset: L1 summed over the two channels, mean over the valid vehicle cells;
* weighting (uncertainty, one learned log-variance ``w`` per term, initialised to 0):
  ``10 * bce * exp(-w_ce) + 0.5 * w_ce + center / (2 exp(w_c)) + 0.5 * w_c
  + offset / (2 exp(w_o)) + 0.5 * w_o``.

Cells of vehicle boxes whose nuScenes visibility level is below ``min_visibility`` are ignored
by every term (:func:`bev.data.targets.visibility_mask`).
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from .data.targets import visibility_mask


def masked_mean(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return (values * mask).sum() / (mask.sum() + eps)


def balanced_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    err = (pred - target) ** 2
    return 0.5 * (masked_mean(err, (target > 0.5) & valid) + masked_mean(err, (target < 0.5) & valid))


class SimpleBevLoss(nn.Module):
    """The three terms and their learned weights; ``forward`` returns the total and its parts."""

    def __init__(self, pos_weight: float = 2.13, seg_scale: float = 10.0, learned_weights: bool = True,
                 min_visibility: int = 2):
        super().__init__()
        if int(min_visibility) not in (1, 2, 3, 4):
            raise ValueError(f"min_visibility must be a nuScenes visibility level 1..4, got {min_visibility}.")
        self.register_buffer("pos_weight", torch.tensor([float(pos_weight)]))
        self.seg_scale = float(seg_scale)
        self.min_visibility = int(min_visibility)
        self.ce_weight = nn.Parameter(torch.zeros(()), requires_grad=learned_weights)
        self.center_weight = nn.Parameter(torch.zeros(()), requires_grad=learned_weights)
        self.offset_weight = nn.Parameter(torch.zeros(()), requires_grad=learned_weights)

    def forward(self, out: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor],
                point_mask: torch.Tensor = None) -> Dict[str, torch.Tensor]:
        """``point_mask`` (B, 1, X, Y), optional: the cells a sparse head predicted (PointBeV)."""
        seg = batch["seg"].to(out["seg"].dtype)
        valid = visibility_mask(batch["seg"], batch["visibility"], self.min_visibility)
        if point_mask is not None:
            valid = valid & point_mask
        bce = F.binary_cross_entropy_with_logits(out["seg"].float(), seg.float(), reduction="none",
                                                 pos_weight=self.pos_weight)
        ce = masked_mean(bce, valid)
        center = balanced_mse(out["centerness"].float(), batch["centerness"].float(), valid)
        l1 = (out["offset"].float() - batch["offset"].float()).abs().sum(1, keepdim=True)
        offset = masked_mean(l1, valid & (batch["seg"] > 0))
        total = (self.seg_scale * ce * torch.exp(-self.ce_weight) + 0.5 * self.ce_weight
                 + center / (2 * torch.exp(self.center_weight)) + 0.5 * self.center_weight
                 + offset / (2 * torch.exp(self.offset_weight)) + 0.5 * self.offset_weight)
        return {"loss": total, "bce": ce.detach(), "center": center.detach(), "offset": offset.detach()}
