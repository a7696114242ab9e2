"""The BeV losses: PointBeV's (``loss.name=pointbev``, the paper setting's) and SimpleBEV's
(``loss.name=simplebev``), each with the learned weighting and the visibility mask.

PointBeV's (github valeoai/PointBeV, ``pointbev/models/trainer.py`` ``_common_step_losses`` and
``_get_masks``, ``pointbev/loss/segmentation.py`` ``BCELoss`` and ``SpatialLoss``,
``pointbev/loss/common.py`` ``Weighting`` in its ``learned`` mode, ``configs/train.yaml``):

* segmentation: ``BCEWithLogits(pos_weight=2.13)``, mean over the cells of ``valid_binimg`` (the
  visibility mask) and, for a sparse head, its predicted cells;
* centerness: plain MSE, mean over the cells of ``valid_centerness`` (the targets' mask around the
  boxes seen less than ``min_visibility``; and a sparse head's cells);
* offsets: L1, mean over both channels of the cells whose target is not the ignore value 255
  (the cells of a box) within the segmentation's mask; the targets are integer offsets;
* each mean ``sum(loss * mask) / (sum(mask) + 1e-6)``;
* weighting: one learned ``w`` per term, initialised to 0, ``term * c * exp(-w) + 0.5 w`` with
  ``c = 10`` for the segmentation and 0.5 for the others; the total is the *mean* of the three
  (``total_loss / len(losses)``), which is what the gradient clip at 5 sees.

SimpleBEV's: facts taken from SimpleBEV (github aharley/simple_bev, ``train_nuscenes.py`` and
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

Both keep the learned weights under the same names (``ce_weight``, ``center_weight``,
``offset_weight``).
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


class PointBevLoss(SimpleBevLoss):
    """PointBeV's three terms, masks and weighting (module docstring); ``forward`` returns the total
    and its parts. The batch needs ``valid_centerness`` (:func:`bev.data.targets.bev_targets`)."""

    def forward(self, out: Dict[str, torch.Tensor], batch: Dict[str, torch.Tensor],
                point_mask: torch.Tensor = None) -> Dict[str, torch.Tensor]:
        if "valid_centerness" not in batch:
            raise KeyError("loss.name=pointbev needs the targets' valid_centerness map (bev.data.targets.bev_targets) "
                           "in the batch.")
        seg = batch["seg"].float()
        valid = visibility_mask(batch["seg"], batch["visibility"], self.min_visibility)
        centre_valid = batch["valid_centerness"].bool()
        if point_mask is not None:
            valid = valid & point_mask
            centre_valid = centre_valid & point_mask
        bce = F.binary_cross_entropy_with_logits(out["seg"].float(), seg, reduction="none", pos_weight=self.pos_weight)
        ce = masked_mean(bce, valid)
        center = masked_mean((out["centerness"].float() - batch["centerness"].float()) ** 2, centre_valid)
        l1 = (out["offset"].float() - batch["offset"].float()).abs()  # (B, 2, X, Y)
        offset = masked_mean(l1, (valid & (batch["seg"] > 0)).expand_as(l1))
        terms = (self.seg_scale * ce * torch.exp(-self.ce_weight) + 0.5 * self.ce_weight,
                 0.5 * center * torch.exp(-self.center_weight) + 0.5 * self.center_weight,
                 0.5 * offset * torch.exp(-self.offset_weight) + 0.5 * self.offset_weight)
        total = (terms[0] + terms[1] + terms[2]) / 3
        return {"loss": total, "bce": ce.detach(), "center": center.detach(), "offset": offset.detach()}


#: ``loss.name`` -> the loss class (``configs/loss/<name>.yaml``)
LOSSES = {"pointbev": PointBevLoss, "simplebev": SimpleBevLoss}


def build_loss(name: str = "pointbev", **options) -> SimpleBevLoss:
    """The BeV loss ``name`` (:data:`LOSSES`) with ``options`` (``pos_weight``, ``seg_scale``,
    ``learned_weights``, ``min_visibility``)."""
    if name not in LOSSES:
        raise ValueError(f"loss.name must be one of {sorted(LOSSES)}, got {name!r}.")
    return LOSSES[name](**options)
