"""One constructor for every upsampler that shares the call ``(image, features, output_size)``."""

from __future__ import annotations

import warnings
from typing import Optional

from torch import nn

from .baselines import FEATUP_RELEASES, FeatUpJBU, Interpolate, LargeImage, LiFT, Strided
from .model import JAFAR

UPSAMPLERS = ("nearest", "bilinear", "bicubic", "large_image", "strided", "featup", "lift", "jafar")
#: upsamplers that encode the image again and so need the backbone
NEEDS_BACKBONE = ("large_image", "strided")


def _no_options(name, checkpoint, kwargs):
    if checkpoint is not None or kwargs:
        raise ValueError(f"the {name!r} upsampler takes no checkpoint or options, got "
                         f"{dict(kwargs, **({'checkpoint': checkpoint} if checkpoint else {}))}.")


def build_upsampler(name: str, feature_dim: Optional[int] = None, checkpoint: Optional[str] = None,
                    backbone: Optional[nn.Module] = None, **kwargs) -> nn.Module:
    """Build an upsampler by name.

    Args:
        name: one of :data:`UPSAMPLERS`.
        feature_dim: the backbone's channel count (JAFAR's ``v_dim``; checked against a checkpoint);
            taken from ``backbone.embed_dim`` when omitted.
        checkpoint: weights of a learned upsampler. JAFAR: a ``.pth``/``.safetensors`` path or an
            official release name (``jafar.checkpoint.OFFICIAL_RELEASES``). FeatUp: a checkpoint
            path or a release name of :data:`jafar.baselines.FEATUP_RELEASES` (downloaded when
            online). LiFT: a path. Random initialisation when omitted.
        backbone: the frozen :class:`jafar.Backbone`; required by ``large_image`` and ``strided``,
            ignored by the others.
        kwargs: ``large_image``: ``scale``; ``strided``: ``stride``; ``featup``: ``norm``,
            ``on_missing`` (``"error"`` or ``"random"``: what to do when a release cannot be
            fetched or does not fit); JAFAR: constructor arguments of :class:`jafar.JAFAR` (or
            its runtime options when loading a checkpoint).
    """
    if feature_dim is None and backbone is not None:
        feature_dim = int(backbone.embed_dim)
    if name in Interpolate.modes:
        _no_options(name, checkpoint, kwargs)
        return Interpolate(name)
    if name in NEEDS_BACKBONE:
        if backbone is None:
            raise ValueError(f"the {name!r} upsampler encodes the image again: pass backbone=<the frozen backbone>.")
        if checkpoint is not None:
            raise ValueError(f"the {name!r} upsampler takes no checkpoint, got {checkpoint!r}.")
        return LargeImage(backbone, **kwargs) if name == "large_image" else Strided(backbone, **kwargs)
    if name in ("featup", "lift"):
        if feature_dim is None:
            raise ValueError(f"the {name!r} upsampler needs feature_dim (or backbone).")
        if name == "lift":
            model = LiFT(feature_dim, **kwargs)
            return model.load_weights(checkpoint) if checkpoint is not None else model
        on_missing = kwargs.pop("on_missing", "error")
        if on_missing not in ("error", "random"):
            raise ValueError(f"featup on_missing must be 'error' or 'random', got {on_missing!r}.")
        model = FeatUpJBU(feature_dim, **kwargs)
        if checkpoint is None:
            return model
        try:
            return model.load_release(checkpoint) if checkpoint in FEATUP_RELEASES else model.load_weights(checkpoint)
        except (RuntimeError, ValueError, FileNotFoundError) as exc:
            if on_missing == "error":
                raise
            warnings.warn(f"FeatUp weights {checkpoint!r} not loaded ({exc}); using random weights.", stacklevel=2)
            model.weights_source = f"random init ({checkpoint!r} not loaded: {str(exc).split('; ')[0].rstrip('.')})"
            return model
    if name != "jafar":
        raise ValueError(f"unknown upsampler {name!r}; expected one of {UPSAMPLERS}.")
    if checkpoint is None:
        if feature_dim is not None:
            kwargs.setdefault("v_dim", feature_dim)
            if kwargs["v_dim"] != feature_dim:
                raise ValueError(f"v_dim={kwargs['v_dim']} does not match feature_dim={feature_dim}.")
        return JAFAR(**kwargs)
    from . import checkpoint as ckpt

    if ckpt.RELEASE_ALIASES.get(checkpoint, checkpoint) in ckpt.OFFICIAL_RELEASES:
        return ckpt.from_pretrained(checkpoint, feature_dim=feature_dim, **kwargs)
    return ckpt.load_checkpoint(checkpoint, feature_dim=feature_dim, **kwargs)
