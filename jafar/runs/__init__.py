"""What the three tools share: the run skeleton (:mod:`jafar.runs.tool`: :class:`Tool`,
:func:`run`, :func:`main`), the samplers of the training tools (:mod:`jafar.runs.samplers`), and
the pieces the skeleton is made of (:mod:`jafar.runs.common`: config composition, run identity,
the trainer with its loggers and atomic checkpoints, resuming, JSON results). See
``docs/architecture.md``, "The run skeleton"."""

from .common import (CHECKPOINT_KEY, CONFIG_DIR, NOT_IDENTITY, RUN_ARTEFACTS, RUN_CONFIG, TOOL_KEY,
                     AppendingCSVLogger, AtomicCheckpointIO, RecordRunConfig, RunConfigMismatch, StepCheckpoint,
                     apply_per_choice, build_optimizer, check_checkpoint_file, check_optimizer, check_resume, check_run_dir, check_trainer,
                     claim_run_dir, command_line_overrides, compose, config_changes, epoch_checkpoints, fingerprint,
                     global_batch_sentence, is_global_zero, loggers, make_trainer, mismatch_sentence, quiet_lightning,
                     recorded_config, register_configs, resolve_resume, result_config, save_hydra_record,
                     seed_everything, step_checkpoints, write_json, write_results)
from .samplers import ShardSampler, StepBatchSampler, step_seed
from .tool import REFUSED_STATUS, TRAINER_RESERVED, Job, Tool, check_common, main, run

__all__ = [
    "CHECKPOINT_KEY", "CONFIG_DIR", "NOT_IDENTITY", "RUN_ARTEFACTS", "RUN_CONFIG", "TOOL_KEY", "AppendingCSVLogger",
    "AtomicCheckpointIO", "RecordRunConfig", "RunConfigMismatch", "StepCheckpoint", "apply_per_choice",
    "build_optimizer", "check_optimizer",
    "check_checkpoint_file", "check_resume", "check_run_dir", "check_trainer", "claim_run_dir",
    "command_line_overrides", "compose", "config_changes", "epoch_checkpoints", "fingerprint",
    "global_batch_sentence", "is_global_zero", "loggers", "make_trainer", "mismatch_sentence", "quiet_lightning",
    "recorded_config", "register_configs", "resolve_resume", "result_config", "save_hydra_record",
    "seed_everything", "step_checkpoints", "write_json", "write_results", "ShardSampler", "StepBatchSampler",
    "step_seed", "REFUSED_STATUS", "TRAINER_RESERVED", "Job", "Tool", "check_common", "main", "run",
]
