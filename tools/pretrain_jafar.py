#!/usr/bin/env python
"""Task-agnostic training of JAFAR (paper section 3.2), official recipe by default.

    python tools/pretrain_jafar.py data.root=/path/to/imagenet/train       # official recipe
    python tools/pretrain_jafar.py experiment=demo                         # offline demo, CPU
    python tools/pretrain_jafar.py data.root=... trainer.devices=4         # 4 GPUs (DDP)
    python tools/pretrain_jafar.py upsampler=featup data.root=...          # FeatUp's JBU stack, its own objective
    python tools/pretrain_jafar.py upsampler=lift experiment=demo          # LiFT, its own objective, offline demo

Outputs under the Hydra run directory (``outputs/pretrain/<name>``): ``checkpoints/`` (every
``checkpoint_every`` steps and ``last.ckpt``; rerunning the same command resumes from it),
``tensorboard/``, ``csv/``, ``pictures/`` (PCA at each validation), ``jafar.safetensors``
(``featup.safetensors``, ``lift.safetensors``) and ``results.json``. A run directory belongs to
one configuration: rerunning with another seed, learning rate, ... there is refused (give it a
new ``name=``, or ``resume=null`` to start afresh).
Configs: ``configs/pretrain.yaml``; ``--help`` lists the groups and the options. A refused input
exits with status 2 and its one sentence.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jafar.runs import main  # noqa: E402
from jafar.train.run import PRETRAINING  # noqa: E402

if __name__ == "__main__":
    main(PRETRAINING)
