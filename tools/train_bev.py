#!/usr/bin/env python
"""BeV vehicle segmentation on nuScenes with a frozen backbone and an upsampler on every camera.

    python tools/train_bev.py model=simplebev upsampler=jafar data.dataroot=/data/nuscenes
    python tools/train_bev.py upsampler=bilinear data.dataroot=...          # the baselines: none | bilinear
    python tools/train_bev.py upsampler.checkpoint=jafar.safetensors ...     # JAFAR from pretraining
    python tools/train_bev.py experiment=demo                               # offline demo on a synthetic nuScenes (CPU)

Configs: ``configs/bev/train_bev.yaml`` (groups model/, data/, experiment/ there; backbone/ and
upsampler/ shared with the other tools in ``configs/``). Outputs under ``outputs/bev/<name>``:
``checkpoints/`` (rerunning the same command resumes from ``last.ckpt``), ``tensorboard/``,
``csv/``, ``pictures/`` (predictions beside the ground truth at each validation) and
``results.json`` (``{"val": {"iou": ..., "iou_vis1": ..., "iou_vis2": ...}, "prior": {...}}``).
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bev.run import register_resolvers, run  # noqa: E402

register_resolvers()  # configs/bev/train_bev.yaml finds the shared groups of configs/ through it


@hydra.main(config_path="../configs/bev", config_name="train_bev", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
