"""SAPA (Lu et al., NeurIPS 2022, "SAPA: Similarity-Aware Point Affiliation for Feature
Upsampling"), a task-dependent baseline of the paper's Tables 1-2, in pure PyTorch.

Written from github poppinace/sapa @ 5530ef8 (MIT licence), read, not copied:

* ``SAPA.py``, class ``SAPA``: ``forward(y, x)`` takes the high-resolution guidance ``y`` and the
  low-resolution features ``x``; ``norm_y`` / ``norm_x`` are ``nn.LayerNorm`` over channels,
  ``q = Linear(dim_y, embedding_dim)`` on the normed guidance, ``k = Linear(dim_x,
  embedding_dim)`` on the normed features, the values are the features *before* the norm;
  ``attention``: softmax over the neighbourhood of ``sim(q, k)``, then ``atn(attn, v)``. The
  constants taken from its ``__init__``: ``up_factor=2``, ``up_kernel_size=5``,
  ``embedding_dim=64``, ``qkv_bias=True``; from ``_init_weights``: Linear weights
  ``trunc_normal_(std=.02)`` and zero biases, LayerNorm weight 1 and bias 0.
* ``sapa/sapa/src/cuda/qk_cuda_kernel.cu``, ``QKForward``: output pixel ``(qh, qw)`` has the
  source pixel ``(qh // scale_factor, qw // scale_factor)`` and the key ``(kh, kw) = source -
  (kernel_size - 1) / 2 + (kiy, kix)``, neighbour index ``kiy * kernel_size + kix``; the
  similarity is the plain inner product (no ``1/sqrt(d)``), and **0** where the key falls
  outside the grid (that zero still enters the softmax).
* ``sapa/sapa/src/cuda/atn_cuda_kernel.cu``, ``ATNForward``: the same neighbourhood, weighted sum
  of the values, an outside neighbour contributing nothing.

Both rules are exactly zero-padding the keys and the values by ``(kernel_size - 1) / 2``, which
is what :func:`sapa_attention` does (gather with index_select, einsum), chunked over output
rows so that memory is bounded for any output size. The CUDA ops have no CPU path upstream
(``sapa_func.py`` raises ``NotImplementedError``); this one runs on any device and dtype and
autograd differentiates it.

Usage as the paper's baseline (appendix A.2): "stacking four SAPA upsampling modules, each with an
upsampling factor of 2", so ``stages=4`` x2 stages (x16), then bilinear (``align_corners=False``)
to the requested size, skipped when the size already matches.

Guidance (our adaptation): upstream feeds each stage an encoder feature map at that stage's output
resolution (``dim_y`` channels). A ViT has no such pyramid, so stage ``s`` (1-based) takes the
normalised guidance image resized bilinearly (``align_corners=False``, antialiased when it
shrinks) to its output grid ``(2**s h, 2**s w)`` and embeds it with its own small conv
(3x3 conv 3 -> ``guidance_dim``, ReLU, 1x1 conv ``guidance_dim`` -> ``guidance_dim``); that
embedding is SAPA's ``y``. ``guidance_dim=32`` and the conv embedding are our choices.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .base import StackedUpsampler, register_upsampler

#: gathered neighbourhood elements per chunk of output rows (``B * C * rows * W * k * k``); bounds
#: the memory of one forward without autograd (autograd keeps every chunk's gathers)
CHUNK_ELEMENTS = 1 << 24


def _rows_per_chunk(batch: int, channels: int, width: int, kernel_size: int, max_elements: int) -> int:
    return max(1, max_elements // max(1, batch * channels * width * kernel_size * kernel_size))


def sapa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int = 5,
                   max_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """SAPA's ``softmax(sim(q, k))`` then ``atn(attn, v)`` for any integer ratio.

    Args:
        query: ``(B, D, H, W)`` high-resolution queries, ``H = s_h * h`` and ``W = s_w * w``.
        key: ``(B, D, h, w)`` low-resolution keys.
        value: ``(B, C, h, w)`` low-resolution values.
        kernel_size: odd side of the neighbourhood (``up_kernel_size`` upstream).
    Output pixel ``(y, x)`` attends to the ``kernel_size**2`` low-resolution pixels around
    ``(y // s_h, x // s_w)``; keys and values outside the grid are zeros (similarity 0 in the
    softmax, no contribution), as in ``QKForward`` / ``ATNForward``. Returns ``(B, C, H, W)``.
    """
    if kernel_size < 1 or kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}.")
    b, d, big_h, big_w = query.shape
    h, w = key.shape[-2:]
    if big_h % h or big_w % w:
        raise ValueError(f"SAPA needs an integer ratio: queries {big_h}x{big_w} over keys {h}x{w}.")
    r, kk = kernel_size // 2, kernel_size
    kpad = F.pad(key, (r, r, r, r))
    vpad = F.pad(value, (r, r, r, r))
    offsets = torch.arange(kk, device=query.device)
    cols = (torch.arange(big_w, device=query.device) // (big_w // w))[:, None] + offsets  # (W, k) in padded grid
    rows_all = (torch.arange(big_h, device=query.device) // (big_h // h))[:, None] + offsets  # (H, k)
    step = _rows_per_chunk(b, max(d, value.shape[1]), big_w, kk, max_elements)
    out = []
    for y0 in range(0, big_h, step):
        rows = rows_all[y0:y0 + step]
        n = rows.shape[0]

        def gather(t):  # (B, C, h+2r, w+2r) -> (B, C, n, k, W, k)
            t = t.index_select(2, rows.reshape(-1)).view(t.shape[0], t.shape[1], n, kk, t.shape[-1])
            return t.index_select(4, cols.reshape(-1)).view(t.shape[0], t.shape[1], n, kk, big_w, kk)

        sim = torch.einsum("bdrx,bdrixj->brxij", query[:, :, y0:y0 + n], gather(kpad))
        attn = sim.reshape(b, n, big_w, kk * kk).softmax(-1).view(b, n, big_w, kk, kk)
        out.append(torch.einsum("brxij,bcrixj->bcrx", attn, gather(vpad)))
    return torch.cat(out, dim=2)


def _resize(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


class SAPAStage(nn.Module):
    """One SAPA module (``SAPA.py``, class ``SAPA``) with its guidance embedding (our adaptation,
    see the module docstring): ``stage(image, features) -> (B, C, factor*h, factor*w)``."""

    def __init__(self, feature_dim: int, guidance_dim: int = 32, embedding_dim: int = 64, kernel_size: int = 5,
                 factor: int = 2, qkv_bias: bool = True, max_elements: int = CHUNK_ELEMENTS):
        super().__init__()
        self.factor, self.kernel_size, self.max_elements = int(factor), int(kernel_size), int(max_elements)
        self.guidance = nn.Sequential(nn.Conv2d(3, guidance_dim, 3, padding=1), nn.ReLU(inplace=True),
                                      nn.Conv2d(guidance_dim, guidance_dim, 1))
        self.norm_y = nn.LayerNorm(guidance_dim)
        self.norm_x = nn.LayerNorm(feature_dim)
        self.q = nn.Linear(guidance_dim, embedding_dim, bias=qkv_bias)
        self.k = nn.Linear(feature_dim, embedding_dim, bias=qkv_bias)
        for m in (self.q, self.k):  # SAPA.py, SAPA._init_weights
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h, w = features.shape[-2:]
        y = self.guidance(_resize(image, (self.factor * h, self.factor * w)))
        q = self.q(self.norm_y(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        k = self.k(self.norm_x(features.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return sapa_attention(q, k, features, self.kernel_size, self.max_elements)


class SAPA(StackedUpsampler):
    """SAPA as the paper's baseline: ``stages`` x2 SAPA modules, then bilinear to ``output_size``.

    Args:
        feature_dim: the features' channels (SAPA's ``dim_x``; the values keep them).
        stages: number of x2 stages (4: appendix A.2).
        kernel_size: neighbourhood side (5: ``up_kernel_size`` in ``SAPA.py``).
        embedding_dim: query/key width (64: ``embedding_dim`` in ``SAPA.py``).
        guidance_dim: width of the image embedding that stands for SAPA's ``y`` (32: our choice).
        max_elements: gathered elements per chunk of output rows (memory bound).
    """

    label = "SAPA"
    guided = True

    def __init__(self, feature_dim: int, stages: int = 4, kernel_size: int = 5, embedding_dim: int = 64,
                 guidance_dim: int = 32, max_elements: int = CHUNK_ELEMENTS):
        super().__init__()
        if int(stages) < 1:
            raise ValueError(f"SAPA needs at least one x2 stage, got stages={stages}.")
        self.feature_dim, self.n_stages, self.kernel_size = int(feature_dim), int(stages), int(kernel_size)
        self.embedding_dim, self.guidance_dim = int(embedding_dim), int(guidance_dim)
        self.stages = nn.ModuleList(
            SAPAStage(self.feature_dim, self.guidance_dim, self.embedding_dim, self.kernel_size, 2, True, max_elements)
            for _ in range(self.n_stages))

    def describe(self) -> str:
        return (f"SAPA ({self.n_stages} x2 stages, k={self.kernel_size}, then bilinear; guidance: the image, "
                f"conv-embedded per stage), weights: {self.weights_source}.")

    def extra_repr(self) -> str:
        return (f"feature_dim={self.feature_dim}, stages={self.n_stages}, kernel_size={self.kernel_size}, "
                f"embedding_dim={self.embedding_dim}, guidance_dim={self.guidance_dim}, weights={self.weights_source!r}")


@register_upsampler("sapa", summary="SAPA (4 x2 similarity-aware stages, then bilinear)")
def sapa(feature_dim=None, checkpoint=None, backbone=None, **options) -> SAPA:
    """``checkpoint``: one of our trained SAPA state dicts (a path); options: :class:`SAPA`'s."""
    return SAPA.create("sapa", feature_dim, checkpoint, **options)


__all__ = ["SAPA", "SAPAStage", "sapa_attention"]
