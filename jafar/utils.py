"""Small shared helpers that import nothing of the package: atomic file writes, used by every
module that writes a file; :func:`derive_seed`, the seed of every per-step draw; and
:func:`autocast_dtype`, which the layers and the kernels both ask. The tools' shared run
machinery is :mod:`jafar.runs`."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch


def _read_umask() -> int:
    """The process umask, read once at import (``os.umask`` sets it, so it is set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path`` (atomic on
    POSIX), on failure removed. Readers never see a half-written file. The file gets the mode a
    plain ``open()`` gives (``0o666`` less the umask read at import), not mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        if os.path.exists(tmp):  # mkstemp makes 0600; give the file what a plain open() would
            os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def derive_seed(*values: int) -> int:
    """A 63-bit seed from integers (SplitMix64 finaliser), stable across processes and runs:
    the seed of one random draw, e.g. ``derive_seed(seed, step, stream)``."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
        x = (x * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & 0x7FFFFFFFFFFFFFFF


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives a half-precision op's output on ``x``'s device (``x.dtype`` when
    autocast is off or ``x`` is not a float32/bf16/fp16 tensor)."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
