"""One constructor for every upsampler that shares the call ``(image, features, output_size)``."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .baselines import Interpolate
from .model import JAFAR

UPSAMPLERS = ("nearest", "bilinear", "bicubic", "jafar")


def build_upsampler(name: str, feature_dim: Optional[int] = None, checkpoint: Optional[str] = None,
                    **kwargs) -> nn.Module:
    """Build an upsampler by name.

    Args:
        name: ``"nearest"``, ``"bilinear"``, ``"bicubic"`` or ``"jafar"``.
        feature_dim: the backbone's channel count (JAFAR's ``v_dim``; checked against a checkpoint).
        checkpoint: for JAFAR, a ``.pth``/``.safetensors`` path or an official release name
            (``jafar.checkpoint.OFFICIAL_RELEASES``); random initialisation when omitted.
        kwargs: constructor arguments of :class:`jafar.JAFAR` (or its runtime options when
            loading a checkpoint).
    """
    if name in Interpolate.modes:
        if checkpoint is not None or kwargs:
            raise ValueError(f"the {name!r} upsampler takes no checkpoint or options, got "
                             f"{dict(kwargs, **({'checkpoint': checkpoint} if checkpoint else {}))}.")
        return Interpolate(name)
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
