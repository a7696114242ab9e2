"""The baselines JAFAR is compared with, behind its call ``(image, features, output_size)``.

* :class:`Interpolate` (nearest, bilinear, bicubic): training-free; the image is not used.
* :class:`LargeImage` and :class:`Strided`: the paper's "Large Image" and "Strided" rows. They
  hold the frozen backbone and encode the (normalised) guidance image again, on an enlarged
  image or with a reduced patch stride, then resize bilinearly.
* :class:`FeatUpJBU` and :class:`LiFT`: the task-agnostic learned peers (FeatUp's JBU stack, x16;
  LiFT, x2 then bilinear), written from their published architectures under their parameter
  names so that the released weights load; random weights unless loaded.

``align_corners=False`` everywhere, as in the official evaluation code (github
PaulCouairon/JAFAR @ 94d4d54) and ``torch.nn.functional.interpolate``'s default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import _check_output_size


class Interpolate(nn.Module):
    """``F.interpolate`` of the features to ``output_size``; the image is not used."""

    modes = ("nearest", "bilinear", "bicubic")

    def __init__(self, mode: str = "bilinear"):
        super().__init__()
        if mode not in self.modes:
            raise ValueError(f"interpolation mode must be one of {self.modes}, got {mode!r}.")
        self.mode = mode

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        size = _check_output_size(output_size)
        if not isinstance(features, torch.Tensor) or features.dim() != 4:
            raise ValueError(f"features must be a (B, C, h, w) tensor, got "
                             f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}.")
        if self.mode == "nearest":
            return F.interpolate(features, size=size, mode="nearest")
        return F.interpolate(features, size=size, mode=self.mode, align_corners=False)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"



def _check_features(features) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        raise ValueError(f"features must be a (B, C, h, w) tensor, got "
                         f"{tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__}.")


def _check_image(image, features) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] != features.shape[0]:
        raise ValueError(f"image must be a (B, 3, H, W) tensor with the batch of the features "
                         f"{tuple(features.shape)}, got "
                         f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}.")


# ---------------------------------------------------------------------------------------------
# Re-encoding baselines (the paper's "Large Image" and "Strided"): they hold the frozen backbone
# and encode the guidance image again; the ``features`` argument only fixes the batch.
# ---------------------------------------------------------------------------------------------


class LargeImage(nn.Module):
    """The encoder run on the image enlarged ``scale`` times (bilinear, each side rounded to a
    multiple of the patch size), its finer feature grid then resized bilinearly to
    ``output_size``. ``image`` must be the normalised image the backbone was given."""

    def __init__(self, backbone: nn.Module, scale: float = 2.0):
        super().__init__()
        if not float(scale) > 0:
            raise ValueError(f"large_image scale must be positive, got {scale}.")
        self.backbone = backbone
        self.scale = float(scale)

    def input_size(self, height: int, width: int):
        p = int(self.backbone.patch_size)
        return (max(p, int(round(height * self.scale / p)) * p), max(p, int(round(width * self.scale / p)) * p))

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        size = _check_output_size(output_size)
        _check_features(features)
        _check_image(image, features)
        big = F.interpolate(image, size=self.input_size(*image.shape[-2:]), mode="bilinear", align_corners=False)
        with torch.no_grad():
            feats = self.backbone(big)
        return F.interpolate(feats, size=size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class Strided(nn.Module):
    """A timm ViT whose patch-embedding convolution runs at a smaller ``stride`` than its patch
    size (e.g. 14 -> 6: overlapping patches, a ``(H - p) // s + 1`` grid), then bilinear to
    ``output_size``. The position embedding is resampled to the new grid by timm
    (``dynamic_img_size``). The backbone itself is left unchanged after each call."""

    def __init__(self, backbone: nn.Module, stride: int = 6):
        super().__init__()
        model = getattr(backbone, "model", None)
        proj = getattr(getattr(model, "patch_embed", None), "proj", None)
        if not isinstance(proj, nn.Conv2d) or not hasattr(model, "forward_intermediates"):
            raise ValueError(f"the strided baseline needs a timm ViT backbone (a patch_embed.proj convolution); "
                             f"{getattr(backbone, 'name', type(backbone).__name__)} has none.")
        patch = int(backbone.patch_size)
        if not 1 <= int(stride) <= patch:
            raise ValueError(f"strided: stride must be in [1, patch size {patch}], got {stride}.")
        self.backbone = backbone
        self.stride = int(stride)

    def grid_size(self, height: int, width: int):
        p, s = int(self.backbone.patch_size), self.stride
        return (height - p) // s + 1, (width - p) // s + 1

    @torch.no_grad()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, gh, gw)`` features of the normalised ``image`` at the reduced stride."""
        model = self.backbone.model
        proj = model.patch_embed.proj
        old = proj.stride
        proj.stride = (self.stride, self.stride)
        try:
            (tokens,) = model.forward_intermediates(image, indices=1, norm=True, output_fmt="NLC",
                                                    intermediates_only=True)
        finally:
            proj.stride = old
        gh, gw = self.grid_size(*image.shape[-2:])
        b, n, c = tokens.shape
        if n != gh * gw:
            raise RuntimeError(f"strided: {type(model).__name__} returned {n} tokens for a {gh}x{gw} grid; this "
                               "ViT family is not supported.")
        return tokens.transpose(1, 2).reshape(b, c, gh, gw)

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        size = _check_output_size(output_size)
        _check_features(features)
        _check_image(image, features)
        return F.interpolate(self.encode(image), size=size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"stride={self.stride}"


# ---------------------------------------------------------------------------------------------
# FeatUp's JBU stack (Fu, Hamilton et al., ICLR 2024), written from the architecture of
# github mhamilton723/FeatUp @ 6b5a6c0, featup/upsamplers.py (JBULearnedRange, JBUStack) and
# featup/adaptive_conv_cuda (the per-pixel 7x7 filter). Parameter names follow that file, so its
# released checkpoints load (hubconf.py: keys under "upsampler."). The adaptive convolution is a
# loop over the 49 filter taps (memory O(C H W), no CUDA extension).
# ---------------------------------------------------------------------------------------------


def _shifted(x: torch.Tensor, radius: int):
    """The ``(2 r + 1)^2`` views of ``x`` reflect-padded by ``r``, row-major over the offsets
    (the order of ``nn.Unfold``)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, [radius] * 4, mode="reflect")
    d = 2 * radius + 1
    for dy in range(d):
        for dx in range(d):
            yield padded[..., dy:dy + h, dx:dx + w]


class JBULearnedRange(nn.Module):
    """One x2 joint-bilateral upsampling step with a learned range kernel.

    The features are upsampled bicubically to the guidance's size, then each output pixel is a
    normalised 7x7 average of its neighbours, weighted by a Gaussian of the offset
    (``sigma_spatial``) times a softmax of the similarity of learned projections of the guidance
    (``range_proj``, temperature ``exp(range_temp)``), plus 0.1 x a learned correction of the
    kernel (``fixup_proj``).
    """

    def __init__(self, guidance_dim: int = 3, key_dim: int = 32, radius: int = 3):
        super().__init__()
        self.radius = int(radius)
        self.diameter = 2 * self.radius + 1
        taps = self.diameter ** 2
        self.range_temp = nn.Parameter(torch.tensor(0.0))
        self.range_proj = nn.Sequential(nn.Conv2d(guidance_dim, key_dim, 1), nn.GELU(), nn.Dropout2d(0.1),
                                        nn.Conv2d(key_dim, key_dim, 1))
        self.fixup_proj = nn.Sequential(nn.Conv2d(guidance_dim + taps, taps, 1), nn.GELU(), nn.Dropout2d(0.1),
                                        nn.Conv2d(taps, taps, 1))
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0))

    def spatial_kernel(self, device, dtype) -> torch.Tensor:
        r = torch.linspace(-1, 1, self.diameter, device=device, dtype=dtype)
        d2 = r[:, None] ** 2 + r[None, :] ** 2
        return torch.exp(-d2 / (2 * self.sigma_spatial.to(dtype) ** 2)).reshape(1, -1, 1, 1)

    def range_kernel(self, guidance: torch.Tensor) -> torch.Tensor:
        keys = self.range_proj(guidance)
        temp = self.range_temp.exp().clamp(1e-4, 1e4)
        sims = torch.stack([(n * keys).sum(1) for n in _shifted(keys, self.radius)], dim=1)
        return F.softmax(temp * sims, dim=1)

    def forward(self, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        kernel = self.range_kernel(guidance) * self.spatial_kernel(guidance.device, guidance.dtype)
        kernel = kernel / kernel.sum(1, keepdim=True).clamp_min(1e-7)
        kernel = kernel + 0.1 * self.fixup_proj(torch.cat([kernel, guidance], dim=1))
        hr = F.interpolate(source, size=guidance.shape[-2:], mode="bicubic", align_corners=False)
        out = torch.zeros_like(hr)
        for k, view in enumerate(_shifted(hr, self.radius)):
            out = out + view * kernel[:, k:k + 1]
        return out


#: FeatUp's released JBU stacks (README table and hubconf.py of github mhamilton723/FeatUp): the
#: FeatUp backbone name -> the backbone it was trained on and its width. ``norm``: trained on
#: LayerNorm'ed features ("use_norm=True"), else on the raw features ("no_norm/").
FEATUP_RELEASES = {
    "dino16": ("DINO ViT-S/16", 384),
    "dinov2": ("DINOv2 ViT-S/14", 384),
    "clip": ("CLIP ViT-B/16", 512),
    "maskclip": ("MaskCLIP ViT-B/16", 512),
    "vit": ("supervised ViT-S/16", 384),
    "resnet50": ("ResNet-50", 2048),
}
_FEATUP_URL = "https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/pretrained/{}{}_jbu_stack_cocostuff.ckpt"


def featup_release_url(name: str, norm: bool = False) -> str:
    if name not in FEATUP_RELEASES:
        raise ValueError(f"no FeatUp release named {name!r}; known: {', '.join(FEATUP_RELEASES)}.")
    if norm and name == "maskclip":
        raise ValueError("FeatUp releases MaskCLIP only without LayerNorm (norm=False).")
    return _FEATUP_URL.format("" if norm else "no_norm/", name)


class FeatUpJBU(nn.Module):
    """FeatUp's JBU stack: four x2 JBU steps (x16), each guided by the image average-pooled to its
    output size, then ``0.1 * fixup_proj(x) + x`` (a 1x1 conv), and a bilinear resize to
    ``output_size`` when that is not 16 x the feature grid (as the official JAFAR evaluation does
    for upsamplers that overshoot). ``norm=True``: the features are first LayerNorm'ed over
    channels (``norm``), as FeatUp's ``use_norm`` checkpoints expect.

    Weights: random unless loaded (:meth:`load_release`, :meth:`load_weights`).
    """

    def __init__(self, feature_dim: int, norm: bool = False, key_dim: int = 32, radius: int = 3):
        super().__init__()
        self.feature_dim = int(feature_dim)
        self.norm = nn.LayerNorm(self.feature_dim) if norm else None
        self.up1, self.up2, self.up3, self.up4 = (JBULearnedRange(3, key_dim, radius) for _ in range(4))
        self.fixup_proj = nn.Sequential(nn.Dropout2d(0.2), nn.Conv2d(self.feature_dim, self.feature_dim, 1))
        self.weights_source = "random init"

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        size = _check_output_size(output_size)
        _check_features(features)
        _check_image(image, features)
        if features.shape[1] != self.feature_dim:
            raise ValueError(f"FeatUp JBU built for {self.feature_dim}-channel features got {features.shape[1]}.")
        if min(features.shape[-2:]) < 2:
            raise ValueError(f"FeatUp JBU needs a feature grid of at least 2x2, got {tuple(features.shape[-2:])}.")
        x = features
        if self.norm is not None:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        taps, pixels = self.up1.diameter ** 2, 0
        for up in (self.up1, self.up2, self.up3, self.up4):
            h, w = x.shape[-2:]
            x = up(x, F.adaptive_avg_pool2d(image, (2 * h, 2 * w)))
            pixels += x.shape[0] * 4 * h * w
        key_dim = self.up1.range_proj[-1].out_channels
        self._uncounted = pixels * taps * 2 * (self.feature_dim + key_dim)
        x = 0.1 * self.fixup_proj(x) + x
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def uncounted_flops(self) -> int:
        """FLOPs of the last forward that ``torch.utils.flop_counter`` does not see: the per-pixel
        filtering of each JBU step (a multiply and an add per tap, channel and output pixel) and
        its range kernel's similarities (per tap, key channel and output pixel); 0 before any
        forward. The 1x1 convolutions and the interpolations' matrix products are counted by it."""
        return int(getattr(self, "_uncounted", 0))

    def load_weights(self, path) -> "FeatUpJBU":
        """Load a FeatUp checkpoint (``{"state_dict": {"upsampler.*": ...}}``, a Lightning file) or
        a plain state dict of this module, without running pickled code."""
        from .checkpoint import safe_torch_load

        obj = safe_torch_load(path)
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(state, dict):
            raise ValueError(f"{str(path)!r} holds no state dict.")
        ours = {k[len("upsampler."):]: v for k, v in state.items() if k.startswith("upsampler.")} or dict(state)
        if self.norm is not None:
            for k in ("weight", "bias"):  # hubconf.py: Sequential(featurizer, ChannelNorm(dim)) -> "model.1.norm.*"
                if f"model.1.norm.{k}" in state:
                    ours[f"norm.{k}"] = state[f"model.1.norm.{k}"]
        try:
            missing, unexpected = self.load_state_dict(ours, strict=False)
        except RuntimeError as exc:  # shapes
            raise ValueError(f"{str(path)!r} does not fit FeatUpJBU(feature_dim={self.feature_dim}): {exc}") from None
        if missing or unexpected:
            raise ValueError(f"{str(path)!r} does not fit FeatUpJBU(feature_dim={self.feature_dim}, "
                             f"norm={self.norm is not None}): missing {missing[:4]}, unexpected {unexpected[:4]}.")
        self.weights_source = str(path)
        return self

    def load_release(self, name: str, cache_dir=None) -> "FeatUpJBU":
        """Download (into torch's hub cache) and load FeatUp's released JBU stack for ``name``
        (:data:`FEATUP_RELEASES`); RuntimeError with what to do when offline."""
        from pathlib import Path

        from .utils import atomic_path

        url = featup_release_url(name, self.norm is not None)
        if FEATUP_RELEASES[name][1] != self.feature_dim:
            raise ValueError(f"FeatUp's {name!r} release upsamples {FEATUP_RELEASES[name][1]}-channel features, "
                             f"not {self.feature_dim}.")
        root = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints" / "featup"
        path = root / ("norm" if self.norm is not None else "no_norm") / url.rsplit("/", 1)[1]
        if not path.is_file():
            try:
                with atomic_path(path) as tmp:
                    torch.hub.download_url_to_file(url, str(tmp), progress=True)
            except Exception as exc:
                raise RuntimeError(f"could not download FeatUp's {name!r} JBU weights from {url} "
                                   f"({type(exc).__name__}); offline, fetch that file elsewhere and pass its path "
                                   f"as checkpoint=...") from None
        self.load_weights(path)
        self.weights_source = f"FeatUp release {name!r}" + (" (LayerNorm)" if self.norm is not None else "")
        return self

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, norm={self.norm is not None}, weights={self.weights_source!r}"


# ---------------------------------------------------------------------------------------------
# LiFT (Suri, Walmer et al., ECCV 2024), written from the architecture of github saksham-s/lift @
# fd6d929, lift.py: image convolutions give guidance at 2x and 1x the feature grid; the features
# (+ the 1x guidance) go through a 2x2 transposed convolution, are concatenated with the 2x
# guidance, then two 3x3 conv-BN-ReLU and a 1x1 conv back to the feature width. Parameter names
# follow that file, so its released modules load. Upstream supports patch 8 and 16 only (an
# identity or a 2x2 max-pool between the image stages); an adaptive max-pool to twice the feature
# grid is the same for those and also serves patch 14.
# ---------------------------------------------------------------------------------------------


def _conv_bn_relu(cin: int, cout: int, stride: int = 1, bias: bool = True):
    return [nn.Conv2d(cin, cout, 3, padding=1, stride=stride, bias=bias), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _LiftUp(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
        self.conv_1 = nn.Module()
        self.conv_1.double_conv = nn.Sequential(*_conv_bn_relu(in_channels // 2 + 32, out_channels // 2, bias=False),
                                                *_conv_bn_relu(out_channels // 2, out_channels // 2, bias=False))

    def forward(self, x: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        return self.conv_1.double_conv(torch.cat([self.up(x), guidance], dim=1))


class LiFT(nn.Module):
    """LiFT: x2 features from the features and the image, then bilinear to ``output_size`` (the
    paper's usage of LiFT as a baseline). Weights: random unless :meth:`load_weights` is given a
    released module (upstream's releases are for DINO v1 ViTs, key facet of layer 11)."""

    def __init__(self, feature_dim: int):
        super().__init__()
        c = self.feature_dim = int(feature_dim)
        self.up1 = _LiftUp(c + 32, c)
        self.outc = nn.Conv2d(c // 2, c, kernel_size=1)
        self.image_convs_1 = nn.Sequential(*_conv_bn_relu(3, 32, stride=2), *_conv_bn_relu(32, 32, stride=2))
        self.image_convs_2 = nn.Sequential(*_conv_bn_relu(32, 32, stride=2))
        self.weights_source = "random init"

    def upsample2(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        h, w = features.shape[-2:]
        g1 = F.adaptive_max_pool2d(self.image_convs_1(image), (2 * h, 2 * w))
        g2 = self.image_convs_2(g1)
        return self.outc(self.up1(torch.cat([features, g2], dim=1), g1))

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        size = _check_output_size(output_size)
        _check_features(features)
        _check_image(image, features)
        if features.shape[1] != self.feature_dim:
            raise ValueError(f"LiFT built for {self.feature_dim}-channel features got {features.shape[1]}.")
        x = self.upsample2(image, features)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x

    def load_weights(self, path) -> "LiFT":
        """Load a released LiFT module (a state dict, ``module.`` prefixes stripped) or ours."""
        from .checkpoint import safe_torch_load

        obj = safe_torch_load(path)
        state = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
        if not isinstance(state, dict):
            raise ValueError(f"{str(path)!r} holds no state dict.")
        state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}
        try:
            missing, unexpected = self.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ValueError(f"{str(path)!r} does not fit LiFT(feature_dim={self.feature_dim}): {exc}") from None
        if missing or unexpected:
            raise ValueError(f"{str(path)!r} does not fit LiFT(feature_dim={self.feature_dim}): missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}.")
        self.weights_source = str(path)
        return self

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, weights={self.weights_source!r}"
