"""Depth pseudo-labels from Depth Anything V2, as the official depth probe makes them.

The official evaluation (github PaulCouairon/JAFAR @ 94d4d54, ``evaluation/train_probes.py``)
runs ``depth-anything/Depth-Anything-V2-Small-hf`` through ``transformers``
(``AutoImageProcessor`` + ``AutoModelForDepthEstimation``) on each batch of uint8 images and
resizes ``predicted_depth`` bilinearly to the probe's output size. That output is Depth Anything
V2's *relative* prediction (larger is nearer), which the official code uses as the depth target
as it is, with ``max_depth = 10``; so does this module.

``transformers`` is optional: ``pip install transformers``. Offline, pass ``model`` as a local
folder holding the Hugging Face files.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_MODEL = "depth-anything/Depth-Anything-V2-Small-hf"


class DepthAnythingLabeler(nn.Module):
    """``forward(images in [0, 1], (B, 3, H, W)) -> (B, H, W)`` relative depth, frozen."""

    def __init__(self, model: str = DEFAULT_MODEL):
        super().__init__()
        try:
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation
        except ImportError:
            raise RuntimeError("depth pseudo-labels need the transformers package: `pip install transformers` "
                               "(or give a data set with depth maps and task.pseudo_labels=null).") from None
        try:
            self.processor = AutoImageProcessor.from_pretrained(model)
            self.model = AutoModelForDepthEstimation.from_pretrained(model).eval()
        except Exception as exc:
            raise RuntimeError(f"could not load the depth model {model!r} ({type(exc).__name__}: {exc}); offline, "
                               f"download its Hugging Face folder elsewhere and pass its path as "
                               f"task.pseudo_model=/path/to/folder.") from None
        for p in self.model.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        batch = (images.clamp(0, 1) * 255).byte().permute(0, 2, 3, 1).cpu().numpy()
        inputs = self.processor(images=list(np.ascontiguousarray(batch)), return_tensors="pt").to(device)
        depth = self.model(**inputs)["predicted_depth"]
        return F.interpolate(depth.unsqueeze(1), size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
