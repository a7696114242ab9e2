"""BeV heads: ``head(features (B, N, C, h, w), intrinsics, cam2ego, image_size) -> dict`` of
``(B, ., X, Y)`` maps (``seg`` logits, ``centerness``, ``offset``), one module per head, each
registered in :data:`HEADS` (:mod:`bev.heads.common`, which also holds what the heads share:
the camera input check, SimpleBEV's lifting and BeV decoder). :func:`build_head` builds one by
name, :func:`model_config` reads its settings from ``configs/model/<name>.yaml`` without Hydra.
"""

from .common import HEADS, build_head, lift_to_voxels, model_config

__all__ = ["HEADS", "build_head", "lift_to_voxels", "model_config"]
