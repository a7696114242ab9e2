"""SimpleBEV's lifting and BeV decoder on the camera features of :class:`bev.encoder.MultiCameraEncoder`.

Follows SimpleBEV (Harley et al., ICRA 2023; github aharley/simple_bev, ``nets/segnet.py`` and
``utils/vox.py``), re-written:

* neck: SimpleBEV's image encoders end with a 1x1 projection to ``latent_dim = 128`` channels
  (``depth_layer``); here a 1x1 conv takes the (frozen, upsampled) features to ``latent_dim``;
* lifting (:func:`lift_to_voxels`): every voxel centre is projected into every camera and the
  feature there is sampled bilinearly (no depth estimate: the same feature along the whole
  ray); the cameras that see a voxel are averaged;
* ``bev_compressor`` (SimpleBEV's ``do_rgbcompress``): heights folded into channels, 3x3 conv,
  InstanceNorm, GELU, back to ``latent_dim``;
* decoder: a 7x7 stride-2 conv, BatchNorm, ReLU and layers 1-3 of a ResNet-18 (torchvision,
  random init, ``zero_init_residual=True``), then three upsample-and-add skips (bilinear, 1x1
  conv, InstanceNorm) back to the grid, and three heads (3x3 conv, InstanceNorm, ReLU, 1x1
  conv): segmentation logits (1), instance centre (1, sigmoid), instance offset (2).

Departures from SimpleBEV, deliberate: one pixel convention everywhere (pixel corners, the one
of :func:`bev.geometry.scale_intrinsics`: ``u`` maps to ``2u/w - 1`` of ``grid_sample(
align_corners=False)``; SimpleBEV normalises by ``W - 1`` while sampling with
``align_corners=False``), a geometric visibility mask (depth > 0 and inside the feature map)
instead of SimpleBEV's "feature is non-zero", border padding for the half pixel at the edges,
and the decoder's upsampling goes to the skip's size, so any grid size works (SimpleBEV's
``scale_factor=2`` needs sizes divisible by 8).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import (BevGrid, apply_transform, inside_image, invert_rigid_torch, pixels_to_grid_sample,
                        project_points, scale_intrinsics)

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


def _head(channels: int, out: int, sigmoid: bool = False) -> nn.Sequential:
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
        self.segmentation_head = _head(channels, 1)
        self.instance_center_head = _head(channels, 1, sigmoid=True)
        self.instance_offset_head = _head(channels, 2)

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


class SimpleBeV(nn.Module):
    """SimpleBEV's head on multi-camera features: neck, lifting, BeV compressor, decoder.

    Args:
        in_channels: C of the camera features (``MultiCameraEncoder.out_channels``).
        grid: the BeV grid (default 200 x 200 cells of 0.5 m, 8 heights).
        latent_dim: SimpleBEV's ``latent_dim`` (128): the neck's output width and the width of
            the BeV features.

    Call: ``head(features (B, N, C, h, w), intrinsics (B, N, 3, 3) in the input image's pixels,
    cam2ego (B, N, 4, 4), image_size (H, W))`` -> ``dict(seg (B, 1, X, Y) logits, centerness
    (B, 1, X, Y) in [0, 1], offset (B, 2, X, Y))``, rows along ego x, columns along ego y.

    Size (``latent_dim=128``, 8 heights): 4,846,596 + 128 * C parameters, i.e. 4,862,980 for
    C = 128 and 4,895,748 for C = 384 (DINOv2 ViT-S): neck 128 * C + 128, compressor 1,179,648
    (``128 * 8 * 128 * 9``), decoder 3,666,820 (ResNet-18 layers 1-3 are 2.78 M of it).
    Memory (200 x 200 x 8 voxels, 6 cameras, 128 channels, batch 1, float32): the lifted volume
    is 164 MB, the compressor's input (the same values, heights folded) another 164 MB, and the
    lifting holds one more 164 MB per-camera temporary; measured peak of one forward + backward
    on the CPU: +0.9 GB. CPU time of that step (2 busy cores): 7 to 11 s at 200 x 200, 0.35 s at
    50 x 50 x 8.
    """

    def __init__(self, in_channels: int, grid: BevGrid = BevGrid(), latent_dim: int = 128):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("latent_dim", latent_dim)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}.")
        if not isinstance(grid, BevGrid):
            raise ValueError(f"grid must be a bev.geometry.BevGrid, got {type(grid).__name__}.")
        self.in_channels, self.latent_dim, self.grid = in_channels, latent_dim, grid
        self.neck = nn.Conv2d(in_channels, latent_dim, 1)
        self.bev_compressor = nn.Sequential(
            nn.Conv2d(latent_dim * grid.z_bins, latent_dim, 3, padding=1, bias=False),
            nn.InstanceNorm2d(latent_dim), nn.GELU())
        self.decoder = BevDecoder(latent_dim)
        # float32 voxel centres per device (not a buffer: .half() would round them)
        self._centers: Dict[torch.device, torch.Tensor] = {}

    def voxel_centers(self, device: torch.device) -> torch.Tensor:
        """``grid.voxel_centers()`` in float32 on ``device``, computed once per device."""
        if device not in self._centers:
            self._centers[device] = self.grid.voxel_centers().to(device=device, dtype=torch.float32)
        return self._centers[device]

    def lift(self, features: torch.Tensor, intrinsics: torch.Tensor, cam2ego: torch.Tensor, image_size
             ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Neck then :func:`lift_to_voxels`: ``(B, latent_dim, X, Y, Z)`` and the view counts."""
        check_camera_inputs(features, intrinsics, cam2ego, image_size, self.in_channels)
        b, n = features.shape[:2]
        latent = self.neck(features.flatten(0, 1)).unflatten(0, (b, n))
        return lift_to_voxels(latent, intrinsics, cam2ego, image_size, self.grid, self.voxel_centers(latent.device))

    def forward(self, features: torch.Tensor, intrinsics: torch.Tensor, cam2ego: torch.Tensor,
                image_size) -> Dict[str, torch.Tensor]:
        voxels, _ = self.lift(features, intrinsics, cam2ego, image_size)
        b, c, nx, ny, nz = voxels.shape
        bev = voxels.permute(0, 1, 4, 2, 3).reshape(b, c * nz, nx, ny)  # channel = c * Z + z
        return self.decoder(self.bev_compressor(bev))

    def uncounted_flops(self, num_cameras: int) -> int:
        """FLOPs of one forward that ``torch.utils.flop_counter`` does not see: the bilinear
        sampling of the lifting, 4 taps x 2 FLOPs per channel per (voxel, camera) pair."""
        X, Y = self.grid.shape
        return X * Y * self.grid.z_bins * int(num_cameras) * self.latent_dim * 4 * 2

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, latent_dim={self.latent_dim}, grid={self.grid}"
