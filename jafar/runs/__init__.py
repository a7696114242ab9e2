"""What the three tools share: the run skeleton (:mod:`jafar.runs.tool`: :class:`Tool`,
:func:`run`, :func:`main`), the samplers of the training tools (:mod:`jafar.runs.samplers`), and
the pieces the skeleton is made of (:mod:`jafar.runs.common`: config composition, run identity,
the trainer with its loggers and atomic checkpoints, resuming, JSON results). See
``docs/architecture.md``, "The run skeleton"."""

import importlib

#: the submodule of each public name, imported on first use (PEP 562): ``jafar.runs.samplers``
#: needs only torch, so the library's modules that draw per-step seeds import it without Hydra,
#: OmegaConf or Lightning (the GPU machines have none of the first two)
_WHERE = {
    **{name: "common" for name in (
        "CHECKPOINT_KEY", "CONFIG_DIR", "NOT_IDENTITY", "RUN_ARTEFACTS", "RUN_CONFIG", "TOOL_KEY", "AppendingCSVLogger",
        "AtomicCheckpointIO", "RecordRunConfig", "RunConfigMismatch", "StepCheckpoint", "apply_per_choice",
        "build_partial", "check_optimizer", "check_partial", "check_checkpoint_file", "check_resume", "check_run_dir",
        "check_trainer", "claim_run_dir", "command_line_overrides", "compose", "config_changes", "epoch_checkpoints",
        "fingerprint", "global_batch_sentence", "is_global_zero", "loggers", "make_trainer", "mismatch_sentence",
        "quiet_lightning", "recorded_config", "register_configs", "resolve_resume", "result_config",
        "save_hydra_record", "seed_everything", "step_checkpoints", "write_json", "write_results")},
    **{name: "samplers" for name in ("ShardSampler", "StepBatchSampler", "step_seed")},
    **{name: "tool" for name in ("REFUSED_STATUS", "TRAINER_RESERVED", "Job", "Tool", "check_common", "main", "run")},
}

__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'jafar.runs' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
