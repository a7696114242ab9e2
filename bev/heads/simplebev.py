"""SimpleBEV's head on the camera features of :class:`bev.encoder.MultiCameraEncoder` (its lifting
and BeV decoder live in :mod:`bev.heads.common`, shared with the other heads).

Follows SimpleBEV (Harley et al., ICRA 2023; github aharley/simple_bev, ``nets/segnet.py`` and
``utils/vox.py``), re-written:

* neck: SimpleBEV's image encoders end with a 1x1 projection to ``latent_dim = 128`` channels
  (``depth_layer``); here a 1x1 conv takes the (frozen, upsampled) features to ``latent_dim``;
* lifting (:func:`bev.heads.common.lift_to_voxels`): every voxel centre is projected into every camera and the
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

from typing import Dict, Tuple

import torch
from torch import nn

from ..geometry import BevGrid
from .common import HEADS, BevDecoder, check_camera_inputs, lift_to_voxels


@HEADS.register("simplebev")
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

    #: the smallest settings worth running (contract tests, ``tools/gpu_report.py --smoke``)
    SMOKE_OPTIONS = {"latent_dim": 16}

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
