"""The paper's 2-D evaluations of upsampled features (``tools/eval_2d.py``).

* :mod:`.metrics`: mIoU / pixel accuracy (torchmetrics, ignore 255), depth errors (delta_1, RMSE, ...);
* :mod:`.datasets`: Pascal VOC, ADE20K, Cityscapes (19 or 27 classes), COCO-Stuff (27 coarse
  classes), folders of depth maps and ImageNet (classification), from their on-disk layouts, at 448 x 448;
* :mod:`.probes`: linear probes (segmentation, depth) on a frozen backbone + upsampler;
* :mod:`.pseudo_depth`: Depth Anything V2 pseudo-labels (optional ``transformers``);
* :mod:`.cam`: Grad-CAMs from upsampled features and their faithfulness metrics (``task=cam``);
* :mod:`.maskclip`, :mod:`.ovseg`: MaskCLIP dense CLIP features (open_clip) and training-free
  open-vocabulary segmentation (``task=ovseg``);
* :mod:`.demo_data`: offline demo data from the package photographs;
* :mod:`.report`: the paper-style Markdown table and prediction pictures;
* :mod:`.run`: the task registry and the run over data sets x upsamplers.
"""
