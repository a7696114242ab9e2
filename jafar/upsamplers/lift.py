"""LiFT (Suri, Walmer et al., ECCV 2024), a task-agnostic learned peer of JAFAR: x2 features from
the features and the image, then bilinear to the output size, with its checkpoint adapter.

Written from the architecture of github saksham-s/lift @ fd6d929, lift.py: image convolutions
give guidance at 2x and 1x the feature grid; the features (+ the 1x guidance) go through a 2x2
transposed convolution, are concatenated with the 2x guidance, then two 3x3 conv-BN-ReLU and a
1x1 conv back to the feature width. Parameter names follow that file, so its released modules
load.

Between the two image stages upstream has a ``scale_adapter`` for patch 8 (identity) and 16
(``MaxPool2d(2, 2)``) only, taking the stride-4 image features to twice the feature grid. The
paper's appendix A.2 adapts LiFT to patch 14 by "resizing the intermediate representations after
the downsampling module". Here that resize is an adaptive max-pool of the stride-4 image features
to twice the feature grid (``upsample2``): for patch 8 and 16 it is exactly upstream's identity and
2x2 max-pool (the windows are the same), and for patch 14 it is the published patch-14 LiFT of
github andrehuang/loftup @ 6620d9b (``upsamplers/lift.py``, ``LiFT.forward``:
``F.adaptive_max_pool2d(imgs_1, (2 h, 2 w))`` in place of the scale adapter), the LiFT baseline of
the LoftUp codebase in which the paper ran its Table 9. A max-pool rather than a bilinear resize:
it keeps upstream's operator where upstream has one, and the released modules were trained on
max-pooled guidance. The official JAFAR code has no LiFT.

``iterative=True`` is LiFT-iterative (the paper's Table 8): the same module applied twice, the
second time to its own x2 output with the image enlarged x2 (bilinear, ``align_corners=False``),
as upstream's ``lift_extractor.py`` (``ViTLiFTExtractor.extract_descriptors_iterative_lift``,
``--lift_iter 2``) does, then bilinear to the output size.
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
    paper's usage of LiFT as a baseline); ``iterative``: x2 twice (x4), then bilinear. Weights:
    random unless :meth:`load_weights` is given a released module (upstream's releases are for DINO
    v1 ViTs, key facet of layer 11: ``configs/backbone/dino_vits16.yaml``)."""

    label = "LiFT"

    def __init__(self, feature_dim: int, iterative: bool = False):
        super().__init__()
        if not isinstance(iterative, bool):
            raise ValueError(f"LiFT iterative must be true or false, got {iterative!r}.")
        self.iterative = iterative
        c = self.feature_dim = int(feature_dim)
        self.up1 = _LiftUp(c + 32, c)
        self.outc = nn.Conv2d(c // 2, c, kernel_size=1)
        self.image_convs_1 = nn.Sequential(*_conv_bn_relu(3, 32, stride=2), *_conv_bn_relu(32, 32, stride=2))
        self.image_convs_2 = nn.Sequential(*_conv_bn_relu(32, 32, stride=2))

    def upsample2(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """One LiFT pass: ``(B, C, h, w)`` -> ``(B, C, 2h, 2w)``. The stride-4 image features are
        max-pooled to ``(2h, 2w)`` (upstream's scale adapter for patch 8 and 16, its patch-14
        adaptation otherwise; module docstring)."""
        h, w = features.shape[-2:]
        g1 = self.image_convs_1(image)
        if g1.shape[-2] < 2 * h or g1.shape[-1] < 2 * w:
            raise ValueError(f"LiFT needs an image of at least 8x the feature grid {h}x{w} (its image convolutions "
                             f"stride 4, then pool to 2x the grid), got {tuple(image.shape[-2:])}.")
        g1 = F.adaptive_max_pool2d(g1, (2 * h, 2 * w))
        g2 = self.image_convs_2(g1)
        return self.outc(self.up1(torch.cat([features, g2], dim=1), g1))

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        size = check_output_size(output_size)
        check_features(features)
        check_image(image, features)
        self.check_width(features)
        image = image.to(features.dtype)
        x = self.upsample2(image, features)
        if self.iterative:  # lift_extractor.py, extract_descriptors_iterative_lift: the image x2 for the next pass
            big = F.interpolate(image, size=(2 * image.shape[-2], 2 * image.shape[-1]), mode="bilinear",
                                align_corners=False)
            x = self.upsample2(big, x)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def describe(self) -> str:
        how = "x2 twice (LiFT-iterative)" if self.iterative else "x2"
        return (f"LiFT ({how} then bilinear), weights: {self.weights_source}. LiFT's released modules are for "
                f"DINO (v1) ViTs only (the key facet of layer 11).")

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, iterative={self.iterative}, weights={self.weights_source!r}"


@register_upsampler("lift", summary="LiFT (x2, or x2 twice with iterative, then bilinear)")
def lift(feature_dim=None, checkpoint=None, backbone=None, iterative: bool = False, **options) -> LiFT:
    """``checkpoint``: a released LiFT module or one of ours (a path). ``iterative``: LiFT-iterative
    (the module applied twice, the paper's Table 8)."""
    return LiFT.create("lift", feature_dim, checkpoint, iterative=iterative, **options)
