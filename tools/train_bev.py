#!/usr/bin/env python
"""BeV vehicle segmentation on nuScenes with a frozen backbone and an upsampler on every camera.

    python tools/train_bev.py model=simplebev upsampler=jafar data.dataroot=/data/nuscenes
    python tools/train_bev.py upsampler=bilinear data.dataroot=...          # the baselines: none | bilinear
    python tools/train_bev.py upsampler.checkpoint=jafar.safetensors ...     # JAFAR from pretraining
    python tools/train_bev.py experiment=demo                               # offline demo on a synthetic nuScenes (CPU)

Configs: ``configs/train_bev.yaml`` and the groups backbone/, upsampler/, model/, data/,
experiment/train_bev/ (``--help`` lists them). Outputs under ``outputs/bev/<name>``:
``checkpoints/`` (rerunning the same command resumes from ``last.ckpt``; another configuration in
the same directory is refused: a new ``name=``, or ``resume=null`` to start afresh), ``tensorboard/``,
``csv/``, ``pictures/`` (predictions beside the ground truth at each validation) and
``results.json`` (``{"val": {"iou": ..., "iou_vis1": ..., "iou_vis2": ...}, "prior": {...}}``).
A refused input exits with status 2 and its one sentence.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bev.run import BEV_TRAINING  # noqa: E402
from jafar.runs import main  # noqa: E402

if __name__ == "__main__":
    main(BEV_TRAINING)
