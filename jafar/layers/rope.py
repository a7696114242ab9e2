"""2-D rotary position embedding of JAFAR's encoded image.

Follows the official release (github PaulCouairon/JAFAR @ 94d4d54,
``src/layers/positional_encoding.py``): a learnable ``freqs`` table of shape
``(2, dim)`` (row and column angular frequencies, initialised to
``2*pi * theta**linspace(0, -1, dim/4)`` with ``theta = 100``, rows on the first half of
the channels and columns on the second), pixel coordinates ``linspace(0, 1, H)`` x
``linspace(0, 1, W)``, and ``x * cos(angle) + rotate_half(x) * sin(angle)``.

Differences from the official code, none of which changes the numbers in float32:

* it works on ``(B, C, H, W)`` tensors directly (no rearrange to tokens and back);
* the angles are always computed in float32, with autocast disabled, and only ``cos`` /
  ``sin`` are cast to the activation dtype (the official ``coords @ freqs`` runs in bf16
  under autocast, which loses the phase of the high frequencies);
* no ``"cuda"`` literal: the coordinates are made on the input's device.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rotate_half(x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``(x1, x2) -> (-x2, x1)`` along ``dim`` (the channel axis of an NCHW tensor)."""
    x1, x2 = x.chunk(2, dim=dim)
    return torch.cat((-x2, x1), dim=dim)


class RoPE(nn.Module):
    """Learnable 2-D RoPE over the channels of an NCHW feature map."""

    def __init__(self, dim: int, theta: float = 100.0):
        super().__init__()
        if dim % 4:
            raise ValueError(f"RoPE needs a channel count divisible by 4, got dim={dim}.")
        self.dim = dim
        self.theta = theta
        self.freqs = nn.Parameter(torch.empty(2, dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        freqs_1d = self.theta ** torch.linspace(0, -1, self.dim // 4)
        freqs_1d = torch.cat([freqs_1d, freqs_1d])
        table = torch.zeros(2, self.dim)
        table[0, : self.dim // 2] = freqs_1d
        table[1, -self.dim // 2 :] = freqs_1d
        self.freqs.copy_(table * 2 * math.pi)

    def angles(self, height: int, width: int) -> torch.Tensor:
        """Float32 angles ``(dim, H, W)``: ``row * freqs[0] + col * freqs[1]``."""
        device = self.freqs.device
        with torch.autocast(device_type=device.type, enabled=False):
            freqs = self.freqs.float()
            rows = torch.linspace(0, 1, height, device=device, dtype=torch.float32)
            cols = torch.linspace(0, 1, width, device=device, dtype=torch.float32)
            angle = rows[None, :, None] * freqs[0][:, None, None] + cols[None, None, :] * freqs[1][:, None, None]
        return angle

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"RoPE expects (B, {self.dim}, H, W), got {tuple(x.shape)}.")
        angle = self.angles(x.shape[-2], x.shape[-1])
        cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
        return x * cos + rotate_half(x) * sin
