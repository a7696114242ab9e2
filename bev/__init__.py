"""Bird's-eye-view perception with a frozen multi-camera encoder and a feature upsampler.

``bev.data`` (nuScenes through its devkit, the BeV labels, a synthetic nuScenes), ``bev.geometry``
(every camera / ego / BeV transform), ``bev.encoder`` (frozen backbone + upsampler on every
camera), ``bev.heads`` (SimpleBeV, PointBeV, BEVFormer), ``bev.module`` (the LightningModule:
losses, IoU under the visibility mask, pictures) and ``bev.run`` (``tools/train_bev.py``).
``bev`` may import ``jafar``; ``jafar`` never imports it.
"""
