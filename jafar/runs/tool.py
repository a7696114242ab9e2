"""The run skeleton: the one protocol of the three tools (``tools/pretrain_jafar.py``,
``tools/train_bev.py``, ``tools/eval_2d.py``), owned by :func:`run`. A tool is a :class:`Tool`
that declares what differs (its config root and schema, what does not change a result, its
checkpoints' state-dict prefixes, how it reads its inputs, builds its model and trains or
evaluates); :func:`main` is a tool script's whole body.

:func:`run`, in order:

1. the inputs, before any work: the experiment's per-choice settings (:meth:`Tool.configure`);
   the checks shared by every tool (``trainer`` arguments, ``resume``, gradient accumulation) and
   the tool's own (:meth:`Tool.check`); the run identity (:meth:`Tool.identity`), compared with the
   run directory's record; the checkpoint to resume from; the data read and checked
   (:meth:`Tool.prepare`). A bad input is refused here in one sentence (``ValueError``,
   ``FileNotFoundError``), and nothing is written.
2. ``seed`` seeds Python, NumPy and torch; :meth:`Tool.build` builds the model (random weights
   drawn from the seed; a checkpoint that does not fit is refused here too).
3. the run directory is claimed (:func:`jafar.runs.claim_run_dir`: its record written, and with
   ``resume=null`` the previous run's artefacts removed);
4. :meth:`Tool.execute` trains or evaluates and writes the results (the first process of a job
   writes the files).

Gradient accumulation is refused: the training samplers count one batch as one step
(:class:`jafar.runs.samplers.StepBatchSampler`), so with ``accumulate_grad_batches=N`` a run would
stop after ``max_steps / N`` optimizer steps and a resume would replay the wrong batches; a larger
global batch is ``data.batch_size`` (or more devices).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig

from .common import (
    RUN_ARTEFACTS,
    check_resume,
    check_run_dir,
    check_trainer,
    claim_run_dir,
    command_line_overrides,
    resolve_resume,
    result_config,
    seed_everything,
)

#: lightning.Trainer arguments every tool sets itself (the checkpoints, loggers, epochs and samplers)
TRAINER_RESERVED = ("max_epochs", "callbacks", "logger", "plugins", "default_root_dir", "use_distributed_sampler",
                    "enable_checkpointing")
#: the exit status of a refused input (an unexpected error keeps Python's 1 and its traceback)
REFUSED_STATUS = 2
#: the attribute :func:`run` sets on an exception raised while the inputs are read (step 1-2)
REFUSED = "refused_input"


@dataclass
class Job:
    """What :meth:`Tool.execute` is given: the config as the run uses it, where it writes, the run's
    identity (recorded in every checkpoint), the checkpoint to resume from (None: fresh), what
    :meth:`Tool.prepare` read and :meth:`Tool.build` built, and extra Lightning callbacks."""

    cfg: DictConfig
    run_dir: Path
    identity: dict
    resume_from: Optional[str]
    data: Any
    model: Any
    callbacks: list = field(default_factory=list)

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"


class Tool:
    """One tool: what it declares; :func:`run` owns the protocol. Subclasses set the attributes
    and override :meth:`check`, :meth:`prepare`, :meth:`build` and :meth:`execute` (and
    :meth:`configure`, :meth:`identity`, :meth:`check_run_dir` where the defaults do not fit)."""

    #: the config root, ``configs/<root>.yaml``
    root: str = ""
    #: its schema (a dataclass): Hydra refuses a misspelt key or a wrong type
    schema: type = None
    #: the script users run, for sentences and checkpoint records (``tools/train_bev.py``)
    script: str = ""
    #: keys that do not change this tool's results (``fnmatch`` patterns; besides
    #: :data:`jafar.runs.NOT_IDENTITY`)
    not_identity: Sequence[str] = ()
    #: what a fresh start (``resume=null``) removes from the run directory
    artefacts: Sequence[str] = RUN_ARTEFACTS
    #: state-dict key prefixes of this tool's Lightning checkpoints (a resume file without them is
    #: refused); empty: the tool resumes its own way (no single checkpoint)
    checkpoint_keys: Sequence[str] = ()
    #: whether ``resume`` may name a checkpoint file (besides auto and null)
    resume_file: bool = True

    def configure(self, cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
        """The config as the run uses it (e.g. an experiment's settings for the chosen head merged
        in under the command line's ``overrides``)."""
        return cfg

    def check(self, cfg: DictConfig) -> None:
        """Refuse what a type cannot say (ranges, names), one sentence naming the key."""

    def identity(self, cfg: DictConfig) -> dict:
        """The configuration the run directory belongs to."""
        return result_config(cfg, self.not_identity)

    def check_run_dir(self, cfg: DictConfig, run_dir: Path, identity: dict) -> None:
        """Refuse a run directory that holds a run of another configuration."""
        check_run_dir(run_dir, identity, cfg.resume)

    def prepare(self, cfg: DictConfig, run_dir: Path) -> Any:
        """Read and check the inputs (data), before the run directory is claimed."""
        return None

    def build(self, cfg: DictConfig, run_dir: Path, data: Any) -> Any:
        """The model, after seeding (its random initialisation is the seed's)."""
        return None

    def execute(self, job: Job) -> dict:
        """Train and/or evaluate; write the results; return them."""
        raise NotImplementedError


def check_common(tool: Tool, cfg: DictConfig) -> None:
    """The checks every tool shares: ``trainer`` arguments, ``resume`` and gradient accumulation."""
    check_trainer(cfg.trainer, TRAINER_RESERVED)
    check_resume(cfg.resume, allow_path=tool.resume_file)
    accumulate = cfg.trainer.get("accumulate_grad_batches", 1)
    if accumulate not in (None, 1):
        raise ValueError(f"trainer.accumulate_grad_batches={accumulate} is not supported: {tool.script} counts "
                         f"one batch as one step (its batches are a function of the step, for exact resumes), "
                         f"so the run would stop early and resume on the wrong batches; for a larger batch raise "
                         f"data.batch_size (or trainer.devices).")


def run(tool: Tool, cfg: DictConfig, run_dir: Path, callbacks: Optional[list] = None) -> dict:
    """The protocol (module docstring) for ``tool`` on ``cfg``, writing in ``run_dir``. An
    exception raised while the inputs are read and the model built carries ``refused_input=True``
    (:func:`main` prints its sentence alone and exits with status 2)."""
    run_dir = Path(run_dir)
    try:
        cfg = tool.configure(cfg, command_line_overrides())
        check_common(tool, cfg)
        tool.check(cfg)
        identity = tool.identity(cfg)
        tool.check_run_dir(cfg, run_dir, identity)
        resume_from = (resolve_resume(cfg.resume, run_dir / "checkpoints", tool.checkpoint_keys)
                       if tool.checkpoint_keys else None)
        data = tool.prepare(cfg, run_dir)
        seed_everything(cfg.seed)
        model = tool.build(cfg, run_dir, data)
    except (ValueError, FileNotFoundError) as err:
        setattr(err, REFUSED, True)
        raise
    claim_run_dir(run_dir, identity, cfg.resume, tool.artefacts, record=cfg)
    return tool.execute(Job(cfg, run_dir, identity, resume_from, data, model, list(callbacks or [])))


def main(tool: Tool) -> None:
    """A tool script's body: register the tool's configs, let Hydra compose the command line, then
    :func:`run` in Hydra's run directory. A refused input prints its one sentence alone (no
    traceback) and exits with status 2; any other error keeps its traceback."""
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from .common import CONFIG_DIR, register_configs

    register_configs(tool.root, tool.schema)

    @hydra.main(config_path=str(CONFIG_DIR), config_name=tool.root, version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        try:
            run(tool, cfg, Path(HydraConfig.get().runtime.output_dir))
        except Exception as err:  # noqa: BLE001 - only refused inputs are answered here
            if not getattr(err, REFUSED, False):
                raise
            print(f"{tool.script}: {err}", file=sys.stderr)
            sys.exit(REFUSED_STATUS)

    _main()
