"""One home for weights files: the downloader, the safe reader, and the offline rule.

* :func:`download` fetches a URL into torch's hub cache (``torch.hub.get_dir()/checkpoints``),
  atomically, with a SHA-256 check where the publisher gives one. Offline (the standard
  ``HF_HUB_OFFLINE=1``, as huggingface_hub and timm read it) it fails at once with the file to
  fetch and where to put it; no socket is probed.
* :func:`safe_torch_load` reads a PyTorch file with ``torch.load(weights_only=True)``; every
  non-tensor class its pickle names (OmegaConf's, ``typing.Any``, ...) is replaced by an inert
  placeholder, so no pickled code runs, and modules torch blocks outright make the load fail.
* :func:`read_weights` reads a ``.safetensors`` file (tensors and metadata) or a PyTorch file;
  :func:`read_state_dict` unwraps the nesting of the usual formats into a flat state dict.

The upsamplers' release tables and checkpoint adapters sit beside their code
(``jafar/upsamplers/jafar.py``, ``featup.py``); the backbones' weights come through timm
(Hugging Face hub) or a local file read here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch

from .utils import atomic_path

PathLike = Union[str, os.PathLike]

_TRUE = ("1", "true", "yes", "on")


def offline() -> bool:
    """Whether downloads are switched off: ``HF_HUB_OFFLINE`` (huggingface_hub's variable, which
    timm's downloads follow too) set to a true value."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def cache_path(filename: str, subdir: str = "", cache_dir: Optional[PathLike] = None) -> Path:
    """Where :func:`download` keeps ``filename``: ``cache_dir`` or ``torch.hub.get_dir()/checkpoints``
    (then ``subdir``)."""
    root = Path(cache_dir) if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    return (root / subdir if subdir else root) / filename


def download(url: str, filename: Optional[str] = None, subdir: str = "", cache_dir: Optional[PathLike] = None,
             sha256: Optional[str] = None, what: str = "the file", local_hint: str = "") -> Path:
    """The cached copy of ``url`` (downloaded first if missing). ``sha256``: the publisher's hash
    (or a prefix of it), checked on download. RuntimeError, in one sentence saying which file to
    fetch and where to put it, when offline or when the download fails."""
    path = cache_path(filename or url.rsplit("/", 1)[1], subdir, cache_dir)
    if path.is_file():
        return path
    fix = (f"download {url} on a machine with internet access and copy it to {path}"
           + (f", or {local_hint}" if local_hint else ""))
    if offline():
        raise RuntimeError(f"{what} is not in the cache and HF_HUB_OFFLINE is set: {fix}.")
    try:
        with atomic_path(path) as tmp:
            torch.hub.download_url_to_file(url, str(tmp), hash_prefix=sha256, progress=True)
    except Exception as exc:
        raise RuntimeError(f"could not download {what} ({type(exc).__name__}: {exc}); {fix}.") from None
    return path


def sha256(path: PathLike) -> str:
    """The SHA-256 of a file, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Inert:
    """Placeholder for any class a checkpoint's pickle names: stores its arguments, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def _looks_like_legacy_torch_file(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x80\x02"


def safe_torch_load(path: PathLike, map_location="cpu"):
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


def read_weights(path: PathLike) -> Tuple[object, Dict[str, str]]:
    """``(content, metadata)`` of a weights file: a ``.safetensors`` file gives its tensors and its
    metadata; any other file is read by :func:`safe_torch_load` (metadata ``{}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
        except Exception as exc:
            raise ValueError(f"{str(path)!r} is not a readable safetensors file ({exc}).") from None
    return safe_torch_load(path), {}


def unwrap_state_dict(obj, source: str, nested: Sequence[str] = ("model", "state_dict"),
                      strip_prefix: Optional[str] = "module.") -> Dict[str, torch.Tensor]:
    """The flat state dict inside ``obj``: the first of ``nested`` that holds a dict is unwrapped, and
    ``strip_prefix`` (DataParallel's ``module.``) removed when every key has it."""
    for key in nested:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        keys = list(obj)[:5] if isinstance(obj, dict) else type(obj).__name__
        raise ValueError(f"{source!r} does not hold a state dict of tensors (found {keys}).")
    if strip_prefix and obj and all(k.startswith(strip_prefix) for k in obj):
        obj = {k[len(strip_prefix):]: v for k, v in obj.items()}
    return dict(obj)


def read_state_dict(path: PathLike, nested: Sequence[str] = ("model", "state_dict"),
                    strip_prefix: Optional[str] = "module.") -> Dict[str, torch.Tensor]:
    """A flat state dict from a ``.safetensors`` or PyTorch file (see :func:`unwrap_state_dict`)."""
    content, _ = read_weights(path)
    return unwrap_state_dict(content, str(path), nested, strip_prefix)


def load_into(module: torch.nn.Module, state: Dict[str, torch.Tensor], source: PathLike, what: str) -> None:
    """Load ``state`` into ``module``, every key matching: a shape mismatch, a missing or an
    unexpected key is one ValueError naming the file (``source``) and the model (``what``)."""
    try:
        missing, unexpected = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes
        raise ValueError(f"{str(source)!r} does not fit {what}: {exc}") from None
    if missing or unexpected:
        raise ValueError(f"{str(source)!r} does not fit {what}: missing keys {list(missing)[:4]}, unexpected keys "
                         f"{list(unexpected)[:4]}.")
