"""What the BeV heads share: the registry of heads (:data:`HEADS`, :func:`build_head`), the camera
input check, SimpleBEV's lifting of camera features into the voxel grid (:func:`lift_to_voxels`,
which PointBeV and BEVFormer sample the same way) and SimpleBEV's BeV decoder (:class:`BevDecoder`,
also BEVFormer's ``decoder="simplebev"``). Sources: SimpleBEV (Harley et al., ICRA 2023; github
aharley/simple_bev, ``nets/segnet.py``, ``utils/vox.py``); the conventions are described in
:mod:`bev.heads.simplebev`.

A head is a ``nn.Module`` class registered in :data:`HEADS` by its module in this package
(``@HEADS.register("name")``), built as ``cls(in_channels=..., grid=..., **options)`` and called as
``head(features (B, N, C, h, w), intrinsics, cam2ego, image_size) -> dict`` of ``(B, ., X, Y)``
maps (``seg`` logits, ``centerness``, ``offset``). ``SMOKE_OPTIONS`` (a class attribute, optional)
are the smallest settings worth running: the contract tests and ``tools/gpu_report.py --smoke``
use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from jafar.registry import Registry

from ..geometry import (
    BevGrid,
    apply_transform,
    inside_image,
    invert_rigid_torch,
    pixels_to_grid_sample,
    project_points,
    scale_intrinsics,
)

#: every BeV head, by name (``model.name`` in the config): each module of this package registers its own
HEADS = Registry("BeV head", package="bev.heads", key="model")


#: the heads' settings, one yaml per head (the ``model`` group of ``configs/train_bev.yaml``)
MODEL_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def model_config(name: str) -> dict:
    """``configs/model/<name>.yaml`` as a dict, read with PyYAML (no Hydra: the GPU machines have
    none), less ``name``: the options :func:`build_head` takes. A file with interpolations is
    refused (they need Hydra)."""
    import yaml

    path = MODEL_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"{HEADS.unknown(name)} (no {path})" if name not in HEADS else f"{path} is missing.")
    cfg = yaml.safe_load(path.read_text()) or {}
    cfg.pop("name", None)
    if any(isinstance(v, str) and "${" in v for v in cfg.values()):
        raise ValueError(f"{path} has interpolations, which need Hydra: {cfg}.")
    return cfg


def build_head(name: str, in_channels: int, grid: BevGrid, **options) -> nn.Module:
    """The head registered as ``name`` with its ``options`` (the keys of ``configs/model/<name>.yaml``
    less ``name``): the one construction path of the BeV tool, ``tools/bev_cost.py`` and
    ``tools/gpu_report.py``."""
    return HEADS.build(name, in_channels=int(in_channels), grid=grid, **options)


#: a voxel is seen by a camera only if its depth along the optical axis exceeds this (metres)
MIN_DEPTH = 1e-3


def _image_size(image_size) -> Tuple[int, int]:
    ok = isinstance(image_size, (Sequence, torch.Size)) and len(image_size) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size)
    if not ok:
        raise ValueError(f"image_size must be the (H, W) of the input images, positive ints, got {image_size!r}.")
    return int(image_size[0]), int(image_size[1])


def check_camera_inputs(features: torch.Tensor, intrinsics: torch.Tensor, cam2ego: torch.Tensor,
                        image_size, channels: Optional[int] = None) -> Tuple[int, int]:
    """One ValueError sentence for inconsistent head inputs; returns ``(H, W)``."""
    if not isinstance(features, torch.Tensor) or features.dim() != 5 or (
            channels is not None and features.shape[2] != channels):
        got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a (B, N, {channels if channels is not None else 'C'}, h, w) tensor, "
                         f"got {got}.")
    b, n = features.shape[:2]
    for name, t, shape in (("intrinsics", intrinsics, (b, n, 3, 3)), ("cam2ego", cam2ego, (b, n, 4, 4))):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a {shape} tensor to match features {tuple(features.shape)}, got {got}.")
    return _image_size(image_size)


def lift_to_voxels(features: torch.Tensor, intrinsics: torch.Tensor, cam2ego: torch.Tensor, image_size,
                   grid: BevGrid, voxel_centers: Optional[torch.Tensor] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sample camera features at the projection of every voxel centre, averaged over cameras.

    Args:
        features: ``(B, N, C, h, w)`` camera feature maps.
        intrinsics: ``(B, N, 3, 3)`` in the pixel frame of the ``image_size`` input images;
            scaled per axis to the feature map (``sx = w / W``, ``sy = h / H``).
        cam2ego: ``(B, N, 4, 4)`` camera -> ego transforms.
        image_size: ``(H, W)`` of the input images.
        grid: the BeV grid.
        voxel_centers: ``grid.voxel_centers()`` already on the right device (a cache), or None.

    Returns:
        ``voxels (B, C, X, Y, Z)``: the mean over the cameras that see each voxel (depth >
        :data:`MIN_DEPTH` and projection inside the feature map, pixel corners ``[0, w] x [0,
        h]``), bilinear, zero where no camera sees it; ``views (B, X, Y, Z)``: the number of
        cameras that see each voxel (``views > 0`` is the valid mask).

    The geometry runs in float32 with autocast off (pixel coordinates in bfloat16 would be
    several pixels off); the sampling runs in the features' dtype. Memory: one camera at a time,
    ``B * C * X * Y * Z`` values per temporary (128 channels on 200 x 200 x 8: 164 MB in float32).
    """
    height, width = check_camera_inputs(features, intrinsics, cam2ego, image_size)
    b, n, c, h, w = features.shape
    nx, ny = grid.shape
    nz = grid.z_bins
    device = features.device
    if voxel_centers is None:
        voxel_centers = grid.voxel_centers()
    if tuple(voxel_centers.shape) != (nx, ny, nz, 3):
        raise ValueError(f"voxel_centers must be ({nx}, {ny}, {nz}, 3) for this grid, got {tuple(voxel_centers.shape)}.")

    with torch.autocast(device.type, enabled=False):
        centers = voxel_centers.to(device=device, dtype=torch.float32).reshape(-1, 3)  # (P, 3)
        k_feat = scale_intrinsics(intrinsics.float(), w / width, h / height)  # (B, N, 3, 3)
        ego2cam = invert_rigid_torch(cam2ego.float())  # (B, N, 4, 4)
        uv, depth = project_points(apply_transform(ego2cam, centers), k_feat)  # (B, N, P, 2), (B, N, P)
        seen = (depth > MIN_DEPTH) & inside_image(uv, (h, w))  # (B, N, P)
        sample_at = pixels_to_grid_sample(uv, (h, w)).clamp(-2.0, 2.0)  # far-away points stay finite
    if not torch.is_autocast_enabled(device.type):
        sample_at = sample_at.to(features.dtype)

    total = None
    for cam in range(n):
        sampled = F.grid_sample(features[:, cam], sample_at[:, cam, None], mode="bilinear",
                                padding_mode="border", align_corners=False)[:, :, 0]  # (B, C, P)
        sampled = sampled * seen[:, cam, None].to(sampled.dtype)
        total = sampled if total is None else total + sampled
    views = seen.sum(1)  # (B, P)
    mean = total / views.clamp_min(1)[:, None].to(total.dtype)
    return mean.view(b, c, nx, ny, nz), views.view(b, nx, ny, nz)


class UpsampleAdd(nn.Module):
    """Bilinear upsampling to the skip's size, 1x1 conv, InstanceNorm, plus the skip (SimpleBEV's
    ``UpsamplingAdd``, which upsamples by a fixed factor 2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = nn.InstanceNorm2d(out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.norm(self.conv(x)) + skip


def output_head(channels: int, out: int, sigmoid: bool = False) -> nn.Sequential:
    """3x3 conv, InstanceNorm, ReLU, 1x1 conv to ``out`` channels (+ sigmoid): SimpleBEV's heads."""
    layers = [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.InstanceNorm2d(channels),
              nn.ReLU(inplace=True), nn.Conv2d(channels, out, 1)]
    return nn.Sequential(*layers, nn.Sigmoid()) if sigmoid else nn.Sequential(*layers)


class BevDecoder(nn.Module):
    """SimpleBEV's BeV decoder: ResNet-18 stem and layers 1-3 (strides 2, 1, 2, 2: the grid /8),
    three upsample-and-add skips back to the grid, and the three heads. ``(B, C, X, Y) -> dict``."""

    def __init__(self, channels: int):
        super().__init__()
        import torchvision

        resnet = torchvision.models.resnet18(weights=None, zero_init_residual=True)
        self.first_conv = nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1, self.relu = resnet.bn1, resnet.relu
        self.layer1, self.layer2, self.layer3 = resnet.layer1, resnet.layer2, resnet.layer3
        self.up3_skip = UpsampleAdd(256, 128)
        self.up2_skip = UpsampleAdd(128, 64)
        self.up1_skip = UpsampleAdd(64, channels)
        self.segmentation_head = output_head(channels, 1)
        self.instance_center_head = output_head(channels, 1, sigmoid=True)
        self.instance_offset_head = output_head(channels, 2)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        skip1 = x  # (X, Y)
        x = self.relu(self.bn1(self.first_conv(x)))
        skip2 = x = self.layer1(x)  # (X/2, Y/2)
        skip3 = x = self.layer2(x)  # (X/4, Y/4)
        x = self.layer3(x)  # (X/8, Y/8)
        x = self.up3_skip(x, skip3)
        x = self.up2_skip(x, skip2)
        x = self.up1_skip(x, skip1)
        return dict(seg=self.segmentation_head(x), centerness=self.instance_center_head(x),
                    offset=self.instance_offset_head(x))
