"""The multi-camera image encoder of the BeV models: a frozen backbone on every camera, then the
upsampler slot (none, an interpolation baseline, or JAFAR), with an optional on-disk cache of
the frozen backbone's features.

``build_multicamera_encoder(backbone, "jafar", checkpoint=...)`` is the one factory; it builds
the upsampler with :func:`jafar.build_upsampler` (feature width taken from the backbone), or
takes one already built from a config.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from jafar.backbones import Backbone
from jafar.upsamplers import build_upsampler
from jafar.utils import atomic_path

PathLike = Union[str, os.PathLike]

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]*$")


def _pair(value, name: str) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    ok = isinstance(value, (Sequence, torch.Size)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok:
        raise ValueError(f"{name} must be None or a pair of positive ints (height, width), got {value!r}.")
    return int(value[0]), int(value[1])


class MultiCameraEncoder(nn.Module):
    """``forward(images (B, N, 3, H, W) in [0, 1], cache_keys=None) -> (B, N, C, h', w')``.

    Every camera image is normalised with the backbone's mean/std and encoded by the frozen
    backbone (no grad, eval mode: :class:`jafar.backbones.Backbone`); the upsampler, called as
    ``upsampler(guidance, features, (h', w'))``, then brings the ``(h, w)`` patch grid to
    ``(h', w')``, guided by the normalised camera image (resized to ``guidance_size``, bilinear,
    antialiased when shrinking, if one is given).

    Args:
        backbone: a frozen :class:`jafar.backbones.Backbone`. H and W must be multiples of its
            ``patch_size`` (its stride), so that the feature grid covers the image exactly and
            intrinsics scale by ``w/W``, ``h/H``.
        upsampler: a module with the call ``(image, features, output_size)`` (``jafar.JAFAR``,
            ``jafar.Interpolate``), or None: the backbone's grid is returned as it is (then
            ``output_scale`` does not apply and ``output_size`` must be None).
        output_scale: with an upsampler, ``(h', w') = (round(s * h), round(s * w))``.
        output_size: with an upsampler, a fixed ``(h', w')`` instead of ``output_scale``.
        guidance_size: ``(H_g, W_g)`` of the guidance image given to the upsampler; None gives
            it the network input as it is.
        freeze_upsampler: no parameter of the upsampler requires grad, it stays in eval mode,
            and it runs under ``torch.no_grad()``. Otherwise JAFAR's (trainable) parameters get
            gradients from the BeV loss.
        cache_dir: where to keep the frozen backbone's features (see below); None disables it.
        cache_dtype: dtype of the cached features; None keeps the computed dtype (float32
            outside autocast), so cached and uncached forwards agree exactly. ``torch.float16``
            halves the disk (DINOv2-S at 224x476: 6 x 384 x 16 x 34 values per sample, 5.0 MB in
            float32, 2.5 MB in float16) at the cost of exactness.

    Feature cache: when ``cache_dir`` is set and ``forward`` gets ``cache_keys`` (one str per
    batch item, e.g. the nuScenes sample token), the backbone features ``(N, C, h, w)`` of item
    ``b`` are read from ``<cache_dir>/<fingerprint>/<cache_keys[b]>.pt`` or computed and written
    there atomically (``jafar.utils.atomic_path``). The fingerprint hashes the backbone (class,
    name, mean/std and every weight), the input image size, the cached dtype and the autocast
    dtype, so a changed setting never reads stale features. Only valid without image
    augmentation (the cached features are those of the un-augmented image): the caller must pass
    keys only then. The upsampler always runs, on the cached features.
    """

    def __init__(self, backbone: Backbone, upsampler: Optional[nn.Module] = None, output_scale: float = 2.0,
                 output_size: Optional[Tuple[int, int]] = None, guidance_size: Optional[Tuple[int, int]] = None,
                 freeze_upsampler: bool = False, cache_dir: Optional[PathLike] = None,
                 cache_dtype: Optional[torch.dtype] = None):
        super().__init__()
        if not isinstance(backbone, Backbone):
            raise ValueError(f"backbone must be a jafar.backbones.Backbone, got {type(backbone).__name__}.")
        if upsampler is not None and not isinstance(upsampler, nn.Module):
            raise ValueError(f"upsampler must be an nn.Module or None, got {type(upsampler).__name__}.")
        if not (isinstance(output_scale, (int, float)) and not isinstance(output_scale, bool)
                and math.isfinite(output_scale) and output_scale > 0):
            raise ValueError(f"output_scale must be a positive number, got {output_scale!r}.")
        self.output_size = _pair(output_size, "output_size")
        if upsampler is None and self.output_size is not None:
            raise ValueError(f"output_size={output_size!r} needs an upsampler; with upsampler=None the "
                             "backbone's grid is returned as it is.")
        if cache_dtype is not None and not (isinstance(cache_dtype, torch.dtype) and cache_dtype.is_floating_point):
            raise ValueError(f"cache_dtype must be None or a floating torch.dtype, got {cache_dtype!r}.")
        self.backbone = backbone
        self.upsampler = upsampler
        self.output_scale = float(output_scale)
        # "output": the guidance image at the upsampler's output size (the cheapest; see docs/bev.md)
        self.guidance_size = guidance_size if guidance_size == "output" else _pair(guidance_size, "guidance_size")
        self.freeze_upsampler = bool(freeze_upsampler)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.cache_dtype = cache_dtype
        self._weights_digest: Optional[str] = None
        if upsampler is not None and self.freeze_upsampler:
            upsampler.requires_grad_(False)
            upsampler.train(False)

    # ------------------------------------------------------------------ sizes
    @property
    def out_channels(self) -> int:
        """C of the output: the backbone's width (upsamplers keep the channels)."""
        return self.backbone.embed_dim

    @property
    def stride(self) -> int:
        return self.backbone.patch_size

    def feature_grid(self, height: int, width: int) -> Tuple[int, int]:
        """``(h, w)`` of the backbone's grid; ValueError unless H, W are multiples of its stride."""
        s = self.stride
        if not (isinstance(height, int) and isinstance(width, int)) or height <= 0 or width <= 0 \
                or height % s or width % s:
            raise ValueError(f"image size {height}x{width} is not a multiple of the stride {s} of backbone "
                             f"{self.backbone.name}; resize or crop the images to multiples of {s}.")
        return height // s, width // s

    def output_size_for(self, height: int, width: int) -> Tuple[int, int]:
        """``(h', w')`` of the features this encoder returns for ``height x width`` images."""
        h, w = self.feature_grid(height, width)
        if self.upsampler is None:
            return h, w
        if self.output_size is not None:
            return self.output_size
        return max(1, int(round(self.output_scale * h))), max(1, int(round(self.output_scale * w)))

    # ------------------------------------------------------------------ modes
    def train(self, mode: bool = True) -> "MultiCameraEncoder":
        super().train(mode)
        if self.upsampler is not None and self.freeze_upsampler:
            self.upsampler.train(False)
        return self

    # ------------------------------------------------------------------ forward
    def _check(self, images, cache_keys) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 5 or images.shape[2] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a (B, N, 3, H, W) tensor of RGB in [0, 1], got {got}.")
        if not images.is_floating_point():
            raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}.")
        self.feature_grid(int(images.shape[-2]), int(images.shape[-1]))
        if cache_keys is not None:
            if isinstance(cache_keys, str) or len(cache_keys) != images.shape[0] or not all(
                    isinstance(k, str) and _KEY_RE.match(k) for k in cache_keys):
                raise ValueError(f"cache_keys must be one file-name-safe str per batch item ({images.shape[0]}: "
                                 f"letters, digits, '_', '-', '.'), got {cache_keys!r}.")

    def forward(self, images: torch.Tensor, cache_keys: Optional[Sequence[str]] = None) -> torch.Tensor:
        self._check(images, cache_keys)
        b, n, _, height, width = images.shape
        normalized = self.backbone.normalize(images.flatten(0, 1))  # (B*N, 3, H, W)
        if self.cache_dir is not None and cache_keys is not None:
            feats = self._cached_features(normalized.unflatten(0, (b, n)), list(cache_keys)).flatten(0, 1)
        else:
            feats = self.backbone(normalized)
        if self.upsampler is None:
            return feats.unflatten(0, (b, n))
        out_size = self.output_size_for(height, width)
        guidance = normalized
        g_size = tuple(out_size) if self.guidance_size == "output" else self.guidance_size
        if g_size is not None and g_size != (height, width):
            shrink = g_size[0] < height or g_size[1] < width
            guidance = F.interpolate(normalized, size=g_size, mode="bilinear", align_corners=False, antialias=shrink)
        trainable = any(p.requires_grad for p in self.upsampler.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable and not self.freeze_upsampler):
            out = self.upsampler(guidance, feats, out_size)
        return out.unflatten(0, (b, n))

    # ------------------------------------------------------------------ cache
    def _weights_hash(self) -> str:
        if self._weights_digest is None:
            digest = hashlib.sha256()
            for key, tensor in sorted(self.backbone.state_dict().items()):
                t = tensor.detach().cpu().contiguous().reshape(-1)
                digest.update(f"{key}:{tuple(tensor.shape)}:{t.dtype};".encode())
                digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            self._weights_digest = digest.hexdigest()
        return self._weights_digest

    def cache_fingerprint(self, height: int, width: int, device_type: str = "cpu") -> dict:
        """What the cached features depend on (hashed into the cache folder's name)."""
        autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        return dict(backbone_class=type(self.backbone).__name__, backbone=self.backbone.name,
                    mean=list(self.backbone.mean), std=list(self.backbone.std),
                    weights_sha256=self._weights_hash(), image_size=[int(height), int(width)],
                    cache_dtype=str(self.cache_dtype), autocast=str(autocast))

    def cache_folder(self, height: int, width: int, device_type: str = "cpu") -> Path:
        if self.cache_dir is None:
            raise ValueError("this encoder has no cache_dir.")
        meta = self.cache_fingerprint(height, width, device_type)
        name = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
        folder = self.cache_dir / name
        info = folder / "fingerprint.json"
        if not info.is_file():
            with atomic_path(info) as tmp:
                tmp.write_text(json.dumps(meta, indent=1, sort_keys=True))
        return folder

    def _cached_features(self, normalized: torch.Tensor, keys: List[str]) -> torch.Tensor:
        """``(B, N, 3, H, W)`` normalised images -> ``(B, N, C, h, w)`` features, cached per key."""
        b, n, _, height, width = normalized.shape
        folder = self.cache_folder(height, width, normalized.device.type)
        paths = [folder / f"{key}.pt" for key in keys]
        found = {}
        for i, path in enumerate(paths):
            if path.is_file():
                try:
                    found[i] = torch.load(path, map_location=normalized.device, weights_only=True)["features"]
                except Exception:  # a truncated or foreign file: recompute it
                    continue
        missing = [i for i in range(b) if i not in found]
        if missing:
            computed = self.backbone(normalized[missing].flatten(0, 1)).unflatten(0, (len(missing), n))
            for j, i in enumerate(missing):
                feats = computed[j] if self.cache_dtype is None else computed[j].to(self.cache_dtype)
                with atomic_path(paths[i]) as tmp:
                    torch.save({"features": feats.detach().cpu().clone()}, tmp)
                found[i] = feats
        dtype = next(iter(found.values())).dtype if self.cache_dtype is None else self.cache_dtype
        out = torch.stack([found[i].to(device=normalized.device, dtype=dtype) for i in range(b)])
        return out if self.cache_dtype is None else out.to(normalized.dtype)

    def extra_repr(self) -> str:
        size = self.output_size if self.output_size is not None else f"x{self.output_scale:g}"
        return (f"output={size if self.upsampler is not None else 'backbone grid'}, guidance_size={self.guidance_size}, "
                f"freeze_upsampler={self.freeze_upsampler}, cache_dir={str(self.cache_dir) if self.cache_dir else None}")


def build_multicamera_encoder(backbone: Backbone, upsampler: Union[str, nn.Module, None] = "jafar",
                              checkpoint: Optional[str] = None, jafar_kwargs: Optional[dict] = None,
                              **encoder_kwargs) -> MultiCameraEncoder:
    """The one factory of :class:`MultiCameraEncoder` (``tools/train_bev.py``, ``tools/bev_cost.py``
    and the tests all build the encoder here).

    Args:
        backbone: the frozen backbone (``jafar.build_backbone(...)``).
        upsampler: a name, ``"none"`` (the backbone's grid), ``"nearest"``, ``"bilinear"``,
            ``"bicubic"`` or ``"jafar"`` (:func:`jafar.build_upsampler`, ``feature_dim`` = the
            backbone's width); or an upsampler module already built (e.g. from a Hydra config:
            FeatUp, LiFT), or None for no upsampler.
        checkpoint: for JAFAR by name, a ``.pth``/``.safetensors`` path or an official release
            name; random initialisation when None.
        jafar_kwargs: JAFAR constructor / runtime arguments (``qk_dim``, ``attention``, ...).
        encoder_kwargs: the other :class:`MultiCameraEncoder` arguments.
    """
    if not isinstance(backbone, Backbone):
        raise ValueError(f"backbone must be a jafar.backbones.Backbone, got {type(backbone).__name__}.")
    if upsampler is None or isinstance(upsampler, nn.Module) or upsampler == "none":
        if checkpoint is not None or jafar_kwargs:
            raise ValueError(f"checkpoint and jafar_kwargs only apply to an upsampler built by name, got "
                             f"upsampler={upsampler if isinstance(upsampler, (str, type(None))) else type(upsampler).__name__!r}"
                             f" with checkpoint={checkpoint!r}, jafar_kwargs={jafar_kwargs!r}.")
        module = upsampler if isinstance(upsampler, nn.Module) else None
    elif isinstance(upsampler, str):
        module = build_upsampler(upsampler, feature_dim=backbone.embed_dim, checkpoint=checkpoint,
                                 **dict(jafar_kwargs or {}))
    else:
        raise ValueError(f"upsampler must be a name, an nn.Module or None, got {type(upsampler).__name__}.")
    return MultiCameraEncoder(backbone, module, **encoder_kwargs)
