"""FeatUp's JBU stack (Fu, Hamilton et al., ICLR 2024), a task-agnostic learned peer of JAFAR (x16,
then bilinear to the output size), with its release table and checkpoint adapter.

Written from the architecture of github mhamilton723/FeatUp @ 6b5a6c0, featup/upsamplers.py
(JBULearnedRange, JBUStack) and featup/adaptive_conv_cuda (the per-pixel 7x7 filter). Parameter
names follow that file, so its released checkpoints load (hubconf.py: keys under
"upsampler."). The adaptive convolution is a loop over the 49 filter taps (memory O(C H W), no
CUDA extension). Random weights unless loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import hub
from .base import Upsampler, check_features, check_image, check_on_missing, check_output_size, load_or_random, register_upsampler


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

#: the backbones of this repository (their ``Backbone.name``) whose features each release was
#: trained on. FeatUp's extractors (hubconf.py ``UpsampledBackbone``: ``get_featurizer(name,
#: "token")``; featup/featurizers/util.py): ``dinov2``: torch.hub ``dinov2_vits14``,
#: ``forward_features(img)["x_norm_patchtokens"]`` (DINOv2.py), the last block's normed patch tokens,
#: as timm's ``vit_small_patch14_dinov2.lvd142m`` (the same weights) gives them; ``dino16``: torch.hub
#: ``dino_vits16``, the "token" facet of ``get_intermediate_feat(img, n=1)`` (DINO.py: the last block,
#: normed); ``vit``: timm ``vit_small_patch16_224`` (its default tag, ``augreg_in21k_ft_in1k``) loaded into
#: the same DINO ViT, the same facet; ``maskclip``: MaskCLIP's value path of OpenAI's CLIP ViT-B/16
#: (MaskCLIP.py; ``jafar.eval.maskclip`` with the ``openai`` weights, or a local file of them).
#: ``clip`` (OpenAI ``clip``'s own visual tokens) and ``resnet50`` (FeatUp's ResNet-50 module) have no
#: backbone here. Every FeatUp extractor takes ImageNet-normalised images (featup/util.py ``norm``:
#: mean 0.485, 0.456, 0.406, std 0.229, 0.224, 0.225; for ``vit`` too, whose timm config says 0.5),
#: at 224 px in training (train_jbu_upsampler.py ``load_size = 224``, resize and centre crop).
FEATUP_BACKBONES = {
    "dinov2": ("vit_small_patch14_dinov2.lvd142m",),
    "dino16": ("vit_small_patch16_224.dino",),
    "vit": ("vit_small_patch16_224.augreg_in21k_ft_in1k",),
    "maskclip": ("maskclip_ViT-B-16.openai", "maskclip_ViT-B-16.file"),
    "clip": (),
    "resnet50": (),
}


def featup_release_for(backbone) -> str:
    """The FeatUp release trained on ``backbone``'s features (:data:`FEATUP_BACKBONES`); ValueError
    in one sentence when there is none."""
    name = str(getattr(backbone, "name", backbone))
    found = next((k for k, names in FEATUP_BACKBONES.items() if name in names), None)
    if found is None:
        known = ", ".join(f"{k} ({names[0]})" for k, names in FEATUP_BACKBONES.items() if names)
        raise ValueError(f"FeatUp has no release for the backbone {name}; its releases fit: {known}.")
    return found


def check_release_backbone(release: str, backbone) -> None:
    """Refuse, in one sentence, FeatUp's ``release`` for a named ``backbone`` it was not trained on
    (:data:`FEATUP_BACKBONES`); nothing to check without a backbone."""
    if backbone is None or not hasattr(backbone, "name"):
        return
    names = FEATUP_BACKBONES.get(release, ())
    if str(backbone.name) not in names:
        trained = FEATUP_RELEASES[release][0] + (f" ({names[0]})" if names else "")
        raise ValueError(f"FeatUp's {release!r} release was trained on the features of {trained}, not of "
                         f"{backbone.name}; use checkpoint=auto (the backbone's release, if any), a file, or null.")


_FEATUP_URL = "https://marhamilresearch4.blob.core.windows.net/feature-upsampling-public/pretrained/{}{}_jbu_stack_cocostuff.ckpt"


def featup_release_url(name: str, norm: bool = False) -> str:
    if name not in FEATUP_RELEASES:
        raise ValueError(f"no FeatUp release named {name!r}; known: {', '.join(FEATUP_RELEASES)}.")
    if norm and name == "maskclip":
        raise ValueError("FeatUp releases MaskCLIP only without LayerNorm (norm=False).")
    return _FEATUP_URL.format("" if norm else "no_norm/", name)


class FeatUpJBU(Upsampler):
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
        size = check_output_size(output_size)
        check_features(features)
        check_image(image, features)
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
        state = hub.read_state_dict(path, nested=("state_dict",), strip_prefix=None)
        ours = {k[len("upsampler."):]: v for k, v in state.items() if k.startswith("upsampler.")} or dict(state)
        if self.norm is not None:
            for k in ("weight", "bias"):  # hubconf.py: Sequential(featurizer, ChannelNorm(dim)) -> "model.1.norm.*"
                if f"model.1.norm.{k}" in state:
                    ours[f"norm.{k}"] = state[f"model.1.norm.{k}"]
        hub.load_into(self, ours, path, f"FeatUpJBU(feature_dim={self.feature_dim}, norm={self.norm is not None})")
        self.weights_source = str(path)
        return self

    def load_release(self, name: str, cache_dir=None) -> "FeatUpJBU":
        """Download (into torch's hub cache) and load FeatUp's released JBU stack for ``name``
        (:data:`FEATUP_RELEASES`); RuntimeError with what to do when offline."""
        url = featup_release_url(name, self.norm is not None)
        if FEATUP_RELEASES[name][1] != self.feature_dim:
            raise ValueError(f"FeatUp's {name!r} release upsamples {FEATUP_RELEASES[name][1]}-channel features, "
                             f"not {self.feature_dim}.")
        subdir = "featup/" + ("norm" if self.norm is not None else "no_norm")
        path = hub.download(url, subdir=subdir, cache_dir=cache_dir, what=f"FeatUp's {name!r} JBU weights",
                            local_hint="pass its path as checkpoint=...")
        self.load_weights(path)
        self.weights_source = f"FeatUp release {name!r}" + (" (LayerNorm)" if self.norm is not None else "")
        return self

    def describe(self) -> str:
        note = ""
        if self.weights_source.startswith("FeatUp release"):  # a file is ours (tools/pretrain_jafar.py upsampler=featup)
            note = (" The paper retrained FeatUp on ImageNet (50k steps; tools/pretrain_jafar.py upsampler=featup "
                    "experiment=featup_official): FeatUp's released weights (COCO-Stuff) do not reproduce its Table 1-2 row.")
        return f"FeatUp JBU stack (x16 then bilinear), weights: {self.weights_source}.{note}"

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, norm={self.norm is not None}, weights={self.weights_source!r}"


@register_upsampler("featup", summary="FeatUp's JBU stack (x16, then bilinear)")
def featup(feature_dim=None, checkpoint=None, backbone=None, norm: bool = False, on_missing: str = "error",
           **options) -> FeatUpJBU:
    """``checkpoint``: a file, a release name of :data:`FEATUP_RELEASES` (downloaded when online;
    refused for a ``backbone`` it was not trained on), or ``"auto"``: the release of ``backbone``
    (:func:`featup_release_for`). ``on_missing``: ``"error"``, or ``"random"`` to fall back to random
    weights (with a warning) when a release cannot be fetched or does not fit."""
    if feature_dim is None:
        raise ValueError("the 'featup' upsampler needs feature_dim (or backbone).")
    check_on_missing("featup", on_missing)
    if checkpoint == "auto" and backbone is None:
        raise ValueError("FeatUp checkpoint=auto picks the release of the backbone: pass backbone=..., or name a "
                         "release or a file.")
    model = FeatUpJBU(feature_dim, norm=norm, **options)
    if checkpoint is None:
        return model

    def load():
        release = featup_release_for(backbone) if checkpoint == "auto" else checkpoint
        if release in FEATUP_RELEASES:
            check_release_backbone(release, backbone)
            return model.load_release(release)
        return model.load_weights(checkpoint)

    return load_or_random(model, checkpoint, load, on_missing, "FeatUp")
