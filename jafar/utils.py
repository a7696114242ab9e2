"""Small shared helpers."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

#: the project's Hydra config folder (``configs/`` beside the package, as in a source checkout)
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


@contextmanager
def atomic_path(path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path`` (atomic on
    POSIX), on failure removed. Readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def register_config_resolvers() -> None:
    """Register ``${jafar_configs:}``: the project's ``configs/`` folder. A tool whose root config
    lives in a sub-folder (``configs/bev/``, ``configs/eval/``) adds it to ``hydra.searchpath`` to
    reach the shared groups (``backbone/``, ``upsampler/``). Call before Hydra composes."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("jafar_configs", lambda: str(CONFIG_DIR), replace=True)
