"""Every upsampler behind one call, ``upsampler(image, features, output_size)``, and one registry.

One file per upsampler, each registering its factory in :data:`UPSAMPLERS` (``jafar.upsamplers.base``;
the registry imports every module of this package on its first lookup):

* ``jafar.py``: JAFAR (the architecture, its official releases and checkpoint adapter);
* ``interpolate.py``: nearest, bilinear, bicubic (training-free);
* ``reencode.py``: the paper's "Large Image" and "Strided" rows (the backbone again);
* ``featup.py``: FeatUp's JBU stack (and its releases); ``lift.py``: LiFT;
* ``loftup.py``: LoftUp (coordinate queries cross-attend to the features; its releases);
* ``anyup.py``: AnyUp (feature-agnostic windowed attention, any feature width; its releases);
* ``naf.py``: NAF (encoder-agnostic neighbourhood attention, zero-shot for any encoder; its release);
* the task-dependent baselines of the paper's Tables 1-2, pure PyTorch: ``carafe.py`` (MMCV's
  CARAFEPack), ``dysample.py`` (DySample), ``sapa.py`` (SAPA, guided by the image), ``resfu.py``
  (ReSFU as reconstructed from its paper, guided by the image).

:func:`build_upsampler` is the public entry (also ``jafar.build_upsampler``): it takes the
backbone's width from ``backbone`` when ``feature_dim`` is omitted, then calls the registered
factory (:func:`create_upsampler`).
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .base import (
    UPSAMPLERS,
    Upsampler,
    UpsamplerEntry,
    create_upsampler,
    list_upsamplers,
    register_upsampler,
    upsampler_entry,
)
from .featup import FEATUP_RELEASES, FeatUpJBU
from .interpolate import Interpolate
from .jafar import JAFAR
from .lift import LiFT
from .reencode import LargeImage, Strided

__all__ = [
    "UPSAMPLERS", "Upsampler", "UpsamplerEntry", "register_upsampler", "create_upsampler", "list_upsamplers", "upsampler_entry",
    "build_upsampler", "JAFAR", "Interpolate", "LargeImage", "Strided", "FeatUpJBU", "LiFT", "FEATUP_RELEASES",
]


def build_upsampler(name: str, feature_dim: Optional[int] = None, checkpoint: Optional[str] = None,
                    backbone: Optional[nn.Module] = None, **kwargs) -> Upsampler:
    """Build an upsampler by its registered name (:func:`list_upsamplers`).

    Args:
        name: ``"jafar"``, ``"nearest"``, ``"bilinear"``, ``"bicubic"``, ``"large_image"``,
            ``"strided"``, ``"featup"``, ``"lift"``, or any name registered since.
        feature_dim: the backbone's channel count (JAFAR's ``v_dim``; checked against a
            checkpoint); taken from ``backbone.embed_dim`` when omitted.
        checkpoint: weights of a learned upsampler: a file or a release name (see each
            upsampler's factory); random initialisation when omitted.
        backbone: the frozen :class:`jafar.Backbone`; required by ``large_image`` and
            ``strided``, ignored by the others.
        kwargs: the upsampler's own options (``large_image``: ``scale``; ``strided``:
            ``stride``; ``featup``: ``norm``, ``on_missing``; ``jafar``: constructor arguments of
            :class:`JAFAR`, or its runtime options when loading a checkpoint).
    """
    if feature_dim is None and backbone is not None:
        feature_dim = int(backbone.embed_dim)
    return create_upsampler(name, feature_dim=feature_dim, checkpoint=checkpoint, backbone=backbone, **kwargs)
