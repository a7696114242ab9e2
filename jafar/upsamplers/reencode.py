"""The paper's "Large Image" and "Strided" baselines: they hold the frozen backbone and encode the
(normalised) guidance image again, on an enlarged image or with a reduced patch stride, then
resize bilinearly; the ``features`` argument only fixes the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import Upsampler, check_features, check_image, check_output_size, register_upsampler


class LargeImage(Upsampler):
    """The encoder run on the image enlarged ``scale`` times (bilinear, each side rounded to a
    multiple of the patch size), its finer feature grid then resized bilinearly to
    ``output_size``. ``image`` must be the normalised image the backbone was given."""

    def __init__(self, backbone: nn.Module, scale: float = 2.0):
        super().__init__()
        if not float(scale) > 0:
            raise ValueError(f"large_image scale must be positive, got {scale}.")
        self.backbone = backbone
        self.scale = float(scale)

    def input_size(self, height: int, width: int):
        p = int(self.backbone.patch_size)
        return (max(p, int(round(height * self.scale / p)) * p), max(p, int(round(width * self.scale / p)) * p))

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        size = check_output_size(output_size)
        check_features(features)
        check_image(image, features)
        big = F.interpolate(image, size=self.input_size(*image.shape[-2:]), mode="bilinear", align_corners=False)
        with torch.no_grad():
            feats = self.backbone(big)
        return F.interpolate(feats, size=size, mode="bilinear", align_corners=False)

    def describe(self) -> str:
        return f"the encoder on the image enlarged x{self.scale:g}, then bilinear."

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class Strided(Upsampler):
    """A timm ViT whose patch-embedding convolution runs at a smaller ``stride`` than its patch
    size (e.g. 14 -> 6: overlapping patches, a ``(H - p) // s + 1`` grid), then bilinear to
    ``output_size``. The position embedding is resampled to the new grid by timm
    (``dynamic_img_size``). The backbone itself is left unchanged after each call."""

    def __init__(self, backbone: nn.Module, stride: int = 6):
        super().__init__()
        model = getattr(backbone, "model", None)
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        if not isinstance(proj, nn.Conv2d) or not hasattr(model, "forward_intermediates"):
            raise ValueError(f"the strided baseline needs a timm ViT backbone (a patch_embed.proj convolution); "
                             f"{getattr(backbone, 'name', type(backbone).__name__)} has none.")
        if getattr(backbone, "facet", "token") != "token":  # it reads the last block's tokens itself
            raise ValueError(f"the strided baseline re-encodes the image and returns the last block's tokens; the backbone "
                             f"gives the {backbone.facet!r} facet of block {backbone.layer}, which it cannot reproduce: "
                             f"use a backbone with facet='token'.")
        patch = int(backbone.patch_size)
        if not 1 <= int(stride) <= patch:
            raise ValueError(f"strided: stride must be in [1, patch size {patch}], got {stride}.")
        self.backbone = backbone
        self.stride = int(stride)

    def grid_size(self, height: int, width: int):
        p, s = int(self.backbone.patch_size), self.stride
        return (height - p) // s + 1, (width - p) // s + 1

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, gh, gw)`` features of the normalised ``image`` at the reduced stride."""
        model = self.backbone.model
        proj = model.patch_embed.proj
        old = proj.stride
        proj.stride = (self.stride, self.stride)
        try:
            (tokens,) = model.forward_intermediates(image, indices=1, norm=True, output_fmt="NLC",
                                                    intermediates_only=True)
        finally:
            proj.stride = old
        gh, gw = self.grid_size(*image.shape[-2:])
        b, n, c = tokens.shape
        if n != gh * gw:
            raise RuntimeError(f"strided: {type(model).__name__} returned {n} tokens for a {gh}x{gw} grid; this "
                               "ViT family is not supported.")
        return tokens.transpose(1, 2).reshape(b, c, gh, gw)

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        size = check_output_size(output_size)
        check_features(features)
        check_image(image, features)
        return F.interpolate(self.encode(image), size=size, mode="bilinear", align_corners=False)

    def describe(self) -> str:
        return f"the ViT's patch stride reduced to {self.stride}, then bilinear."

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


def _no_checkpoint(name: str, checkpoint) -> None:
    if checkpoint is not None:
        raise ValueError(f"the {name!r} upsampler takes no checkpoint, got {checkpoint!r}.")


@register_upsampler("large_image", needs_backbone=True, summary="the encoder on an enlarged image, then bilinear")
def large_image(feature_dim=None, checkpoint=None, backbone=None, **options) -> LargeImage:
    _no_checkpoint("large_image", checkpoint)
    return LargeImage(backbone, **options)


@register_upsampler("strided", needs_backbone=True, summary="the ViT at a reduced patch stride, then bilinear")
def strided(feature_dim=None, checkpoint=None, backbone=None, **options) -> Strided:
    _no_checkpoint("strided", checkpoint)
    return Strided(backbone, **options)
