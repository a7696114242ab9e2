"""Training-free upsamplers behind JAFAR's call ``(image, features, output_size)``.

They ignore the guidance image. ``align_corners=False`` everywhere, as in the official
evaluation code (github PaulCouairon/JAFAR @ 94d4d54) and ``torch.nn.functional.interpolate``'s
default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import _check_output_size


class Interpolate(nn.Module):
    """``F.interpolate`` of the features to ``output_size``; the image is not used."""

    modes = ("nearest", "bilinear", "bicubic")

    def __init__(self, mode: str = "bilinear"):
        super().__init__()
        if mode not in self.modes:
            raise ValueError(f"interpolation mode must be one of {self.modes}, got {mode!r}.")
        self.mode = mode

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        size = _check_output_size(output_size)
        if not isinstance(features, torch.Tensor) or features.dim() != 4:
            raise ValueError(f"features must be a (B, C, h, w) tensor, got "
                             f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}.")
        if self.mode == "nearest":
            return F.interpolate(features, size=size, mode="nearest")
        return F.interpolate(features, size=size, mode=self.mode, align_corners=False)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

