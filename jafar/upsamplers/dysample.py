"""DySample (Liu et al., "Learning to Upsample by Learning to Sample", ICCV 2023), one of the
paper's task-dependent baselines (Tables 1-2; appendix A.2: "the default implementation from the
official Dysample repository, stacking four Dysample upsampling modules, each with an upsampling
factor of 2", x16), then bilinear to the output size.

Written in plain PyTorch from github tiny-smart/dysample @ 81a1de5 (MIT), ``dysample.py``, class
``DySample``:

* ``__init__``: defaults ``scale=2``, ``style='lp'``, ``groups=4``, ``dyscope=False``; the
  channels must be a multiple of ``groups`` (and, for ``'pl'``, of ``scale**2``); the offset
  generator is a 1x1 convolution (``offset``) to ``2 * groups * scale**2`` channels (``'lp'``: from
  the features) or ``2 * groups`` (``'pl'``: from ``pixel_shuffle(x, scale)``, ``channels /
  scale**2`` wide, its output ``pixel_unshuffle``-d back), ``normal_init(std=0.001)``, bias 0;
  with ``dyscope`` a bias-free 1x1 ``scope`` convolution initialised to 0;
* ``_init_pos``: the initial offsets ``((j - (scale - 1) / 2) / scale, (i - (scale - 1) / 2) /
  scale)`` (x, y) for sub-pixel ``(i, j)``, the same for every group, so that a zero offset
  generator is bilinear upsampling;
* ``forward_lp`` / ``forward_pl``: offset = generator * 0.25 + init_pos (static scope), or
  generator * 0.5 * sigmoid(scope) + init_pos (dynamic scope);
* ``sample``: the offset channel ``(xy * groups + g) * scale**2 + i * scale + j`` at source pixel
  ``(y, x)`` moves output pixel ``(y * scale + i, x * scale + j)`` of group ``g`` (the channels
  split into ``groups`` contiguous blocks) to the point ``(x + 0.5 + dx, y + 0.5 + dy)`` of the
  source map (pixel corners at integers), sampled bilinearly by ``grid_sample``
  (``align_corners=False``, ``padding_mode='border'``).

Parameter and buffer names follow ``DySample`` (``stages.<n>.offset``, ``stages.<n>.scope``,
``stages.<n>.init_pos``), so a stage loads an official state dict. The image is not used:
DySample upsamples from the features alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import StackedUpsampler, register_upsampler

STYLES = ("lp", "pl")


def initial_offsets(scale: int, groups: int) -> torch.Tensor:
    """``(1, 2 * groups * scale**2, 1, 1)``: channel ``(xy * groups + g) * scale**2 + i * scale + j``
    holds ``(j - (scale - 1) / 2) / scale`` for x, ``(i - (scale - 1) / 2) / scale`` for y."""
    steps = (torch.arange(scale, dtype=torch.float32) - (scale - 1) / 2) / scale
    x = steps.view(1, scale).expand(scale, scale)
    y = steps.view(scale, 1).expand(scale, scale)
    return torch.stack([x, y]).view(2, 1, scale * scale).expand(2, groups, scale * scale).reshape(1, -1, 1, 1).clone()


def dysample_sample(x: torch.Tensor, offset: torch.Tensor, scale: int, groups: int) -> torch.Tensor:
    """Sample ``x`` ``(B, C, H, W)`` at the source positions that ``offset`` ``(B, 2 * groups *
    scale**2, H, W)`` (pixel units, init_pos included) gives every output pixel: ``(B, C, scale * H,
    scale * W)``, bilinear with border padding."""
    b, c, h, w = x.shape
    s = scale
    off = offset.view(b, 2, groups, s, s, h, w)
    # pixel centres of the source map, then the sampling point in grid_sample's [-1, 1] (align_corners=False)
    cx = torch.arange(w, dtype=x.dtype, device=x.device) + 0.5
    cy = torch.arange(h, dtype=x.dtype, device=x.device).view(h, 1) + 0.5
    gx = 2 * (cx + off[:, 0]) / w - 1  # (B, G, s, s, H, W)
    gy = 2 * (cy + off[:, 1]) / h - 1
    # output pixel (y * s + i, x * s + j): (B, G, H, i, W, j) -> (B * G, s * H, s * W, 2)
    grid = torch.stack([gx, gy], dim=-1).permute(0, 1, 4, 2, 5, 3, 6).reshape(b * groups, s * h, s * w, 2)
    out = F.grid_sample(x.reshape(b * groups, c // groups, h, w), grid, mode="bilinear", padding_mode="border",
                        align_corners=False)
    return out.view(b, c, s * h, s * w)


class DySampleStage(nn.Module):
    """One official ``DySample`` module: offsets from a 1x1 convolution, then point sampling."""

    def __init__(self, channels: int, scale: int = 2, style: str = "lp", groups: int = 4, dyscope: bool = False):
        super().__init__()
        self.scale, self.style, self.groups = scale, style, groups
        cin, cout = (channels // scale ** 2, 2 * groups) if style == "pl" else (channels, 2 * groups * scale ** 2)
        self.offset = nn.Conv2d(cin, cout, 1)
        nn.init.normal_(self.offset.weight, 0.0, 0.001)
        nn.init.zeros_(self.offset.bias)
        if dyscope:
            self.scope = nn.Conv2d(cin, cout, 1, bias=False)
            nn.init.zeros_(self.scope.weight)
        self.register_buffer("init_pos", initial_offsets(scale, groups))

    def offsets(self, x: torch.Tensor) -> torch.Tensor:
        """Offsets in source pixels, ``(B, 2 * groups * scale**2, H, W)``, init_pos included."""
        src = F.pixel_shuffle(x, self.scale) if self.style == "pl" else x
        raw = self.offset(src)
        raw = raw * self.scope(src).sigmoid() * 0.5 if hasattr(self, "scope") else raw * 0.25
        if self.style == "pl":
            raw = F.pixel_unshuffle(raw, self.scale)
        return raw + self.init_pos.to(raw.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dysample_sample(x, self.offsets(x), self.scale, self.groups)


class DySample(StackedUpsampler):
    """``stages`` DySample modules (x``scale`` each; four x2 = x16, the paper's setting), then
    bilinear (``align_corners=False``) to ``output_size``. Feature-only: the image is not used.
    Weights: random (task-dependent: trained with the probe) unless :meth:`load_weights`."""

    label = "DySample"

    def __init__(self, feature_dim: int, stages: int = 4, scale: int = 2, style: str = "lp", groups: int = 4,
                 dyscope: bool = False):
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.options = dict(stages=stages, scale=scale, style=style, groups=groups, dyscope=dyscope)
        self.stages = nn.ModuleList(DySampleStage(self.feature_dim, scale, style, groups, dyscope) for _ in range(stages))

    def describe(self) -> str:
        o = self.options
        return (f"DySample ({o['stages']} x{o['scale']} stages = x{o['scale'] ** o['stages']}, style {o['style']}, "
                f"{o['groups']} groups, {'dynamic' if o['dyscope'] else 'static'} scope, then bilinear; features "
                f"only, the image is not used), weights: {self.weights_source}.")

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())


@register_upsampler("dysample", summary="DySample (official module, four x2 stages, then bilinear)")
def dysample(feature_dim=None, checkpoint=None, backbone=None, stages: int = 4, scale: int = 2, style: str = "lp",
             groups: int = 4, dyscope: bool = False, **options) -> DySample:
    """``checkpoint``: a state dict of :class:`DySample` (a path); random weights when omitted. The
    defaults are the official ``DySample``'s (github tiny-smart/dysample) and the paper's four x2
    stages."""
    if options:
        raise ValueError(f"the 'dysample' upsampler takes stages, scale, style, groups and dyscope, got "
                         f"{sorted(options)}.")
    if feature_dim is None:
        raise ValueError("the 'dysample' upsampler needs feature_dim (or backbone).")
    for name, value in (("stages", stages), ("scale", scale), ("groups", groups)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"dysample {name} must be a positive int, got {value!r}.")
    if style not in STYLES:
        raise ValueError(f"dysample style must be one of {STYLES}, got {style!r}.")
    if not isinstance(dyscope, bool):
        raise ValueError(f"dysample dyscope must be True or False, got {dyscope!r}.")
    c = int(feature_dim)
    if c % groups:
        raise ValueError(f"dysample splits the channels into groups={groups} blocks: feature_dim must be a multiple of "
                         f"{groups}, got {c}.")
    if style == "pl" and c % scale ** 2:
        raise ValueError(f"dysample style 'pl' pixel-shuffles the features by scale={scale}: feature_dim must be a "
                         f"multiple of {scale ** 2}, got {c}.")
    model = DySample(c, stages, scale, style, groups, dyscope)
    return model.load_weights(checkpoint) if checkpoint is not None else model
