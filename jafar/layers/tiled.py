"""JAFAR's 1x1 encoders at inference on the CPU, tile by tile in token layout.

At the output resolution JAFAR's encoders are memory-bound on a CPU: each GroupNorm, SiLU, 1x1
convolution and residual add of a ResBlock is a pass over a ``(B, 128, H, W)`` map (103 MB at
448x448), and PyTorch's NCHW 1x1 convolution reorders its input and output to a blocked layout
on the way. Here the maps are tokens ``(B, H*W, C)`` (the channels-last layout, which the
attention reads anyway), and each half of a ResBlock (GroupNorm applied as ``x * a + s``,
SiLU, the convolution as one matmul, the residual, the next GroupNorm's statistics) runs on
tiles of a few thousand tokens that stay in the core's cache: one read and one write of the map
per half instead of five or six (``docs/benchmarks.md``, "JAFAR at 448 on the CPU").

Same arithmetic as the modules (``nn.Conv2d``, :class:`jafar.layers.norm.GroupNorm`, ``F.silu``,
:class:`jafar.layers.rope.RoPE`) up to float rounding: GroupNorm's statistics are sums of shifted values
(:class:`GroupStats`), so no ``E[x^2] - E[x]^2`` cancellation; RoPE's angles are the module's float32 products
of the same ``linspace`` values.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

#: tokens per tile: 2,048 x 128 float32 channels is 1 MiB, the L2 cache of one core of the development
#: machine (AMD EPYC, 1 MiB L2 per core); the tile sweep in docs/benchmarks.md chose it
TILE_TOKENS = 2048


class GroupStats:
    """GroupNorm's statistics of a token map, accumulated tile by tile: per (sample, channel) the
    sums of ``x - K`` and ``(x - K)^2``, ``K`` the channel's mean over the sample's first tile (the
    shifted-data algorithm: with ``K`` near the mean, ``E[d^2] - E[d]^2`` loses no digits); each
    tile's sums in float32 (``Tensor.sum`` over a contiguous token tile: ten times faster than
    ``var_mean`` across tokens here), their totals in float64."""

    def __init__(self, batch: int, channels: int, device):
        self.count = [0] * batch
        self.shift: List[Optional[torch.Tensor]] = [None] * batch
        self.s1 = torch.zeros(batch, channels, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(batch, channels, dtype=torch.float64, device=device)

    def add(self, b: int, tile: torch.Tensor) -> None:
        """Fold the tokens ``tile`` ``(T, C)`` of sample ``b`` in."""
        if self.shift[b] is None:
            self.shift[b] = tile.mean(dim=0)
        d = tile - self.shift[b]
        self.s1[b] += d.sum(dim=0)
        self.s2[b] += d.square_().sum(dim=0)
        self.count[b] += tile.shape[0]

    def group(self, groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """GroupNorm's ``(mean, var)`` per (sample, group), float64 ``(B, groups)``: the channels'
        shifted sums combined exactly (each channel has its own shift)."""
        b, c = self.s1.shape
        n = torch.tensor(self.count, dtype=torch.float64, device=self.s1.device)[:, None]
        shift = torch.stack(self.shift).double()
        mean_c = shift + self.s1 / n  # (B, C)
        m2_c = self.s2 - self.s1.square() / n  # sum over tokens of (x - mean_c)^2
        mean_c, m2_c = mean_c.view(b, groups, -1), m2_c.view(b, groups, -1)
        mean = mean_c.mean(dim=2)
        m2 = m2_c.sum(2) + (mean_c - mean[..., None]).square().sum(2) * n
        return mean, m2 / (n * (c // groups))


def norm_coefficients(stats: GroupStats, norm: nn.GroupNorm, dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(a, s)`` per (sample, channel) such that ``norm(x) = x * a + s``."""
    mean, var = stats.group(norm.num_groups)
    c = stats.s1.shape[1]
    rstd = (var + norm.eps).rsqrt().repeat_interleave(c // norm.num_groups, dim=1)  # (B, C)
    mean = mean.repeat_interleave(c // norm.num_groups, dim=1)
    a = rstd if norm.weight is None else rstd * norm.weight.double()
    s = -mean * a if norm.bias is None else norm.bias.double() - mean * a
    return a.to(dtype), s.to(dtype)


def rope_tile(rope, tile: torch.Tensor, start: int, height: int, width: int, rows: torch.Tensor,
              cols: torch.Tensor) -> torch.Tensor:
    """:class:`RoPE` on the tokens ``start .. start + T`` of an ``height x width`` map (in place)."""
    idx = torch.arange(start, start + tile.shape[0])
    freqs = rope.freqs.float()
    angle = rows[idx // width][:, None] * freqs[0] + cols[idx % width][:, None] * freqs[1]  # (T, C), float32
    cos, sin = angle.cos().to(tile.dtype), angle.sin().to(tile.dtype)
    x1, x2 = tile.chunk(2, dim=1)
    rotated = torch.cat((-x2, x1), dim=1)
    return tile.mul_(cos).add_(rotated.mul_(sin))


def conv_pass(x: torch.Tensor, weights: List[torch.Tensor], outs: List[Optional[torch.Tensor]], coef=None,
              accumulate: bool = False, stats: Optional[List[bool]] = None, rope=None, hw: Tuple[int, int] = (0, 0),
              tile: Optional[int] = None):
    """One pass over the tokens ``x`` ``(B, N, Cin)``: per tile, ``h = silu(x * a + s)`` when ``coef``
    = ``(a, s)`` is given (else ``h = x``), then for the first weight ``y = h W^T`` written into
    ``outs[0]`` (added to it when ``accumulate``: the residual, in place), and RoPE on ``y`` when
    ``rope`` is given; each further weight ``W_k`` reads that ``y`` into ``outs[k]`` (the encoders
    that all start from the encoded image, fused into the pass that makes it). ``outs``: the
    buffers ``(B, N, Cout)`` (None: a new one; reusing them spares the page faults of fresh 100 MB
    maps, which cost as much system time as the arithmetic takes here). ``tile``: tokens per
    tile (None: :data:`TILE_TOKENS`).

    Returns ``[(out, stats)]`` per weight, ``stats`` a :class:`GroupStats` where ``stats`` (one bool
    per weight, all True by default) asks for the output's GroupNorm statistics, else None."""
    b, n, _ = x.shape
    tile = TILE_TOKENS if tile is None else tile
    stats = [True] * len(weights) if stats is None else stats
    outs = [x.new_empty(b, n, w.shape[0]) if o is None else o for w, o in zip(weights, outs)]
    accs = [GroupStats(b, w.shape[0], x.device) if want else None for w, want in zip(weights, stats)]
    wts = [w.t() for w in weights]
    hbuf = x.new_empty(min(tile, n), x.shape[2]) if coef is not None else None
    if rope is not None:
        height, width = hw
        with torch.autocast(x.device.type, enabled=False):
            rows = torch.linspace(0, 1, height, dtype=torch.float32)
            cols = torch.linspace(0, 1, width, dtype=torch.float32)
    for i in range(b):
        a, s = (coef[0][i], coef[1][i]) if coef is not None else (None, None)
        for start in range(0, n, tile):
            end = min(n, start + tile)
            h = x[i, start:end]
            if a is not None:
                h = F.silu(torch.addcmul(s, h, a, out=hbuf[:end - start]), inplace=True)
            y = outs[0][i, start:end]
            if accumulate:
                y.addmm_(h, wts[0])
            else:
                torch.mm(h, wts[0], out=y)
            if rope is not None:
                rope_tile(rope, y, start, height, width, rows, cols)
            for k in range(1, len(weights)):
                torch.mm(y, wts[k], out=outs[k][i, start:end])
            for k, acc in enumerate(accs):
                if acc is not None:
                    acc.add(i, outs[k][i, start:end])
    return list(zip(outs, accs))


def resblocks(y: torch.Tensor, stats: GroupStats, blocks, scratch: torch.Tensor, last_stats: bool, rope=None,
              hw=(0, 0), heads: Tuple[torch.Tensor, ...] = (), tile: Optional[int] = None):
    """The ResBlocks ``blocks`` (:class:`jafar.upsamplers.jafar.ResBlock`, at least one) on the tokens
    ``y`` (updated in place) whose GroupNorm statistics are ``stats``, ``scratch`` (same shape) holding
    each block's middle map; RoPE (``rope``) and the 1x1 ``heads`` (into new maps) on the last output.
    Returns ``[(tokens, stats)]``: the blocks' output (its statistics if ``last_stats``), then one per
    head (with statistics)."""
    for j, block in enumerate(blocks):
        last = j == len(blocks) - 1
        coef = norm_coefficients(stats, block.norm1, y.dtype)
        (t, t_stats), = conv_pass(y, [block.conv1.weight.flatten(1)], [scratch], coef, tile=tile)
        coef = norm_coefficients(t_stats, block.norm2, y.dtype)
        weights = [block.conv2.weight.flatten(1)] + (list(heads) if last else [])
        outs = [y] + ([None] * len(heads) if last else [])
        want = [not last or last_stats] + [True] * (len(weights) - 1)
        results = conv_pass(t, weights, outs, coef, accumulate=True, stats=want, rope=rope if last else None, hw=hw,
                            tile=tile)
        (y, stats), extra = results[0], results[1:]
    return [(y, stats)] + extra


def tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``(B, H*W, C)`` tokens as a ``(B, C, H, W)`` channels-last view (no copy)."""
    return tokens.view(tokens.shape[0], height, width, -1).permute(0, 3, 1, 2)
