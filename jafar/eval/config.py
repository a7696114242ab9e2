"""The schema of ``configs/eval_2d.yaml`` (Hydra structured config): the top-level keys and their
types, so that Hydra refuses a misspelt key or a wrong type before any work. The task node differs
per task (``task/``); each task checks its own keys (``jafar.eval.run.Task.check``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig

from .. import runs

ROOT = "eval_2d"


@dataclass
class Eval2dConfig:
    name: str = MISSING
    seed: int = MISSING
    resume: Optional[str] = MISSING
    data_root: str = MISSING
    compare: List[str] = MISSING  # the table's rows: keys of upsamplers
    labels: Dict[str, str] = field(default_factory=dict)
    backbone: Dict[str, Any] = field(default_factory=dict)
    dataset: Dict[str, Any] = field(default_factory=dict)  # every data set, by key (dataset/<name>.yaml)
    upsamplers: Dict[str, Any] = field(default_factory=dict)  # every row, by key (upsampler/<name>.yaml)
    task: Dict[str, Any] = field(default_factory=dict)  # task/<name>.yaml
    per_task: Dict[str, Any] = field(default_factory=dict)
    trainer: Dict[str, Any] = field(default_factory=dict)  # lightning.Trainer arguments (names checked by the run)


def register_configs() -> None:
    """The schema and the 2-D evaluation experiments (``experiment=demo``), for Hydra."""
    runs.register_configs(ROOT, Eval2dConfig)


def apply_per_task(cfg: DictConfig, overrides=()) -> DictConfig:
    """The experiment's settings for the chosen task (``per_task.<task.name>``) merged in, under
    the command line's ``overrides``."""
    return runs.apply_per_choice(cfg, "per_task", str(cfg.task.name), overrides)


def compose(*overrides: str) -> DictConfig:
    """``configs/eval_2d.yaml`` with command-line ``overrides``, as ``tools/eval_2d.py`` runs it."""
    register_configs()
    return apply_per_task(runs.compose(ROOT, overrides), overrides)
