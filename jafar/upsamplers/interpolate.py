"""Training-free interpolation of the features (nearest, bilinear, bicubic); the image is not used.

``align_corners=False``, as in the official evaluation code (github PaulCouairon/JAFAR @ 94d4d54)
and ``torch.nn.functional.interpolate``'s default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Upsampler, check_features, check_output_size, no_options, register_upsampler


class Interpolate(Upsampler):
    """``F.interpolate`` of the features to ``output_size``; the image is not used."""

    modes = ("nearest", "bilinear", "bicubic")

    def __init__(self, mode: str = "bilinear"):
        super().__init__()
        if mode not in self.modes:
            raise ValueError(f"interpolation mode must be one of {self.modes}, got {mode!r}.")
        self.mode = mode

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        size = check_output_size(output_size)
        check_features(features)
        if self.mode == "nearest":
            return F.interpolate(features, size=size, mode="nearest")
        return F.interpolate(features, size=size, mode=self.mode, align_corners=False)

    def describe(self) -> str:
        return f"{self.mode} interpolation (training-free)."

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def _interpolate_factory(mode: str):
    def build(feature_dim=None, checkpoint=None, backbone=None, **options) -> Interpolate:
        no_options(mode, checkpoint, options)
        return Interpolate(mode)

    return build


for _mode in Interpolate.modes:
    register_upsampler(_mode, summary=f"{_mode} interpolation (training-free)")(_interpolate_factory(_mode))
