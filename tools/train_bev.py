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
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bev.config import register_configs  # noqa: E402
from bev.run import run  # noqa: E402

register_configs()  # the schema of configs/train_bev.yaml and the experiments of configs/experiment/train_bev/


@hydra.main(config_path="../configs", config_name="train_bev", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
