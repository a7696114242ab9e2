"""CARAFE (Wang et al., "CARAFE: Content-Aware ReAssembly of FEatures", ICCV 2019), one of the
paper's task-dependent baselines (Tables 1-2; appendix A.2: "the CARAFEPack module from MMCV,
stacking four upsampling stages with a x2 ratio each", x16), then bilinear to the output size.

Written in plain PyTorch from github open-mmlab/mmcv @ a8073c7, ``mmcv/ops/carafe.py``:

* ``CARAFEPack.__init__``: defaults ``up_kernel=5``, ``up_group=1``, ``encoder_kernel=3``,
  ``encoder_dilation=1``, ``compressed_channels=64``; a 1x1 ``channel_compressor`` to
  ``compressed_channels``, then a ``content_encoder`` convolution (``encoder_kernel``, padding
  ``(encoder_kernel - 1) * encoder_dilation // 2``) to ``up_kernel**2 * up_group * scale**2``
  channels;
* ``CARAFEPack.init_weights``: every convolution xavier-uniform (gain 1, bias 0, mmengine's
  ``xavier_init(distribution='uniform')``), then the content encoder ``normal_init(std=0.001)``
  (bias 0);
* ``CARAFEPack.kernel_normalizer``: ``pixel_shuffle`` of the encoder's output by ``scale``, then a
  softmax over each group's ``up_kernel**2`` values;
* the ``carafe`` op (``mmcv/ops/csrc/common/cuda/carafe_naive_cuda_kernel.cuh``,
  ``carafe_naive_forward_cuda_kernel``): output pixel ``(i, j)`` of channel ``c`` is the sum over
  the ``k x k`` neighbourhood of the source pixel ``(i // scale, j // scale)`` of the features
  times the kernel predicted at ``(i, j)``, mask channel ``(group * k + dy) * k + dx`` with
  ``group = c // (C / up_group)``; neighbours outside the map are skipped (zero padding).

The op here is one batched matrix product per source pixel (:func:`carafe_reassemble`). Parameter names follow
``CARAFEPack`` (``stages.<n>.channel_compressor``, ``stages.<n>.content_encoder``), so a stage
loads a CARAFEPack state dict. The image is not used: CARAFE upsamples from the features alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import StackedUpsampler, register_upsampler


def carafe_reassemble(features: torch.Tensor, masks: torch.Tensor, kernel_size: int, group_size: int,
                      scale_factor: int) -> torch.Tensor:
    """The CARAFE op: ``features`` ``(B, C, h, w)``, normalised ``masks`` ``(B, group_size * k * k,
    s * h, s * w)`` (channel ``(g * k + dy) * k + dx``) -> ``(B, C, s * h, s * w)``; output pixel
    ``(i, j)`` reassembles the ``k x k`` neighbourhood of ``(i // s, j // s)`` (zero padding).

    One batched matrix product per source pixel: the ``(s * s, k * k)`` kernels of the ``s x s``
    output pixels it feeds times its ``(k * k, C / groups)`` neighbourhood, gathered channels-last
    (``Tensor.unfold`` views, one copy), so the sum over the neighbourhood is a matmul and not
    ``k * k`` passes over the output (CARAFE's row of ``tools/benchmark.py --upsamplers all`` in
    docs/benchmarks.md: as fast as JAFAR's forward at 224 on the CPU)."""
    b, c, h, w = features.shape
    k, g, s = kernel_size, group_size, scale_factor
    cg, r = c // g, (k - 1) // 2
    x = F.pad(features, (r, r, r, r)).permute(0, 2, 3, 1)  # (B, h + 2r, w + 2r, C)
    windows = x.unfold(1, k, 1).unfold(2, k, 1)  # (B, h, w, C, k, k), a view
    windows = windows.reshape(b, h, w, g, cg, k * k).permute(0, 3, 1, 2, 5, 4).reshape(b * g * h * w, k * k, cg)
    kernels = masks.view(b, g, k * k, h, s, w, s).permute(0, 1, 3, 5, 4, 6, 2).reshape(b * g * h * w, s * s, k * k)
    out = torch.bmm(kernels, windows).view(b, g, h, w, s, s, cg)
    return out.permute(0, 1, 6, 2, 4, 3, 5).reshape(b, c, s * h, s * w)


class CARAFEStage(nn.Module):
    """One ``CARAFEPack``: channel compressor, content encoder, kernel normaliser, reassembly."""

    def __init__(self, channels: int, scale_factor: int = 2, up_kernel: int = 5, up_group: int = 1,
                 encoder_kernel: int = 3, encoder_dilation: int = 1, compressed_channels: int = 64):
        super().__init__()
        self.scale_factor, self.up_kernel, self.up_group = scale_factor, up_kernel, up_group
        self.channel_compressor = nn.Conv2d(channels, compressed_channels, 1)
        self.content_encoder = nn.Conv2d(compressed_channels, up_kernel * up_kernel * up_group * scale_factor ** 2,
                                         encoder_kernel, padding=(encoder_kernel - 1) * encoder_dilation // 2,
                                         dilation=encoder_dilation)
        self.init_weights()

    def init_weights(self) -> None:
        for conv in (self.channel_compressor, self.content_encoder):
            nn.init.xavier_uniform_(conv.weight, gain=1.0)
            nn.init.zeros_(conv.bias)
        nn.init.normal_(self.content_encoder.weight, 0.0, 0.001)
        nn.init.zeros_(self.content_encoder.bias)

    def kernels(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised reassembly kernels ``(B, up_group * k * k, s * h, s * w)``."""
        mask = F.pixel_shuffle(self.content_encoder(self.channel_compressor(x)), self.scale_factor)
        b, _, h, w = mask.shape
        mask = mask.view(b, self.up_group, self.up_kernel ** 2, h, w).softmax(dim=2)
        return mask.view(b, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return carafe_reassemble(x, self.kernels(x), self.up_kernel, self.up_group, self.scale_factor)


class CARAFE(StackedUpsampler):
    """``stages`` CARAFEPack stages (x``scale_factor`` each; four x2 = x16, the paper's setting),
    then bilinear (``align_corners=False``) to ``output_size``. Feature-only: the image is not
    used. Weights: random (task-dependent: trained with the probe) unless :meth:`load_weights`."""

    label = "CARAFE"

    def __init__(self, feature_dim: int, stages: int = 4, scale_factor: int = 2, up_kernel: int = 5, up_group: int = 1,
                 encoder_kernel: int = 3, encoder_dilation: int = 1, compressed_channels: int = 64):
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.options = dict(stages=stages, scale_factor=scale_factor, up_kernel=up_kernel, up_group=up_group,
                            encoder_kernel=encoder_kernel, encoder_dilation=encoder_dilation,
                            compressed_channels=compressed_channels)
        self.stages = nn.ModuleList(
            CARAFEStage(self.feature_dim, scale_factor, up_kernel, up_group, encoder_kernel, encoder_dilation,
                        compressed_channels) for _ in range(stages))

    def describe(self) -> str:
        o = self.options
        total = o["scale_factor"] ** o["stages"]
        return (f"CARAFE (MMCV's CARAFEPack, {o['stages']} x{o['scale_factor']} stages = x{total}, then bilinear; "
                f"features only, the image is not used), weights: {self.weights_source}.")

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, " + ", ".join(f"{k}={v}" for k, v in self.options.items())


def _positive_int(name: str, value, odd: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (odd and value % 2 == 0):
        raise ValueError(f"carafe {name} must be a positive {'odd ' if odd else ''}int, got {value!r}.")
    return value


@register_upsampler("carafe", summary="CARAFE (MMCV's CARAFEPack, four x2 stages, then bilinear)")
def carafe(feature_dim=None, checkpoint=None, backbone=None, stages: int = 4, scale_factor: int = 2, up_kernel: int = 5,
           up_group: int = 1, encoder_kernel: int = 3, encoder_dilation: int = 1, compressed_channels: int = 64,
           **options) -> CARAFE:
    """``checkpoint``: a state dict of :class:`CARAFE` (a path); random weights when omitted. The
    defaults are CARAFEPack's (mmcv ``mmcv/ops/carafe.py``) and the paper's four x2 stages."""
    if options:
        raise ValueError(f"the 'carafe' upsampler takes stages, scale_factor, up_kernel, up_group, encoder_kernel, "
                         f"encoder_dilation and compressed_channels, got {sorted(options)}.")
    if feature_dim is None:
        raise ValueError("the 'carafe' upsampler needs feature_dim (or backbone).")
    for name, value in (("stages", stages), ("scale_factor", scale_factor), ("up_group", up_group),
                        ("encoder_dilation", encoder_dilation), ("compressed_channels", compressed_channels)):
        _positive_int(name, value)
    _positive_int("up_kernel", up_kernel, odd=True)
    _positive_int("encoder_kernel", encoder_kernel)
    if (encoder_kernel - 1) * encoder_dilation % 2:
        raise ValueError(f"carafe's content encoder keeps the size only when (encoder_kernel - 1) * encoder_dilation is "
                         f"even, got encoder_kernel={encoder_kernel}, encoder_dilation={encoder_dilation}.")
    if int(feature_dim) % up_group:
        raise ValueError(f"carafe splits the channels into up_group={up_group} groups: feature_dim must be a multiple "
                         f"of it, got {feature_dim}.")
    model = CARAFE(feature_dim, stages, scale_factor, up_kernel, up_group, encoder_kernel, encoder_dilation,
                   compressed_channels)
    return model.load_weights(checkpoint) if checkpoint is not None else model
