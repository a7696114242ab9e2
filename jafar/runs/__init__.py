"""What the three tools share: the run skeleton (:mod:`jafar.runs.tool`: :class:`Tool`,
:func:`run`, :func:`main`), the samplers of the training tools (:mod:`jafar.runs.samplers`), and
the pieces the skeleton is made of (:mod:`jafar.runs.common`: config composition, run identity,
the trainer with its loggers and atomic checkpoints, resuming, JSON results). See
``docs/architecture.md``, "The run skeleton"."""

import importlib

#: the submodules, searched in this order for a public name on first use (PEP 562):
#: ``jafar.runs.samplers`` needs only torch, so the library's modules that draw per-step seeds
#: import it without Hydra, OmegaConf or Lightning (the GPU machines have none of the first two)
_SUBMODULES = ("samplers", "common", "tool")


def __getattr__(name):
    if not name.startswith("_"):
        for sub in _SUBMODULES:
            module = importlib.import_module(f".{sub}", __name__)
            if hasattr(module, name):
                value = getattr(module, name)
                globals()[name] = value
                return value
    raise AttributeError(f"module 'jafar.runs' has no attribute {name!r}")
