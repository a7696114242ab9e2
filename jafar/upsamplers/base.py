"""The one upsampler interface and its registry.

Every upsampler is an :class:`Upsampler`: ``upsampler(image, features, output_size) -> (B, C,
H_out, W_out)``, where ``image`` is the normalised guidance image ``(B, 3, H, W)`` (the image the
backbone was given), ``features`` the backbone's ``(B, C, h, w)`` patch grid and
``output_size`` any pair of positive ints; :meth:`Upsampler.describe` is its one-line note for
result tables.

Upsamplers register a factory under a name (:func:`register_upsampler`, into :data:`UPSAMPLERS`),
as timm registers models; :func:`create_upsampler` builds one by name and :func:`list_upsamplers`
lists them. Adding an upsampler is one file in this package (a class, a factory, its release table
and checkpoint adapter if it has weights; the registry imports every module of the package) and
one yaml in ``configs/upsampler/``.
"""

from __future__ import annotations

import dataclasses
import operator
import warnings
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import torch
from torch import nn

from ..registry import Registry


class Upsampler(nn.Module):
    """Base class: ``forward(image, features, output_size)`` and a one-line :meth:`describe`."""

    #: where the weights came from (``"random init"``, a path, a release); learned upsamplers set it
    weights_source: str = "training-free"

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def describe(self) -> str:
        """One line for result tables: what this upsampler is and where its weights come from."""
        return f"{type(self).__name__} ({self.weights_source})."


@dataclasses.dataclass(frozen=True)
class UpsamplerEntry:
    """What :data:`UPSAMPLERS` holds for one name: the factory and what it needs."""

    name: str
    factory: Callable[..., Upsampler]
    #: the upsampler encodes the image again, so it needs ``backbone=``
    needs_backbone: bool = False
    summary: str = ""

    def __call__(self, **kwargs) -> Upsampler:
        if self.needs_backbone and kwargs.get("backbone") is None:
            raise ValueError(f"the {self.name!r} upsampler encodes the image again: pass backbone=<the frozen "
                             f"backbone>.")
        return self.factory(**kwargs)


#: every upsampler, by name: each module of this package registers its own on import
#: (:class:`jafar.registry.Registry` imports them all on the first lookup)
UPSAMPLERS = Registry("upsampler", package="jafar.upsamplers", key="upsampler")


def register_upsampler(name: str, needs_backbone: bool = False, summary: str = ""):
    """Decorator: register ``factory(feature_dim=None, checkpoint=None, backbone=None, **options)``
    under ``name`` in :data:`UPSAMPLERS`. The factory refuses options it does not take, in one
    sentence."""

    def wrap(factory):
        UPSAMPLERS.register(name, UpsamplerEntry(name, factory, needs_backbone, summary))
        return factory

    return wrap


def list_upsamplers() -> List[str]:
    """Registered upsampler names (:meth:`jafar.registry.Registry.list`)."""
    return UPSAMPLERS.list()


def upsampler_entry(name: str) -> UpsamplerEntry:
    return UPSAMPLERS.get(name)


def create_upsampler(name: str, **kwargs) -> Upsampler:
    """Build the upsampler registered as ``name`` with its factory's arguments
    (``feature_dim``, ``checkpoint``, ``backbone`` and the upsampler's own options)."""
    return UPSAMPLERS.build(name, **kwargs)


# ---------------------------------------------------------------------------------------------
# input checks shared by the upsamplers: one sentence before any work
# ---------------------------------------------------------------------------------------------


def _as_int(x):
    """``x`` as a Python int if it is an integer (Python, numpy or a 0-d integer tensor), else None."""
    if isinstance(x, bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def check_output_size(output_size) -> Tuple[int, int]:
    """``(H_out, W_out)`` as Python ints; numpy integers are accepted. One sentence otherwise."""
    ok = isinstance(output_size, (Sequence, torch.Size)) and not isinstance(output_size, str) and len(output_size) == 2
    values = [_as_int(s) for s in output_size] if ok else []
    if not ok or any(v is None or v <= 0 for v in values):
        shown = (f"{output_size!r} ({', '.join(type(s).__name__ for s in output_size)})"
                 if ok else f"{output_size!r} ({type(output_size).__name__})")
        raise ValueError(f"output_size must be a pair of positive ints (H_out, W_out), got {shown}.")
    return values[0], values[1]


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def check_features(features) -> None:
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        raise ValueError(f"features must be a (B, C, h, w) tensor, got {_shape(features)}.")


def check_image(image, features) -> None:
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[0] != features.shape[0]:
        raise ValueError(f"image must be a (B, 3, H, W) tensor with the batch of the features "
                         f"{tuple(features.shape)}, got {_shape(image)}.")


def no_options(name: str, checkpoint, options: dict) -> None:
    """Refuse a checkpoint or options given to an upsampler that takes none."""
    if checkpoint is not None or options:
        given = dict(options, **({"checkpoint": checkpoint} if checkpoint is not None else {}))
        raise ValueError(f"the {name!r} upsampler takes no checkpoint or options, got {given}.")


class LearnedUpsampler(Upsampler):
    """An upsampler with weights, built for one feature width ``feature_dim``: the width check
    (:meth:`check_width`, one sentence naming the class's ``label``) and :meth:`load_weights`
    (a state dict of the module, optionally under ``state_dict`` and with ``module.`` prefixes,
    read without running pickled code)."""

    feature_dim: int
    #: how the messages name the upsampler
    label: str = "upsampler"
    weights_source = "random init"

    def check_width(self, features: torch.Tensor) -> None:
        if features.shape[1] != self.feature_dim:
            raise ValueError(f"{self.label} built for {self.feature_dim}-channel features got {features.shape[1]}.")

    @classmethod
    def create(cls, name: str, feature_dim, checkpoint, **options):
        """What a registered factory does: refuse a missing ``feature_dim`` in one sentence, build
        ``cls(feature_dim, **options)``, load ``checkpoint`` when given."""
        if feature_dim is None:
            raise ValueError(f"the {name!r} upsampler needs feature_dim (or backbone).")
        model = cls(feature_dim, **options)
        return model.load_weights(checkpoint) if checkpoint is not None else model

    def load_weights(self, path):
        """Load a state dict of this module (upstream's where the parameter names follow it)."""
        from .. import hub

        state = hub.read_state_dict(path, nested=("state_dict",), strip_prefix="module.")
        hub.load_into(self, state, path, f"{type(self).__name__}(feature_dim={self.feature_dim})")
        self.weights_source = str(path)
        return self


class StackedUpsampler(LearnedUpsampler):
    """The task-dependent upsamplers as the paper's appendix A.2 stacks them: the modules in
    ``self.stages`` applied in turn (each ``stage(x)``, or ``stage(image, x)`` when ``guided``),
    then bilinear (``align_corners=False``) to the output size when it differs."""

    guided: bool = False
    stages: nn.ModuleList

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        size = check_output_size(output_size)
        check_features(features)
        if self.guided:
            check_image(image, features)
            image = image.to(features.dtype)
        self.check_width(features)
        x = features
        for stage in self.stages:
            x = stage(image, x) if self.guided else stage(x)
        if tuple(x.shape[-2:]) != size:
            x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x


#: what a learned upsampler whose weights cannot be loaded does (``on_missing``)
ON_MISSING = ("error", "random")


def check_on_missing(name: str, on_missing: str) -> None:
    if on_missing not in ON_MISSING:
        raise ValueError(f"{name} on_missing must be 'error' or 'random', got {on_missing!r}.")


def load_or_random(model: "LearnedUpsampler", checkpoint, load, on_missing: str, label: str):
    """``load()`` (which loads ``checkpoint`` into ``model`` and returns it); when it fails and
    ``on_missing == "random"``, ``model`` with its random weights, a warning, and ``weights_source``
    saying what was not loaded (the table's note)."""
    try:
        return load()
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        if on_missing == "error":
            raise
        warnings.warn(f"{label} weights {checkpoint!r} not loaded ({exc}); using random weights.", stacklevel=3)
        model.weights_source = f"random init ({checkpoint!r} not loaded: {str(exc).split('; ')[0].rstrip('.')})"
        return model


def load_file_or_release(model: "LearnedUpsampler", checkpoint, find_release, on_missing: str, label: str):
    """``checkpoint`` into ``model``: a release name (``find_release(checkpoint)`` gives its key, and
    no file of that name exists) through ``model.load_release``, else a file through
    ``model.load_weights``; ``on_missing`` as :func:`load_or_random`."""
    def load():
        key = find_release(checkpoint)
        if key is not None and not Path(str(checkpoint)).is_file():
            return model.load_release(key)
        return model.load_weights(checkpoint)

    return load_or_random(model, checkpoint, load, on_missing, label)


def fetch_release(name, find_release, releases: dict, label: str, subdir: str, filename=None, cache_dir=None):
    """``(key, release, path)`` of the release named ``name`` (one of ``releases``, found by
    ``find_release``; an unknown name is refused in one sentence), downloaded into torch's hub cache
    (RuntimeError with what to do when offline). ``filename``: the cached file's name (default the
    release's ``filename``)."""
    from .. import hub

    key = find_release(name)
    if key is None:
        raise ValueError(f"no {label} release named {name!r}; known: {', '.join(releases)}.")
    release = releases[key]
    path = hub.download(release.url, filename=filename or release.filename, subdir=subdir, cache_dir=cache_dir,
                        what=f"{label}'s {key!r} weights", local_hint="pass its path as checkpoint=...")
    return key, release, path

