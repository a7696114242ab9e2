"""Static BEVFormer for BeV segmentation, on the camera features of :class:`bev.encoder.MultiCameraEncoder`.

BEVFormer (Li et al., ECCV 2022; github fundamentalvision/BEVFormer) without its temporal part,
as re-implemented for segmentation by SimpleBEV (github aharley/simple_bev, ``nets/bevformernet.py``)
and PointBeV (github valeoai/PointBeV, ``pointbev/models/bevformer.py``,
``pointbev/models/view_transform/attention.py``, ``pointbev/models/layers/attention.py``,
``configs/model/BeVFormer.yaml``). Written here from those descriptions:

* **BeV queries**: one learned ``latent_dim`` vector per cell of the query grid, initialised
  ``0.1 * randn`` (SimpleBEV's and PointBeV's ``bev_queries``); the query grid is the BeV grid
  (200 x 200 at 0.5 m by default, as both re-implementations and BEVFormer-base) or, with
  ``query_downsample = k``, a grid of k x k larger cells whose features are upsampled bilinearly
  to the BeV grid before the dense head.
* **Positional embedding** of their own: BEVFormer's ``LearnedPositionalEncoding`` (configs
  ``bevformer_base.py``: ``num_feats = embed_dims / 2``), a learned row vector and a learned
  column vector of ``latent_dim / 2`` each, concatenated (column half first), initialised
  uniform in [0, 1) (mmcv's ``init_cfg=dict(type='Uniform', layer='Embedding')``). It is added
  to the queries where offsets and attention weights are predicted, not to the values.
* **6 encoder layers** (BEVFormer ``num_layers=6``; SimpleBEV ``num_layers = 6``; PointBeV
  ``n_layers: 6``), each ``self-attention -> LayerNorm -> spatial cross-attention -> LayerNorm ->
  FFN -> LayerNorm`` (BEVFormer's ``operation_order``, post-norm), every sub-block residual,
  dropout 0.1 on the attention outputs (BEVFormer's and SimpleBEV's ``dropout=0.1``). FFN:
  Linear, ReLU, Linear with a hidden width of 1028 and no dropout (SimpleBEV's ``ffn_dim = 1028``
  and PointBeV's ``ffn_dim: 1028``; BEVFormer-base uses ``2 * 256 = 512`` and ``ffn_dropout=0.1``).
* **Deformable self-attention** over the BeV queries (BEVFormer's temporal self-attention with
  no history, i.e. Deformable DETR's ``MSDeformAttn`` on the query map): one level, 4 heads,
  8 points (SimpleBEV ``n_levels=1, n_heads=4, n_points=8``; PointBeV the same), the reference
  point of a query is its own cell centre; values are the queries without the positional
  embedding (BEVFormer's ``TemporalSelfAttention`` adds ``query_pos`` to the query only).
* **Spatial cross-attention** (BEVFormer's ``SpatialCrossAttention`` + ``MSDeformableAttention3D``):
  every query owns a pillar of reference points at ``D`` heights above its cell centre; they are
  projected into every camera's feature map; a (query, camera) pair is *valid* when any of its
  reference points lies in front of the camera and inside the feature map. For each valid pair
  the query samples that camera's features at ``num_points`` points per head and level: the
  points are split evenly among the ``D`` projected reference points (``num_points / D`` each,
  BEVFormer's ``num_all_points // num_Z_anchors``) and displaced by learned offsets in feature
  pixels; the attention weights are one softmax over levels x points per head. The outputs of
  the valid cameras are averaged (BEVFormer's ``slots / count``), projected and added to the
  query. 4 heads, 8 points, 1 level by default (SimpleBEV and PointBeV; BEVFormer-base: 8 heads,
  8 points, 4 FPN levels). Like BEVFormer, only the valid (query, camera) pairs are computed:
  each camera's valid queries are gathered into a padded batch ("rebatching").
* **Reference heights**: by default the grid's height-bin centres, 8 heights from -3.375 to
  5.375 m (PointBeV's BeVFormer projector: ``in_shape.projector: [200,200,8]`` with
  ``spatial_bounds`` z from -3.375 to 5.375; SimpleBEV samples the same 8 voxel heights
  ``Y = 8``). ``num_heights = D`` gives BEVFormer's choice instead: ``D`` heights evenly spaced
  from half a metre above the bottom of the z range to half a metre below its top
  (``get_reference_points``: ``linspace(0.5, Z - 0.5, D) / Z`` of the range; BEVFormer uses
  ``num_points_in_pillar = 4`` over ``[-5, 3]`` m: -4.5, -2.17, 0.17, 2.5 m).
* **Initialisation** (Deformable DETR's, kept by BEVFormer's ``MSDeformableAttention3D.init_weights``
  and SimpleBEV's ``nets/ops/modules/ms_deform_attn.py``): offset weights 0, offset biases point
  ``p`` of head ``m`` at ``(p + 1) * (cos, sin)(2 pi m / M)`` scaled so the larger coordinate is
  ``p + 1`` pixels; attention-weight weights and biases 0 (uniform weights); value and output
  projections Xavier-uniform with zero biases.
* **Dense head** (``decoder``): ``"conv"`` (default) is PointBeV's: its BeVFormer has no BeV
  decoder (``configs/model/BeVFormer.yaml`` sets none) and puts its ``BEVConvHead`` (3x3 conv,
  InstanceNorm, ReLU, 1x1 conv per output) directly on the queries, so the six attention layers
  do the BeV reasoning; this is the setting of the paper's BeV experiments, which follow
  PointBeV's code. ``"simplebev"`` is SimpleBEV's ``Bevformernet``, which runs its ResNet-18 BeV
  decoder (:class:`bev.heads.common.BevDecoder`) on the queries first. Outputs: segmentation
  logits (1), centerness (1, sigmoid), offset (2).

**What each layer takes** (``layer_query``):

* ``"pointbev"`` (the default, and ``configs/model/bevformer.yaml``'s): the code behind the
  paper's Table 4. PointBeV's ``DefAttnVT.forward`` (``pointbev/models/view_transform/
  attention.py``) hands the *initial* query to every layer's self-attention and keeps only the
  last layer's output (its loop reads ``query``, never the previous ``queries``), and its
  ``BeVFormer.forward`` (``pointbev/models/bevformer.py``) passes the query parameter itself as
  ``query_pos`` (its ``query_gen`` returns the same ``nn.Parameter`` twice), which its
  ``SADefnAttn`` adds to the query before sampling (so the values are ``2 q``). The output is
  therefore one encoder layer applied to the learned queries, with ``q + q`` for offsets,
  weights and values; the other ``num_layers - 1`` layers of PointBeV's model never reach the
  output (nor get a gradient), so we build only that one layer: the same function and the
  same trained weights, without PointBeV's dead layers and their compute.
* ``"pointbev_all_layers"``: the same output computed as PointBeV's loop computes it, for cost
  measurements (``tools/bev_cost.py``): ``num_layers`` layers are built and every one runs on the
  initial query (``DefAttnVT.forward``: ``for i in range(self.n_layers): queries =
  self.sa_layers[i](query, query_pos)`` ... ``self.last_norm_layers[i](queries)``, and
  ``BevFormerNetwork.forward`` in ``pointbev/models/bevformer.py`` hands the result to the
  heads), and all outputs but the last are discarded. Given the same weights for the last layer
  (``layers[-1]`` here, ``layers[0]`` of ``"pointbev"``), the output is ``"pointbev"``'s; the
  forward costs ``num_layers`` layers (the FLOPs of the paper's Table 14, which follows
  PointBeV's code). The first ``num_layers - 1`` layers never get a gradient, as in PointBeV, so
  multi-process (DDP) training with this mode needs unused parameters to be allowed.
* ``"chained"``: BEVFormer's encoder as BEVFormer and SimpleBEV's ``Bevformernet`` run it,
  ``num_layers`` layers in sequence, each on the previous one's output, with the learned
  row/column positional embedding above and values without it: a deeper model than the one
  behind Table 4's BEVFormer column.

Departures, deliberate: the self-attention's reference points are ``(x = (col + 0.5) / cols,
y = (row + 0.5) / rows)`` of the query map (SimpleBEV and PointBeV stack them as (row, col),
which transposes the map on their square grids); one pixel convention everywhere (pixel
corners, :func:`bev.geometry.pixels_to_grid_sample`; Deformable DETR's normalised sampling
location ``loc`` is pixel ``u = loc * w``, exactly ``grid_sample(align_corners=False)``'s
``2 * loc - 1``); reference points behind a camera are moved a whole feature map outside it
(they sample zeros: BEVFormer divides by a clamped depth and keeps them wherever that lands);
one output projection in the self-attention (SimpleBEV and PointBeV apply two in a row).

**The deformable attention** runs in plain PyTorch (:func:`ms_deform_attn_pytorch`, bilinear
``F.grid_sample`` with zero padding, the algorithm of Deformable DETR's
``ms_deform_attn_core_pytorch``), so the default install and CI need no OpenMMLab package.
Users with mmcv (>= 2.0, built with its ops, ``MMCV_WITH_OPS=1``) can switch to its fused CUDA
kernel with the model key ``deform_attn_impl=mmcv`` (``python tools/train_bev.py model=bevformer
model.deform_attn_impl=mmcv``): the head then calls
``mmcv.ops.multi_scale_deform_attn.MultiScaleDeformableAttnFunction`` on CUDA tensors (same
inputs, same result up to float rounding; CPU tensors keep the PyTorch path, as mmcv's own
module does) and refuses to build, in one sentence, when mmcv's ops cannot be imported.

Sizes: ``latent_dim = 128`` (PointBeV's ``query_gen: 128`` and SimpleBEV's ``latent_dim=128``,
the re-implementations the paper's table is comparable with; BEVFormer's own is 256). On the
default 200 x 200 grid, with ``layer_query="chained"``, the head has 7,724,060 + 128 * C parameters (7,773,212 for DINOv2 ViT-S,
C = 384), of which the 40,000 queries are 5,120,000. One forward with six 32 x 68 feature maps
of 384 channels: 201 GFLOPs seen by ``torch.utils.flop_counter`` (the FFNs are 126 of them)
plus about 4 GFLOPs of bilinear taps (:meth:`BEVFormer.uncounted_flops`); forward + backward
on the CPU peaks at about 7 GB resident.

CPU demo (``experiment=demo model=bevformer``): ``per_model.bevformer`` in
``configs/experiment/train_bev/demo.yaml`` sets ``query_downsample: 2`` for that experiment only
(2 m query cells on the demo's 1 m grid, BEVFormer-tiny's query spacing);
``model.query_downsample=1`` restores one query per cell.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..geometry import (
    BevGrid,
    apply_transform,
    inside_image,
    invert_rigid_torch,
    pixels_to_grid_sample,
    project_points,
    scale_intrinsics,
)
from .common import HEADS, MIN_DEPTH, BevDecoder, check_camera_inputs, output_head

DEFORM_ATTN_IMPLS = ("pytorch", "mmcv")
DECODERS = ("conv", "simplebev")
#: what each encoder layer takes as its query (``layer_query``; module docstring)
LAYER_QUERIES = ("pointbev", "pointbev_all_layers", "chained")

#: normalised sampling location given to reference points behind a camera: a whole feature map
#: to the left of and above it, so that learned offsets of a few pixels still sample zeros
BEHIND_CAMERA = -1.0


# ---------------------------------------------------------------------------------------------
# multi-scale deformable attention: the sampling core
# ---------------------------------------------------------------------------------------------

def _shapes(spatial_shapes) -> List[Tuple[int, int]]:
    return [(int(h), int(w)) for h, w in (spatial_shapes.tolist() if isinstance(spatial_shapes, torch.Tensor)
                                          else spatial_shapes)]


def ms_deform_attn_pytorch(value: torch.Tensor, spatial_shapes, sampling_locations: torch.Tensor,
                           attention_weights: torch.Tensor) -> torch.Tensor:
    """Multi-scale deformable attention's sampling and weighted sum, in PyTorch.

    Args:
        value: ``(B, S, M, D)``: ``M`` heads of ``D`` channels at the ``S = sum_l h_l * w_l``
            positions of the levels, each level flattened row-major and the levels concatenated.
        spatial_shapes: the ``(h_l, w_l)`` of the ``L`` levels (sequence or ``(L, 2)`` tensor).
        sampling_locations: ``(B, Q, M, L, P, 2)`` normalised ``(x, y)`` in each level:
            ``(0, 0)`` is the top-left corner of the top-left pixel, ``(1, 1)`` the bottom-right
            corner of the bottom-right one (pixel ``k``'s centre is at ``(k + 0.5) / w``).
        attention_weights: ``(B, Q, M, L, P)`` (the caller's softmax over ``L x P``).

    Returns:
        ``(B, Q, M * D)``: per head, the attention-weighted sum of the bilinear samples (zero
        outside the map, tap by tap), heads concatenated. The same contract as mmcv's
        ``MultiScaleDeformableAttnFunction`` and Deformable DETR's ``ms_deform_attn_core_pytorch``.
    """
    shapes = _shapes(spatial_shapes)
    b, s, m, d = value.shape
    _, q, _, levels, p, _ = sampling_locations.shape
    if levels != len(shapes) or sum(h * w for h, w in shapes) != s:
        raise ValueError(f"value has {s} positions and sampling_locations {levels} levels, which do not match "
                         f"spatial_shapes {shapes}.")
    grids = 2.0 * sampling_locations - 1.0  # grid_sample(align_corners=False) coordinates
    if not torch.is_autocast_enabled(value.device.type):
        grids = grids.to(value.dtype)  # under autocast, grid_sample runs in float32 (its cast policy)
    out = None
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        v = value[:, start:start + h * w].permute(0, 2, 3, 1).reshape(b * m, d, h, w)
        start += h * w
        g = grids[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(b * m, q, p, 2)
        sampled = F.grid_sample(v, g, mode="bilinear", padding_mode="zeros",
                                align_corners=False)  # (B*M, D, Q, P)
        wts = attention_weights[:, :, :, lvl].permute(0, 2, 1, 3).reshape(b * m, 1, q, p).to(sampled.dtype)
        part = (sampled * wts).sum(-1)  # (B*M, D, Q)
        out = part if out is None else out + part
    return out.view(b, m * d, q).transpose(1, 2)


def load_mmcv_kernel():
    """mmcv's ``MultiScaleDeformableAttnFunction`` (fused CUDA kernel), or one ImportError sentence."""
    try:
        from mmcv.ops.multi_scale_deform_attn import MultiScaleDeformableAttnFunction
    except ImportError as err:
        raise ImportError("deform_attn_impl='mmcv' needs mmcv built with its ops "
                          "(mmcv.ops.multi_scale_deform_attn could not be imported: "
                          f"{err}); install mmcv>=2.0 with MMCV_WITH_OPS=1 or use deform_attn_impl='pytorch'.") from err
    return MultiScaleDeformableAttnFunction


def _kernel_device(t: torch.Tensor) -> bool:
    """Whether mmcv's kernel can run on ``t``'s device (it is CUDA-only)."""
    return t.is_cuda


class DeformableAttention(nn.Module):
    """The learned part of multi-scale deformable attention (Deformable DETR's ``MSDeformAttn``,
    BEVFormer's ``MSDeformableAttention3D`` when ``num_anchors > 1``): sampling offsets and
    attention weights from the queries, the value projection, and the sampling.

    Args:
        embed_dim: channels of queries and values (``num_heads * head_dim``).
        num_heads, num_levels, num_points: ``M``, ``L``, ``P`` (``P`` points per head and level,
            split evenly among the ``num_anchors`` reference points of a query).
        num_anchors: reference points per query (the pillar's heights in the cross-attention).
        impl: ``"pytorch"`` or ``"mmcv"`` (mmcv's CUDA kernel on CUDA tensors).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_levels: int, num_points: int, num_anchors: int = 1,
                 impl: str = "pytorch"):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim must be a multiple of num_heads, got {embed_dim} and {num_heads}.")
        if num_points % num_anchors:
            raise ValueError(f"num_points must be a multiple of the {num_anchors} reference points per query, "
                             f"got {num_points}.")
        if impl not in DEFORM_ATTN_IMPLS:
            raise ValueError(f"deform_attn_impl must be one of {DEFORM_ATTN_IMPLS}, got {impl!r}.")
        self.embed_dim, self.num_heads, self.num_levels = embed_dim, num_heads, num_levels
        self.num_points, self.num_anchors, self.impl = num_points, num_anchors, impl
        self.kernel = load_mmcv_kernel() if impl == "mmcv" else None
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(m, dtype=torch.float32) * (2.0 * math.pi / m)
        direction = torch.stack([theta.cos(), theta.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values
        bias = direction[:, None, None, :] * torch.arange(1, p + 1, dtype=torch.float32)[None, None, :, None]
        self.sampling_offsets.bias.copy_(bias.expand(m, lv, p, 2).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)

    def offsets_and_weights(self, query: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``query (..., C)`` -> offsets ``(..., M, L, P, 2)`` in pixels of each level and
        weights ``(..., M, L, P)``, softmax over ``L x P`` per head."""
        lead = query.shape[:-1]
        m, lv, p = self.num_heads, self.num_levels, self.num_points
        offsets = self.sampling_offsets(query).view(*lead, m, lv, p, 2)
        weights = self.attention_weights(query).view(*lead, m, lv * p).softmax(-1).view(*lead, m, lv, p)
        return offsets, weights

    def locations(self, reference: torch.Tensor, offsets: torch.Tensor, spatial_shapes) -> torch.Tensor:
        """``reference (B, Q, A, 2)`` normalised ``(x, y)`` (A = ``num_anchors``), offsets
        ``(B, Q, M, L, P, 2)`` in pixels -> sampling locations ``(B, Q, M, L, P, 2)``. Point
        ``p`` belongs to reference point ``p % A`` (BEVFormer's ``view(..., P // A, A, 2)``)."""
        shapes = _shapes(spatial_shapes)
        dtype = torch.promote_types(offsets.dtype, torch.float32)  # locations never in half precision
        norm = torch.tensor([[w, h] for h, w in shapes], dtype=dtype, device=offsets.device)  # (L, 2)
        b, q, m, lv, p, _ = offsets.shape
        a = reference.shape[2]
        if a != self.num_anchors:
            raise ValueError(f"reference has {a} points per query, expected num_anchors={self.num_anchors}.")
        off = (offsets.to(dtype) / norm[:, None, :]).view(b, q, m, lv, p // a, a, 2)
        return (reference[:, :, None, None, None, :, :].to(dtype) + off).view(b, q, m, lv, p, 2)

    def sample(self, value: torch.Tensor, spatial_shapes, locations: torch.Tensor,
               weights: torch.Tensor) -> torch.Tensor:
        """``value (B, S, C)`` (already projected) -> ``(B, Q, C)``."""
        b, s, c = value.shape
        v = value.view(b, s, self.num_heads, c // self.num_heads)
        if self.kernel is not None and _kernel_device(value):
            shapes = torch.tensor(_shapes(spatial_shapes), dtype=torch.long, device=value.device)
            start = torch.cat([shapes.new_zeros(1), (shapes[:, 0] * shapes[:, 1]).cumsum(0)[:-1]])
            out = self.kernel.apply(v.float().contiguous(), shapes, start, locations.float().contiguous(),
                                    weights.float().contiguous(), b)  # im2col_step = batch: always divides it
            return out.to(value.dtype)
        return ms_deform_attn_pytorch(v, spatial_shapes, locations, weights)


# ---------------------------------------------------------------------------------------------
# encoder layers
# ---------------------------------------------------------------------------------------------

class BevSelfAttention(nn.Module):
    """Deformable self-attention over the ``(rows, cols)`` query map: each query attends around
    its own cell (``(B, Q, C) -> (B, Q, C)``, residual included)."""

    def __init__(self, dim: int, num_heads: int, num_points: int, dropout: float, impl: str):
        super().__init__()
        self.attn = DeformableAttention(dim, num_heads, 1, num_points, 1, impl)
        self.output_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor, reference: torch.Tensor,
                shape: Tuple[int, int], value_with_pos: bool = False) -> torch.Tensor:
        """``value_with_pos``: the values are ``query + query_pos`` (PointBeV's ``SADefnAttn``,
        ``pointbev/models/layers/attention.py``, samples the query after adding the positional
        embedding), else ``query`` (BEVFormer's ``TemporalSelfAttention``)."""
        b = query.shape[0]
        offsets, weights = self.attn.offsets_and_weights(query + query_pos)
        loc = self.attn.locations(reference.expand(b, -1, -1, -1), offsets, [shape])
        out = self.attn.sample(self.attn.value_proj(query + query_pos if value_with_pos else query), [shape], loc,
                               weights)
        return query + self.dropout(self.output_proj(out))


class Rebatch:
    """BEVFormer's rebatching: for each (sample, camera), the indices of the queries it sees,
    padded to the longest list. ``index (B*N, Lmax)`` long, ``keep (B*N, Lmax)`` bool."""

    def __init__(self, valid: torch.Tensor):
        b, n, q = valid.shape
        flat = valid.reshape(b * n, q)
        lengths = flat.sum(1)
        self.max_len = int(lengths.max()) if flat.numel() else 0
        order = torch.sort((~flat).to(torch.uint8), dim=1, stable=True).indices  # seen queries first, in order
        self.index = order[:, :self.max_len].contiguous()
        self.keep = torch.arange(self.max_len, device=valid.device)[None, :] < lengths[:, None]
        self.batch, self.cameras, self.queries = b, n, q

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, Q, ...)`` per-query tensor -> ``(B*N, Lmax, ...)`` (camera-independent values)."""
        b, n = self.batch, self.cameras
        idx = self.index.view(b, n * self.max_len)
        out = torch.gather(x, 1, idx.view(b, -1, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]))
        return out.view(b * n, self.max_len, *x.shape[2:])

    def gather_per_camera(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, Q, ...)`` -> ``(B*N, Lmax, ...)``."""
        x = x.flatten(0, 1)
        return torch.gather(x, 1, self.index.view(*self.index.shape, *([1] * (x.dim() - 2)))
                            .expand(-1, -1, *x.shape[2:]))

    def scatter_sum(self, x: torch.Tensor) -> torch.Tensor:
        """``(B*N, Lmax, C)`` -> ``(B, Q, C)``: the sum over the cameras of the kept rows."""
        b, n, c = self.batch, self.cameras, x.shape[-1]
        x = x * self.keep[..., None].to(x.dtype)
        target = (self.index + torch.arange(b, device=x.device).repeat_interleave(n)[:, None] * self.queries)
        out = x.new_zeros(b * self.queries, c)
        out.index_add_(0, target.reshape(-1), x.reshape(-1, c))
        return out.view(b, self.queries, c)


class SpatialCrossAttention(nn.Module):
    """Each query samples, in every camera that sees its pillar, the feature map around the
    projections of its reference points; the cameras are averaged (``(B, Q, C) -> (B, Q, C)``,
    residual included)."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int, num_heights: int,
                 dropout: float, impl: str):
        super().__init__()
        self.attn = DeformableAttention(dim, num_heads, num_levels, num_points, num_heights, impl)
        self.output_proj = nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: torch.Tensor, query_pos: torch.Tensor, values: torch.Tensor, spatial_shapes,
                reference: torch.Tensor, rebatch: Rebatch, views: torch.Tensor) -> torch.Tensor:
        """``values (B*N, S, C)`` the cameras' (unprojected) feature levels; ``reference (B*N,
        Lmax, D, 2)`` the rebatched projections; ``views (B, Q)`` the valid cameras per query."""
        if rebatch.max_len == 0:
            return query  # no camera sees any pillar: BEVFormer's slots stay zero, the output projection's bias aside
        offsets, weights = self.attn.offsets_and_weights(query + query_pos)
        loc = self.attn.locations(reference, rebatch.gather(offsets), spatial_shapes)
        out = self.attn.sample(self.attn.value_proj(values), spatial_shapes, loc, rebatch.gather(weights))
        slots = rebatch.scatter_sum(out) / views.clamp_min(1)[..., None].to(out.dtype)
        return query + self.dropout(self.output_proj(slots))


class EncoderLayer(nn.Module):
    """BEVFormer's encoder layer, static: self-attention, norm, cross-attention, norm, FFN, norm."""

    def __init__(self, dim: int, num_heads: int, self_points: int, cross_points: int, num_levels: int,
                 num_heights: int, ffn_dim: int, dropout: float, impl: str):
        super().__init__()
        self.self_attn = BevSelfAttention(dim, num_heads, self_points, dropout, impl)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = SpatialCrossAttention(dim, num_heads, num_levels, cross_points, num_heights, dropout, impl)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(inplace=True), nn.Linear(ffn_dim, dim))
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, query, query_pos, ref_2d, query_shape, values, spatial_shapes, ref_cam, rebatch, views,
                value_with_pos: bool = False):
        query = self.norm1(self.self_attn(query, query_pos, ref_2d, query_shape, value_with_pos))
        query = self.norm2(self.cross_attn(query, query_pos, values, spatial_shapes, ref_cam, rebatch, views))
        return self.norm3(query + self.ffn(query))


# ---------------------------------------------------------------------------------------------
# geometry of the pillars
# ---------------------------------------------------------------------------------------------

def reference_heights(grid: BevGrid, num_heights: Optional[int] = None) -> torch.Tensor:
    """``(D,)`` float64 heights of every pillar's reference points: the grid's ``z_bins`` bin
    centres (PointBeV), or BEVFormer's ``num_heights`` evenly spaced from ``z_low + 0.5`` m to
    ``z_high - 0.5`` m (``get_reference_points``: ``linspace(0.5, Z - 0.5, D) / Z`` of the range)."""
    if num_heights is None:
        return grid.z_centers()
    lo, hi = grid.z_bounds
    return lo + torch.linspace(0.5, (hi - lo) - 0.5, int(num_heights), dtype=torch.float64)


def project_pillars(points: torch.Tensor, intrinsics: torch.Tensor, cam2ego: torch.Tensor, image_size,
                    feature_hw: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Project pillar reference points into every camera's feature map.

    Args:
        points: ``(Q, D, 3)`` ego-frame reference points (``D`` heights per pillar).
        intrinsics: ``(B, N, 3, 3)`` in the pixels of the ``image_size`` input images, scaled per
            axis to the ``feature_hw`` map (``sx = w / W``, ``sy = h / H``).
        cam2ego: ``(B, N, 4, 4)``.

    Returns:
        ``locations (B, N, Q, D, 2)``: normalised ``(x, y) = (u / w, v / h)`` in the feature map
        (pixel corners), clamped to ``[-0.5, 1.5]``, and :data:`BEHIND_CAMERA` for points at
        depth <= :data:`bev.heads.common.MIN_DEPTH`; ``seen (B, N, Q, D)``: depth >
        ``MIN_DEPTH`` and inside the feature map (``[0, w] x [0, h]``), the visibility of
        :func:`bev.heads.common.lift_to_voxels`. A (query, camera) pair is valid when
        ``seen.any(-1)``. Runs in float32 with autocast off.
    """
    height, width = image_size
    h, w = feature_hw
    q, d, _ = points.shape
    with torch.autocast(intrinsics.device.type, enabled=False):
        k_feat = scale_intrinsics(intrinsics.float(), w / width, h / height)
        ego2cam = invert_rigid_torch(cam2ego.float())
        uv, depth = project_points(apply_transform(ego2cam, points.float().reshape(-1, 3)), k_feat)  # (B, N, Q*D, .)
        in_front = depth > MIN_DEPTH
        seen = in_front & inside_image(uv, (h, w))
        loc = ((pixels_to_grid_sample(uv, (h, w)) + 1.0) / 2.0).clamp(-0.5, 1.5)
        loc = torch.where(in_front[..., None], loc, torch.full_like(loc, BEHIND_CAMERA))
    b, n = loc.shape[:2]
    return loc.view(b, n, q, d, 2), seen.view(b, n, q, d)


# ---------------------------------------------------------------------------------------------
# the head
# ---------------------------------------------------------------------------------------------

def _positive_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {v!r}.")
    return v


@HEADS.register("bevformer")
class BEVFormer(nn.Module):
    """Static BEVFormer on multi-camera features: neck, learned BeV queries, ``num_layers``
    encoder layers, dense head.

    Args:
        in_channels: C of the camera features (``MultiCameraEncoder.out_channels``).
        grid: the BeV grid (default 200 x 200 cells of 0.5 m, 8 heights).
        latent_dim: width of the queries, the neck's output and the attention (128: PointBeV's
            and SimpleBEV's; BEVFormer's is 256). Even, and a multiple of ``num_heads``.
        num_layers: encoder layers (6).
        num_heads: attention heads of both attentions (4).
        self_points: sampling points per head of the self-attention (8).
        cross_points: sampling points per head and level of the cross-attention (8), a multiple
            of the number of reference heights (split evenly among them).
        num_heights: reference heights per pillar: None (default) for the grid's ``z_bins``
            height centres (8, PointBeV), or an int (BEVFormer's 4, see :func:`reference_heights`).
        num_levels: feature levels of the cross-attention (1, as SimpleBEV and PointBeV): level
            0 is the neck's output, level ``l`` its 2^l average-pooled copy.
        ffn_dim: hidden width of the FFN (1028).
        dropout: dropout of the attention outputs (0.1).
        query_downsample: the query grid's cells are ``query_downsample`` x ``query_downsample``
            grid cells (1: one query per BeV cell); the BeV features are then upsampled
            bilinearly to the grid. The grid's rows and columns must be multiples of it.
        decoder: ``"conv"`` (PointBeV's heads on the queries) or ``"simplebev"`` (SimpleBEV's
            ResNet-18 BeV decoder and heads).
        deform_attn_impl: ``"pytorch"`` or ``"mmcv"`` (see the module docstring).
        layer_query: ``"pointbev"`` (each layer on the initial query, the query as its own
            positional embedding: PointBeV's static BEVFormer; one layer built),
            ``"pointbev_all_layers"`` (the same output, with PointBeV's ``num_layers`` layers built
            and run, all but the last discarded: PointBeV's cost) or ``"chained"`` (``num_layers``
            layers in sequence, learned row/column embedding); module docstring.

    Call: ``head(features (B, N, C, h, w), intrinsics (B, N, 3, 3) in the input image's pixels,
    cam2ego (B, N, 4, 4), image_size (H, W))`` -> ``dict(seg (B, 1, X, Y) logits, centerness
    (B, 1, X, Y) in [0, 1], offset (B, 2, X, Y))``, rows along ego x, columns along ego y.
    """

    #: the smallest settings worth running (contract tests, ``tools/gpu_report.py --smoke``)
    SMOKE_OPTIONS = {"latent_dim": 16, "num_layers": 1, "ffn_dim": 32, "self_points": 2, "cross_points": 4}

    def __init__(self, in_channels: int, grid: BevGrid = BevGrid(), latent_dim: int = 128, num_layers: int = 6,
                 num_heads: int = 4, self_points: int = 8, cross_points: int = 8,
                 num_heights: Optional[int] = None, num_levels: int = 1, ffn_dim: int = 1028,
                 dropout: float = 0.1, query_downsample: int = 1, decoder: str = "conv",
                 deform_attn_impl: str = "pytorch", layer_query: str = "pointbev"):
        super().__init__()
        for name, v in (("in_channels", in_channels), ("latent_dim", latent_dim), ("num_layers", num_layers),
                        ("num_heads", num_heads), ("self_points", self_points), ("cross_points", cross_points),
                        ("num_levels", num_levels), ("ffn_dim", ffn_dim), ("query_downsample", query_downsample)):
            _positive_int(name, v)
        if num_heights is not None:
            _positive_int("num_heights", num_heights)
        if not isinstance(grid, BevGrid):
            raise ValueError(f"grid must be a bev.geometry.BevGrid, got {type(grid).__name__}.")
        if latent_dim % 2 or latent_dim % num_heads:
            raise ValueError(f"latent_dim must be even and a multiple of num_heads={num_heads}, got {latent_dim}.")
        heights = reference_heights(grid, num_heights)
        if cross_points % len(heights):
            raise ValueError(f"cross_points must be a multiple of the {len(heights)} reference heights, got {cross_points}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}.")
        if deform_attn_impl not in DEFORM_ATTN_IMPLS:
            raise ValueError(f"deform_attn_impl must be one of {DEFORM_ATTN_IMPLS}, got {deform_attn_impl!r}.")
        if layer_query not in LAYER_QUERIES:
            raise ValueError(f"layer_query must be one of {LAYER_QUERIES}, got {layer_query!r}.")
        nx, ny = grid.shape
        if nx % query_downsample or ny % query_downsample:
            raise ValueError(f"query_downsample must divide the grid's {nx} x {ny} cells, got {query_downsample}.")
        self.in_channels, self.latent_dim, self.grid = in_channels, latent_dim, grid
        self.num_layers, self.num_heads, self.num_levels = num_layers, num_heads, num_levels
        self.self_points, self.cross_points = self_points, cross_points
        self.query_downsample, self.decoder_kind, self.deform_attn_impl = query_downsample, decoder, deform_attn_impl
        self.layer_query = layer_query
        self.query_grid = dataclasses.replace(grid, resolution=grid.resolution * query_downsample)
        self.query_shape = (nx // query_downsample, ny // query_downsample)
        assert self.query_grid.shape == self.query_shape
        self.heights = heights
        xq, yq = self.query_shape

        self.neck = nn.Conv2d(in_channels, latent_dim, 1)
        self.bev_queries = nn.Parameter(0.1 * torch.randn(xq * yq, latent_dim))
        if layer_query == "chained":
            self.row_embed = nn.Parameter(torch.rand(xq, latent_dim // 2))
            self.col_embed = nn.Parameter(torch.rand(yq, latent_dim // 2))
        # "pointbev": only the last of PointBeV's num_layers layers reaches the output; it is the
        # one built (the others would hold weights that never get a gradient);
        # "pointbev_all_layers" builds and runs them all, as PointBeV does
        built = 1 if layer_query == "pointbev" else num_layers
        self.layers = nn.ModuleList([
            EncoderLayer(latent_dim, num_heads, self_points, cross_points, num_levels, len(heights), ffn_dim,
                         float(dropout), deform_attn_impl) for _ in range(built)])
        if decoder == "simplebev":
            self.decoder = BevDecoder(latent_dim)
        else:
            self.decoder = None
            self.segmentation_head = output_head(latent_dim, 1)
            self.instance_center_head = output_head(latent_dim, 1, sigmoid=True)
            self.instance_offset_head = output_head(latent_dim, 2)
        # float32 geometry per device (not buffers: .half() would round them)
        self._geometry: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}
        #: (query, camera) pairs the cross-attention computed in the last forward, padding
        #: included, summed over the batch (for :meth:`uncounted_flops`)
        self.last_cross_pairs: Optional[int] = None

    # ----------------------------------------------------------------------------- geometry
    def pillar_points(self) -> torch.Tensor:
        """``(Q, D, 3)`` float64 ego reference points, queries row-major over the query grid."""
        xy = self.query_grid.cell_centers().reshape(-1, 2)
        q, d = xy.shape[0], len(self.heights)
        return torch.cat([xy[:, None, :].expand(q, d, 2), self.heights[None, :, None].expand(q, d, 1)], -1)

    def geometry(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Pillar points ``(Q, D, 3)`` and the self-attention's reference points ``(1, Q, 1, 2)``
        (normalised ``(x, y) = ((col + 0.5) / cols, (row + 0.5) / rows)`` of the query map)."""
        if device not in self._geometry:
            xq, yq = self.query_shape
            rows = (torch.arange(xq, dtype=torch.float64) + 0.5) / xq
            cols = (torch.arange(yq, dtype=torch.float64) + 0.5) / yq
            r, c = torch.meshgrid(rows, cols, indexing="ij")
            ref_2d = torch.stack([c.reshape(-1), r.reshape(-1)], -1)[None, :, None, :]
            self._geometry[device] = (self.pillar_points().to(device=device, dtype=torch.float32),
                                      ref_2d.to(device=device, dtype=torch.float32))
        return self._geometry[device]

    def query_pos(self) -> torch.Tensor:
        """``(Q, C)`` the positional embedding: with ``layer_query="chained"``, BEVFormer's
        learned one (column half, then row half); with ``"pointbev"`` (and
        ``"pointbev_all_layers"``), the query parameter itself
        (PointBeV's ``BeVFormer.forward`` calls its ``query_gen`` twice, for the query and for
        ``query_pos``, and both return the one ``nn.Parameter``)."""
        if self.layer_query != "chained":
            return self.bev_queries
        xq, yq = self.query_shape
        half = self.latent_dim // 2
        return torch.cat([self.col_embed[None, :, :].expand(xq, yq, half),
                          self.row_embed[:, None, :].expand(xq, yq, half)], -1).reshape(xq * yq, self.latent_dim)

    # ----------------------------------------------------------------------------- forward
    def forward(self, features: torch.Tensor, intrinsics: torch.Tensor, cam2ego: torch.Tensor,
                image_size) -> Dict[str, torch.Tensor]:
        query, query_pos, context = self.layer_inputs(features, intrinsics, cam2ego, image_size)
        if self.layer_query == "pointbev":
            # every PointBeV layer starts again from the initial query, so the output is the last
            # layer's on it (DefAttnVT.forward); the self-attention samples query + query_pos
            query = self.layers[-1](query, query_pos, *context, value_with_pos=True)
        elif self.layer_query == "pointbev_all_layers":
            # PointBeV's loop as written: every layer on the initial query, only the last output kept
            for layer in self.layers:
                out = layer(query, query_pos, *context, value_with_pos=True)
            query = out
        else:
            for layer in self.layers:
                query = layer(query, query_pos, *context)
        return self.dense(query)

    def layer_inputs(self, features: torch.Tensor, intrinsics: torch.Tensor, cam2ego: torch.Tensor, image_size):
        """``(query (B, Q, C), query_pos (1, Q, C), context)``: what every encoder layer takes,
        ``layer(query, query_pos, *context)``."""
        image_size = check_camera_inputs(features, intrinsics, cam2ego, image_size, self.in_channels)
        b, n, _, h, w = features.shape
        latent = self.neck(features.flatten(0, 1))  # (B*N, C', h, w)
        levels = [latent]
        for _ in range(1, self.num_levels):
            levels.append(F.avg_pool2d(levels[-1], 2, ceil_mode=True))
        spatial_shapes = [tuple(lv.shape[-2:]) for lv in levels]
        values = torch.cat([lv.flatten(2) for lv in levels], 2).transpose(1, 2)  # (B*N, S, C')

        points, ref_2d = self.geometry(features.device)
        loc, seen = project_pillars(points, intrinsics, cam2ego, image_size, (h, w))  # (B, N, Q, D, 2)
        valid = seen.any(-1)  # (B, N, Q)
        views = valid.sum(1)  # (B, Q)
        rebatch = Rebatch(valid)
        ref_cam = rebatch.gather_per_camera(loc)  # (B*N, Lmax, D, 2)
        self.last_cross_pairs = b * n * rebatch.max_len

        # a copy: a view of a parameter under no_grad still requires grad
        query = self.bev_queries[None].repeat(b, 1, 1).to(latent.dtype)
        # "pointbev": PointBeV's second query_gen call, a copy of the same parameter (a view of it
        # under no_grad would still require grad, which torch's flop counter refuses)
        query_pos = query if self.layer_query != "chained" else self.query_pos()[None].to(latent.dtype)
        return query, query_pos, (ref_2d, self.query_shape, values, spatial_shapes, ref_cam, rebatch, views)

    def dense(self, query: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The BeV outputs of the encoder's queries ``(B, Q, C)``."""
        xq, yq = self.query_shape
        bev = query.transpose(1, 2).reshape(query.shape[0], self.latent_dim, xq, yq)
        if self.query_downsample > 1:
            bev = F.interpolate(bev, size=self.grid.shape, mode="bilinear", align_corners=False)
        if self.decoder is not None:
            return self.decoder(bev)
        return dict(seg=self.segmentation_head(bev), centerness=self.instance_center_head(bev),
                    offset=self.instance_offset_head(bev))

    def uncounted_flops(self, num_cameras: int) -> int:
        """FLOPs of one forward (batch 1) that ``torch.utils.flop_counter`` does not see: the
        bilinear taps of the deformable sampling, queries x heads x levels x points x 4 taps x 2
        FLOPs x head dim (the attention-weighted sum is not counted, as the SimpleBeV head does
        not count its average), per layer:

        * self-attention: every query, 1 level, ``self_points``;
        * cross-attention: the (query, camera) pairs computed, i.e. each camera's valid queries
          padded to the longest list (BEVFormer's rebatching), as measured by the last forward
          (``last_cross_pairs``); before any forward, every query in every one of
          ``num_cameras`` cameras (an upper bound).
        """
        q = self.query_shape[0] * self.query_shape[1]
        pairs = self.last_cross_pairs if self.last_cross_pairs is not None else q * int(num_cameras)
        taps = 4 * 2 * self.latent_dim  # heads x head dim = latent_dim
        per_layer = q * self.self_points * taps + pairs * self.num_levels * self.cross_points * taps
        return len(self.layers) * per_layer

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, latent_dim={self.latent_dim}, query_shape={self.query_shape}, "
                f"heights={[round(float(z), 3) for z in self.heights]}, decoder={self.decoder_kind!r}, "
                f"layer_query={self.layer_query!r}, "
                f"deform_attn_impl={self.deform_attn_impl!r}")
