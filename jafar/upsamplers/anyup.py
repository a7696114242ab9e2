"""AnyUp (Wimmer, Truong, Rakotosaona, Oechsle, Tombari, Schiele, Lenssen, "AnyUp: Universal Feature
Upsampling", arXiv 2510.12764, ICLR 2026), a feature-agnostic learned peer of JAFAR: one set of
weights upsamples features of any backbone and any width. JAFAR's design (RoPE'd image encoding,
queries pooled to the output size, keys pooled to the features' size, the head-averaged attention
applying to the unprojected features) with a width-independent key path and windowed attention.

Written from github wimmerth/anyup @ 351807a (CC-BY-4.0), read, not copied:

* ``anyup/model.py``, class ``AnyUp`` (defaults ``input_dim=3, qk_dim=128, kernel_size=1,
  kernel_size_lfu=5, window_ratio=0.1, num_heads=4``, those of both releases): ``_make_encoder``
  (a reflect-padded bias-free conv, or ``LearnedFeatureUnification``, then two ``ResBlock``\\ s
  with ``kernel_size=1, num_groups=8, pad_mode="reflect", norm_fn=nn.GroupNorm,
  activation_fn=nn.SiLU``) for ``image_encoder``, ``key_encoder``, ``query_encoder``,
  ``key_features_encoder`` (on the features L2-normalised over channels) and ``aggregation``
  (3x3 conv of the concatenated ``2 * qk_dim`` keys); ``forward`` (RoPE on the image encoding
  with ``create_coordinate``'s ``linspace(0, 1)`` grid) and ``upsample`` (queries
  ``adaptive_avg_pool2d``'ed to the output size, keys to the features' size, values = the features).
* ``anyup/layers/convolutions.py``, ``ResBlock`` (GroupNorm, SiLU, conv, GroupNorm, SiLU, conv, plus
  the identity or a 1x1 conv shortcut).
* ``anyup/layers/feature_unification.py``, ``LearnedFeatureUnification``: every channel convolved
  (zero padding) with each of ``lfu_dim`` learned ``k x k`` kernels (``basis``), divided by the number
  of in-image taps, viewed as ``(B, lfu_dim, C, h, w)``, softmax over dim 1, mean over dim 2: a
  ``lfu_dim``-channel map whatever ``C``. The view reads the depthwise conv's channel-major output
  ``(C, lfu_dim)`` as ``(lfu_dim, C)``; that layout is what the releases were trained with and is kept.
* ``anyup/layers/positional_encoding.py``, ``RoPE`` (``theta=100``; ``freqs`` a learned ``(2, dim)``
  table; ``x cos + rotate_half(x) sin``).
* ``anyup/layers/attention/chunked_attention.py``, ``CrossAttentionBlock`` and ``CrossAttention``: a
  bias-free 3x3 conv on the queries, ``nn.RMSNorm`` on queries and keys, ``nn.MultiheadAttention``'s
  head-averaged weights (its output projection is computed and unused) applied to the features;
  ``q_chunk_size`` queries at a time when given.
* ``anyup/layers/attention/attention_masking.py``, ``window2d`` and ``compute_attention_mask``: each
  output pixel ``(i + 0.5) / H`` attends to the feature cells ``[floor(clamp(p - r) * h),
  ceil(clamp(p + r) * h))`` per axis, ``r = window_ratio``, computed in float32.
* ``hubconf.py`` and the README: the releases (:data:`ANYUP_RELEASES`), plain state dicts of
  ``AnyUp()``; the guidance is the image normalised with the ImageNet mean and std, at any
  resolution (not resized: its encoding is pooled to the output size), the output size defaulting
  to the image's.

Module and parameter names follow upstream's ``AnyUp`` (``image_encoder.*``, ``key_encoder.*``,
``query_encoder.*``, ``key_features_encoder.*``, ``cross_decode.*``, ``aggregation.*``,
``rope.freqs``), so a release's state dict loads with ``load_state_dict`` as it is.

What differs from upstream, and why:

* The windowed attention (``attention="local"``, the default) is pure PyTorch: queries in chunks of
  ``q_chunk_size`` (chosen from ``chunk_elements`` when not given), each chunk against only the
  feature cells inside the bounding box of its queries' windows, the window mask applied there. A
  masked key has weight exactly 0 in upstream's softmax, so this is upstream's result, with memory
  bounded by the chunk instead of ``queries x all keys`` weights. ``attention="reference"`` calls
  ``nn.MultiheadAttention`` with the full mask, as upstream.
* Upstream's optional ``NATTENCrossAttentionBlock`` (``use_natten=True``; ``natten_attention.py``)
  is not built: the README says it uses slightly different windows. Its parameters are copied from
  the standard block's, so both releases are run here with the paper's windows.
* Features of fewer than 2 x 2 cells are refused in one sentence (upstream's reflect padding of the
  keys' 3x3 ``aggregation`` conv raises a RuntimeError on them).
* ``init_gaussian_derivatives`` (an initialisation of ``basis``, off in both releases) is not offered.
"""

from __future__ import annotations

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

#: attention weights (``B * heads * queries * keys``) per chunk of queries when ``q_chunk_size`` is None
CHUNK_ELEMENTS = 1 << 26
ATTENTION_MODES = ("local", "reference")
#: ``RoPE``'s default ``theta`` in ``positional_encoding.py``
ROPE_THETA = 100


class ResBlock(nn.Module):
    """``convolutions.py``, ``ResBlock`` as ``AnyUp`` builds it: GroupNorm(8), SiLU, conv, GroupNorm(8),
    SiLU, conv (bias-free, reflect padding), plus the identity (or a bias-free 1x1 conv when the
    widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, num_groups: int = 8):
        super().__init__()
        p = kernel_size // 2
        self.block = nn.Sequential(
            nn.GroupNorm(num_groups, in_channels), nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=p, padding_mode="reflect", bias=False),
            nn.GroupNorm(num_groups, out_channels), nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size, padding=p, padding_mode="reflect", bias=False))
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels
                         else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) + self.shortcut(x)


class LearnedFeatureUnification(nn.Module):
    """``feature_unification.py``, ``LearnedFeatureUnification``: ``(B, C, h, w)`` of any ``C`` ->
    ``(B, out_channels, h, w)`` (see the module docstring)."""

    def __init__(self, out_channels: int, kernel_size: int = 5):
        super().__init__()
        self.out_channels, self.kernel_size = int(out_channels), int(kernel_size)
        self.basis = nn.Parameter(torch.randn(self.out_channels, 1, self.kernel_size, self.kernel_size))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, h, w = features.shape
        k, p = self.kernel_size, self.kernel_size // 2
        # every channel against every kernel: (B * C, 1, h, w) -> (B, C * out_channels, h, w), channel-major
        x = F.conv2d(F.pad(features.reshape(b * c, 1, h, w), (p, p, p, p)), self.basis).reshape(b, c * self.out_channels, h, w)
        taps = F.conv2d(F.pad(features.new_ones(1, 1, h, w), (p, p, p, p)), features.new_ones(1, 1, k, k))
        x = (x / taps).view(b, self.out_channels, c, h, w)  # upstream's view of that layout
        return F.softmax(x, dim=1).mean(dim=2)


class RoPE(nn.Module):
    """``positional_encoding.py``, ``RoPE``: ``forward(x (B, N, dim), coords (1, N, 2))``."""

    def __init__(self, dim: int, theta: int = ROPE_THETA):
        super().__init__()
        self.dim, self.theta = int(dim), theta
        self.freqs = nn.Parameter(torch.empty(2, self.dim))
        with torch.no_grad():  # upstream's _device_weight_init
            one = self.theta ** torch.linspace(0, -1, self.dim // 4)
            one = torch.cat([one, one])
            table = torch.zeros(2, self.dim)
            table[0, : self.dim // 2] = one
            table[1, -self.dim // 2:] = one
            self.freqs.copy_(table * 2 * torch.pi)

    def forward(self, x: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        angle = coords @ self.freqs
        x1, x2 = x.chunk(2, dim=-1)
        return x * angle.cos() + torch.cat((-x2, x1), dim=-1) * angle.sin()


def window_bounds(out_size: Tuple[int, int], key_size: Tuple[int, int], ratio: float, device=None) -> torch.Tensor:
    """``attention_masking.py``, ``window2d``: ``(H * W, 4)`` long, each output pixel's feature rows
    ``[r0, r1)`` and columns ``[c0, c1)``, computed in float32 as upstream does."""
    (H, W), (h, w) = out_size, key_size
    rows = (torch.arange(H, device=device, dtype=torch.float32) + 0.5) / H
    cols = (torch.arange(W, device=device, dtype=torch.float32) + 0.5) / W
    rows, cols = torch.meshgrid(rows, cols, indexing="ij")
    r0 = ((rows - ratio).clamp(0.0, 1.0) * h).floor().long()
    r1 = ((rows + ratio).clamp(0.0, 1.0) * h).ceil().long()
    c0 = ((cols - ratio).clamp(0.0, 1.0) * w).floor().long()
    c1 = ((cols + ratio).clamp(0.0, 1.0) * w).ceil().long()
    return torch.stack([r0, r1, c0, c1], dim=2).reshape(H * W, 4)


class CrossAttention(nn.Module):
    """``chunked_attention.py``, ``CrossAttention``: RMSNorm'ed queries and keys, the head-averaged
    attention weights of ``nn.MultiheadAttention``'s parameters, applied to the unprojected values."""

    def __init__(self, qk_dim: int, num_heads: int):
        super().__init__()
        self.norm_q = nn.RMSNorm(qk_dim)
        self.norm_k = nn.RMSNorm(qk_dim)
        self.attention = nn.MultiheadAttention(embed_dim=qk_dim, num_heads=num_heads, dropout=0.0, batch_first=True)

    def weights(self, q: torch.Tensor, k: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Head-averaged softmax weights ``(B, Lq, Lk)`` of normed ``q`` ``(B, Lq, E)`` and ``k``
        ``(B, Lk, E)``; ``mask`` ``(Lq, Lk)`` True where a key is outside the window."""
        mha = self.attention
        e, heads = mha.embed_dim, mha.num_heads
        d = e // heads
        w, bias = mha.in_proj_weight, mha.in_proj_bias
        b, n_q, n_k = q.shape[0], q.shape[1], k.shape[1]
        q = F.linear(q, w[:e], bias[:e]).view(b, n_q, heads, d).transpose(1, 2)
        k = F.linear(k, w[e:2 * e], bias[e:2 * e]).view(b, n_k, heads, d).transpose(1, 2)
        scores = (q * d ** -0.5) @ k.transpose(-1, -2)
        if mask is not None:
            scores = scores.masked_fill(mask, float("-inf"))
        return scores.softmax(dim=-1).mean(dim=1)

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                  q_chunk_size: Optional[int]) -> torch.Tensor:
        """Upstream's call: ``nn.MultiheadAttention`` on all keys with the full mask."""
        q, kn = self.norm_q(q), self.norm_k(k)
        step = q.shape[1] if q_chunk_size is None else int(q_chunk_size)
        out = []
        for s in range(0, q.shape[1], step):
            attn = self.attention(q[:, s:s + step], kn, k, attn_mask=None if mask is None else mask[s:s + step],
                                  average_attn_weights=True)[1]
            out.append(attn @ v)
        return torch.cat(out, dim=1)


class CrossAttentionBlock(nn.Module):
    """``chunked_attention.py``, ``CrossAttentionBlock``: a bias-free 3x3 conv on the queries, then the
    windowed cross-attention; ``forward(q (B, E, H, W), k (B, E, h, w), v (B, C, h, w)) -> (B, C, H, W)``."""

    def __init__(self, qk_dim: int, num_heads: int, window_ratio: float = 0.1):
        super().__init__()
        self.cross_attn = CrossAttention(qk_dim, num_heads)
        self.window_ratio = float(window_ratio)
        self.conv2d = nn.Conv2d(qk_dim, qk_dim, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention: str = "local",
                q_chunk_size: Optional[int] = None, chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
        q = self.conv2d(q)
        b, _, H, W = q.shape
        _, _, h, w = k.shape
        c = v.shape[1]
        q = q.permute(0, 2, 3, 1).reshape(b, H * W, -1)
        k = k.permute(0, 2, 3, 1).reshape(b, h * w, -1)
        v = v.permute(0, 2, 3, 1).reshape(b, h * w, c)
        windowed = self.window_ratio > 0
        bounds = window_bounds((H, W), (h, w), self.window_ratio, q.device) if windowed else None
        if attention == "reference":
            mask = None
            if windowed:
                rows, cols = torch.arange(h, device=q.device), torch.arange(w, device=q.device)
                row_ok = (rows >= bounds[:, :1]) & (rows < bounds[:, 1:2])
                col_ok = (cols >= bounds[:, 2:3]) & (cols < bounds[:, 3:])
                mask = ~(row_ok[:, :, None] & col_ok[:, None, :]).reshape(H * W, h * w)
            out = self.cross_attn.reference(q, k, v, mask, q_chunk_size)
            return out.view(b, H, W, c).permute(0, 3, 1, 2)
        attn = self.cross_attn
        q, kn = attn.norm_q(q), attn.norm_k(k)
        kn, v = kn.view(b, h, w, -1), v.view(b, h, w, c)
        if q_chunk_size is None:  # keys per query: at most the window's box (all keys without windows)
            if windowed:
                per_query = int(((bounds[:, 1] - bounds[:, 0]).max() + 1) * w)
            else:
                per_query = h * w
            q_chunk_size = max(1, int(chunk_elements) // max(1, b * attn.attention.num_heads * per_query))
        out = []
        for s in range(0, H * W, int(q_chunk_size)):
            e = min(s + int(q_chunk_size), H * W)
            if windowed:
                bd = bounds[s:e]
                r0, r1 = int(bd[:, 0].min()), int(bd[:, 1].max())
                c0, c1 = int(bd[:, 2].min()), int(bd[:, 3].max())
                rows = torch.arange(r0, r1, device=q.device)
                cols = torch.arange(c0, c1, device=q.device)
                row_ok = (rows >= bd[:, :1]) & (rows < bd[:, 1:2])
                col_ok = (cols >= bd[:, 2:3]) & (cols < bd[:, 3:])
                mask = ~(row_ok[:, :, None] & col_ok[:, None, :]).reshape(e - s, -1)
                k_box = kn[:, r0:r1, c0:c1].reshape(b, -1, kn.shape[-1])
                v_box = v[:, r0:r1, c0:c1].reshape(b, -1, c)
            else:
                mask, k_box, v_box = None, kn.reshape(b, h * w, -1), v.reshape(b, h * w, c)
            out.append(attn.weights(q[:, s:e], k_box, mask) @ v_box)
        return torch.cat(out, dim=1).view(b, H, W, c).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class AnyUpRelease:
    """A released AnyUp (``hubconf.py`` of github wimmerth/anyup)."""

    hub_name: str  #: its ``torch.hub.load("wimmerth/anyup", ...)`` entry
    url: str
    trained_on: str

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]


#: AnyUp's releases, each a state dict of ``AnyUp()`` (upstream's defaults); any feature width. Keyed by
#: the torch hub names; ``"paper"`` and ``"multi_backbone"`` are accepted too.
ANYUP_RELEASES: Dict[str, AnyUpRelease] = {
    "anyup": AnyUpRelease("anyup", "https://github.com/wimmerth/anyup/releases/download/checkpoint/anyup_paper.pth",
                          "DINOv2 ViT-S/14 features (the paper's model)"),
    "anyup_multi_backbone": AnyUpRelease(
        "anyup_multi_backbone", "https://github.com/wimmerth/anyup/releases/download/checkpoint_v2/anyup_multi_backbone.pth",
        "DINOv2 (S), DINOv2-R (S), CLIP (B), SigLIP (B) and ViT-B features"),
}
_ALIASES = {"paper": "anyup", "multi_backbone": "anyup_multi_backbone", "anyup_paper": "anyup"}


def find_anyup_release(name) -> Optional[str]:
    """The key of :data:`ANYUP_RELEASES` that ``name`` names (the torch hub name, ``paper`` or
    ``multi_backbone``, or the file's name), else None."""
    name = str(name)
    if name in ANYUP_RELEASES:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    for key, release in ANYUP_RELEASES.items():
        if name in (release.url, release.filename):
            return key
    return None


class AnyUp(LearnedUpsampler):
    """AnyUp: ``anyup(image, features, output_size) -> (B, C, H_out, W_out)`` for features of any width
    ``C`` (the output keeps the features' scale: it is a convex combination of feature cells).

    Args:
        feature_dim: optional, recorded only (AnyUp takes any width; the tools pass the backbone's).
        qk_dim, kernel_size, kernel_size_lfu, window_ratio, num_heads, lfu_dim, input_dim: upstream's
            ``AnyUp`` arguments (defaults those of both releases; ``lfu_dim`` None means ``qk_dim``).
        attention: ``"local"`` (pure PyTorch, queries in chunks against their windows' box of keys) or
            ``"reference"`` (``nn.MultiheadAttention`` with the full mask, as upstream).
        q_chunk_size: queries per chunk (upstream's option); None: chosen so that a chunk holds at most
            ``chunk_elements`` attention weights (``"local"``) or no chunking (``"reference"``).

    Inputs: ``image`` the guidance ``(B, input_dim, H, W)`` normalised with the ImageNet mean and std
    (upstream's README), at any resolution (its encoding is pooled to ``output_size``, never resized);
    ``features`` ``(B, C, h, w)`` as they come out of the backbone.
    """

    label = "AnyUp"

    def __init__(self, feature_dim: Optional[int] = None, qk_dim: int = 128, kernel_size: int = 1,
                 kernel_size_lfu: int = 5, window_ratio: float = 0.1, num_heads: int = 4, lfu_dim: Optional[int] = None,
                 input_dim: int = 3, attention: str = "local", q_chunk_size: Optional[int] = None,
                 chunk_elements: int = CHUNK_ELEMENTS):
        super().__init__()
        self.feature_dim = None if feature_dim is None else int(feature_dim)
        qk_dim, num_heads = int(qk_dim), int(num_heads)
        if num_heads < 1 or qk_dim < 8 or qk_dim % 8 or qk_dim % num_heads:
            raise ValueError(f"AnyUp's qk_dim must be a multiple of 8 (its GroupNorm groups) and of num_heads={num_heads}, "
                             f"got {qk_dim}.")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"AnyUp attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}.")
        if q_chunk_size is not None and int(q_chunk_size) < 1:
            raise ValueError(f"AnyUp q_chunk_size must be a positive int or None, got {q_chunk_size!r}.")
        self.qk_dim, self.num_heads, self.window_ratio = qk_dim, num_heads, float(window_ratio)
        self.lfu_dim = qk_dim if lfu_dim is None else int(lfu_dim)
        self.input_dim, self.kernel_size, self.kernel_size_lfu = int(input_dim), int(kernel_size), int(kernel_size_lfu)
        self.attention = attention
        self.q_chunk_size = None if q_chunk_size is None else int(q_chunk_size)
        self.chunk_elements = int(chunk_elements)
        self.image_encoder = self._encoder(nn.Conv2d(self.input_dim, qk_dim, self.kernel_size, padding=self.kernel_size // 2,
                                                     padding_mode="reflect", bias=False), qk_dim)
        self.key_encoder = self._encoder(nn.Conv2d(qk_dim, qk_dim, 1, bias=False), qk_dim)
        self.query_encoder = self._encoder(nn.Conv2d(qk_dim, qk_dim, 1, bias=False), qk_dim)
        self.key_features_encoder = self._encoder(LearnedFeatureUnification(self.lfu_dim, self.kernel_size_lfu), self.lfu_dim)
        self.cross_decode = CrossAttentionBlock(qk_dim, num_heads, self.window_ratio)
        self.aggregation = self._encoder(nn.Conv2d(2 * qk_dim, qk_dim, 3, padding=1, padding_mode="reflect", bias=False),
                                         qk_dim)
        self.rope = RoPE(qk_dim)

    def _encoder(self, first: nn.Module, first_width: int) -> nn.Sequential:
        """``AnyUp._make_encoder``: ``first``, then two 1x1 ``ResBlock``\\ s to ``qk_dim``."""
        return nn.Sequential(first, ResBlock(first_width, self.qk_dim), ResBlock(self.qk_dim, self.qk_dim))

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size=None) -> torch.Tensor:
        check_features(features)
        check_image(image, features)
        size = check_output_size(tuple(image.shape[-2:]) if output_size is None else output_size)
        if image.shape[1] != self.input_dim:
            raise ValueError(f"AnyUp's guidance must be a (B, {self.input_dim}, H, W) image, got {image.shape[1]} channels.")
        if min(features.shape[-2:]) < 2:
            raise ValueError(f"AnyUp needs features of at least 2 x 2 cells (its keys' 3x3 reflect-padded convolution), "
                             f"got {features.shape[-2]} x {features.shape[-1]}.")
        image = image.to(features.dtype)
        enc = self.image_encoder(image)
        b, e, H, W = enc.shape
        grid = [torch.linspace(0.0, 1.0, n, device=enc.device, dtype=enc.dtype) for n in (H, W)]
        coords = torch.stack(torch.meshgrid(*grid, indexing="ij"), -1).view(1, H * W, 2)
        enc = self.rope(enc.permute(0, 2, 3, 1).reshape(b, H * W, e), coords).view(b, H, W, e).permute(0, 3, 1, 2)
        q = F.adaptive_avg_pool2d(self.query_encoder(enc), output_size=size)
        k = F.adaptive_avg_pool2d(self.key_encoder(enc), output_size=tuple(features.shape[-2:]))
        k = self.aggregation(torch.cat([k, self.key_features_encoder(F.normalize(features, dim=1))], dim=1))
        return self.cross_decode(q, k, features, self.attention, self.q_chunk_size, self.chunk_elements)

    def load_weights(self, path) -> "AnyUp":
        """Load a release's ``.pth`` (a state dict of upstream's ``AnyUp``, the same names as this
        module's) or a state dict of this module (optionally under ``state_dict``, ``module.``
        prefixes stripped), without running pickled code."""
        state = hub.read_state_dict(path, nested=("state_dict",), strip_prefix="module.")
        hub.load_into(self, state, path, f"AnyUp(qk_dim={self.qk_dim}, lfu_dim={self.lfu_dim}, "
                                         f"kernel_size_lfu={self.kernel_size_lfu})")
        self.weights_source = str(path)
        return self

    def load_release(self, name: str, cache_dir=None) -> "AnyUp":
        """Download (into torch's hub cache) and load the release ``name`` (:data:`ANYUP_RELEASES`);
        RuntimeError with what to do when offline."""
        key, release, path = fetch_release(name, find_anyup_release, ANYUP_RELEASES, "AnyUp", "anyup", cache_dir=cache_dir)
        self.load_weights(path)
        self.weights_source = f"AnyUp release {key!r} (trained on {release.trained_on})"
        return self

    def describe(self) -> str:
        return (f"AnyUp (feature-agnostic: features of any backbone and any width; RoPE'd image queries attend "
                f"within windows of {self.window_ratio:g} of the image to width-independent keys, the weights "
                f"averaging the features), weights: {self.weights_source}.")

    def extra_repr(self) -> str:
        return (f"qk_dim={self.qk_dim}, num_heads={self.num_heads}, window_ratio={self.window_ratio:g}, "
                f"attention={self.attention!r}, q_chunk_size={self.q_chunk_size}, weights={self.weights_source!r}")


@register_upsampler("anyup", summary="AnyUp (feature-agnostic windowed attention, any width and output size)")
def anyup(feature_dim=None, checkpoint=None, backbone=None, on_missing: str = "error", **options) -> AnyUp:
    """``checkpoint``: a file (a release's ``.pth`` or ours), or a release name of
    :data:`ANYUP_RELEASES` (downloaded when online); random weights when omitted. ``feature_dim`` is
    optional (AnyUp takes any width). ``on_missing``: ``"error"``, or ``"random"`` to fall back to
    random weights (with a warning, and said by :meth:`AnyUp.describe`) when a release cannot be
    fetched. ``options``: :class:`AnyUp`'s arguments."""
    check_on_missing("anyup", on_missing)
    model = AnyUp(feature_dim, **options)
    if checkpoint is None:
        return model
    return load_file_or_release(model, checkpoint, find_anyup_release, on_missing, "AnyUp")


__all__ = ["AnyUp", "ANYUP_RELEASES", "AnyUpRelease", "find_anyup_release", "anyup"]
