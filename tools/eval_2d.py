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
same directory is refused: a new ``name=``, or ``resume=null`` to redo it). A refused input exits
with status 2 and its one sentence. See docs/eval_2d.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jafar.eval.run import EVALUATION_2D  # noqa: E402
from jafar.runs import main  # noqa: E402

if __name__ == "__main__":
    main(EVALUATION_2D)
