"""Loading and saving JAFAR weights.

Two formats:

* **official** ``.pth`` files of github PaulCouairon/JAFAR (release ``Weights``):
  ``{"jafar": state_dict, "optimizer_jafar": ..., "epoch": ..., "cfg": <pickled OmegaConf>}``.
  They are read with ``torch.load(weights_only=True)``: every non-tensor class the pickle
  names (OmegaConf's, ``typing.Any``, ...) is replaced by an inert placeholder, so no pickled
  code runs; modules that torch blocks outright (``os``, ``subprocess``, ...) make the load
  fail. The releases carry a few stray ``query_features_encoder.*`` keys from an older
  version of the model; they are dropped with a warning.
* **ours**: a single ``.safetensors`` file whose metadata holds the constructor config
  (``{"format": "jafar", "config": "<json>"}``); no pickle at all.

``from_pretrained(name)`` downloads a named official release into torch's hub cache
(``torch.hub.get_dir()/checkpoints``) when online, and otherwise explains how to fetch it by
hand.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch

from .model import JAFAR
from .utils import atomic_path

PathLike = Union[str, os.PathLike]

_RELEASE_URL = "https://github.com/PaulCouairon/JAFAR/releases/download/Weights/{}"


@dataclass(frozen=True)
class Release:
    """An official JAFAR checkpoint and the frozen timm backbone it was trained for."""

    filename: str
    backbone: str  #: exact timm model name
    feature_dim: int  #: the backbone's width, i.e. the checkpoint's ``v_dim``
    label: str  #: the official README's label

    @property
    def url(self) -> str:
        return _RELEASE_URL.format(self.filename)


#: The official releases (README of github PaulCouairon/JAFAR @ 94d4d54, "Available Models").
#: The README labels ``vit_base_patch16_224.dino.pth`` "ViT-B-16" and ``vit_base_patch16_224.pth``
#: "ViT-B-16-DINO"; the file names are timm model names (the official training config takes
#: ``backbone.name`` from timm), so the first is DINO ViT-B/16 and the second the supervised
#: ViT-B/16: the labels are swapped and we key the table by the files' backbones.
OFFICIAL_RELEASES: Dict[str, Release] = {
    r.backbone: r
    for r in (
        Release("vit_small_patch14_dinov2.lvd142m.pth", "vit_small_patch14_dinov2.lvd142m", 384, "ViT-S-14-DINOv2"),
        Release("vit_base_patch14_dinov2.lvd142m.pth", "vit_base_patch14_dinov2.lvd142m", 768, "ViT-B-14-DINOv2"),
        Release("vit_small_patch14_reg4_dinov2.pth", "vit_small_patch14_reg4_dinov2.lvd142m", 384,
                "ViT-S-Reg4-14-DINOv2"),
        Release("vit_base_patch16_224.dino.pth", "vit_base_patch16_224.dino", 768, "ViT-B-16 (DINO; label swapped)"),
        Release("vit_base_patch16_224.pth", "vit_base_patch16_224.augreg2_in21k_ft_in1k", 768,
                "ViT-B-16-DINO (supervised; label swapped)"),
        Release("vit_base_patch16_clip_384.pth", "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k", 768,
                "ViT-B-16-CLIP"),
        Release("vit_base_patch16_siglip_512.v2_webli.pth", "vit_base_patch16_siglip_512.v2_webli", 768,
                "ViT-B-16-SigLIP2"),
    )
}

#: Short aliases accepted by :func:`from_pretrained` besides the timm names above.
RELEASE_ALIASES = {
    "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_vits14_reg4": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dino_vitb16": "vit_base_patch16_224.dino",
    "vitb16": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_base_patch16_224": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "vit_small_patch14_reg4_dinov2": "vit_small_patch14_reg4_dinov2.lvd142m",
    "clip_vitb16": "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k",
    "vit_base_patch16_clip_384": "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k",
    "siglip2_vitb16": "vit_base_patch16_siglip_512.v2_webli",
}

_STRAY_PREFIXES = ("query_features_encoder.",)


class _Inert:
    """Placeholder for any class a checkpoint's pickle names: stores its arguments, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def safe_torch_load(path: PathLike, map_location="cpu") -> dict:
    """``torch.load(weights_only=True)`` with inert placeholders for non-tensor classes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as exc:  # not a zip checkpoint (legacy format): weights_only load decides
        names = []
        if not _looks_like_legacy_torch_file(path):
            raise ValueError(f"{str(path)!r} is not a PyTorch checkpoint ({exc}).") from None
    stubs = [(type(f"Inert[{n}]", (_Inert,), {}), n) for n in names]
    try:
        with torch.serialization.safe_globals(stubs):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()
        detail = next((line for line in first if "GLOBAL" in line), first[0] if first else "")
        raise ValueError(f"refusing to load {str(path)!r}: it cannot be read without executing pickled "
                         f"code ({detail.strip()}).") from None


def _looks_like_legacy_torch_file(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x80\x02"


def infer_config(state_dict: Dict[str, torch.Tensor]) -> dict:
    """JAFAR constructor arguments implied by the shapes of a state dict."""
    try:
        first = state_dict["image_encoder.0.weight"]
        feats = state_dict["key_features_encoder.0.weight"]
    except KeyError as exc:
        raise ValueError(f"not a JAFAR state dict: key {exc.args[0]!r} is missing.") from None
    # The number of heads does not show in any shape; every official release uses 4.
    return dict(input_dim=first.shape[1], qk_dim=first.shape[0], v_dim=feats.shape[1], num_heads=4,
                kernel_size=first.shape[-1])


def _clean_state_dict(state_dict: Dict[str, torch.Tensor], source: str) -> Dict[str, torch.Tensor]:
    if all(k.startswith("module.") for k in state_dict):  # saved from DDP
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    stray = [k for k in state_dict if k.startswith(_STRAY_PREFIXES)]
    if stray:
        warnings.warn(f"{source}: ignoring {len(stray)} stray keys of an older JAFAR version "
                      f"({', '.join(sorted(stray)[:3])}{', ...' if len(stray) > 3 else ''}).", stacklevel=3)
        state_dict = {k: v for k, v in state_dict.items() if k not in stray}
    return state_dict


def read_state_dict(path: PathLike) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Read a JAFAR state dict and its constructor config from either format."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist.")
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            state_dict = {k: fh.get_tensor(k) for k in fh.keys()}
        if meta.get("format") != "jafar" or "config" not in meta:
            raise ValueError(f"{str(path)!r} is a safetensors file without JAFAR metadata "
                             "(expected one written by jafar.save_checkpoint).")
        return state_dict, json.loads(meta["config"])
    obj = safe_torch_load(path)
    if isinstance(obj, dict) and isinstance(obj.get("jafar"), dict):
        state_dict = obj["jafar"]
    elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state_dict = obj["state_dict"]
    elif isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state_dict = obj
    else:
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{str(path)!r} holds no JAFAR state dict (expected a 'jafar' entry or a flat "
                         f"state dict, found {keys}).")
    state_dict = _clean_state_dict(dict(state_dict), str(path))
    return state_dict, infer_config(state_dict)


def load_checkpoint(path: PathLike, feature_dim: Optional[int] = None, map_location="cpu",
                    **model_kwargs) -> JAFAR:
    """Build a :class:`JAFAR` from an official ``.pth`` or one of our ``.safetensors`` files.

    Args:
        path: the checkpoint.
        feature_dim: the backbone's channel count; a checkpoint for another width is refused.
        map_location: device for the returned model.
        model_kwargs: runtime options of :class:`JAFAR` (``attention``, ``memory_budget_mb``,
            ``compile``, ``encoders``).
    """
    state_dict, config = read_state_dict(path)
    if feature_dim is not None and int(feature_dim) != config["v_dim"]:
        raise ValueError(f"checkpoint {str(path)!r} upsamples {config['v_dim']}-channel features but the "
                         f"backbone gives {feature_dim} channels: use the checkpoint trained for this backbone.")
    for key in set(model_kwargs) & set(config):
        if model_kwargs[key] != config[key]:
            raise ValueError(f"checkpoint {str(path)!r} has {key}={config[key]} but {key}={model_kwargs[key]} "
                             "was asked for.")
        del model_kwargs[key]
    model = JAFAR(**config, **model_kwargs)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(path)!r} does not fit JAFAR({config}): missing keys "
                         f"{missing[:4]}, unexpected keys {unexpected[:4]}.")
    return model.to(map_location)


def save_checkpoint(model: JAFAR, path: PathLike, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``model`` as one ``.safetensors`` file with its constructor config, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_checkpoint writes .safetensors files, got {str(path)!r}.")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format="jafar", config=json.dumps(model.config))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def resolve_release(name: str) -> Release:
    key = RELEASE_ALIASES.get(name, name)
    if key not in OFFICIAL_RELEASES:
        names = sorted(set(OFFICIAL_RELEASES) | set(RELEASE_ALIASES))
        raise ValueError(f"no official JAFAR release named {name!r}; known names: {', '.join(names)}.")
    return OFFICIAL_RELEASES[key]


def release_path(name: str, cache_dir: Optional[PathLike] = None) -> Path:
    """Where :func:`from_pretrained` keeps (or looks for) a release's file."""
    release = resolve_release(name)
    root = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    return root / release.filename


def from_pretrained(name: str, feature_dim: Optional[int] = None, cache_dir: Optional[PathLike] = None,
                    map_location="cpu", **model_kwargs) -> JAFAR:
    """Load a named official release, downloading it into the hub cache if needed.

    ``name`` is the backbone's timm name (``vit_small_patch14_dinov2.lvd142m``) or an alias
    (``dinov2_vits14``); see :data:`OFFICIAL_RELEASES`.
    """
    release = resolve_release(name)
    path = release_path(name, cache_dir)
    if not path.is_file():
        try:
            with atomic_path(path) as tmp:
                torch.hub.download_url_to_file(release.url, str(tmp), progress=True)
        except Exception as exc:
            raise RuntimeError(
                f"could not download the JAFAR release {release.filename!r} from {release.url} ({type(exc).__name__}: "
                f"{exc}); if this machine is offline, download that file on one with internet access and either "
                f"copy it to {path} or load it with jafar.load_checkpoint('/path/to/{release.filename}')."
            ) from None
    model = load_checkpoint(path, feature_dim=feature_dim, map_location=map_location, **model_kwargs)
    if model.v_dim != release.feature_dim:
        warnings.warn(f"{release.filename} upsamples {model.v_dim}-channel features, not the "
                      f"{release.feature_dim} channels of {release.backbone} listed for it.", stacklevel=2)
    return model
