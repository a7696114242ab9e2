"""The paper's 2-D evaluations as tasks, one module per task, each registering a :class:`Task` in
:data:`TASKS` (``task.name`` in the config; the registry imports every module of this package):
``probe`` (``seg``, ``depth``: linear probes, :mod:`jafar.eval.probes`), ``cam`` (Grad-CAM
faithfulness, :mod:`jafar.eval.cam`), ``ovseg`` (MaskCLIP open-vocabulary segmentation,
:mod:`jafar.eval.ovseg`). A task declares the metric columns of its table and evaluates one
(data set, upsampler) pair; :func:`jafar.eval.run.run` does the rest. Adding a task is one module
here and one yaml in ``configs/task/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from ...registry import Registry
from ..report import Column


@dataclass
class EvalContext:
    """What a task needs besides the pair it evaluates."""

    cfg: DictConfig
    run_dir: Path
    backbone: torch.nn.Module
    resume: bool = True
    extras: dict = field(default_factory=dict)
    #: the configuration of each (data set key, row) pair (recorded in its probe checkpoints)
    pair_configs: dict = field(default_factory=dict)


@dataclass
class DatasetSplits:
    key: str
    title: str
    train: Optional[Dataset]
    val: Dataset
    num_classes: Optional[int]
    class_names: Optional[Sequence[str]]
    info: dict
    #: this data set's probe epochs (``dataset.<key>.epochs``), None: the task's ``probe.epochs``
    epochs: Optional[int] = None


def trains_with_probe(cfg: DictConfig, row: str) -> bool:
    """Whether row ``row`` trains its upsampler with the task (``upsamplers.<row>.train_with_probe``:
    the paper's task-dependent rows, section 4.3) rather than using it frozen."""
    return bool(cfg.upsamplers[row].get("train_with_probe", False))


class Task:
    """One of the paper's 2-D evaluations.

    Attributes: ``name`` (``task.name``), ``title`` (the table's heading), ``columns`` (metric
    columns of the table, per data set), ``picture_kind`` (``"seg"`` or ``"depth"``: how
    :func:`jafar.eval.report.prediction_grid` paints targets and predictions), ``needs_train``
    (whether the training split is read), ``trains_upsamplers`` (whether rows with
    ``train_with_probe`` are trained by the task).
    """

    name: str = ""
    title: str = ""
    columns: Sequence[Column] = ()
    picture_kind: str = "seg"
    target_title: str = "ground truth"
    needs_train: bool = True
    trains_upsamplers: bool = False

    def check(self, cfg: DictConfig) -> None:
        """Refuse bad task settings before any work (one sentence naming the key)."""

    def table_notes(self, ctx: "EvalContext") -> List[str]:
        """Lines added under the table (e.g. what the run's weights are)."""
        return []

    def evaluate(self, ctx: EvalContext, data: DatasetSplits, row: str, upsampler: torch.nn.Module,
                 out_dir: Path) -> dict:
        """Evaluate ``upsampler`` on ``data``; return ``{"metrics": {...}, "pictures": [...], ...}``
        (pictures: ``[{"index", "name", "image", "target", "prediction"}]``, CPU tensors)."""
        raise NotImplementedError


#: every evaluation task, by name (``task.name``): each module of this package registers its own
TASKS = Registry("evaluation task", package="jafar.eval.tasks", key="task.name")


def register_task(task: Task) -> Task:
    """Register the :class:`Task` instance ``task`` under ``task.name`` in :data:`TASKS`."""
    if not task.name:
        raise ValueError("a task needs a name.")
    TASKS.register(task.name, task)
    return task


def get_task(name: str) -> Task:
    """The task registered as ``name``; an unknown name is refused in one sentence."""
    return TASKS.get(name)


def eval_device(cfg: DictConfig) -> torch.device:
    """The device of the training-free tasks (cam, ovseg), which run outside a Lightning trainer:
    CUDA when ``trainer.accelerator`` allows it (auto, gpu, cuda) and one is present, else the CPU."""
    acc = str(cfg.trainer.get("accelerator", "auto"))
    if acc in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def picture_indices(n: int, k: int) -> List[int]:
    """``k`` fixed validation indices spread evenly over ``n`` images."""
    k = min(max(int(k), 0), n)
    if k == 0:
        return []
    if k == 1:
        return [0]
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})
