"""Training-free open-vocabulary segmentation with MaskCLIP (``task=ovseg``).

For each image: MaskCLIP's dense CLIP features (:mod:`jafar.eval.maskclip`, ``(B, 512, h, w)``
for ViT-B/16) are upsampled to the label size by the row's upsampler, L2-normalised per pixel
and compared (cosine) with the text embeddings of the data set's class names put in the prompt
templates; each pixel takes the class of highest similarity. Nothing is trained. Scores: mIoU
and pixel accuracy with torchmetrics, 255 ignored (:func:`jafar.eval.metrics.segmentation_metrics`,
as ``task=seg``).
"""

from __future__ import annotations

import logging
from typing import List

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


def segment(backbone, upsampler: nn.Module, image01: torch.Tensor, text: torch.Tensor, size) -> torch.Tensor:
    """Cosine-similarity logits ``(B, K, *size)`` of the upsampled MaskCLIP features against the
    class embeddings ``text`` (``(K, D)``, normalised)."""
    x = backbone.normalize(image01)
    with torch.no_grad():
        feats = backbone(x)
        hr = upsampler(x, feats, tuple(size)).float()
        logits = torch.einsum("bdhw,kd->bkhw", F.normalize(hr, dim=1), text.to(hr.device, hr.dtype))
        if tuple(logits.shape[-2:]) != tuple(size):  # an upsampler that overshoots
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    return logits


def never_labelled(dataset, num_classes: int) -> List[int]:
    """The classes no label id of ``dataset`` maps to (through its ``lut``), e.g. ADE20K's
    "other" with ``skip_other_class``: task=ovseg never predicts them. Empty without a ``lut``."""
    lut = getattr(dataset, "lut", None)
    if lut is None:
        return []
    return sorted(set(range(int(num_classes))) - {int(v) for v in np.unique(lut)})
