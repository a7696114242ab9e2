"""What the three tools share (pretraining, BeV training, the 2-D evaluations): composing their
Hydra configs, seeding, run identity, the Lightning trainer with its loggers and atomic
checkpoints, resuming, and JSON results.

Configs. One tree, ``configs/`` (:data:`CONFIG_DIR`): one root per tool (``pretrain.yaml``,
``train_bev.yaml``, ``eval_2d.yaml``) and groups shared by all of them. An experiment belongs to
one tool: ``configs/experiment/<root>/<name>.yaml``; :func:`register_configs` offers the tool's
own experiments as the ``experiment`` group (so ``experiment=demo`` is each tool's demo) and
registers the tool's schema (a dataclass: Hydra refuses a misspelt key or a wrong type before any
work). An experiment may give one option of a group settings of its own (``per_model`` in BeV,
``per_task`` in the 2-D evaluations): :func:`apply_per_choice` merges them over the config, under
the command line's values.

Run identity. A run directory belongs to one configuration: the resolved config less what does
not change a result (:data:`NOT_IDENTITY`: names, paths to data, logging, progress bars, the
devices). :func:`check_run_dir` compares it with the one recorded in the directory
(``run_config.json``, and inside every checkpoint) before any work, and refuses another one in one
sentence; :func:`claim_run_dir` records it (and clears the artefacts of the previous run when
``resume=null``).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import inspect
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, ListConfig, OmegaConf

from ..utils import atomic_path

log = logging.getLogger(__name__)

#: the project's Hydra config tree (``configs/`` beside the package, as in a source checkout)
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"

#: the file of a run directory that records its configuration
RUN_CONFIG = "run_config.json"
#: the key under which every Lightning checkpoint carries the same record
CHECKPOINT_KEY = "run_config"
#: the key under which every Lightning checkpoint names the tool that wrote it
TOOL_KEY = "tool"

#: keys that never change a result, in every tool (``fnmatch`` patterns on dotted keys): where
#: outputs go and what they are called, how to resume, logging and pictures, and how the work is
#: spread over devices
NOT_IDENTITY = ("name", "resume", "checkpoint_every", "pictures", "per_model", "per_task",
                "trainer.accelerator", "trainer.devices", "trainer.num_nodes", "trainer.strategy",
                "trainer.enable_progress_bar", "trainer.log_every_n_steps")

#: what a fresh start (``resume=null``) removes from a run directory
RUN_ARTEFACTS = ("checkpoints", "csv", "tensorboard", "pictures", "results.json")


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------


def register_configs(root: str, schema: type) -> None:
    """Make ``configs/<root>.yaml`` composable: its schema (``<root>_schema``, listed first in
    the root's defaults) and, as the ``experiment`` group, the tool's own experiments
    (``configs/experiment/<root>/*.yaml``). Call before Hydra composes (the tools do it before
    ``hydra.main``; :func:`compose` does it). The last call wins: one tool at a time."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name=f"{root}_schema", node=schema)
    cs.repo.pop("experiment", None)  # another tool's experiments
    for path in sorted((CONFIG_DIR / "experiment" / root).glob("*.yaml")):
        cs.store(group="experiment", name=path.stem, node=OmegaConf.load(path), package="_global_")


def compose(root: str, overrides: Sequence[str] = ()) -> DictConfig:
    """``configs/<root>.yaml`` with ``overrides`` (command-line syntax), as the tool composes it.
    Call :func:`register_configs` for the tool first. Inside a running Hydra app (whose config
    tree is this one) it composes there; elsewhere it opens the tree for the call."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(root, overrides=list(overrides))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(root, overrides=list(overrides))


def command_line_overrides() -> List[str]:
    """The running Hydra app's command-line overrides (empty outside one)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return []


def _flat(node: Any, prefix: str = "") -> Dict[str, Any]:
    """``{dotted key: leaf}`` of a nested container (lists are leaves)."""
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def apply_per_choice(cfg: DictConfig, table: str, choice: str, overrides: Sequence[str] = ()) -> DictConfig:
    """Merge ``cfg[table][choice]`` (settings an experiment gives one option of a group, as whole
    keys of the config: ``per_task: {cam: {task: {batch_size: 8}}}``) over ``cfg``, then the
    command-line ``overrides`` that touch the same keys again, so the command line still wins.
    The table is emptied (applying twice changes nothing). Returns a new config."""
    cfg = copy.deepcopy(cfg)
    settings = cfg.get(table) or {}
    chosen = settings.get(choice) if settings else None
    struct = OmegaConf.is_struct(cfg)
    OmegaConf.set_struct(cfg, False)
    cfg[table] = {}
    if chosen:
        chosen = OmegaConf.to_container(chosen, resolve=False)
        touched = set(_flat(chosen))
        cfg = OmegaConf.merge(cfg, chosen)
        log.info("%s=%s under this experiment: %s", table.removeprefix("per_"), choice,
                 ", ".join(f"{k}={v}" for k, v in _flat(chosen).items()))
        if overrides:
            from hydra.core.override_parser.overrides_parser import OverridesParser

            for ov in OverridesParser.create().parse_overrides(list(overrides)):
                key = ov.key_or_group
                # a value at or below a key the settings gave (a group choice such as backbone=...
                # lies above them and is not a value)
                if not ov.is_delete() and any(key == t or key.startswith(t + ".") for t in touched):
                    OmegaConf.update(cfg, key, ov.value(), merge=False, force_add=True)
    OmegaConf.set_struct(cfg, struct)
    return cfg


def check_trainer(trainer_cfg, reserved: Iterable[str] = ()) -> None:
    """Refuse ``trainer.<key>`` that ``lightning.Trainer`` does not take, or that the tool sets
    itself, in one sentence."""
    params = set(inspect.signature(L.Trainer.__init__).parameters) - {"self"}
    reserved = set(reserved)
    for key in trainer_cfg:
        if key in reserved:
            raise ValueError(f"trainer.{key} is set by the tool itself; remove it from the config.")
        if key not in params:
            raise ValueError(f"trainer.{key} is not an argument of lightning.Trainer (see its documentation "
                             f"for the names).")


def check_resume(resume, allow_path: bool = True) -> None:
    """``resume`` is auto, null or (where the tool takes one: ``allow_path``) a checkpoint file."""
    if resume in ("auto", None) or (allow_path and isinstance(resume, str)):
        return
    raise ValueError(f"resume must be auto (continue the run of this configuration in its directory) or null "
                     f"(start afresh){', or a checkpoint file' if allow_path else ''}, got {resume!r}.")


def check_partial(node, key: str, base: type, base_name: str, example: str) -> None:
    """``<key>`` is a ``_target_`` that names a subclass of ``base`` and ``_partial_: true`` (the
    module calls it with what only it has: the parameters, the optimizer), in one sentence each."""
    target = node.get("_target_")
    try:
        from hydra.utils import get_class

        cls = get_class(str(target))
    except Exception:  # noqa: BLE001 - any failure to import is the same sentence
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{key}._target_ must name a {base_name} class (e.g. {example}), got {target!r}.")
    if node.get("_partial_") is not True:
        raise ValueError(f"{key}._partial_ must be true (the module completes the call), got "
                         f"{node.get('_partial_')!r}.")


def check_optimizer(node, key: str = "optimizer") -> None:
    """``<key>`` builds an optimizer: a ``_target_`` that is a ``torch.optim.Optimizer`` class,
    ``_partial_: true`` (the module calls it with its trainable parameters) and a positive ``lr``."""
    check_partial(node, key, torch.optim.Optimizer, "torch.optim.Optimizer", "torch.optim.AdamW")
    lr = node.get("lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"{key}.lr must be a positive learning rate, got {lr}.")


def build_partial(node):
    """The factory a checked config node describes (:func:`check_partial`): ``hydra.utils.instantiate``
    of a ``_partial_`` node, e.g. ``params -> optimizer`` or ``optimizer -> scheduler``."""
    from hydra.utils import instantiate

    return instantiate(node)


# ---------------------------------------------------------------------------------------------
# seeding
# ---------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (every device) seeded with ``seed``; data-loader workers too."""
    L.seed_everything(int(seed), workers=True, verbose=False)


# ---------------------------------------------------------------------------------------------
# run identity
# ---------------------------------------------------------------------------------------------


def _ignored(key: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) or fnmatch.fnmatchcase(key, p + ".*") for p in patterns)


def _identity(node, prefix: str, patterns: Sequence[str]):
    if isinstance(node, DictConfig):
        out = {}
        for k in node.keys():
            key = f"{prefix}{k}"
            if not _ignored(key, patterns):  # ignored keys are never resolved: a path may need a Hydra run
                out[str(k)] = _identity(node[k], key + ".", patterns)
        return out
    if isinstance(node, ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node


def result_config(cfg: DictConfig, ignore: Sequence[str] = ()) -> dict:
    """The configuration that matters for a run's result: ``cfg`` resolved, less the keys of
    :data:`NOT_IDENTITY` and ``ignore`` (``fnmatch`` patterns on dotted keys, e.g.
    ``"dataset.*.root"``), as plain nested dicts."""
    return _identity(cfg, "", tuple(NOT_IDENTITY) + tuple(ignore))


def config_changes(old: dict, new: dict) -> List[str]:
    """``["seed: 0 -> 1", ...]``: the keys whose values differ, in key order."""
    a, b = _flat(old), _flat(new)
    out = []
    for key in sorted(set(a) | set(b)):
        if key not in a:
            out.append(f"{key}: (absent) -> {b[key]!r}")
        elif key not in b:
            out.append(f"{key}: {a[key]!r} -> (absent)")
        elif json.dumps(a[key], sort_keys=True, default=str) != json.dumps(b[key], sort_keys=True, default=str):
            out.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return out


def fingerprint(config: dict) -> str:
    """A short stable hash of a configuration."""
    import hashlib

    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recorded_config(run_dir: Path) -> Optional[dict]:
    """The configuration a run directory belongs to: its ``run_config.json``, else the record in
    ``checkpoints/last.ckpt``; ``None`` when neither has one."""
    run_dir = Path(run_dir)
    path = run_dir / RUN_CONFIG
    if path.is_file():
        return json.loads(path.read_text())["config"]
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        try:
            ckpt = torch.load(last, map_location="cpu", weights_only=False, mmap=True)
        except Exception as err:  # noqa: BLE001 - a truncated or foreign file: one sentence
            raise ValueError(f"{last} is not a readable Lightning checkpoint ({type(err).__name__}), so "
                             f"{run_dir} cannot be continued: delete it, or pass resume=null to start afresh."
                             ) from None
        return ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    return None


class RunConfigMismatch(ValueError):
    """A run directory holds a run of another configuration."""


def mismatch_sentence(where: Path, changes: List[str]) -> str:
    shown = "; ".join(changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8 else "")
    return (f"{where} holds a run of another configuration ({shown}): give this one a new name= "
            f"(its own directory), or pass resume=null to start {where} afresh.")


def _fresh(resume) -> bool:
    return resume in (None, False, "none", "null")


def check_run_dir(run_dir: Path, config: dict, resume) -> None:
    """Before any work: unless ``resume`` is null (start afresh), refuse a run directory whose
    recorded configuration differs from ``config``, in one sentence naming the differing keys
    and the two ways out. A directory without a record (made before records existed) is
    adopted."""
    if _fresh(resume):
        return
    old = recorded_config(run_dir)
    if old is None:
        if (Path(run_dir) / "checkpoints" / "last.ckpt").is_file():
            log.warning("%s records no configuration (an older run); continuing it as this one.", run_dir)
        return
    changes = config_changes(old, config)
    if changes:
        raise RunConfigMismatch(mismatch_sentence(Path(run_dir), changes))


def global_batch_sentence(world: int, batch: int, unit: str, steps: str, lr: float, official: str) -> str:
    """What more than one process changes, for a tool to say once before training: the global
    batch (``batch`` ``unit`` per process), what the steps then mean (``steps``), and that the
    learning rate is not scaled; ``official`` names the source's setting."""
    return (f"{world} processes (trainer.devices x trainer.num_nodes): the global batch is data.batch_size x "
            f"{world} = {batch * world} {unit}; {steps}; the learning rate is not scaled: optimizer.lr={lr:g} as "
            f"for one process ({official}).")


def is_global_zero() -> bool:
    """Whether this process is the first of its job (before a Trainer exists: from the launcher's
    environment variables)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def claim_run_dir(run_dir: Path, config: dict, resume, artefacts: Sequence[str] = RUN_ARTEFACTS,
                  record: Optional[DictConfig] = None) -> None:
    """Record ``config`` as the run directory's configuration (after :func:`check_run_dir`, when
    the inputs are known to be good). With ``resume=null`` the previous run's ``artefacts`` are
    removed first, so nothing of it is reused or mixed in. ``record`` (the tool's composed config)
    is written to ``.hydra/`` as Hydra would (:func:`save_hydra_record`): the tools' configs set
    ``hydra.output_subdir: null``, so a rerun refused by :func:`check_run_dir` leaves the finished
    run's ``.hydra/config.yaml`` as it was. First process of a job only."""
    if not is_global_zero():
        return
    run_dir = Path(run_dir)
    if _fresh(resume):
        for name in artefacts:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    write_json(run_dir / RUN_CONFIG, {"config": config})
    if record is not None:
        save_hydra_record(run_dir, record)


def save_hydra_record(run_dir: Path, cfg: DictConfig) -> None:
    """``<run_dir>/.hydra/{config,overrides,hydra}.yaml``: the composed config (unresolved, as
    Hydra saves it), the command-line overrides and, inside a Hydra app, Hydra's own config;
    each written atomically."""
    folder = Path(run_dir) / ".hydra"
    files = {"config.yaml": OmegaConf.to_yaml(cfg),
             "overrides.yaml": OmegaConf.to_yaml(OmegaConf.create(command_line_overrides()))}
    try:
        from hydra.core.hydra_config import HydraConfig

        files["hydra.yaml"] = OmegaConf.to_yaml(OmegaConf.create({"hydra": HydraConfig.get()}))
    except (ImportError, ValueError):  # composed outside a Hydra app (tests, notebooks)
        pass
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        with atomic_path(folder / name) as tmp:
            tmp.write_text(text)


class RecordRunConfig(Callback):
    """Stores the run's configuration in every checkpoint (``checkpoint["run_config"]``) and, when
    given, the tool that wrote it (``checkpoint["tool"]``: its script, e.g. ``tools/train_bev.py``)."""

    def __init__(self, config: dict, tool: Optional[str] = None):
        self.config, self.tool = config, tool

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint[CHECKPOINT_KEY] = self.config
        if self.tool:
            checkpoint[TOOL_KEY] = self.tool


# ---------------------------------------------------------------------------------------------
# trainer, checkpoints, resume
# ---------------------------------------------------------------------------------------------


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file and renamed: a kill never leaves a
    truncated ``last.ckpt``."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def resolve_resume(resume, checkpoint_dir: Path, expected_keys: Sequence[str] = ()) -> Optional[str]:
    """The checkpoint to continue from: ``auto`` -> ``<checkpoint_dir>/last.ckpt`` if present,
    null -> none (fresh), a path -> that file (refused if missing). ``expected_keys``: the
    state-dict key prefixes of the tool's checkpoints (:attr:`jafar.runs.Tool.checkpoint_keys`)."""
    if _fresh(resume):
        return None
    if resume == "auto":
        last = Path(checkpoint_dir) / "last.ckpt"
        if not last.is_file():
            return None
        # the run directory's own last.ckpt is checked like a given file: a truncated or foreign one
        # is refused in one sentence before any work, not met by Lightning after the model is built
        check_checkpoint_file(last, expected_keys, given="resume=auto found ")
        return str(last)
    path = Path(str(resume))
    if not path.is_file():
        raise FileNotFoundError(f"resume={str(resume)!r} is not a checkpoint file (use resume=auto to continue "
                                f"from {Path(checkpoint_dir) / 'last.ckpt'} when it exists).")
    check_checkpoint_file(path, expected_keys)
    return str(path)


def check_checkpoint_file(path: Path, expected_keys: Sequence[str] = (), given: str = "") -> None:
    """Refuse, in one sentence, a resume file that is not a Lightning checkpoint of this tool:
    unreadable, or whose model weights lack ``expected_keys`` (state-dict key prefixes, e.g. the
    other tool's checkpoint). ``given`` prefixes the file's name in the sentence (``resume=auto``
    names the run directory's own ``last.ckpt`` that way)."""
    from ..hub import safe_torch_load

    name = f"{given}resume={str(path)!r}" if not given else f"{given}{str(path)!r}"
    way_out = (", delete it or pass resume=null to start afresh" if given else "")
    try:
        ckpt = safe_torch_load(path, map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any failure to read is the same sentence
        raise ValueError(f"{name} is not a readable Lightning checkpoint "
                         f"({type(err).__name__}); expected a last.ckpt written by this tool{way_out}.") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ValueError(f"{name} is not a Lightning checkpoint (no state_dict); "
                         f"expected a last.ckpt written by this tool{way_out}.")
    keys = list(ckpt["state_dict"])
    missing = [p for p in expected_keys if not any(k.startswith(p) for k in keys)]
    if missing:
        writer = ckpt.get(TOOL_KEY)
        which = f"of {writer}" if writer else "of another tool"
        raise ValueError(f"{name} is a checkpoint {which} (its weights have no "
                         f"{missing[0]!r} keys); expected a last.ckpt written by this tool{way_out}.")


class StepCheckpoint(ModelCheckpoint):
    """:class:`ModelCheckpoint` that also saves the final state when training ends on a step that
    is not a multiple of ``every_n_train_steps`` (the results are always for saved weights).

    ``validate_every`` (training steps; set by a run that validates every that many steps): on a
    step that is validated, the checkpoint is written after that validation instead of before it
    (Lightning validates after the step's ``on_train_batch_end``), so it holds what the validation
    changed (the best IoU so far, ``bev.module.BestValidation``): a run killed during the
    validation resumes from the previous checkpoint and validates that step again."""

    validate_every: Optional[int] = None

    def _deferred(self, trainer) -> bool:
        every = self.validate_every
        return bool(every) and trainer.global_step > 0 and trainer.global_step % int(every) == 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._deferred(trainer):
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer, pl_module):
        super().on_validation_end(trainer, pl_module)
        if (self._deferred(trainer) and not trainer.sanity_checking and trainer.state.fn == "fit"
                and self._last_global_step_saved != trainer.global_step
                and trainer.global_step % max(1, self._every_n_train_steps) == 0):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_end(self, trainer, pl_module):
        super().on_train_end(trainer, pl_module)
        if trainer.global_step > 0 and self._last_global_step_saved != trainer.global_step:
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)


def step_checkpoints(checkpoint_dir: Path, every: int) -> ModelCheckpoint:
    """A checkpoint every ``every`` training steps (the latest kept), ``last.ckpt``, and one at
    the last step whatever ``every``."""
    return StepCheckpoint(dirpath=checkpoint_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                           every_n_train_steps=max(1, int(every)), save_last=True, save_top_k=1,
                           monitor="step", mode="max")


def epoch_checkpoints(checkpoint_dir: Path) -> ModelCheckpoint:
    """``last.ckpt`` after every epoch."""
    return ModelCheckpoint(dirpath=checkpoint_dir, save_last=True, save_top_k=0, every_n_epochs=1)


class AppendingCSVLogger(CSVLogger):
    """CSV logger that keeps the rows already in ``metrics.csv``: a resumed run appends to them
    (rows of steps at or after the resumed one, logged after its checkpoint, are dropped) instead
    of starting the file again."""

    _old_rows = None

    @property
    def experiment(self):
        from lightning.pytorch.utilities import rank_zero_only

        if self._experiment is None and self._old_rows is None and rank_zero_only.rank == 0:
            path = Path(self.log_dir) / "metrics.csv"
            self._old_rows = []
            if path.is_file():
                import csv
                with open(path, newline="") as f:
                    self._old_rows = list(csv.DictReader(f))
            import warnings

            with warnings.catch_warnings():  # "previous log files will be deleted": their rows are kept
                warnings.filterwarnings("ignore", message="Experiment logs directory")
                exp = super().experiment  # removes the old file
            exp.metrics = list(self._old_rows) + exp.metrics
            return exp
        return super().experiment

    def log_metrics(self, metrics, step=None):
        if self._old_rows and step is not None:
            exp = self.experiment
            old = {id(r) for r in self._old_rows}
            exp.metrics = [r for r in exp.metrics if id(r) not in old or _row_step(r) < step]
            self._old_rows = None
        super().log_metrics(metrics, step)


def _row_step(row) -> float:
    try:
        return float(row.get("step", ""))
    except ValueError:
        return float("-inf")


def loggers(run_dir: Path) -> list:
    """TensorBoard (``<run_dir>/tensorboard``) and CSV (``<run_dir>/csv``) loggers."""
    return [TensorBoardLogger(str(run_dir), name="tensorboard", version=""),
            AppendingCSVLogger(str(run_dir), name="csv", version="")]


def make_trainer(run_dir: Path, trainer_cfg, checkpointing: Optional[ModelCheckpoint] = None,
                 callbacks: Sequence[Callback] = (), run_config: Optional[dict] = None, log: bool = True,
                 tool: Optional[str] = None, **kwargs) -> L.Trainer:
    """``lightning.Trainer`` with the ``trainer`` config (``kwargs`` win), the loggers of
    :func:`loggers` (``log=False``: none), ``callbacks`` then ``checkpointing``, atomic
    checkpoints carrying ``run_config``, outputs in ``run_dir``."""
    if isinstance(trainer_cfg, DictConfig):
        args = OmegaConf.to_container(trainer_cfg, resolve=True)
    else:
        args = dict(trainer_cfg)
    args.update(kwargs)
    cbs = list(callbacks) + ([checkpointing] if checkpointing is not None else [])
    if run_config is not None:
        cbs.append(RecordRunConfig(run_config, tool))
    if checkpointing is None:
        args.setdefault("enable_checkpointing", False)
    return L.Trainer(**args, callbacks=cbs, logger=loggers(run_dir) if log else False,
                     plugins=[AtomicCheckpointIO()], default_root_dir=str(run_dir))


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's warnings that do not apply to these runs, silenced: resuming mid-epoch is
    exact (batches are a function of the step), few workers is deliberate on small machines,
    frozen modules are in eval mode on purpose, and a checkpoint of a manually optimised step (FeatUp's
    and LiFT's pretraining) holds the state after the step's update, which is what resuming needs."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before the epoch ended.*")
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*module.* in eval mode.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
        warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
        yield


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    """``obj`` as indented JSON, written atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def write_results(run_dir: Path, results: dict, config: dict) -> None:
    """``<run_dir>/results.json``, only if the directory still belongs to ``config`` (a run of
    another configuration started there since never has its numbers replaced)."""
    recorded = recorded_config(run_dir)
    if recorded is not None and config_changes(recorded, config):
        raise RunConfigMismatch(mismatch_sentence(Path(run_dir), config_changes(recorded, config)))
    write_json(Path(run_dir) / "results.json", results)
