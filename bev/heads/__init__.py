"""BeV heads: ``head(features (B, N, C, h, w), intrinsics, cam2ego, image_size) -> dict`` of
``(B, ., X, Y)`` maps (``seg`` logits, ``centerness``, ``offset``).

:func:`bev.heads.simplebev.lift_to_voxels` (camera features -> voxel grid) is shared by the heads.
"""

from .simplebev import SimpleBeV, lift_to_voxels

__all__ = ["SimpleBeV", "lift_to_voxels"]
