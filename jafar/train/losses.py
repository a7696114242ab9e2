"""JAFAR's training loss.

Official (github PaulCouairon/JAFAR @ 94d4d54, ``src/loss.py``, ``Cosine_MSE``): per pixel,
``1 - cos(pred, target)`` (``nn.CosineEmbeddingLoss`` with target 1) plus the MSE between
``pred`` and ``target`` both min-max normalised by the *target's* per-pixel range over channels
(``(x - min) / (max - min + 1e-6)``), averaged over pixels. The paper (section 3.2) writes a
plain L2 term instead: ``mse="plain"`` gives that, ``mse="none"`` drops it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MSE_MODES = ("minmax", "plain", "none")


class CosineMSELoss(nn.Module):
    def __init__(self, cos_weight: float = 1.0, mse: str = "minmax", mse_weight: float = 1.0):
        super().__init__()
        if mse not in MSE_MODES:
            raise ValueError(f"loss.mse must be one of {MSE_MODES}, got {mse!r}.")
        self.cos_weight, self.mse, self.mse_weight = float(cos_weight), mse, float(mse_weight)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape.")
        pred, target = pred.float(), target.float()
        loss = self.cos_weight * (1 - F.cosine_similarity(pred, target, dim=1, eps=1e-8)).mean()
        if self.mse == "minmax":
            lo = target.amin(dim=1, keepdim=True)
            span = target.amax(dim=1, keepdim=True) - lo + 1e-6
            loss = loss + self.mse_weight * F.mse_loss((pred - lo) / span, (target - lo) / span)
        elif self.mse == "plain":
            loss = loss + self.mse_weight * F.mse_loss(pred, target)
        return loss
