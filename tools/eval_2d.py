#!/usr/bin/env python
"""The paper's 2-D evaluations of upsampled features, every upsampler through the same code.

    python tools/eval_2d.py task=seg data_root=/data                          # Table 1: COCO, VOC, ADE20K, Cityscapes
    python tools/eval_2d.py task=seg task.datasets=[voc] compare=[bilinear,jafar]
    python tools/eval_2d.py task=seg dataset.cityscapes.classes=27            # the paper's 27 Cityscapes classes
    python tools/eval_2d.py task=depth data_root=/data                        # depth probe, Depth Anything V2 pseudo-labels
    python tools/eval_2d.py task=cam data_root=/data                          # Grad-CAM faithfulness (ViT-B/16, ImageNet val)
    python tools/eval_2d.py task=ovseg data_root=/data                        # MaskCLIP open-vocabulary segmentation
    python tools/eval_2d.py task=seg experiment=demo                          # offline demo on the CPU (also depth, cam, ovseg)

Configs: ``configs/eval_2d.yaml`` and the groups task/, dataset/, upsampler/, backbone/,
experiment/eval_2d/ (``--help`` lists them). Outputs under
``outputs/eval/<name>``: ``results.json``, ``table.md`` (the paper's layout, one row per
upsampler), ``pictures/<dataset>.png`` and one folder per (data set, upsampler) with its logs and
probe checkpoints; rerunning the same command reuses what is done (another configuration in the
same directory is refused: a new ``name=``, or ``resume=null`` to redo it). See docs/eval_2d.md.
"""

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jafar.eval.config import register_configs  # noqa: E402
from jafar.eval.run import run  # noqa: E402

register_configs()  # the schema of configs/eval_2d.yaml and the experiments of configs/experiment/eval_2d/


@hydra.main(config_path="../configs", config_name="eval_2d", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
