"""One line from an image to upsampled features: ``jafar.load("dinov2_s", resolution=448)``.

:func:`load` builds a :class:`JafarFeatures` for one of the official releases, by the official
hub's short names (github PaulCouairon/JAFAR, ``hubconf.py``, ``load``: ``dinov2_s``,
``dinov2_b``, ``dinov2_reg4_s``, ``dinov3_s``, ``dinov3_s_plus``, ``dinov3_b``, ``dinov3_l``,
``dino_b``, ``clip_b``, ``siglip2_b``, ``vit_b``, ``radio_b``, ``radio_l``, ``radio_h``;
``jafar.upsamplers.jafar.HUB_NAMES``) or any name :func:`jafar.from_pretrained` takes.

As the official ``JAFARModel``: the frozen backbone's features of the image, then JAFAR guided
by that same image, to ``resolution`` (``output_size`` per call), without gradients. One
difference, on purpose: the official module takes the image as its backbone expects it (the
user normalises); ours takes RGB in ``[0, 1]`` and normalises it with the backbone's mean/std,
the normalisation the official training applied to both the backbone's input and JAFAR's
guidance (``utils/training.py``, ``get_dataloaders``: ``T.Normalize`` with the backbone's
config). RADIO normalises internally (mean 0, std 1 here, as the official ``RadioWrapper``).

Offline (``HF_HUB_OFFLINE=1``), every file the call needs and does not have locally is named
before any work, in one sentence: which file to fetch and where to put it (or which argument to
pass it with). RADIO's backbone loads only online (its authors' torch.hub loader).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import nn

from . import hub
from .backbones import RADIO_BACKBONES, RADIO_HUB_REPO, Backbone, RadioBackbone, build_backbone
from .upsamplers.base import check_output_size
from .upsamplers.jafar import JAFAR, from_pretrained, load_checkpoint, release_path, resolve_release

PathLike = Union[str, os.PathLike]

__all__ = ["JafarFeatures", "load"]


def _size(value) -> Tuple[int, int]:
    return check_output_size((value, value) if isinstance(value, int) and not isinstance(value, bool) else value)


class JafarFeatures(nn.Module):
    """``model(images, output_size=None) -> (B, C, H_out, W_out)``: ``images`` RGB in ``[0, 1]``,
    ``(B, 3, H, W)`` (``H``, ``W`` as the backbone takes them: multiples of its patch size for the
    ViTs); ``output_size`` an int (square) or ``(H_out, W_out)``, the model's ``resolution`` when
    omitted. Runs without gradients."""

    def __init__(self, backbone: Backbone, upsampler: nn.Module, resolution=512, name: str = ""):
        super().__init__()
        self.backbone, self.upsampler = backbone, upsampler
        self.resolution = _size(resolution)
        self.name = name
        self.upsampler.eval()

    def forward(self, images: torch.Tensor, output_size=None) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be an RGB batch (B, 3, H, W) with values in [0, 1], got {got}.")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating-point RGB in [0, 1], got {images.dtype}; e.g. images.float() "
                             f"/ 255 for uint8 pixels.")
        lo, hi = images.aminmax()
        if lo < 0 or hi > 1:
            raise ValueError(f"images must be RGB in [0, 1] (this model normalises them itself), got values in "
                             f"[{lo.item():.3g}, {hi.item():.3g}].")
        size = self.resolution if output_size is None else _size(output_size)
        with torch.no_grad():
            x = self.backbone.normalize(images)
            return self.upsampler(x, self.backbone(x), size)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, resolution={self.resolution}"


def _timm_weights_cached(timm_name: str) -> Tuple[bool, str]:
    """Whether timm would find ``timm_name``'s weights in the Hugging Face cache, and its hub repo."""
    import timm

    repo = getattr(timm.models.get_pretrained_cfg(timm_name), "hf_hub_id", None) or f"timm/{timm_name}"
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = any(isinstance(try_to_load_from_cache(repo, f), str)
                     for f in ("model.safetensors", "pytorch_model.bin"))
    except Exception:
        cached = False
    return cached, repo


def _check_offline(name: str, release, pretrained: bool, weights, backbone_weights, cache_dir) -> None:
    """Offline, one sentence naming each missing file, which to fetch and where to put it."""
    if not pretrained or not hub.offline():
        return
    missing = []
    if weights is None:
        path = release_path(release.backbone, cache_dir)
        if not path.is_file():
            missing.append(f"the JAFAR weights {release.filename} (download {release.url} and put it at {path}, "
                           f"or pass weights='/path/to/{release.filename}')")
    if release.backbone in RADIO_BACKBONES:
        missing.append(f"RADIO's backbone {release.backbone}, which loads only online through torch.hub.load("
                       f"{RADIO_HUB_REPO!r}, 'radio_model', version={release.backbone!r}) (run it on a machine "
                       f"with internet access)")
    elif backbone_weights is None:
        cached, repo = _timm_weights_cached(release.backbone)
        if not cached:
            missing.append(f"the backbone's weights (download https://huggingface.co/{repo}/resolve/main/"
                           f"model.safetensors and pass backbone_weights='/path/to/model.safetensors')")
    if missing:
        raise RuntimeError(f"jafar.load({name!r}) needs {' and '.join(missing)}, and HF_HUB_OFFLINE is set.")


def load(name: str, resolution=512, pretrained: bool = True, weights: Optional[PathLike] = None,
         backbone_weights: Optional[PathLike] = None, device=None, cache_dir: Optional[PathLike] = None,
         backbone_options: Optional[dict] = None, **jafar_options) -> JafarFeatures:
    """The official release ``name`` as one module from an RGB batch in ``[0, 1]`` to upsampled
    features (:class:`JafarFeatures`).

    Args:
        name: the official hub's short name (``dinov2_s``, ..., ``radio_h``), or a backbone or file
            name of :data:`jafar.OFFICIAL_RELEASES`.
        resolution: the default output size (int: square; or ``(H, W)``); the official default 512.
        pretrained: download what is missing (the JAFAR release into the torch hub cache, the
            backbone through timm or RADIO's torch.hub loader); False: random weights for what no
            file is given for (a random timm backbone; RADIO has no random path).
        weights: a local JAFAR checkpoint (the official ``.pth`` or ours); nothing downloaded for it.
        backbone_weights: a local timm state dict for the backbone; nothing downloaded for it.
        device: where the model goes; None: CUDA when available, else the CPU (as the official).
        cache_dir: where release files are kept (default ``torch.hub.get_dir()/checkpoints``).
        backbone_options: extra ``timm.create_model`` arguments (tests build tiny backbones).
        jafar_options: runtime options of :class:`jafar.JAFAR` (``attention``, ``compile``, ...).
    """
    release = resolve_release(name)
    is_radio = release.backbone in RADIO_BACKBONES
    if is_radio and (backbone_weights is not None or backbone_options):
        raise ValueError(f"{name!r} uses RADIO's backbone, which only its authors' torch.hub loader builds: "
                         f"backbone_weights= and backbone_options= are not supported for it.")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights {str(weights)!r} does not exist (expected the JAFAR file "
                                f"{release.filename} or one of our .safetensors checkpoints).")
    if backbone_weights is not None and not Path(backbone_weights).is_file():
        raise FileNotFoundError(f"backbone_weights {str(backbone_weights)!r} does not exist (expected the "
                                f"{release.backbone} weights as a .safetensors or .pth file).")
    size = _size(resolution)
    _check_offline(name, release, pretrained, weights, backbone_weights, cache_dir)

    if is_radio:
        backbone = RadioBackbone(release.backbone)
    else:
        backbone = build_backbone(release.backbone, pretrained=pretrained, weights=backbone_weights,
                                  **(backbone_options or {}))
    if weights is not None:
        upsampler = load_checkpoint(weights, feature_dim=backbone.embed_dim, **jafar_options)
    elif pretrained:
        upsampler = from_pretrained(release.backbone, feature_dim=backbone.embed_dim, cache_dir=cache_dir,
                                    **jafar_options)
    else:
        upsampler = JAFAR(v_dim=backbone.embed_dim, **jafar_options)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return JafarFeatures(backbone, upsampler, size, name=name).to(device)
