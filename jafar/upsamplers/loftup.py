"""LoftUp (Huang, Chen, Havrylov, Geiger, Zhang, "LoftUp: Learning a Coordinate-Based Feature
Upsampler for Vision Foundation Models", arXiv 2504.14032), a task-agnostic learned peer of JAFAR
(the paper's appendix C.2 and Tables 12-14): every output pixel is a query built from Fourier
features of its coordinates and colour, which cross-attends to all the low-resolution features.

Written from github andrehuang/loftup @ 6620d9b (MIT licence), read, not copied:

* ``upsamplers/upsamplers.py``, class ``LoftUp`` with ``lr_pe_type="sine"`` (every release):
  ``fourier_feat`` = ``MinMaxScaler`` then ``ImplicitFeaturizer(color_feats=True, n_freqs=20,
  learn_bias=True)`` on the guidance image, ``5 * n_freqs * 2 + 3 = 203`` channels;
  ``first_conv`` = ``ChannelNorm``, 3x3 conv to ``dim + 20``, BatchNorm, ReLU, 3x3 conv, BatchNorm,
  ReLU; keys/values: the features concatenated with ``lr_pe = ImplicitFeaturizer(color_feats=False,
  n_freqs=5, learn_bias=True)`` of their grid (``lr_pe_dim = 2 * 5 * 2 = 20``); ``ca_transformer
  = CATransformer(dim + 20, depth=2, heads=4, mlp_dim=dim)``; ``final_conv`` = 1x1 conv to ``dim``
  and ``LayerNorm(dim)``. The output has the guidance image's size.
* ``upsamplers/upsamplers.py``, class ``UpsamplerwithChannelNorm``: the features are first
  LayerNorm'ed over channels (``channelnorm``), the released pair's other half.
* ``upsamplers/layers.py``: ``ChannelNorm`` (``nn.LayerNorm`` over channels, eps 1e-5);
  ``LayerNorm`` (ConvNeXt's channel-first LayerNorm, eps 1e-6); ``MinMaxScaler`` (per channel,
  min and max over the whole batch and the image, ``(x - min) / max(max - min, 1e-4) - 0.5``);
  ``ImplicitFeaturizer`` (grid ``linspace(-1, 1)`` over rows then columns, ``torch.meshgrid``'s
  ij order, then the colours; frequencies ``exp(linspace(-2, 10, n_freqs))``; angles ``value *
  freq + bias`` with the ``(2, m, n_freqs)`` bias read as ``biases[i].reshape(n_freqs, m)``;
  output ``[sin (n_freqs x m, frequency-major), cos, colours]``); ``CrossAttentionLayer``
  (``norm_q`` on the queries, ``norm_kv`` on keys and values, ``nn.MultiheadAttention``);
  ``CATransformer`` (per layer ``q = attn(q, kv) + q``, ``q = ff(q) + q``, then ``norm``);
  ``FeedForward`` (LayerNorm, Linear, GELU, Dropout, Linear, Dropout).
* ``hubconf.py`` and the README's table: the releases (:data:`LOFTUP_RELEASES`), each a state
  dict of ``UpsamplerwithChannelNorm`` in ``pytorch_model.bin`` of a Hugging Face repo.
* ``example_usage.py`` and ``eval_seg.py``: the guidance is the image as normalised for the
  backbone (ImageNet mean/std for DINOv2), and another output size is obtained by resizing the
  guidance image with ``F.interpolate(..., mode="bilinear", align_corners=False)``; this module does
  exactly that when the image's size differs from ``output_size``.

Module and parameter names follow upstream (``upsampler.*`` for its ``LoftUp``, ``channelnorm.*``
for its ``ChannelNorm``), so a release's state dict loads with ``load_state_dict`` as it is.

What differs from upstream, and why:

* The Fourier features (the min-max scaling, the guidance resize, the angles, sin and cos) are
  computed in float64 and then cast to the features' dtype. The frequencies reach ``e**10 ~ 22026``
  rad per unit, so a float32 rounding of a coordinate or a colour moves an angle by ~1e-3 rad:
  upstream's float32 features carry that noise; these are the float64 result rounded once (on the
  fixture's cases upstream's float32 forward is 5e-4 from its float64 forward, this module's 7e-7).
* The cross-attention uses the ``nn.MultiheadAttention`` parameters with
  ``F.scaled_dot_product_attention`` over chunks of queries (``chunk_elements`` attention weights
  per chunk) instead of ``nn.MultiheadAttention``'s call, which materialises the weights of every
  query (upstream calls it with ``need_weights=True``); ``attention="reference"`` is that call.
* Only ``lr_pe_type="sine"`` is built (every release uses it; ``lr_size`` then has no effect).

Quirk kept from upstream: ``MinMaxScaler`` takes one min and max per colour channel over the
whole batch, so an image's output depends on the other images of its batch. Any per-channel
affine map of the image (normalised or not) gives the same scaled image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

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
    load_file_or_release,
    register_upsampler,
)

#: the keys/values' positional encoding width: ``lr_pe_dim = 2 * 5 * 2`` in ``LoftUp.__init__``
LR_PE_FREQS = 5
LR_PE_DIM = 2 * LR_PE_FREQS * 2
#: attention weights (``B * heads * queries * keys``) per chunk of queries
CHUNK_ELEMENTS = 1 << 26
ATTENTION_MODES = ("sdpa", "reference")


class ChannelNorm(nn.Module):
    """``nn.LayerNorm`` over the channels of a ``(B, C, H, W)`` map (``layers.py``, ``ChannelNorm``)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ChannelFirstLayerNorm(nn.Module):
    """ConvNeXt's channel-first LayerNorm (``layers.py``, ``LayerNorm``): mean and biased variance
    over dim 1, eps 1e-6, then a per-channel affine."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class MinMaxScaler(nn.Module):
    """Per channel, ``(x - min) / max(max - min, 1e-4) - 0.5`` with min and max over the batch and the
    pixels (``layers.py``, ``MinMaxScaler``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        low = flat.min(dim=-1).values.view(1, -1, 1, 1)
        span = flat.max(dim=-1).values.view(1, -1, 1, 1) - low
        return (x - low) / span.clamp_min(1e-4) - 0.5


class FourierFeatures(nn.Module):
    """``layers.py``, ``ImplicitFeaturizer`` with ``learn_bias=True``: sin and cos of the pixel
    coordinates (and the colours when ``color_feats``) times ``n_freqs`` frequencies plus a learned
    offset, then the colours; computed in float64 (see the module docstring).

    ``forward(x)`` takes a ``(B, c, H, W)`` map (its values are used when ``color_feats``, only its
    shape otherwise) and returns ``(B, 2 * n_freqs * m [+ c], H, W)`` in float64, ``m = 2 (+ c)``.
    """

    def __init__(self, color_feats: bool = True, n_freqs: int = 10):
        super().__init__()
        self.color_feats, self.n_freqs = bool(color_feats), int(n_freqs)
        self.dim_multiplier = 2 + (3 if self.color_feats else 0)
        self.biases = nn.Parameter(torch.randn(2, self.dim_multiplier, self.n_freqs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        f64 = dict(device=x.device, dtype=torch.float64)
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, h, **f64), torch.linspace(-1, 1, w, **f64), indexing="ij")
        values = torch.stack([rows, cols]).unsqueeze(0).expand(b, 2, h, w)
        if self.color_feats:
            values = torch.cat([values, x.to(torch.float64)], dim=1)
        m = values.shape[1]
        if m != self.dim_multiplier:
            raise ValueError(f"LoftUp's Fourier features expect {self.dim_multiplier - 2} colour channels, got {m - 2}.")
        freqs = torch.exp(torch.linspace(-2, 10, self.n_freqs, **f64)).view(1, -1, 1, 1, 1)
        angle = values.unsqueeze(1) * freqs  # (B, n_freqs, m, H, W)
        # upstream reshapes each (m, n_freqs) bias table to (n_freqs, m) without transposing it
        bias = self.biases.to(torch.float64).reshape(2, 1, self.n_freqs, m, 1, 1)
        out = [torch.sin(angle + bias[0]).reshape(b, -1, h, w), torch.cos(angle + bias[1]).reshape(b, -1, h, w)]
        if self.color_feats:
            out.append(values[:, 2:])
        return torch.cat(out, dim=1)


class CrossAttentionLayer(nn.Module):
    """``layers.py``, ``CrossAttentionLayer``: LayerNorm'ed queries attend to LayerNorm'ed keys and
    values (one tensor) with ``nn.MultiheadAttention``'s parameters; see :meth:`forward`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(embed_dim=dim, num_heads=heads)

    def forward(self, query: torch.Tensor, kv: torch.Tensor, mode: str = "sdpa",
                chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
        """``query`` ``(B, L, E)``, ``kv`` ``(B, S, E)`` -> ``(B, L, E)``. ``"reference"`` calls
        ``nn.MultiheadAttention`` as upstream does; ``"sdpa"`` computes the same from its
        ``in_proj``/``out_proj`` parameters with ``F.scaled_dot_product_attention`` on chunks of
        queries."""
        q, kv = self.norm_q(query), self.norm_kv(kv)
        mha = self.attention
        if mode == "reference":
            kv_t = kv.transpose(0, 1)
            return mha(q.transpose(0, 1), kv_t, kv_t)[0].transpose(0, 1)
        e, heads = mha.embed_dim, mha.num_heads
        w, bias = mha.in_proj_weight, mha.in_proj_bias
        b, n_q, n_k, d = q.shape[0], q.shape[1], kv.shape[1], e // heads
        q = F.linear(q, w[:e], bias[:e]).view(b, n_q, heads, d).transpose(1, 2)
        k = F.linear(kv, w[e:2 * e], bias[e:2 * e]).view(b, n_k, heads, d).transpose(1, 2)
        v = F.linear(kv, w[2 * e:], bias[2 * e:]).view(b, n_k, heads, d).transpose(1, 2)
        rows = max(1, int(chunk_elements) // max(1, b * heads * n_k))
        if rows >= n_q:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            out = torch.cat([F.scaled_dot_product_attention(q[:, :, i:i + rows], k, v) for i in range(0, n_q, rows)], 2)
        return mha.out_proj(out.transpose(1, 2).reshape(b, n_q, e))


class FeedForward(nn.Module):
    """``layers.py``, ``FeedForward``: LayerNorm, Linear, GELU, Dropout, Linear, Dropout."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CATransformer(nn.Module):
    """``layers.py``, ``CATransformer``: ``depth`` x (cross-attention + residual, feed-forward +
    residual), then LayerNorm; the keys/values are the same input for every layer."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList([nn.ModuleList([CrossAttentionLayer(dim, heads), FeedForward(dim, mlp_dim)])
                                     for _ in range(depth)])

    def forward(self, query: torch.Tensor, kv: torch.Tensor, mode: str = "sdpa",
                chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
        for attend, ff in self.layers:
            query = attend(query, kv, mode, chunk_elements) + query
            query = ff(query) + query
        return self.norm(query)


class LoftUpCore(nn.Module):
    """Upstream's ``LoftUp`` module (``lr_pe_type="sine"``): ``core(lr_feats, image) -> (B, dim,
    H, W)`` at the image's size ``(H, W)``. ``lr_feats`` are already channel-normed (the outer
    :class:`LoftUp` does that); ``image`` is the guidance (any float dtype: its Fourier features
    are computed in float64)."""

    def __init__(self, dim: int, n_freqs: int = 20, num_heads: int = 4, num_layers: int = 2):
        super().__init__()
        start_dim = 5 * n_freqs * 2 + 3
        width = dim + LR_PE_DIM
        self.lr_pe = FourierFeatures(color_feats=False, n_freqs=LR_PE_FREQS)
        self.fourier_feat = nn.Sequential(MinMaxScaler(), FourierFeatures(color_feats=True, n_freqs=n_freqs))
        self.first_conv = nn.Sequential(
            ChannelNorm(start_dim),
            nn.Conv2d(start_dim, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, kernel_size=3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        self.final_conv = nn.Sequential(nn.Conv2d(width, dim, kernel_size=1), ChannelFirstLayerNorm(dim))
        self.ca_transformer = CATransformer(width, depth=num_layers, heads=num_heads, mlp_dim=dim)

    def forward(self, lr_feats: torch.Tensor, image: torch.Tensor, attention: str = "sdpa",
                chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
        dtype = lr_feats.dtype
        with torch.autocast(lr_feats.device.type, enabled=False):  # float64 angles (module docstring)
            x = self.fourier_feat(image.to(torch.float64)).to(dtype)
            pe = self.lr_pe(lr_feats).to(dtype)
        x = self.first_conv(x)
        b, c, h, w = x.shape
        queries = x.flatten(2).transpose(1, 2)
        kv = torch.cat([lr_feats, pe], dim=1).flatten(2).transpose(1, 2)
        x = self.ca_transformer(queries, kv, attention, chunk_elements)
        return self.final_conv(x.transpose(1, 2).reshape(b, c, h, w))


@dataclass(frozen=True)
class LoftUpRelease:
    """A released LoftUp (README table and ``hubconf.py`` of github andrehuang/loftup)."""

    repo: str  #: the Hugging Face repository holding ``pytorch_model.bin``
    backbone: str  #: the backbone it upsamples (``featurizers/util.py``, ``get_featurizer``)
    feature_dim: int

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/resolve/main/pytorch_model.bin"


#: LoftUp's releases: the README table's featurizer names -> Hugging Face repo, backbone, width. Every
#: one is ``LoftUp(dim, lr_pe_type="sine")`` with its ``ChannelNorm(dim)`` (``hubconf.py``,
#: ``loftup_<name>``). The torch hub names (``loftup_dinov2s``) and the repos are accepted too.
LOFTUP_RELEASES: Dict[str, LoftUpRelease] = {
    "dinov2s": LoftUpRelease("haiwen/loftup-dinov2s", "DINOv2 ViT-S/14 (torch hub dinov2_vits14)", 384),
    "dinov2s_reg": LoftUpRelease("haiwen/loftup-dinov2s_reg", "DINOv2 ViT-S/14 with registers (dinov2_vits14_reg)", 384),
    "dinov2b": LoftUpRelease("haiwen/loftup-dinov2b", "DINOv2 ViT-B/14 (dinov2_vitb14)", 768),
    "dinov2b_reg": LoftUpRelease("haiwen/loftup-dinov2b_reg", "DINOv2 ViT-B/14 with registers (dinov2_vitb14_reg)", 768),
    "clip": LoftUpRelease("haiwen/loftup-clip", "CLIP ViT-B/16 (OpenAI, 512-d projected tokens)", 512),
    "siglip": LoftUpRelease("haiwen/loftup-siglip", "SigLIP ViT-B/16 (timm/ViT-B-16-SigLIP)", 768),
    "siglip2": LoftUpRelease("haiwen/loftup-siglip2", "SigLIP2 ViT-B/16 (timm/ViT-B-16-SigLIP2)", 768),
}


def find_loftup_release(name) -> Optional[str]:
    """The key of :data:`LOFTUP_RELEASES` that ``name`` names (the key, ``loftup_<key>`` or the
    Hugging Face repo), else None."""
    name = str(name)
    for key, release in LOFTUP_RELEASES.items():
        if name in (key, f"loftup_{key}", release.repo):
            return key
    return None


#: the first names of upstream ``LoftUp``'s own parameters (a file without the ``upsampler.`` prefix)
_CORE_PREFIXES = ("lr_pe.", "fourier_feat.", "first_conv.", "final_conv.", "ca_transformer.")


class LoftUp(LearnedUpsampler):
    """LoftUp with its channel norm (upstream's ``UpsamplerwithChannelNorm``): ``loftup(image,
    features, output_size) -> (B, feature_dim, H_out, W_out)``, computed directly at the output size.

    Args:
        feature_dim: the features' channels (``dim``); ``feature_dim + 20`` must divide by ``num_heads``.
        n_freqs, num_heads, num_layers: upstream's ``LoftUp`` arguments (defaults 20, 4, 2: every release).
        attention: ``"sdpa"`` (chunked ``F.scaled_dot_product_attention``) or ``"reference"``
            (``nn.MultiheadAttention``'s call, as upstream, materialising every weight).
        chunk_elements: attention weights per chunk of queries (``"sdpa"``; bounds memory).

    Inputs: ``image`` the guidance ``(B, 3, H, W)``, normalised as for the backbone (upstream gives
    it the ImageNet-normalised image; its min-max scaling makes any per-channel affine
    normalisation equivalent), at any resolution: resized bilinearly (``align_corners=False``,
    in float64) to ``output_size`` when it differs, as upstream's ``example_usage.py`` does.
    ``features`` ``(B, feature_dim, h, w)`` from the frozen backbone, as they come out of it (the
    channel norm is part of this module). The output is in the channel-normed, LayerNorm'ed space
    LoftUp was trained to produce, not in the backbone's raw scale.
    """

    label = "LoftUp"

    def __init__(self, feature_dim: int, n_freqs: int = 20, num_heads: int = 4, num_layers: int = 2,
                 attention: str = "sdpa", chunk_elements: int = CHUNK_ELEMENTS):
        super().__init__()
        self.feature_dim = int(feature_dim)
        if self.feature_dim < 1 or (self.feature_dim + LR_PE_DIM) % int(num_heads):
            raise ValueError(f"LoftUp attends over feature_dim + {LR_PE_DIM} channels, which must divide by "
                             f"num_heads={num_heads}: feature_dim={feature_dim} does not fit.")
        if attention not in ATTENTION_MODES:
            raise ValueError(f"LoftUp attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}.")
        self.n_freqs, self.num_heads, self.num_layers = int(n_freqs), int(num_heads), int(num_layers)
        self.attention, self.chunk_elements = attention, int(chunk_elements)
        self.upsampler = LoftUpCore(self.feature_dim, self.n_freqs, self.num_heads, self.num_layers)
        self.channelnorm = ChannelNorm(self.feature_dim)

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        size = check_output_size(output_size)
        check_features(features)
        check_image(image, features)
        if image.shape[1] != 3:
            raise ValueError(f"LoftUp's guidance must be an RGB image (B, 3, H, W), got {image.shape[1]} channels.")
        self.check_width(features)
        guidance = image.to(torch.float64)
        if tuple(guidance.shape[-2:]) != size:
            guidance = F.interpolate(guidance, size=size, mode="bilinear", align_corners=False)
        return self.upsampler(self.channelnorm(features), guidance, self.attention, self.chunk_elements)

    def load_weights(self, path) -> "LoftUp":
        """Load a release's ``pytorch_model.bin`` (a state dict of upstream's
        ``UpsamplerwithChannelNorm``: ``upsampler.*``, ``channelnorm.norm.*``), upstream's training
        checkpoint (``{"state_dict": ...}`` with ``upsampler.*`` and the channel norm as
        ``model.1.norm.*``, as ``load_upsampler_weights`` reads it), or a state dict of this
        module, without running pickled code."""
        state = hub.read_state_dict(path, nested=("state_dict",), strip_prefix="module.")
        if any(k.startswith("model.1.norm.") for k in state):  # the training checkpoint: drop the backbone
            ours = {k: v for k, v in state.items() if k.startswith("upsampler.")}
            ours.update({"channelnorm." + k[len("model.1."):]: v for k, v in state.items() if k.startswith("model.1.norm.")})
            state = ours
        elif state and all(k.startswith(_CORE_PREFIXES) for k in state):  # upstream LoftUp alone
            state = {"upsampler." + k: v for k, v in state.items()}
        hub.load_into(self, state, path, f"LoftUp(feature_dim={self.feature_dim}, n_freqs={self.n_freqs}, "
                                         f"num_layers={self.num_layers})")
        self.weights_source = str(path)
        return self

    def load_release(self, name: str, cache_dir=None) -> "LoftUp":
        """Download (into torch's hub cache) and load the release ``name`` (:data:`LOFTUP_RELEASES`);
        RuntimeError with what to do when offline."""
        key = find_loftup_release(name)
        if key is None:
            raise ValueError(f"no LoftUp release named {name!r}; known: {', '.join(LOFTUP_RELEASES)}.")
        release = LOFTUP_RELEASES[key]
        if release.feature_dim != self.feature_dim:
            raise ValueError(f"LoftUp's {key!r} release upsamples {release.feature_dim}-channel features "
                             f"({release.backbone}), not {self.feature_dim}.")
        path = hub.download(release.url, filename=f"{key}.bin", subdir="loftup", cache_dir=cache_dir,
                            what=f"LoftUp's {key!r} weights", local_hint="pass its path as checkpoint=...")
        self.load_weights(path)
        self.weights_source = f"LoftUp release {key!r} ({release.backbone})"
        return self

    def describe(self) -> str:
        return (f"LoftUp (Fourier features of each output pixel's coordinates and colour cross-attend to the "
                f"channel-normed features; computed at the output size), weights: {self.weights_source}.")

    def extra_repr(self) -> str:
        return (f"feature_dim={self.feature_dim}, n_freqs={self.n_freqs}, num_heads={self.num_heads}, "
                f"num_layers={self.num_layers}, attention={self.attention!r}, weights={self.weights_source!r}")


@register_upsampler("loftup", summary="LoftUp (coordinate queries cross-attend to the features, any output size)")
def loftup(feature_dim=None, checkpoint=None, backbone=None, on_missing: str = "error", **options) -> LoftUp:
    """``checkpoint``: a file (a release's ``pytorch_model.bin``, upstream's training checkpoint or
    ours), or a release name of :data:`LOFTUP_RELEASES` (downloaded when online); random weights
    when omitted. ``on_missing``: ``"error"``, or ``"random"`` to fall back to random weights (with
    a warning, and said by :meth:`LoftUp.describe`) when a release cannot be fetched or does not
    fit. ``options``: :class:`LoftUp`'s arguments."""
    check_on_missing("loftup", on_missing)
    model = LoftUp.create("loftup", feature_dim, None, **options)
    if checkpoint is None:
        return model
    return load_file_or_release(model, checkpoint, find_loftup_release, on_missing, "LoftUp")


__all__ = ["LoftUp", "LoftUpCore", "LOFTUP_RELEASES", "LoftUpRelease", "find_loftup_release", "loftup"]
