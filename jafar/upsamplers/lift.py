"""LiFT (Suri, Walmer et al., ECCV 2024), a task-agnostic learned peer of JAFAR: x2 features from
the features and the image, then bilinear to the output size, with its checkpoint adapter.

Written from the architecture of github saksham-s/lift @ fd6d929, lift.py: image convolutions
give guidance at 2x and 1x the feature grid; the features (+ the 1x guidance) go through a 2x2
transposed convolution, are concatenated with the 2x guidance, then two 3x3 conv-BN-ReLU and a
1x1 conv back to the feature width. Parameter names follow that file, so its released modules
load. Upstream supports patch 8 and 16 only (an identity or a 2x2 max-pool between the image
stages); an adaptive max-pool to twice the feature grid is the same for those and also serves
patch 14.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LearnedUpsampler, check_features, check_image, check_output_size, register_upsampler


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, bias: bool = True):
    return [nn.Conv2d(cin, cout, 3, padding=1, stride=stride, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _LiftUp(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv_1 = nn.Module()
        self.conv_1.double_conv = nn.Sequential(*_conv_bn_relu(in_channels // 2 + 32, out_channels // 2, bias=False),
                                                *_conv_bn_relu(out_channels // 2, out_channels // 2, bias=False))

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return self.conv_1.double_conv(torch.cat([self.up(x), guidance], dim=1))


class LiFT(LearnedUpsampler):
    """LiFT: x2 features from the features and the image, then bilinear to ``output_size`` (the
    paper's usage of LiFT as a baseline). Weights: random unless :meth:`load_weights` is given a
    released module (upstream's releases are for DINO v1 ViTs, key facet of layer 11)."""

    label = "LiFT"

    def __init__(self, feature_dim: int):
        super().__init__()
        c = self.feature_dim = int(feature_dim)
        self.up1 = _LiftUp(c + 32, c)
        self.outc = nn.Conv2d(c // 2, c, kernel_size=1)
        self.image_convs_1 = nn.Sequential(*_conv_bn_relu(3, 32, stride=2), *_conv_bn_relu(32, 32, stride=2))
        self.image_convs_2 = nn.Sequential(*_conv_bn_relu(32, 32, stride=2))

    def upsample2(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h, w = features.shape[-2:]
        g1 = F.adaptive_max_pool2d(self.image_convs_1(image), (2 * h, 2 * w))
        g2 = self.image_convs_2(g1)
        return self.outc(self.up1(torch.cat([features, g2], dim=1), g1))

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        size = check_output_size(output_size)
        check_features(features)
        check_image(image, features)
        self.check_width(features)
        x = self.upsample2(image, features)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def describe(self) -> str:
        return (f"LiFT (x2 then bilinear), weights: {self.weights_source}. LiFT's released modules are for "
                f"DINO (v1) ViTs only.")

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, weights={self.weights_source!r}"


@register_upsampler("lift", summary="LiFT (x2, then bilinear)")
def lift(feature_dim=None, checkpoint=None, backbone=None, **options) -> LiFT:
    """``checkpoint``: a released LiFT module or one of ours (a path)."""
    return LiFT.create("lift", feature_dim, checkpoint, **options)
