"""NAF (Chambon, Couairon, Zablocki, Boulch, Thome, Cord, "NAF: Zero-Shot Feature Upsampling via
Neighborhood Attention Filtering", arXiv 2511.18452), a backbone-agnostic learned peer of JAFAR by
its and PointBeV's authors: the image alone makes the queries and keys, so one set of weights
upsamples the features of any encoder, zero-shot. Each output pixel attends to a dilated
``kernel_size x kernel_size`` neighbourhood of feature cells; the head-wise weights average the
unprojected features.

Written from github valeoai/NAF @ ad4e24d (Apache-2.0), read, not copied:

* ``src/model/naf.py``, class ``NAF`` (defaults ``dim=256, heads_attn=4, heads_rope=4,
  kernel_size=9, use_encoder=True, rope_base=100.0, rope_rescale=2.0, img_layers=2``, those of the
  release and of ``config/model/naf.yaml``): ``ImageEncoder`` (the image bilinearly shrunk when it is
  more than 4 times the output size, see below; ``encoder`` and ``sem_encoder`` concatenated,
  ``adaptive_avg_pool2d``'ed to the output size, then ``RoPE``), ``QueryEncoder`` (the identity),
  ``KeyEncoder`` (the encoding ``adaptive_avg_pool2d``'ed to the features' size), values = the features.
* ``src/layers/convolutions.py``, ``encoder`` (a reflect-padded conv with bias to ``dim // 2``, then
  ``img_layers`` ``EncBlock``\\ s) and ``EncBlock`` (GroupNorm(8), SiLU, conv, GroupNorm(8), SiLU,
  conv; ``residual=False``, so no skip is added); ``encoder`` with 1x1 convolutions, ``sem_encoder``
  with 3x3 ones.
* ``src/layers/rope.py``, ``RoPE`` (DINOv3's axial RoPE, no learned weights: ``periods`` a persistent
  buffer ``base ** (2 i / (D_head / 2))``; coordinates ``2 (i + 0.5) / H - 1`` per axis,
  ``normalize_coords="separate"``; ``angles = 2 pi coords / periods``, the two axes concatenated and
  tiled twice; ``x cos + rotate_half(x) sin`` per head of ``dim // heads_rope`` channels). Its
  ``rescale_coords`` (``rope_rescale``) applies in training only.
* ``src/layers/attentions.py``, ``CrossAttention`` (no parameters): dilation ``(H_out // h, W_out //
  w)``; keys and values ``F.interpolate(..., mode="nearest-exact")``'d to the output size; queries,
  keys and values split into ``heads_attn`` heads (``"b (n d) h w -> b h w n d"``); natten's 2-D
  neighbourhood attention (``na2d``, or ``na2d_qk`` / softmax / ``na2d_av`` with older natten) with
  scale ``(dim // heads_attn) ** -0.5``, no relative positional bias, stride 1.
* ``hubconf.py``, ``naf`` (``NAF()`` and the release's URL) and the README and
  ``notebooks/inference.ipynb``: the guidance is the image normalised with the ImageNet mean and
  std, the output size chosen by the caller.

natten's neighbourhood (its ``get_window_start``): along an axis of length ``L`` with kernel ``k`` and
dilation ``d``, position ``i`` belongs to the sub-grid ``i mod d`` of ``L_r`` positions; within it,
at index ``j = i // d``, the window is the ``k`` consecutive sub-grid positions starting at
``clamp(j - k // 2, 0, L_r - k)`` (shifted inwards at the borders, never shrunk), which needs
``L // d >= k``. :func:`neighborhood_attention` computes exactly that in pure PyTorch.

Module and buffer names follow upstream's ``NAF`` (``image_encoder.encoder.*``,
``image_encoder.sem_encoder.*``, ``image_encoder.rope.periods``; ``upsampler`` has no parameters),
so the release's state dict loads with ``load_state_dict`` as it is.

What differs from upstream, and why:

* No natten: where the output is a whole multiple of the feature grid (224 from 16x16, 448 from
  32x32, ...), :func:`cell_attention` computes the same attention per feature cell on the
  low-resolution keys and values (the queries of a cell share their window); elsewhere
  :func:`neighborhood_attention` gathers each query's neighbourhood (rows of queries in
  chunks bounded by ``chunk_elements``), softmax over it. Both in the features' dtype (float64 too, which
  natten's kernels do not take) and with values of any head width. ``attention="natten"`` calls
  natten's ``na2d`` when it is installed (its default backend; upstream names ``cutlass-fna``).
* Feature widths: the values are split into ``heads_attn`` groups of channels, each averaged with
  its head's weights, so the width must be a multiple of ``heads_attn`` (4 for the release): others
  are refused in one sentence.
* Small grids, where upstream's natten call raises: the dilation is at least 1 (an output smaller
  than the features would give 0), and the kernel is at most ``H_out // dilation`` rows and
  ``W_out // dilation`` columns (features of fewer than ``kernel_size`` cells a side), so the window
  is then all of a query's sub-grid (clamped as natten clamps). Wherever natten runs, both are
  upstream's values and the output is upstream's.
* Upstream shrinks an image taller than ``4 H_out`` or wider than ``4 W_out`` to
  ``(min(H, 4 H_out, 4 W_out), min(W, 4 W_out, 4 H_out))`` (both bounds on both axes); kept as is.
* The output size defaults to the image's when not given; the image is cast to the features' dtype.
* ``use_encoder=False`` (the image itself as the encoding, for ablations) is not offered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import hub
from .base import (
    LearnedUpsampler,
    check_features,
    check_image,
    check_on_missing,
    check_output_size,
    fetch_release,
    load_file_or_release,
    register_upsampler,
)

#: gathered neighbourhood elements (``B * W_out * k * k * heads * head width``, per chunk of output rows)
CHUNK_ELEMENTS = 1 << 25
ATTENTION_MODES = ("local", "natten")


class EncBlock(nn.Module):
    """``convolutions.py``, ``EncBlock`` as ``encoder`` builds it: GroupNorm, SiLU, conv, GroupNorm, SiLU,
    conv (with bias, reflect padding), no skip (``residual=False``)."""

    def __init__(self, channels: int, kernel_size: int, num_groups: int = 8):
        super().__init__()
        p = kernel_size // 2
        self.norm1 = nn.GroupNorm(num_groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size, padding=p, padding_mode="reflect")
        self.norm2 = nn.GroupNorm(num_groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size, padding=p, padding_mode="reflect")
        self.activation_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(self.activation_fn(self.norm1(x)))
        return self.conv2(self.activation_fn(self.norm2(x)))


def make_encoder(in_channels: int, channels: int, kernel_size: int, num_layers: int) -> nn.Sequential:
    """``convolutions.py``, ``encoder(in_dim, hidden_dim, kernel_size, ks_res=kernel_size, num_layers)``."""
    first = nn.Conv2d(in_channels, channels, kernel_size, padding=kernel_size // 2, padding_mode="reflect")
    return nn.Sequential(first, *[EncBlock(channels, kernel_size) for _ in range(num_layers)])


class RoPE(nn.Module):
    """``rope.py``, ``RoPE`` (evaluation: no shift, jitter or rescale of the coordinates):
    ``(B, dim, H, W) -> (B, dim, H, W)``."""

    def __init__(self, dim: int, num_heads: int, base: float = 100.0):
        super().__init__()
        self.num_heads, self.base = int(num_heads), float(base)
        self.head_dim = int(dim) // self.num_heads
        n = self.head_dim // 4
        self.register_buffer("periods", self.base ** (2 * torch.arange(n, dtype=torch.float32) / (self.head_dim // 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x = x.reshape(b, self.num_heads, self.head_dim, h * w).transpose(-1, -2)  # b n (h w) d
        ch = torch.arange(0.5, h, dtype=x.dtype, device=x.device) / h
        cw = torch.arange(0.5, w, dtype=x.dtype, device=x.device) / w
        coords = 2.0 * torch.stack(torch.meshgrid(ch, cw, indexing="ij"), dim=-1).reshape(h * w, 2) - 1.0
        angles = (2 * math.pi * coords[:, :, None] / self.periods.to(x.dtype)).flatten(1, 2).tile(2)
        x1, x2 = x.chunk(2, dim=-1)
        x = x * angles.cos() + torch.cat((-x2, x1), dim=-1) * angles.sin()
        return x.transpose(-1, -2).reshape(b, self.num_heads * self.head_dim, h, w)


class ImageEncoder(nn.Module):
    """``naf.py``, ``ImageEncoder``: ``(image (B, 3, H, W), output_size) -> (B, dim, H_out, W_out)``."""

    def __init__(self, in_channels: int = 3, out_channels: int = 256, heads_rope: int = 4, rope_base: float = 100.0,
                 img_layers: int = 2):
        super().__init__()
        self.encoder = make_encoder(in_channels, out_channels // 2, 1, img_layers)
        self.sem_encoder = make_encoder(in_channels, out_channels // 2, 3, img_layers)
        self.rope = RoPE(out_channels, heads_rope, rope_base)

    def forward(self, x: torch.Tensor, output_size: Tuple[int, int]) -> torch.Tensor:
        (oh, ow), (h, w) = output_size, x.shape[-2:]
        if h > 4 * oh or w > 4 * ow:  # upstream's bounds, both on both axes
            x = F.interpolate(x, size=(min(h, 4 * oh, 4 * ow), min(w, 4 * ow, 4 * oh)), mode="bilinear", align_corners=False)
        x = torch.cat([self.encoder(x), self.sem_encoder(x)], dim=1)
        return self.rope(F.adaptive_avg_pool2d(x, output_size=output_size))


def neighborhood_index(length: int, kernel_size: int, dilation: int, device=None) -> torch.Tensor:
    """natten's dilated neighbourhood along one axis: ``(length, kernel_size)`` long, the positions each
    position attends to (see the module docstring); needs ``length // dilation >= kernel_size``."""
    i = torch.arange(length, device=device)
    r, j = i % dilation, i // dilation
    sub = (length - r + dilation - 1) // dilation  # the length of i's sub-grid
    start = torch.minimum((j - kernel_size // 2).clamp(min=0), sub - kernel_size)
    return r[:, None] + dilation * (start[:, None] + torch.arange(kernel_size, device=device))


def neighborhood_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Tuple[int, int],
                           dilation: Tuple[int, int], scale: float, rows_per_chunk: Optional[int] = None,
                           chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """natten's ``na2d`` (no positional bias, stride 1) in pure PyTorch: ``q``, ``k`` ``(B, H, W, heads, d)``,
    ``v`` ``(B, H, W, heads, dv)`` -> ``(B, H, W, heads, dv)``; each query's softmax over its dilated
    ``kernel_size`` neighbourhood of keys. Rows of queries go in chunks of ``rows_per_chunk`` (None: as
    many as keep the gathered neighbourhoods under ``chunk_elements``)."""
    b, H, W, n, d = q.shape
    dv = v.shape[-1]
    (kh, kw), (dh, dw) = kernel_size, dilation
    rows = neighborhood_index(H, kh, dh, q.device)
    cols = neighborhood_index(W, kw, dw, q.device)
    if rows_per_chunk is None:
        rows_per_chunk = max(1, int(chunk_elements) // max(1, b * W * kh * kw * n * max(d, dv)))
    out = []
    for s in range(0, H, int(rows_per_chunk)):
        e = min(H, s + int(rows_per_chunk))
        ri, ci = rows[s:e, None, :, None], cols[None, :, None, :]  # -> (rows, W, kh, kw)
        kn = k[:, ri, ci].reshape(b, e - s, W, kh * kw, n, d)
        vn = v[:, ri, ci].reshape(b, e - s, W, kh * kw, n, dv)
        weights = (torch.einsum("brwnd,brwknd->brwnk", q[:, s:e], kn) * scale).softmax(dim=-1)
        out.append(torch.einsum("brwnk,brwknd->brwnd", weights, vn))
    return torch.cat(out, dim=1)


def cell_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel_size: Tuple[int, int], scale: float,
                   num_heads: int, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """:func:`neighborhood_attention` when the output is a whole multiple of the feature grid,
    ``H = d_h h`` and ``W = d_w w``, computed on the low-resolution keys and values: ``q`` ``(B, dim, H,
    W)``, ``k`` ``(B, dim, h, w)``, ``v`` ``(B, C, h, w)`` -> ``(B, C, H, W)``.

    Why it is the same: upstream upsamples the keys and values to ``H x W`` with ``nearest-exact``, which
    maps output row ``r + d m`` (``0 <= r < d``) to feature row ``floor((r + 0.5) / d) + m = m``; natten's
    dilated window of query row ``i`` (sub-grid ``i mod d`` of length ``h``, index ``j = i // d``) holds
    rows ``i mod d + d (start + t)``, ``start = clamp(j - k // 2, 0, h - k)``, i.e. the feature rows
    ``start + t``. So the ``d_h x d_w`` queries of one feature cell share one window of ``k_h x k_w``
    cells: per cell and head, a dense ``(d_h d_w) x (k_h k_w)`` attention (two batched matmuls) instead
    of a gather of every query's neighbourhood. Cells go in chunks of rows whose logits stay under
    ``chunk_elements``."""
    b, dim, H, W = q.shape
    c, (h, w) = v.shape[1], v.shape[-2:]
    dh, dw, (kh, kw), n = H // h, W // w, kernel_size, num_heads
    rows, cols = neighborhood_index(h, kh, 1, q.device), neighborhood_index(w, kw, 1, q.device)
    # queries per cell: (B, h, w, heads, dh dw, d)
    qc = q.reshape(b, n, dim // n, h, dh, w, dw).permute(0, 3, 5, 1, 4, 6, 2).reshape(b, h, w, n, dh * dw, dim // n)
    kt = k.reshape(b, n, dim // n, h, w).permute(0, 3, 4, 1, 2)  # (B, h, w, heads, d)
    vt = v.reshape(b, n, c // n, h, w).permute(0, 3, 4, 1, 2)  # (B, h, w, heads, dv)
    per_row = b * w * n * dh * dw * kh * kw
    step = max(1, int(chunk_elements) // max(1, per_row))
    out = []
    for s in range(0, h, step):
        e = min(h, s + step)
        ri, ci = rows[s:e, None, :, None], cols[None, :, None, :]  # -> (rows, w, kh, kw) windows
        kn = kt[:, ri, ci].reshape(b, e - s, w, kh * kw, n, -1).transpose(3, 4)  # (B, r, w, heads, kk, d)
        vn = vt[:, ri, ci].reshape(b, e - s, w, kh * kw, n, -1).transpose(3, 4)  # (B, r, w, heads, kk, dv)
        weights = (qc[:, s:e] @ kn.transpose(-1, -2) * scale).softmax(dim=-1)  # (B, r, w, heads, dh dw, kk)
        out.append(weights @ vn)  # (B, r, w, heads, dh dw, dv)
    out = torch.cat(out, dim=1).reshape(b, h, w, n, dh, dw, c // n)
    return out.permute(0, 3, 6, 1, 4, 2, 5).reshape(b, c, H, W)


class CrossAttention(nn.Module):
    """``attentions.py``, ``CrossAttention`` (no parameters): ``forward(q (B, dim, H, W), k (B, dim, h, w),
    v (B, C, h, w)) -> (B, C, H, W)``."""

    def __init__(self, dim: int, num_heads: int, kernel_size: Tuple[int, int] = (9, 9)):
        super().__init__()
        self.num_heads, self.kernel_size = int(num_heads), tuple(int(s) for s in kernel_size)
        self.scale = (int(dim) // self.num_heads) ** -0.5

    def _heads(self, x: torch.Tensor, size: Optional[Tuple[int, int]], dtype) -> torch.Tensor:
        if size is not None:
            x = F.interpolate(x, size=size, mode="nearest-exact").to(dtype)
        b, c, h, w = x.shape
        return x.reshape(b, self.num_heads, c // self.num_heads, h, w).permute(0, 3, 4, 1, 2)  # b h w n d

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention: str = "local",
                rows_per_chunk: Optional[int] = None, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
        (H, W), (h, w) = q.shape[-2:], k.shape[-2:]
        dilation = (max(1, H // h), max(1, W // w))  # upstream's H // h, W // w wherever natten runs
        kernel = (min(self.kernel_size[0], H // dilation[0]), min(self.kernel_size[1], W // dilation[1]))
        if attention == "local" and H % h == 0 and W % w == 0 and rows_per_chunk is None:
            return cell_attention(q, k, v.to(q.dtype), kernel, self.scale, self.num_heads, chunk_elements)
        q, k, v = self._heads(q, None, q.dtype), self._heads(k, (H, W), q.dtype), self._heads(v, (H, W), q.dtype)
        if attention == "natten":
            from natten import na2d  # optional; only asked for by name

            out = na2d(q, k, v, kernel_size=kernel, dilation=dilation, stride=1, scale=self.scale)
        else:
            out = neighborhood_attention(q, k, v, kernel, dilation, self.scale, rows_per_chunk, chunk_elements)
        b = out.shape[0]
        return out.permute(0, 3, 4, 1, 2).reshape(b, -1, H, W)


@dataclass(frozen=True)
class NAFRelease:
    """A released NAF (``hubconf.py`` of github valeoai/NAF)."""

    hub_name: str  #: its ``torch.hub.load("valeoai/NAF", ...)`` entry
    url: str
    trained_on: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]


#: NAF's releases, each a state dict of ``NAF()`` (upstream's defaults); used zero-shot for any encoder.
NAF_RELEASES: Dict[str, NAFRelease] = {
    "naf": NAFRelease("naf", "https://github.com/valeoai/NAF/releases/download/model/naf_release.pth",
                      "DINOv3 ViT-B/16 features on ImageNet (config/base.yaml), used zero-shot for any encoder"),
}
_ALIASES = {"naf_release": "naf", "release": "naf"}


def find_naf_release(name) -> Optional[str]:
    """The key of :data:`NAF_RELEASES` that ``name`` names (the torch hub name, ``naf_release``, the URL or
    the file's name), else None."""
    name = str(name)
    if name in NAF_RELEASES:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    for key, release in NAF_RELEASES.items():
        if name in (release.url, release.filename):
            return key
    return None


class NAF(LearnedUpsampler):
    """NAF: ``naf(image, features, output_size) -> (B, C, H_out, W_out)`` for features of any encoder whose
    width is a multiple of ``heads_attn`` (each output is a convex combination of feature cells per
    group of channels: the features' scale is kept).

    Args:
        feature_dim: optional, recorded only (NAF takes any width that ``heads_attn`` divides).
        dim, heads_attn, heads_rope, kernel_size, rope_base, img_layers: upstream's ``NAF`` arguments
            (defaults those of the release); ``rope_rescale`` is accepted and unused (training only).
        attention: ``"local"`` (pure PyTorch, rows of queries in chunks) or ``"natten"`` (natten's
            ``na2d``, when installed).
        rows_per_chunk: output rows per chunk of queries of the per-query gather
            (:func:`neighborhood_attention`); None: as many as keep a chunk's gathered neighbourhoods
            under ``chunk_elements``, and :func:`cell_attention` wherever the output is a whole
            multiple of the feature grid (the same numbers, 47x faster at 224 from 16x16 on the CPU).

    Inputs: ``image`` the guidance ``(B, 3, H, W)`` normalised with the ImageNet mean and std (upstream's
    notebook), any resolution; ``features`` ``(B, C, h, w)`` as they come out of the backbone;
    ``output_size`` any (upstream's result wherever natten's neighbourhood fits, see the module docstring).
    """

    label = "NAF"

    def __init__(self, feature_dim: Optional[int] = None, dim: int = 256, heads_attn: int = 4, heads_rope: int = 4,
                 kernel_size: int = 9, rope_base: float = 100.0, rope_rescale: Optional[float] = 2.0, img_layers: int = 2,
                 attention: str = "local", rows_per_chunk: Optional[int] = None, chunk_elements: int = CHUNK_ELEMENTS):
        super().__init__()
        self.feature_dim = None if feature_dim is None else int(feature_dim)
        dim, heads_attn, heads_rope, kernel_size = int(dim), int(heads_attn), int(heads_rope), int(kernel_size)
        if heads_attn < 1 or heads_rope < 1 or dim % 16 or dim % heads_attn or dim % (4 * heads_rope):
            raise ValueError(f"NAF's dim must be a multiple of 16 (its two GroupNorm(8) halves), of heads_attn={heads_attn} "
                             f"and of 4 * heads_rope={4 * heads_rope}, got {dim}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"NAF's kernel_size must be a positive odd int, got {kernel_size}.")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"NAF attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}.")
        if rows_per_chunk is not None and int(rows_per_chunk) < 1:
            raise ValueError(f"NAF rows_per_chunk must be a positive int or None, got {rows_per_chunk!r}.")
        self.dim, self.heads_attn, self.heads_rope, self.kernel_size = dim, heads_attn, heads_rope, kernel_size
        self.rope_rescale, self.img_layers = rope_rescale, int(img_layers)
        self.attention = attention
        self.rows_per_chunk = None if rows_per_chunk is None else int(rows_per_chunk)
        self.chunk_elements = int(chunk_elements)
        self.image_encoder = ImageEncoder(3, dim, heads_rope, rope_base, self.img_layers)
        self.query_encoder = nn.Identity()  # upstream's QueryEncoder
        self.key_encoder = nn.Identity()  # upstream's KeyEncoder pools; done in forward
        self.upsampler = CrossAttention(dim, heads_attn, (kernel_size, kernel_size))

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size=None) -> torch.Tensor:
        check_features(features)
        check_image(image, features)
        H, W = check_output_size(tuple(image.shape[-2:]) if output_size is None else output_size)
        c, (h, w) = features.shape[1], features.shape[-2:]
        if image.shape[1] != 3:
            raise ValueError(f"NAF's guidance must be a (B, 3, H, W) image, got {image.shape[1]} channels.")
        if c % self.heads_attn:
            raise ValueError(f"NAF splits the features into heads_attn={self.heads_attn} groups of channels: their width must "
                             f"be a multiple of {self.heads_attn}, got {c}.")
        x = self.image_encoder(image.to(features.dtype), (H, W))
        queries = self.query_encoder(x)
        keys = F.adaptive_avg_pool2d(self.key_encoder(x), output_size=(h, w))
        return self.upsampler(queries, keys, features, self.attention, self.rows_per_chunk, self.chunk_elements)

    def load_weights(self, path) -> "NAF":
        """Load the release's ``.pth`` (a state dict of upstream's ``NAF``, the same names as this module's)
        or a state dict of this module (optionally under ``state_dict``, ``module.`` prefixes stripped),
        without running pickled code."""
        state = hub.read_state_dict(path, nested=("state_dict",), strip_prefix="module.")
        hub.load_into(self, state, path, f"NAF(dim={self.dim}, heads_rope={self.heads_rope}, img_layers={self.img_layers})")
        self.weights_source = str(path)
        return self

    def load_release(self, name: str, cache_dir=None) -> "NAF":
        """Download (into torch's hub cache) and load the release ``name`` (:data:`NAF_RELEASES`);
        RuntimeError with what to do when offline."""
        key, release, path = fetch_release(name, find_naf_release, NAF_RELEASES, "NAF", "naf", cache_dir=cache_dir)
        self.load_weights(path)
        self.weights_source = f"NAF release {key!r} (trained on {release.trained_on})"
        return self

    def describe(self) -> str:
        return (f"NAF (encoder-agnostic, zero-shot: features of any backbone whose width is a multiple of "
                f"{self.heads_attn}; RoPE'd image queries attend to a dilated {self.kernel_size} x {self.kernel_size} "
                f"neighbourhood of image keys, the weights averaging the features), weights: {self.weights_source}.")

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads_attn={self.heads_attn}, kernel_size={self.kernel_size}, "
                f"attention={self.attention!r}, rows_per_chunk={self.rows_per_chunk}, weights={self.weights_source!r}")


@register_upsampler("naf", summary="NAF (encoder-agnostic neighbourhood attention, zero-shot for any encoder)")
def naf(feature_dim=None, checkpoint=None, backbone=None, on_missing: str = "error", **options) -> NAF:
    """``checkpoint``: a file (the release's ``.pth`` or ours), or a release name of :data:`NAF_RELEASES`
    (downloaded when online); random weights when omitted. ``feature_dim`` is optional (NAF takes any
    width that ``heads_attn`` divides). ``on_missing``: ``"error"``, or ``"random"`` to fall back to random
    weights (with a warning, and said by :meth:`NAF.describe`) when a release cannot be fetched.
    ``options``: :class:`NAF`'s arguments."""
    check_on_missing("naf", on_missing)
    model = NAF(feature_dim, **options)
    if checkpoint is None:
        return model
    return load_file_or_release(model, checkpoint, find_naf_release, on_missing, "NAF")


__all__ = ["NAF", "NAF_RELEASES", "NAFRelease", "cell_attention", "find_naf_release", "naf", "neighborhood_attention",
           "neighborhood_index"]
