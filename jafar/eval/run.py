"""Compose a 2-D evaluation from a Hydra config (``configs/eval_2d.yaml``): one task, the data
sets of its table, one row per upsampler; ``results.json``, ``table.md`` and pictures.

Entry point: ``tools/eval_2d.py`` (schema in :mod:`jafar.eval.config`). A task is a
:class:`Task` registered in :data:`TASKS` by name (``task.name`` in the config): it declares the
metric columns of its table and evaluates one (data set, upsampler) pair. ``seg`` and ``depth`` (linear probes, :mod:`jafar.eval.probes`)
are defined here; a new task (``cam``, ``ovseg``) subclasses :class:`Task`, calls
:func:`register_task` in its own module, and lists that module in :data:`TASK_MODULES`.

Outputs under the run directory (``outputs/eval/<name>``):

* ``results.json``: ``{"task", "backbone", "datasets": {key: info}, "upsamplers": {key: info},
  "results": {dataset: {upsampler: metrics}}}``, rewritten after every pair;
* ``table.md``: the paper-style table (rows: upsamplers; columns: metrics per data set);
* ``pictures/<dataset>.png``: a few fixed validation images, ground truth and every row's
  prediction;
* ``<dataset>/<upsampler>/``: that pair's ``result.json``, ``run_config.json``, CSV/TensorBoard
  logs and probe checkpoints. Rerunning the same command reuses finished pairs and resumes an
  unfinished probe from its last epoch (``resume=auto``); new rows and data sets are added.

A run directory belongs to one configuration (:mod:`jafar.runs`): the settings shared by every pair
(``run_config.json``) and each pair's own (its data set and upsampler, ``<dataset>/<upsampler>/
run_config.json``). Another configuration there is refused before any work, in one sentence naming
the differing keys (a new ``name=``, or ``resume=null`` to redo the pairs).
"""

from __future__ import annotations

import gc
import importlib
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, Subset

from .. import runs
from .config import apply_per_task, register_configs
from .report import Column, markdown_table, prediction_grid, write_text

log = logging.getLogger(__name__)

#: data-set config keys read by this module (the rest goes to the data set's constructor)
_DATASET_KEYS = ("name", "prepare", "prepare_args", "train_split", "val_split", "max_train_images",
                 "max_val_images", "num_classes", "epochs")
#: upsampler config keys read by this module
_UPSAMPLER_KEYS = ("pretrain_if_missing",)
#: keys that do not change an evaluation's numbers (besides :data:`jafar.runs.NOT_IDENTITY`): where
#: the data are, row labels, pictures, loading, how a missing checkpoint is obtained
NOT_IDENTITY = ("data_root", "dataset.*.root", "labels", "task.pictures", "task.num_workers", "task.probe.num_workers",
                "task.probe.pin_memory", "upsamplers.*.pretrain_if_missing")
#: the checkpoint the 2-D demo expects (configs/experiment/eval_2d/demo.yaml), the only one
#: ``pretrain_if_missing: demo`` trains when it is missing
DEMO_CHECKPOINT = "outputs/pretrain/demo/jafar.safetensors"
#: lightning.Trainer arguments the run sets itself
TRAINER_RESERVED = ("max_epochs", "callbacks", "logger", "plugins", "default_root_dir", "enable_checkpointing")


# ---------------------------------------------------------------------------------------------
# tasks
# ---------------------------------------------------------------------------------------------


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


class Task:
    """One of the paper's 2-D evaluations.

    Attributes: ``name`` (``task.name``), ``title`` (the table's heading), ``columns`` (metric
    columns of the table, per data set), ``picture_kind`` (``"seg"`` or ``"depth"``: how
    :func:`jafar.eval.report.prediction_grid` paints targets and predictions), ``needs_train``
    (whether the training split is read).
    """

    name: str = ""
    title: str = ""
    columns: Sequence[Column] = ()
    picture_kind: str = "seg"
    target_title: str = "ground truth"
    needs_train: bool = True

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


TASKS: Dict[str, Task] = {}
#: modules imported to register more tasks (e.g. ``"jafar.eval.cam"``); missing ones are skipped
TASK_MODULES: List[str] = ["jafar.eval.cam", "jafar.eval.ovseg"]


def register_task(task: Task) -> Task:
    if not task.name:
        raise ValueError("a task needs a name.")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    for module in TASK_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            pass
    if name not in TASKS:
        raise ValueError(f"task.name={name!r} is not a known task; expected one of {sorted(TASKS)}.")
    return TASKS[name]


class ProbeTask(Task):
    """A linear probe trained on the training split and scored on the validation split."""

    @staticmethod
    def epochs(cfg: DictConfig, data: DatasetSplits) -> int:
        """The probe's epochs on ``data``: the data set's own ``epochs`` (the paper: 5 on COCO-Stuff,
        ``configs/dataset/coco.yaml``), else the task's ``probe.epochs``."""
        return int(data.epochs) if data.epochs is not None else int(cfg.task.probe.epochs)

    def probe_kwargs(self, ctx: EvalContext, data: DatasetSplits) -> dict:
        t = ctx.cfg.task
        p = t.probe
        return dict(target_size=int(t.target_size or t.image_size), lr=float(p.lr), betas=tuple(p.betas),
                    weight_decay=float(p.weight_decay), epochs=self.epochs(ctx.cfg, data),
                    scheduler=str(p.scheduler), hflip=float(p.hflip), normalize_input=bool(t.normalize_input),
                    seed=int(ctx.cfg.seed), picture_indices=picture_indices(len(data.val), int(t.pictures)),
                    cache_features=bool(p.get("cache_features", False)))

    def build_probe(self, ctx: EvalContext, data: DatasetSplits, upsampler, feature_dim: int):
        raise NotImplementedError

    def check(self, cfg: DictConfig) -> None:
        p = cfg.task.probe
        if int(p.epochs) < 1:
            raise ValueError(f"task.probe.epochs must be a positive integer, got {p.epochs}.")
        if int(p.batch_size) < 1 or int(p.val_batch_size) < 1:
            raise ValueError(f"task.probe.batch_size and val_batch_size must be positive, got "
                             f"{p.batch_size}, {p.val_batch_size}.")
        from .probes import SCHEDULERS

        if str(p.scheduler) not in SCHEDULERS:
            raise ValueError(f"task.probe.scheduler must be official (the official code: T_max=epochs stepped per "
                             f"batch), naf (T_max=all steps, per batch) or per_epoch, got {p.scheduler!r}.")
        if not isinstance(cfg.task.get("normalize_input"), bool):
            raise ValueError(f"task.normalize_input must be true (the backbone's mean/std) or false (the image in "
                             f"[0, 1], the official depth run), got {cfg.task.get('normalize_input')!r}.")
        for key in cfg.task.datasets:
            e = cfg.dataset.get(key, {}).get("epochs")
            if e is not None and (not isinstance(e, int) or isinstance(e, bool) or e < 1):
                raise ValueError(f"dataset.{key}.epochs must be a positive integer or null (the task's "
                                 f"probe.epochs), got {e!r}.")
        if not 0 <= float(p.hflip) <= 1:
            raise ValueError(f"task.probe.hflip must be a probability, got {p.hflip}.")
        if not float(p.lr) > 0:
            raise ValueError(f"task.probe.lr must be positive, got {p.lr}.")

    def evaluate(self, ctx, data, row, upsampler, out_dir):
        cfg, p = ctx.cfg, ctx.cfg.task.probe
        epochs = self.epochs(cfg, data)
        feature_dim = int(ctx.backbone.embed_dim)
        module = self.build_probe(ctx, data, upsampler, feature_dim)
        from .probes import EpochShuffleSampler

        workers = int(p.num_workers)
        loader_kw = dict(num_workers=workers, pin_memory=bool(p.get("pin_memory", False)), persistent_workers=False)
        train = DataLoader(data.train, batch_size=int(p.batch_size), sampler=EpochShuffleSampler(len(data.train), cfg.seed),
                           drop_last=False, **loader_kw)
        val = DataLoader(data.val, batch_size=int(p.val_batch_size), shuffle=False, **loader_kw)
        ckpt_dir = out_dir / "checkpoints"
        last = ckpt_dir / "last.ckpt"
        trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
        fit_kwargs = {**trainer_kwargs, "limit_val_batches": 0, "num_sanity_val_steps": 0}  # scored once, after
        trainer = runs.make_trainer(out_dir, fit_kwargs, checkpointing=runs.epoch_checkpoints(ckpt_dir),
                                    run_config=ctx.pair_configs.get((data.key, row)), max_epochs=epochs)
        start = time.time()
        with runs.quiet_lightning(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*validation_step` but have no `val_dataloader.*")  # scored after
            trainer.fit(module, train_dataloaders=train,
                        ckpt_path=str(last) if (ctx.resume and last.is_file()) else None)
            fit_s = time.time() - start
            val_trainer = runs.make_trainer(out_dir, trainer_kwargs, log=False)
            val_trainer.validate(module, dataloaders=val, verbose=False)
        module._cache.clear()  # the cached features of this pair are not needed any more
        return {"metrics": module.val_results, "pictures": module.pictures, "train_seconds": round(fit_s, 1),
                "seconds": round(time.time() - start, 1), "epochs": epochs,
                "train_images": len(data.train), "val_images": len(data.val)}


class SegTask(ProbeTask):
    name = "seg"
    title = "Semantic segmentation (linear probe)"
    columns = (Column("miou", "mIoU", True, 100.0, 2), Column("accuracy", "Acc.", True, 100.0, 2))
    picture_kind = "seg"

    def build_probe(self, ctx, data, upsampler, feature_dim):
        from .probes import SegmentationProbe

        if not data.num_classes:
            raise ValueError(f"dataset.{data.key}.num_classes must be set for task=seg.")
        return SegmentationProbe(ctx.backbone, upsampler, num_classes=int(data.num_classes), feature_dim=feature_dim,
                                 **self.probe_kwargs(ctx, data))


class DepthTask(ProbeTask):
    name = "depth"
    title = "Depth estimation (linear probe)"
    columns = (Column("d1", "δ1", True, 100.0, 2), Column("rmse", "RMSE", False, 1.0, 3))
    picture_kind = "depth"

    def check(self, cfg):
        super().check(cfg)
        t = cfg.task
        if not 0 <= float(t.min_depth) < float(t.max_depth):
            raise ValueError(f"task.min_depth and task.max_depth must satisfy 0 <= min < max, got "
                             f"{t.min_depth}, {t.max_depth}.")
        if str(t.global_token) not in ("cls", "mean", "none"):
            raise ValueError(f"task.global_token must be cls, mean or none, got {t.global_token!r}.")
        if t.get("pseudo_labels") not in (None, "auto", "depth_anything"):
            raise ValueError(f"task.pseudo_labels must be auto, depth_anything or null (the data set's depth maps), "
                             f"got {t.pseudo_labels!r}.")

    @staticmethod
    def has_depth(data: DatasetSplits) -> bool:
        base = [d.dataset if isinstance(d, Subset) else d for d in (data.train, data.val) if d is not None]
        return all(all(p is not None for _, p in getattr(d, "items", [(None, None)])) for d in base)

    def labeler(self, ctx, data: DatasetSplits):
        t = ctx.cfg.task
        mode = t.get("pseudo_labels")
        if mode is None or (mode == "auto" and self.has_depth(data)):
            return None
        if "labeler" not in ctx.extras:
            from .pseudo_depth import DepthAnythingLabeler

            ctx.extras["labeler"] = DepthAnythingLabeler(str(t.pseudo_model))
        return ctx.extras["labeler"]

    def build_probe(self, ctx, data, upsampler, feature_dim):
        from .probes import DepthProbe

        t = ctx.cfg.task
        return DepthProbe(ctx.backbone, upsampler, min_depth=float(t.min_depth), max_depth=float(t.max_depth),
                          bins=int(t.bins), global_token=str(t.global_token), gradient_weight=float(t.gradient_weight),
                          warm_up_steps=int(t.warm_up_steps), pseudo_labeler=self.labeler(ctx, data),
                          feature_dim=feature_dim, **self.probe_kwargs(ctx, data))


register_task(SegTask())
register_task(DepthTask())


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


# ---------------------------------------------------------------------------------------------
# data sets and upsamplers from the config
# ---------------------------------------------------------------------------------------------


def _abs(path) -> str:
    """A path relative to the directory the command was started from (Hydra keeps it)."""
    try:
        from hydra.utils import to_absolute_path

        return to_absolute_path(str(path))
    except ValueError:  # outside a Hydra run
        return str(Path(path).resolve())


def build_datasets(cfg: DictConfig, key: str, task: Task) -> DatasetSplits:
    if key not in cfg.dataset:
        raise ValueError(f"task.datasets names {key!r}, which is not under dataset: (known: {sorted(cfg.dataset)}).")
    dcfg = OmegaConf.to_container(cfg.dataset[key], resolve=True)
    extra = {k: dcfg.pop(k, None) for k in _DATASET_KEYS}
    if "root" in dcfg and dcfg["root"] is not None:
        dcfg["root"] = _abs(dcfg["root"])
    if extra["prepare"]:
        from .demo_data import prepare

        prepare(extra["prepare"], dcfg["root"], **(extra["prepare_args"] or {}))
    t = cfg.task
    size = dict(image_size=int(t.image_size), target_size=int(t.target_size or t.image_size))
    if extra["num_classes"] is not None:
        size["num_classes"] = int(extra["num_classes"])
    if task.name == "depth" and dcfg.get("_target_", "").endswith("DepthFolder"):
        dcfg.setdefault("depth_required", t.get("pseudo_labels") is None)  # auto: images without maps are pseudo-labelled
    val = instantiate(dcfg, split=extra["val_split"] or "val", **size)
    train = instantiate(dcfg, split=extra["train_split"] or "train", **size) if task.needs_train else None
    if extra["max_val_images"]:
        val = Subset(val, range(min(len(val), int(extra["max_val_images"]))))
    if train is not None and extra["max_train_images"]:
        train = Subset(train, range(min(len(train), int(extra["max_train_images"]))))
    base = val.dataset if isinstance(val, Subset) else val
    info = {"name": extra["name"] or key, "train_images": len(train) if train is not None else 0,
            "val_images": len(val), "num_classes": extra["num_classes"]}
    if extra["epochs"] is not None and task.needs_train:
        info["epochs"] = int(extra["epochs"])
    return DatasetSplits(key, extra["name"] or key, train, val, extra["num_classes"],
                         getattr(base, "class_names", None), info,
                         None if extra["epochs"] is None else int(extra["epochs"]))


def _run_pretraining_demo(checkpoint: Path) -> None:
    """The pretraining demo (``tools/pretrain_jafar.py experiment=demo``), run here with its run
    directory where ``checkpoint`` is expected (so the file lands there). This process's random
    streams are left as they were (the evaluation's numbers do not depend on whether the
    checkpoint had to be trained)."""
    if checkpoint.name != "jafar.safetensors":
        raise ValueError(f"pretrain_if_missing writes <run dir>/jafar.safetensors; the checkpoint is {str(checkpoint)!r}.")
    from ..train import config as pretrain_config
    from ..train.run import run as pretrain

    run_dir = checkpoint.parent
    cfg = pretrain_config.compose("experiment=demo", f"data.root={run_dir / 'photos'}")
    register_configs()  # the evaluation's configs again
    log.info("JAFAR checkpoint %s is missing: training it with the pretraining demo (experiment=demo) in %s",
             checkpoint, run_dir)
    with runs.preserved_rng():
        pretrain(cfg, run_dir)
    if not checkpoint.is_file():
        raise RuntimeError(f"the pretraining demo did not write {checkpoint}.")


def row_checkpoint(cfg: DictConfig, row: str) -> Optional[str]:
    """The absolute checkpoint file of row ``row`` (None when it names no file). A missing file
    is refused in one sentence, unless it is the demo's own (:data:`DEMO_CHECKPOINT`) with
    ``pretrain_if_missing: demo``: a mistyped path never starts a pretraining."""
    node = cfg.upsamplers[row]
    ckpt = node.get("checkpoint")
    if not (isinstance(ckpt, str) and (Path(ckpt).suffix in (".pth", ".pt", ".safetensors", ".ckpt") or "/" in ckpt)):
        return None
    ckpt = _abs(ckpt)
    if not Path(ckpt).is_file():
        demo = node.get("pretrain_if_missing") == "demo"
        if demo and Path(ckpt) == Path(_abs(DEMO_CHECKPOINT)):
            return ckpt
        why = f" (pretrain_if_missing=demo trains only the demo's own {DEMO_CHECKPOINT})" if demo else ""
        raise FileNotFoundError(f"upsamplers.{row}.checkpoint {ckpt!r} does not exist{why}.")
    return ckpt


def build_upsampler_row(cfg: DictConfig, row: str, backbone) -> Tuple[torch.nn.Module, dict]:
    """The upsampler of table row ``row`` (``upsamplers.<row>``) and its description."""
    if row not in cfg.upsamplers:
        raise ValueError(f"compare lists {row!r}, which is not under upsamplers: (known: {sorted(cfg.upsamplers)}).")
    ucfg = OmegaConf.to_container(cfg.upsamplers[row], resolve=True)
    extra = {k: ucfg.pop(k, None) for k in _UPSAMPLER_KEYS}
    target = ucfg.pop("_target_", "jafar.build_upsampler")
    ckpt = row_checkpoint(cfg, row)
    if ckpt is not None:
        ucfg["checkpoint"] = ckpt
        if not Path(ckpt).is_file():  # row_checkpoint refused every other missing file
            _run_pretraining_demo(Path(ckpt))
    module = get_method(target)(backbone=backbone, **ucfg)
    label = str(cfg.get("labels", {}).get(row, row))
    info = {"label": label, "name": ucfg.get("name", row), "note": module.describe()}
    return module, info


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


def run_config(cfg: DictConfig) -> dict:
    """What every pair of a run shares (:func:`jafar.runs.result_config`): all but the rows and
    data sets chosen and their own settings."""
    return runs.result_config(cfg, NOT_IDENTITY + ("compare", "task.datasets", "dataset", "upsamplers"))


def pair_config(cfg: DictConfig, key: str, row: str) -> dict:
    """The configuration of the pair (data set ``key``, row ``row``): the shared settings, that
    data set's and that upsampler's."""
    others = [f"dataset.{k}" for k in cfg.dataset if k != key] + [f"upsamplers.{r}" for r in cfg.upsamplers if r != row]
    return runs.result_config(cfg, NOT_IDENTITY + ("compare", "task.datasets", *others))


def check_config(cfg: DictConfig, task: Task) -> None:
    """Refuse what would fail later, naming the key, before any work."""
    datasets = list(cfg.task.datasets or [])
    if not datasets:
        raise ValueError("task.datasets is empty: name at least one entry of dataset: (e.g. task.datasets=[voc]).")
    for key in datasets:
        if key not in cfg.dataset:
            raise ValueError(f"task.datasets names {key!r}, which is not under dataset: (known: {sorted(cfg.dataset)}).")
    if not cfg.compare:
        raise ValueError("compare is empty: list the upsamplers to compare (e.g. compare=[bilinear,jafar]).")
    for row in cfg.compare:
        if row not in cfg.upsamplers:
            raise ValueError(f"compare lists {row!r}, which is not under upsamplers: (known: {sorted(cfg.upsamplers)}).")
    if int(cfg.task.image_size) < 16:
        raise ValueError(f"task.image_size must be at least 16 pixels, got {cfg.task.image_size}.")
    if int(cfg.task.pictures) < 0:
        raise ValueError(f"task.pictures must be >= 0, got {cfg.task.pictures}.")
    for row in cfg.compare:
        row_checkpoint(cfg, row)
    runs.check_resume(cfg.resume, allow_path=False)  # auto: reuse finished pairs, resume unfinished probes
    runs.check_trainer(cfg.trainer, TRAINER_RESERVED)
    task.check(cfg)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Evaluate every upsampler of ``compare`` on every data set of ``task.datasets``."""
    run_dir = Path(run_dir)
    cfg = apply_per_task(cfg, runs.command_line_overrides())
    task = get_task(str(cfg.task.name))
    check_config(cfg, task)
    resume = cfg.resume == "auto"
    shared = run_config(cfg)
    pairs = [(k, r) for k in cfg.task.datasets for r in cfg.compare]
    configs = {(k, r): pair_config(cfg, k, r) for k, r in pairs}
    runs.check_run_dir(run_dir, shared, cfg.resume)
    for (key, row), config in configs.items():
        runs.check_run_dir(run_dir / key / row, config, cfg.resume)
    runs.seed_everything(cfg.seed)
    backbone = instantiate(cfg.backbone)
    if "strided" in [str(cfg.upsamplers[r].get("name", r)) for r in cfg.compare] and not hasattr(backbone, "model"):
        raise ValueError(f"compare includes strided, which needs a timm ViT backbone; {backbone.name} is not one "
                         f"(drop it: compare=[...]).")
    data = {key: build_datasets(cfg, key, task) for key in cfg.task.datasets}
    rows = {row: build_upsampler_row(cfg, row, backbone) for row in cfg.compare}
    runs.claim_run_dir(run_dir, shared, cfg.resume, artefacts=(), record=cfg)
    ctx = EvalContext(cfg=cfg, run_dir=run_dir, backbone=backbone, resume=resume, pair_configs=configs)
    summary = {
        "task": task.name, "title": task.title, "backbone": str(backbone.name),
        "image_size": int(cfg.task.image_size), "target_size": int(cfg.task.target_size or cfg.task.image_size),
        "datasets": {k: d.info for k, d in data.items()},
        "upsamplers": {r: info for r, (_, info) in rows.items()},
        "results": {k: {} for k in data},
        "notes": task.table_notes(ctx),
    }
    pictures: Dict[str, Dict[str, List[dict]]] = {k: {} for k in data}
    for i, (key, row) in enumerate(pairs, 1):
        module, info = rows[row]
        out_dir = run_dir / key / row
        config = configs[(key, row)]
        result_file = out_dir / "result.json"
        done = json.loads(result_file.read_text()) if result_file.is_file() else None
        recorded = runs.recorded_config(out_dir) if out_dir.is_dir() else None
        if resume and done is not None and recorded is not None:  # a different record was refused above
            log.info("[%d/%d] %s / %s: already done, reusing %s", i, len(pairs), key, row, result_file)
            result = done
        else:
            if out_dir.exists() and (not resume or recorded is None):
                shutil.rmtree(out_dir)  # resume=null, or the leftovers of a run that recorded no configuration
            runs.claim_run_dir(out_dir, config, "auto", artefacts=())
            log.info("[%d/%d] %s / %s (%s)", i, len(pairs), key, row, info["note"])
            out = task.evaluate(ctx, data[key], row, module, out_dir)
            gc.collect()
            torch.save(out.pop("pictures", []), out_dir / "pictures.pt")
            result = {**out, "fingerprint": runs.fingerprint(config)}
            runs.write_json(result_file, result)
            log.info("[%d/%d] %s / %s: %s", i, len(pairs), key, row,
                     ", ".join(f"{k}={v:.4f}" for k, v in result["metrics"].items() if isinstance(v, float)))
        summary["results"][key][row] = {**result["metrics"], **{k: result[k] for k in ("seconds", "epochs") if k in result}}
        pic_file = out_dir / "pictures.pt"
        if pic_file.is_file():
            pictures[key][info["label"]] = torch.load(pic_file, weights_only=True)
        _write_outputs(run_dir, task, summary, rows, data, pictures, shared, only=key)
    _write_outputs(run_dir, task, summary, rows, data, pictures, shared)
    return summary


def _write_outputs(run_dir: Path, task: Task, summary: dict, rows, data, pictures, config: dict,
                   only: Optional[str] = None) -> None:
    runs.write_results(run_dir, summary, config)
    notes = list(summary.get("notes", [])) + [f"{info['label']}: {info['note']}" for _, info in rows.values()]
    caption = (f"Backbone {summary['backbone']}, {summary['image_size']}x{summary['image_size']} images, labels at "
               f"{summary['target_size']}x{summary['target_size']}.")
    table = markdown_table(task.title, [(k, d.title) for k, d in data.items()],
                           [(r, info["label"]) for r, (_, info) in rows.items()], summary["results"], task.columns,
                           notes=notes, caption=caption)
    write_text(run_dir / "table.md", table)
    palette = None
    if task.picture_kind == "seg":
        from .demo_data import voc_palette

        palette = voc_palette()
    for key in ([only] if only else list(data)):
        prediction_grid(run_dir / "pictures" / f"{key}.png", pictures[key], task.picture_kind, palette,
                        target_title=task.target_title)
