"""Compose a 2-D evaluation from a Hydra config (``configs/eval_2d.yaml``): one task, the data
sets of its table, one row per upsampler; ``results.json``, ``table.md`` and pictures.

Entry point: ``tools/eval_2d.py`` (schema in :mod:`jafar.eval.config`). A task is a
:class:`jafar.eval.tasks.Task` registered in :data:`jafar.eval.tasks.TASKS` by name (``task.name``
in the config), one module of :mod:`jafar.eval.tasks` each: it declares the metric columns of its
table and evaluates one (data set, upsampler) pair.

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
import json
import logging
import shutil
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from hydra.utils import get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Subset

from .. import runs
from ..utils import derive_seed
from .config import ROOT, Eval2dConfig, apply_per_task
from .report import markdown_table, prediction_grid, write_text
from .tasks import DatasetSplits, EvalContext, Task, get_task, trains_with_probe

log = logging.getLogger(__name__)

#: data-set config keys read by this module (the rest goes to the data set's constructor)
_DATASET_KEYS = ("name", "prepare", "prepare_args", "train_split", "val_split", "max_train_images",
                 "max_val_images", "num_classes", "epochs")
#: upsampler config keys read by this module
_UPSAMPLER_KEYS = ("pretrain_if_missing", "train_with_probe")
#: keys that do not change an evaluation's numbers (besides :data:`jafar.runs.NOT_IDENTITY`): where
#: the data are, row labels, pictures, loading, how a missing checkpoint is obtained
NOT_IDENTITY = ("data_root", "dataset.*.root", "labels", "task.pictures", "task.num_workers", "task.probe.num_workers",
                "task.probe.pin_memory", "upsamplers.*.pretrain_if_missing")
#: the command-line tools (``tools/`` beside the package, as in a source checkout)
TOOLS = Path(__file__).resolve().parents[2] / "tools"
#: the checkpoint the 2-D demo expects for JAFAR (configs/experiment/eval_2d/demo.yaml)
DEMO_CHECKPOINT = "outputs/pretrain/demo/jafar.safetensors"
#: the checkpoints the 2-D demo expects, by row, the only ones ``pretrain_if_missing: demo`` trains when
#: they are missing: ``tools/pretrain_jafar.py experiment=demo`` (``upsampler=featup`` / ``lift`` for
#: the others, whose demo runs are ``demo_featup`` and ``demo_lift``)
DEMO_CHECKPOINTS = {"jafar": DEMO_CHECKPOINT, "featup": "outputs/pretrain/demo_featup/featup.safetensors",
                    "lift": "outputs/pretrain/demo_lift/lift.safetensors"}


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
    # the training split: for a probe, or for the rows a task trains (task=cam's task-dependent rows)
    needs_train = task.needs_train or (task.trains_upsamplers and any(trains_with_probe(cfg, r) for r in cfg.compare))
    train = instantiate(dcfg, split=extra["train_split"] or "train", **size) if needs_train else None
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


def pretraining_demo_command(checkpoint: Path) -> List[str]:
    """The pretraining demo's command line (``tools/pretrain_jafar.py experiment=demo``, with
    ``upsampler=<name>`` for ``<name>.safetensors`` other than JAFAR's) with its run directory where
    ``checkpoint`` is expected, so that the file lands there."""
    name = checkpoint.stem if checkpoint.suffix == ".safetensors" else None
    if name not in DEMO_CHECKPOINTS:
        raise ValueError(f"pretrain_if_missing writes <run dir>/<upsampler>.safetensors "
                         f"({', '.join(f'{n}.safetensors' for n in DEMO_CHECKPOINTS)}); the checkpoint is "
                         f"{str(checkpoint)!r}.")
    run_dir = checkpoint.parent
    choice = [] if name == "jafar" else [f"upsampler={name}"]
    return [sys.executable, str(TOOLS / "pretrain_jafar.py"), "experiment=demo", *choice, f"hydra.run.dir={run_dir}",
            f"data.root={run_dir / 'photos'}"]


def _run_pretraining_demo(checkpoint: Path) -> None:
    """Train the demo's missing JAFAR checkpoint by running the pretraining tool, as a user would,
    in a process of its own (the evaluation's random streams and configs are not touched)."""
    cmd = pretraining_demo_command(checkpoint)
    log.info("checkpoint %s is missing: training it with the pretraining demo: %s", checkpoint, " ".join(cmd[1:]))
    done = subprocess.run(cmd, check=False)
    if done.returncode != 0 or not checkpoint.is_file():
        raise RuntimeError(f"the pretraining demo ({' '.join(cmd[1:])}) exited with status {done.returncode} "
                           f"without writing {checkpoint}.")


def row_checkpoint(cfg: DictConfig, row: str) -> Optional[str]:
    """The absolute checkpoint file of row ``row`` (None when it names no file). A missing file
    is refused in one sentence, unless it is the demo's own for that row (:data:`DEMO_CHECKPOINTS`)
    with ``pretrain_if_missing: demo``: a mistyped path never starts a pretraining."""
    node = cfg.upsamplers[row]
    ckpt = node.get("checkpoint")
    if not (isinstance(ckpt, str) and (Path(ckpt).suffix in (".pth", ".pt", ".safetensors", ".ckpt") or "/" in ckpt)):
        return None
    ckpt = _abs(ckpt)
    if not Path(ckpt).is_file():
        demo = node.get("pretrain_if_missing") == "demo"
        own = DEMO_CHECKPOINTS.get(str(node.get("name", row)))
        if demo and own is not None and Path(ckpt) == Path(_abs(own)):
            return ckpt
        why = ""
        if demo:
            why = (f" (pretrain_if_missing=demo trains only the demo's own {own})" if own else
                   f" (pretrain_if_missing=demo trains only {', '.join(DEMO_CHECKPOINTS.values())})")
        raise FileNotFoundError(f"upsamplers.{row}.checkpoint {ckpt!r} does not exist{why}.")
    return ckpt


def row_seed(cfg: DictConfig, *names: str) -> int:
    """The seed of what is drawn for a row (its random weights) or a (data set, row) pair (its
    probe's initialisation): a function of ``seed`` and the names only, so that a pair draws the same
    whichever pairs ran before it in the process (a resumed run skips the finished ones)."""
    return derive_seed(int(cfg.seed), *(zlib.crc32(n.encode()) for n in names)) % 2 ** 32


def build_upsampler_row(cfg: DictConfig, row: str, backbone) -> Tuple[torch.nn.Module, dict]:
    """The upsampler of table row ``row`` (``upsamplers.<row>``) and its description."""
    if row not in cfg.upsamplers:
        raise ValueError(f"compare lists {row!r}, which is not under upsamplers: (known: {sorted(cfg.upsamplers)}).")
    ucfg = OmegaConf.to_container(cfg.upsamplers[row], resolve=True)
    for key in _UPSAMPLER_KEYS:
        ucfg.pop(key, None)
    target = ucfg.pop("_target_", "jafar.build_upsampler")
    ckpt = row_checkpoint(cfg, row)
    if ckpt is not None:
        ucfg["checkpoint"] = ckpt
        if not Path(ckpt).is_file():  # row_checkpoint refused every other missing file
            _run_pretraining_demo(Path(ckpt))
    torch.manual_seed(row_seed(cfg, row))  # a random start depends on the row only, not on the rows before it
    module = get_method(target)(backbone=backbone, **ucfg)
    label = str(cfg.get("labels", {}).get(row, row))
    note = module.describe()
    if trains_with_probe(cfg, row):
        from .probes import trainable_parameters

        count = sum(p.numel() for p in trainable_parameters(module))
        if count == 0:
            raise ValueError(f"upsamplers.{row}.train_with_probe is true, but {label} has no trainable parameter "
                             f"(set it false).")
        note = f"{note}; trained with the task ({count:,} parameters, from these weights)"
    info = {"label": label, "name": ucfg.get("name", row), "note": note}
    return module, info


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------


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
        joint = cfg.upsamplers[row].get("train_with_probe", False)
        if not isinstance(joint, bool):
            raise ValueError(f"upsamplers.{row}.train_with_probe must be true or false, got {joint!r}.")
        if joint and not task.trains_upsamplers:
            raise ValueError(f"upsamplers.{row}.train_with_probe is true, but task={task.name} trains no upsampler "
                             f"(drop the row or set it false).")
    task.check(cfg)


class Evaluation2d(runs.Tool):
    """``tools/eval_2d.py`` (:func:`jafar.runs.run` owns the protocol): the task's data sets read,
    the frozen backbone and one upsampler per row built, then every (data set, row) pair evaluated
    by the task, each in its own directory (finished pairs reused, unfinished probes resumed)."""

    root, schema, script = ROOT, Eval2dConfig, "tools/eval_2d.py"
    not_identity = NOT_IDENTITY + ("compare", "task.datasets", "dataset", "upsamplers")  # each pair records its own
    artefacts = ()  # a pair's directory is its own (resume=null redoes it)
    resume_file = False  # auto: reuse finished pairs, resume unfinished probes

    def configure(self, cfg: DictConfig, overrides) -> DictConfig:
        return apply_per_task(cfg, overrides)

    def check(self, cfg: DictConfig) -> None:
        check_config(cfg, get_task(str(cfg.task.name)))

    def check_run_dir(self, cfg: DictConfig, run_dir: Path, identity: dict) -> None:
        runs.check_run_dir(run_dir, identity, cfg.resume)
        for key in cfg.task.datasets:
            for row in cfg.compare:
                runs.check_run_dir(run_dir / key / row, pair_config(cfg, key, row), cfg.resume)

    def prepare(self, cfg: DictConfig, run_dir: Path) -> dict:
        task = get_task(str(cfg.task.name))
        return {key: build_datasets(cfg, key, task) for key in cfg.task.datasets}

    def build(self, cfg: DictConfig, run_dir: Path, data: dict):
        backbone = instantiate(cfg.backbone)
        if "strided" in [str(cfg.upsamplers[r].get("name", r)) for r in cfg.compare] and not hasattr(backbone, "model"):
            raise ValueError(f"compare includes strided, which needs a timm ViT backbone; {backbone.name} is not one "
                             f"(drop it: compare=[...]).")
        return backbone, {row: build_upsampler_row(cfg, row, backbone) for row in cfg.compare}

    def execute(self, job: runs.Job) -> dict:
        return evaluate_pairs(job)


#: the 2-D evaluation tool (``tools/eval_2d.py`` is ``jafar.runs.main(EVALUATION_2D)``)
EVALUATION_2D = Evaluation2d()


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """:func:`jafar.runs.run` of :data:`EVALUATION_2D`: evaluate every upsampler of ``compare`` on
    every data set of ``task.datasets``."""
    return runs.run(EVALUATION_2D, cfg, run_dir)


def evaluate_pairs(job: runs.Job) -> dict:
    """Every (data set, row) pair of the run, in order; ``results.json``, ``table.md`` and the
    pictures rewritten after each."""
    cfg, run_dir, shared, data = job.cfg, job.run_dir, job.identity, job.data
    backbone, rows = job.model
    task = get_task(str(cfg.task.name))
    resume = cfg.resume == "auto"
    pairs = [(k, r) for k in cfg.task.datasets for r in cfg.compare]
    configs = {(k, r): pair_config(cfg, k, r) for k, r in pairs}
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
            torch.manual_seed(row_seed(cfg, key, row))
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
