"""PointBeV's sparse BeV head on the camera features of :class:`bev.encoder.MultiCameraEncoder`.

Follows PointBeV (Chambon et al., CVPR 2024; github valeoai/PointBeV), re-written. Facts taken
from it (paths in that repository):

* sampling (``pointbev/models/sampled.py``, ``configs/model/PointBeV.yaml``): training predicts
  only at sampled BeV cells ("pillars"): a coarse pass on ``N_coarse = 2500`` random cells (of the
  40,000 of the 200 x 200 grid, ``mode: rnd_pillars``), then a fine pass, with the same weights,
  on ``N_fine = 2500`` cells around the ``N_anchor = 100`` cells of highest coarse segmentation
  score, each anchor opening a ``fine_patch_size = 9`` square window (``fine_thresh = 0.1``
  replaces the top-``N_anchor`` rule when ``N_anchor`` is ``"dyna"``; PointBeV's released runs,
  ``logs/PointBeV/effb4/*/.hydra/config.yaml``, used 7 and 0.2, the values of
  ``configs/model/pointbev.yaml``), the random cells filling the fine pass up to ``N_fine``
  (their ``reinject_pts: true``); where both passes predict
  a cell their outputs are averaged, and the loss is masked by the union of the two passes'
  cells. Evaluation is dense (``val_mode: dense``, no fine pass: ``valid_fine: False``);
* lifting (``pointbev/models/view_transform/gridsample.py``, ``grid_sample_mode: sparse_optim``):
  every pillar's height points (the grid's ``z_bins`` heights) are projected into every camera
  and bilinearly sampled only on the (point, camera) pairs where the camera sees the point; the
  samples are averaged over those cameras (points no camera sees get zeros);
* position embedding (``configs/model/net/view_transform/coordembd/fourier.yaml``,
  ``pointbev/models/layers/attention.py``, ``pointbev/models/projector/common.py``): ego
  coordinates divided by 1.2 x the largest absolute bound of each axis, Fourier features
  ``cos, sin (2 pi b v)`` at ``m = 8`` frequencies ``b = 2^(k - 1)``, ``k = 0..7``, then an MLP
  (48 -> 256 -> 256 -> 128, GELU), *added* to the sampled features;
* height compression (``configs/model/net/view_transform/heightcomp/mlp.yaml``): heights folded
  into channels (channel ``c * Z + z``), an MLP of 4 layers (``C Z -> 128 -> 128 -> 128 -> 128``,
  ReLU; PointBeV's MLP adds a residual only when the input width equals the hidden width, which
  it does not here);
* sparse U-Net (``pointbev/models/autoencoder/sparse_resnet.py``, ``configs/model/net/
  autoencoder/sparse_unet.yaml``): submanifold 7x7 conv to 64 channels + BatchNorm + ReLU; three
  levels of two sparse basic blocks (3x3 submanifold convs, BatchNorm; 64, 128, 256 channels),
  each level followed by a sparse max pool (kernel 3, stride 2, padding 1); decoder: three
  sparse inverse convs (kernel 3, the pools' index pairs) + BatchNorm, each added to the skip
  of its level (the last skip is the U-Net's input); BatchNorm momentum 0.1; no bias;
* heads (``pointbev/models/heads/convn.py``, ``sparse_convn.yaml``): segmentation (1),
  centerness (1, sigmoid) and offset (2), each a 3x3 submanifold conv (no bias), a
  normalisation, ReLU and a 1x1 submanifold conv. PointBeV applies ``nn.InstanceNorm1d`` to the
  ``(points, channels)`` feature matrix, which torch reads as one unbatched ``(C=points,
  L=channels)`` sample: every point is normalised over its channels. That is what this head does
  (``F.layer_norm``, no affine): it does not depend on how many points were sampled;
* spconv's native algorithm everywhere (``algo = spconv.ConvAlgo.Native`` in every PointBeV
  layer file); on the CPU it is also the only one that works.

Departures, deliberate: the camera geometry, pixel convention, visibility test (depth > 1 mm,
projection inside the feature map) and border padding are SimpleBeV's here
(:func:`bev.heads.common.lift_to_voxels`), so the two heads see the same features; the
feature map goes through a 1x1 neck to ``latent_dim`` (PointBeV's AGP neck also ends at 128
channels); the first basic block of levels 2 and 3 adds its 1x1-projected input (a ResNet
block; PointBeV builds the projection but, the widths differing, adds no residual); coarse
cells are drawn independently per sample (PointBeV draws one set for the batch); when more
than ``N_fine`` cells lie in the anchors' windows, the ones kept are those of the best anchors
(PointBeV keeps the first ``N_fine`` in raster order); anchors are taken among the predicted
cells only.

Losses: the run's ``loss`` (``bev.losses``; PointBeV's by default, ``loss=pointbev``: its
terms, masks and learned weighting from ``pointbev/models/trainer.py`` and ``pointbev/loss/``)
with ``point_mask``, the cells this head predicted, masked into every term as PointBeV's
``_get_masks`` does.

spconv notes: its sparse max pool starts from 0 (it returns ``max(0, inputs)``; every pool here
follows a ReLU, so it is the max pool), its 1x1 convs are one matrix product (here
``nn.Linear``), and it reads the raw index buffer, so indices must be contiguous (a strided
``nonzero()`` result silently gives wrong neighbours; the U-Net makes them contiguous).
Training draws (coarse cells, fine tie-breaks) come from a generator seeded by the run's seed
and the ``draws`` buffer, which is checkpointed: a resumed run draws as the uninterrupted one.

spconv is optional at import (the GPU machine has none): building :class:`PointBeV` without it
raises one ImportError sentence.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple, Union

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
from .common import HEADS, MIN_DEPTH, check_camera_inputs

try:
    import spconv.pytorch as spconv
except ImportError:  # pragma: no cover - exercised where spconv is absent
    spconv = None

SPCONV_MISSING = ("PointBeV needs spconv 2.x, which is not installed: pip install spconv-cu120 "
                  "(or the spconv build for your CUDA version).")


def _need_spconv() -> None:
    if spconv is None:
        raise ImportError(SPCONV_MISSING)


def _algo():
    return spconv.ConvAlgo.Native


# ---------------------------------------------------------------------------------------------
# lifting on points
# ---------------------------------------------------------------------------------------------

def gather_point_features(features: torch.Tensor, intrinsics: torch.Tensor, cam2ego: torch.Tensor, image_size,
                          points: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Camera features at ego points, bilinear, averaged over the cameras that see each point.

    Args:
        features: ``(B, N, C, h, w)`` camera feature maps.
        intrinsics: ``(B, N, 3, 3)`` in the pixel frame of the ``image_size`` input images.
        cam2ego: ``(B, N, 4, 4)``.
        image_size: ``(H, W)`` of the input images.
        points: ``(B, P, 3)`` ego points (each sample its own).

    Returns:
        ``(mean (B, P, C), views (B, P), pairs)``: the mean over the cameras that see each point
        (zero where none does), the number of those cameras, and the number of (point, camera)
        pairs sampled. ``F.grid_sample`` runs once per (sample, camera) image on that image's
        valid pairs only; visibility, pixel convention and padding are those of
        :func:`bev.heads.common.lift_to_voxels`, so on a pillar both give the same values.
    """
    height, width = check_camera_inputs(features, intrinsics, cam2ego, image_size)
    b, n, c, h, w = features.shape
    if not isinstance(points, torch.Tensor) or points.dim() != 3 or points.shape[0] != b or points.shape[2] != 3:
        got = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise ValueError(f"points must be a ({b}, P, 3) tensor of ego coordinates, got {got}.")
    p = points.shape[1]
    device = features.device
    with torch.autocast(device.type, enabled=False):
        k_feat = scale_intrinsics(intrinsics.float(), w / width, h / height)  # (B, N, 3, 3)
        ego2cam = invert_rigid_torch(cam2ego.float())
        uv, depth = project_points(apply_transform(ego2cam, points.float()[:, None]), k_feat)  # (B, N, P, 2)
        seen = (depth > MIN_DEPTH) & inside_image(uv, (h, w))  # (B, N, P)
        bi, ci, pi = seen.nonzero(as_tuple=True)  # sorted by sample, then camera
        at = pixels_to_grid_sample(uv[bi, ci, pi], (h, w))  # (V, 2)
    if not torch.is_autocast_enabled(device.type):  # under autocast grid_sample runs in float32 anyway
        at = at.to(features.dtype)
    images = features.reshape(b * n, c, h, w)
    counts = torch.bincount(bi * n + ci, minlength=b * n).tolist()
    chunks, start = [], 0
    for image, count in enumerate(counts):
        if count:
            where = at[start:start + count].view(1, 1, count, 2)
            chunks.append(F.grid_sample(images[image:image + 1], where, mode="bilinear", padding_mode="border",
                                        align_corners=False)[0, :, 0].t())  # (count, C)
            start += count
    views = seen.sum(1)  # (B, P)
    if not chunks:
        return features.new_zeros(b, p, c), views, 0
    sampled = torch.cat(chunks)
    total = sampled.new_zeros(b * p, c).index_add_(0, bi * p + pi, sampled)
    mean = total.view(b, p, c) / views.clamp_min(1)[..., None].to(total.dtype)
    return mean, views, int(sampled.shape[0])


class FourierEmbedding(nn.Module):
    """PointBeV's coordinate embedding: ``cos, sin(2 pi 2^(k-1) v)`` for ``k < frequencies`` on each
    normalised coordinate, then an MLP (GELU) to ``out_channels``. ``(..., 3) -> (..., out)``."""

    def __init__(self, out_channels: int, frequencies: int = 8, hidden: Optional[int] = None, layers: int = 3):
        super().__init__()
        hidden = hidden or 2 * out_channels
        self.register_buffer("freqs", 2.0 ** (torch.arange(frequencies, dtype=torch.float32) - 1), persistent=False)
        widths = [6 * frequencies] + [hidden] * (layers - 1) + [out_channels]
        mods: List[nn.Module] = []
        for i, (a, o) in enumerate(zip(widths[:-1], widths[1:])):
            mods.append(nn.Linear(a, o))
            if i < layers - 1:
                mods.append(nn.GELU())
        self.mlp = nn.Sequential(*mods)

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        angles = 2 * math.pi * v[..., None] * self.freqs  # (..., 3, m)
        return self.mlp(torch.cat([torch.cos(angles), torch.sin(angles)], -1).flatten(-2))


def _mlp(in_ch: int, hidden: int, out_ch: int, layers: int) -> nn.Sequential:
    widths = [in_ch] + [hidden] * (layers - 1) + [out_ch]
    mods: List[nn.Module] = []
    for i, (a, o) in enumerate(zip(widths[:-1], widths[1:])):
        mods.append(nn.Linear(a, o))
        if i < layers - 1:
            mods.append(nn.ReLU(inplace=True))
    return nn.Sequential(*mods)


# ---------------------------------------------------------------------------------------------
# sparse U-Net (spconv)
# ---------------------------------------------------------------------------------------------

def _subm(cin: int, cout: int, k: int, key: Optional[str], bias: bool = False):
    return spconv.SubMConv2d(cin, cout, k, padding=k // 2, bias=bias, indice_key=key, algo=_algo())


def _bn_relu(x, bn: nn.Module, relu: bool = True):
    y = bn(x.features)
    return x.replace_feature(F.relu(y) if relu else y)


class SparseBasicBlock(nn.Module):
    """Two 3x3 submanifold convs with BatchNorm, ReLU, plus the input (projected by a per-site
    linear map, i.e. a 1x1 submanifold conv, and BatchNorm when the width changes), ReLU."""

    def __init__(self, cin: int, cout: int, key: str):
        super().__init__()
        self.conv1, self.bn1 = _subm(cin, cout, 3, key), nn.BatchNorm1d(cout, momentum=0.1)
        self.conv2, self.bn2 = _subm(cout, cout, 3, key), nn.BatchNorm1d(cout, momentum=0.1)
        self.proj = None
        if cin != cout:
            self.proj = nn.Linear(cin, cout, bias=False)
            self.proj_bn = nn.BatchNorm1d(cout, momentum=0.1)

    def forward(self, x):
        out = _bn_relu(self.conv1(x), self.bn1)
        out = _bn_relu(self.conv2(out), self.bn2, relu=False)
        identity = x.features if self.proj is None else self.proj_bn(self.proj(x.features))
        return out.replace_feature(F.relu(out.features + identity))


class SparseUNet(nn.Module):
    """PointBeV's sparse U-Net: ``(features (M, C), indices (M, 3) [sample, row, col] int32)`` ->
    ``(M, C)`` features at the same sites, in the same order."""

    def __init__(self, channels: int, mid: int = 64):
        super().__init__()
        _need_spconv()
        self.channels, self.mid = channels, mid
        widths = (mid, 2 * mid, 4 * mid)
        self.first_conv, self.first_bn = _subm(channels, mid, 7, "subm0_k7"), nn.BatchNorm1d(mid, momentum=0.1)
        self.levels = nn.ModuleList()
        self.pools = nn.ModuleList()
        cin = mid
        for level, width in enumerate(widths):
            key = f"subm{level}_k3"
            self.levels.append(nn.ModuleList([SparseBasicBlock(cin, width, key), SparseBasicBlock(width, width, key)]))
            self.pools.append(spconv.SparseMaxPool2d(3, 2, 1, indice_key=f"pool{level}", algo=_algo()))
            cin = width
        # up[level]: from the output width of `level` to the skip's width (the level's input)
        skips = (channels, mid, 2 * mid)
        self.ups = nn.ModuleList(spconv.SparseInverseConv2d(widths[level], skips[level], 3, indice_key=f"pool{level}",
                                                            bias=False, algo=_algo()) for level in range(3))
        self.up_bns = nn.ModuleList(nn.BatchNorm1d(skips[level], momentum=0.1) for level in range(3))

    def forward(self, x):
        if not x.indices.is_contiguous():  # spconv reads the raw buffer: a strided view (e.g. from
            x.indices = x.indices.contiguous()  # ``nonzero()``) would silently give wrong index pairs
        skips = [x]
        x = _bn_relu(self.first_conv(x), self.first_bn)
        for level, (blocks, pool) in enumerate(zip(self.levels, self.pools)):
            for block in blocks:
                x = block(x)
            x = pool(x)
            if level < 2:
                skips.append(x)
        for level in (2, 1, 0):
            up = self.ups[level](x)
            skip = skips[level]
            if not torch.equal(up.indices, skip.indices):  # the inverse conv restores the pool's input sites, in order
                raise RuntimeError(f"sparse U-Net level {level}: upsampled sites differ from the skip's.")
            x = skip.replace_feature(self.up_bns[level](up.features) + skip.features)
        return x


class SparseHead(nn.Module):
    """3x3 submanifold conv, per-point normalisation over channels (PointBeV's InstanceNorm1d on
    the feature matrix), ReLU, then a per-site linear map with bias (PointBeV's 1x1 submanifold
    conv; spconv computes its 1x1 convs as one matrix product on the features anyway, reading
    the weight in a layout of its own)."""

    def __init__(self, channels: int, out: int, key: str):
        super().__init__()
        self.conv = _subm(channels, channels, 3, key)
        self.out = nn.Linear(channels, out)

    def forward(self, x):
        y = self.conv(x)
        y = y.replace_feature(F.relu(F.layer_norm(y.features, y.features.shape[-1:], eps=1e-5)))
        return self.out(y.features)


def sparse_conv_flops(model: "PointBeV", active: torch.Tensor) -> int:
    """Exact FLOPs (2 per multiply-add) of the spconv layers of the U-Net and the heads (the
    k x k submanifold convs and the inverse convs) on the active cells ``active`` (B, X, Y)
    bool: for every layer, the (input site, output site) pairs its kernel actually uses, times
    ``2 C_in C_out``. Not counted here: the per-site linear maps (``nn.Linear``, which the flop
    counter sees), max pools and normalisations (no multiply-adds)."""
    mid, c = model.unet.mid, model.latent_dim
    widths, skips = (mid, 2 * mid, 4 * mid), (c, mid, 2 * mid)
    m = active[:, None].float()

    def subm_pairs(mask, k):  # sum over active sites of the active sites in their k x k window
        return (mask * F.conv2d(mask, torch.ones(1, 1, k, k, device=mask.device), padding=k // 2)).sum().item()

    def pool_pairs(mask):  # (input, output) pairs of the 3x3 stride-2 pool; outputs: windows with an active input
        out = F.max_pool2d(mask, 3, 2, 1)
        cover = F.conv_transpose2d(out, torch.ones(1, 1, 3, 3, device=mask.device), stride=2, padding=1,
                                   output_padding=(mask.shape[2] - ((out.shape[2] - 1) * 2 + 1),
                                                   mask.shape[3] - ((out.shape[3] - 1) * 2 + 1)))
        return (mask * cover).sum().item(), out

    flops = 2 * subm_pairs(m, 7) * c * mid
    flops += 3 * 2 * subm_pairs(m, 3) * c * c  # the three heads' 3x3 convs
    cin = mid
    for level, width in enumerate(widths):
        pairs3 = subm_pairs(m, 3)
        flops += 2 * pairs3 * (cin * width + 3 * width * width)  # two blocks of two 3x3 convs
        pp, m = pool_pairs(m)
        flops += 2 * pp * width * skips[level]  # the inverse conv of this pool (the same pairs)
        cin = width
    return int(flops)


# ---------------------------------------------------------------------------------------------
# the head
# ---------------------------------------------------------------------------------------------

class _SetThreads(torch.autograd.Function):
    """Identity on tensors whose backward sets torch's intra-op thread count to ``threads``."""

    @staticmethod
    def forward(ctx, threads: int, *tensors):
        ctx.threads = threads
        out = tuple(t.view_as(t) for t in tensors)
        return out[0] if len(out) == 1 else out

    @staticmethod
    def backward(ctx, *grads):
        torch.set_num_threads(ctx.threads)
        return (None, *grads)


@HEADS.register("pointbev")
class PointBeV(nn.Module):
    """PointBeV's head: sampled pillars (training) or every pillar (evaluation), lifted on points,
    embedded, height-compressed, decoded by a sparse U-Net, sparse heads.

    Args:
        in_channels: C of the camera features (``MultiCameraEncoder.out_channels``).
        grid: the BeV grid.
        latent_dim: width of the neck, the lifted features and the U-Net's input/output (128).
        unet_channels: width of the U-Net's first level (64; then 128, 256).
        N_coarse: cells of the coarse pass in training (see ``reference_cells``).
        with_fine: run the fine pass in training (skipped when the coarse pass takes every cell).
        N_fine: cells of the fine pass.
        N_anchor: number of anchor cells of the fine pass (top coarse scores), or ``"dyna"``:
            every coarse cell whose score exceeds ``fine_thresh``.
        fine_patch_size: odd side of the window opened around each anchor.
        fine_thresh: the ``"dyna"`` anchor threshold on the coarse sigmoid score.
        reference_cells: null (the default): ``N_coarse``, ``N_fine`` and ``N_anchor`` are cell
            counts, as in PointBeV, at most ``X Y``: PointBeV's 2,500 are 6.25 % of its 200 x
            200 grid and every cell of the demo's 50 x 50 grid (dense training there: the
            sampling fraction that suits a 300-step CPU demo). An int: the counts are for a grid
            of that many cells and are scaled by ``X Y / reference_cells`` (rounded, at least 1),
            the same sampled fraction on any grid (``reference_cells=40000`` on the demo grid:
            156 + 156 cells and 6 anchors per sample, which reached a validation IoU of 0.004
            after 100 demo steps: 8 times fewer labelled cells per step than dense training).
            The counts in effect are the attributes ``N_coarse``, ``N_fine``, ``N_anchor``.
        fourier_frequencies: frequencies of the coordinate embedding (8).
        cpu_threads: on the CPU, the intra-op threads of the head's forward and backward (the
            rest of the step keeps torch's setting); null: torch's setting. spconv's native CPU
            algorithm issues one small matrix product per kernel tap and layer (about 650 per
            pass, forward and backward), and on CPU cores shared with other processes every such
            parallel region waits for all its threads to be scheduled: measured on 2 shared
            cores at load 10, a training step of the head (50 x 50 grid, 156 + 156 cells per
            sample, batch 2) took 8 to 30 s with 2 threads and 1.6 s with 1.
        height_layers: layers of the height-compressing MLP (4).

    Call: as :class:`bev.heads.simplebev.SimpleBeV`; returns dense ``(B, ., X, Y)`` maps (zeros
    where nothing was predicted) and, in training, ``point_mask`` (B, 1, X, Y) bool: the cells
    predicted by the coarse or the fine pass.
    """

    #: the smallest settings worth running (contract tests, ``tools/gpu_report.py --smoke``): sparse
    #: training on a small grid, random coarse cells then fine cells around the best
    SMOKE_OPTIONS = {"latent_dim": 8, "unet_channels": 4, "N_coarse": 150, "N_fine": 100, "N_anchor": 10,
                     "fine_patch_size": 3, "reference_cells": None}

    def __init__(self, in_channels: int, grid: BevGrid = BevGrid(), latent_dim: int = 128, unet_channels: int = 64,
                 N_coarse: int = 2500, with_fine: bool = True, N_fine: int = 2500,
                 N_anchor: Union[int, str] = 100, fine_patch_size: int = 9, fine_thresh: float = 0.1,
                 reference_cells: Optional[int] = None, fourier_frequencies: int = 8, height_layers: int = 4,
                 cpu_threads: Optional[int] = None):
        super().__init__()
        positive = dict(in_channels=in_channels, latent_dim=latent_dim, unet_channels=unet_channels,
                        N_coarse=N_coarse, N_fine=N_fine, fine_patch_size=fine_patch_size,
                        fourier_frequencies=fourier_frequencies, height_layers=height_layers)
        for name, v in positive.items():
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}.")
        if not (N_anchor == "dyna" or (isinstance(N_anchor, int) and not isinstance(N_anchor, bool) and N_anchor > 0)):
            raise ValueError(f"N_anchor must be a positive int or 'dyna', got {N_anchor!r}.")
        if fine_patch_size % 2 != 1:
            raise ValueError(f"fine_patch_size must be odd (a window centred on its anchor), got {fine_patch_size}.")
        if not isinstance(fine_thresh, (int, float)) or isinstance(fine_thresh, bool) or not 0 <= fine_thresh < 1:
            raise ValueError(f"fine_thresh must be a score in [0, 1), got {fine_thresh!r}.")
        if reference_cells is not None and (not isinstance(reference_cells, int) or isinstance(reference_cells, bool)
                                            or reference_cells <= 0):
            raise ValueError(f"reference_cells must be null or a positive int, got {reference_cells!r}.")
        if cpu_threads is not None and (not isinstance(cpu_threads, int) or isinstance(cpu_threads, bool)
                                        or cpu_threads <= 0):
            raise ValueError(f"cpu_threads must be null or a positive int, got {cpu_threads!r}.")
        if not isinstance(grid, BevGrid):
            raise ValueError(f"grid must be a bev.geometry.BevGrid, got {type(grid).__name__}.")
        _need_spconv()
        self.cpu_threads = cpu_threads
        self.in_channels, self.latent_dim, self.grid = in_channels, latent_dim, grid
        self.reference_cells = reference_cells
        X, Y = grid.shape

        def count(v):  # the configured count on this grid: scaled to its cell count, within [1, X Y]
            if reference_cells is not None:
                v = max(1, round(v * X * Y / reference_cells))
            return min(int(v), X * Y)

        self.N_coarse, self.with_fine, self.N_fine = count(N_coarse), bool(with_fine), count(N_fine)
        self.N_anchor = N_anchor if N_anchor == "dyna" else count(N_anchor)
        self.fine_patch_size, self.fine_thresh = fine_patch_size, float(fine_thresh)
        self.neck = nn.Conv2d(in_channels, latent_dim, 1)
        self.embedding = FourierEmbedding(latent_dim, fourier_frequencies)
        self.height_compressor = _mlp(latent_dim * grid.z_bins, latent_dim, latent_dim, height_layers)
        self.unet = SparseUNet(latent_dim, unet_channels)
        self.segmentation_head = SparseHead(latent_dim, 1, "subm0_k3")
        self.instance_center_head = SparseHead(latent_dim, 1, "subm0_k3")
        self.instance_offset_head = SparseHead(latent_dim, 2, "subm0_k3")
        # PointBeV normalises coordinates by 1.2 x the largest absolute bound of each axis
        # (github valeoai/PointBeV, pointbev/models/projector/common.py, arange_voxels)
        scale = [1.2 * max(abs(lo), abs(hi)) for lo, hi in (grid.x_bounds, grid.y_bounds, grid.z_bounds)]
        self.register_buffer("coord_scale", torch.tensor(scale, dtype=torch.float32), persistent=False)
        # training forwards so far: the random draws of a forward are a function of it and of the
        # run's seed (torch.initial_seed), so a resumed run draws what the uninterrupted one would
        self.register_buffer("draws", torch.zeros((), dtype=torch.int64))
        self._centers: Dict[torch.device, torch.Tensor] = {}
        self._last: Optional[dict] = None  # statistics of the last forward, for uncounted_flops

    # ------------------------------------------------------------------ geometry
    @property
    def num_cells(self) -> int:
        X, Y = self.grid.shape
        return X * Y

    def pillar_points(self, device: torch.device) -> torch.Tensor:
        """``(X * Y, Z, 3)`` float32 voxel centres (row-major cells), computed once per device."""
        if device not in self._centers:
            self._centers[device] = self.grid.voxel_centers().to(device=device, dtype=torch.float32).flatten(0, 1)
        return self._centers[device]

    # ------------------------------------------------------------------ sampling
    def generator(self, device: torch.device) -> torch.Generator:
        """The random generator of the next training forward (advances ``draws``)."""
        seed = (torch.initial_seed() * 1_000_003 + int(self.draws)) % (2 ** 63)
        self.draws += 1
        return torch.Generator(device=device).manual_seed(seed)

    def sample_coarse(self, batch: int, device: torch.device, generator: Optional[torch.Generator] = None
                      ) -> torch.Tensor:
        """``(B, N_coarse)`` distinct random cells per sample (flat ``row * Y + col``)."""
        n = self.N_coarse
        return torch.stack([torch.randperm(self.num_cells, device=device, generator=generator)[:n]
                            for _ in range(batch)])

    @torch.no_grad()
    def sample_fine(self, cells: torch.Tensor, seg_logits: torch.Tensor,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Cells of the fine pass from the coarse pass's ``cells`` (B, K) and segmentation logits
        (B, K): the anchors (top ``N_anchor`` coarse scores, or scores above ``fine_thresh``)
        open a ``fine_patch_size`` window each; cells in windows are kept by decreasing score of
        their best anchor (ties at random), and random cells outside fill up to ``N_fine``.
        Returns ``(B, N_fine)`` distinct cells per sample."""
        X, Y = self.grid.shape
        b, k = cells.shape
        score = torch.sigmoid(seg_logits.float())
        if self.N_anchor == "dyna":
            is_anchor = score > self.fine_thresh
        else:
            top = score.topk(min(int(self.N_anchor), k), dim=1).indices
            is_anchor = torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True)
        # anchor priority 1 + score > 0, spread over each anchor's window (best anchor wins)
        prio = cells.new_zeros(b, X * Y, dtype=torch.float32).scatter_(1, cells, torch.where(is_anchor, 1 + score, 0))
        r = self.fine_patch_size // 2
        prio = F.max_pool2d(prio.view(b, 1, X, Y), 2 * r + 1, 1, r).view(b, X * Y)
        noise = torch.rand(b, X * Y, device=cells.device, generator=generator)
        key = torch.where(prio > 0, prio + 1e-4 * noise, -noise)  # windows first, then random cells
        return key.topk(self.N_fine, dim=1).indices

    # ------------------------------------------------------------------ one pass
    def predict(self, latent: torch.Tensor, intrinsics: torch.Tensor, cam2ego: torch.Tensor, image_size,
                cells: torch.Tensor) -> Tuple[Dict[str, torch.Tensor], int]:
        """Outputs ``(B, K, .)`` of ``seg``, ``centerness``, ``offset`` at ``cells`` (B, K), and
        the number of (point, camera) pairs sampled."""
        b, k = cells.shape
        X, Y = self.grid.shape
        z = self.grid.z_bins
        points = self.pillar_points(latent.device)[cells]  # (B, K, Z, 3)
        feats, _, pairs = gather_point_features(latent, intrinsics, cam2ego, image_size, points.flatten(1, 2))
        feats = feats.view(b, k, z, -1) + self.embedding(points / self.coord_scale).to(feats.dtype)
        bev = self.height_compressor(feats.transpose(2, 3).flatten(2))  # channel c * Z + z -> (B, K, latent)
        batch_index = torch.arange(b, device=cells.device).repeat_interleave(k)
        flat = cells.reshape(-1)
        indices = torch.stack([batch_index, flat // Y, flat % Y], 1).to(torch.int32).contiguous()
        x = spconv.SparseConvTensor(bev.reshape(b * k, -1), indices, [X, Y], b)
        x = self.unet(x)
        out = {"seg": self.segmentation_head(x),
               "centerness": torch.sigmoid(self.instance_center_head(x)),
               "offset": self.instance_offset_head(x)}
        return {key: v.view(b, k, -1) for key, v in out.items()}, pairs

    def forward(self, features: torch.Tensor, intrinsics: torch.Tensor, cam2ego: torch.Tensor,
                image_size) -> Dict[str, torch.Tensor]:
        check_camera_inputs(features, intrinsics, cam2ego, image_size, self.in_channels)
        threads = self.cpu_threads if features.device.type == "cpu" else None
        outer = torch.get_num_threads()
        if threads is None or threads == outer:
            return self._forward(features, intrinsics, cam2ego, image_size)
        # the head's forward and backward on `threads` intra-op threads, the rest of the step on
        # `outer`: the markers' backward switch over where the head's backward starts and ends
        torch.set_num_threads(threads)
        try:
            out = self._forward(features, intrinsics, cam2ego, image_size, restore_threads=outer)
            keys = [k for k, v in out.items() if v.is_floating_point()]
            for k, v in zip(keys, _SetThreads.apply(threads, *(out[k] for k in keys))):
                out[k] = v
            return out
        finally:
            torch.set_num_threads(outer)

    def _forward(self, features: torch.Tensor, intrinsics: torch.Tensor, cam2ego: torch.Tensor, image_size,
                 restore_threads: Optional[int] = None) -> Dict[str, torch.Tensor]:
        b, n = features.shape[:2]
        X, Y = self.grid.shape
        latent = self.neck(features.flatten(0, 1)).unflatten(0, (b, n))
        if restore_threads is not None:  # after the neck: the trained neck puts it in every backward
            latent = _SetThreads.apply(restore_threads, latent)
        device = latent.device
        if not self.training:  # dense: every pillar, in row-major order
            cells = torch.arange(X * Y, device=device).expand(b, -1)
            out, pairs = self.predict(latent, intrinsics, cam2ego, image_size, cells)
            self._last = {"cameras": n, "pairs": pairs, "device": device.type,
                          "active": [torch.ones(b, X, Y, dtype=torch.bool, device=device)]}
            return {key: v.transpose(1, 2).reshape(b, -1, X, Y) for key, v in out.items()}

        gen = self.generator(device)
        cells = self.sample_coarse(b, device, gen)
        out, pairs = self.predict(latent, intrinsics, cam2ego, image_size, cells)
        passes = [(cells, out)]
        if self.with_fine and self.N_coarse < X * Y:  # a coarse pass on every cell leaves nothing to add
            fine = self.sample_fine(cells, out["seg"][..., 0].detach(), gen)
            out_fine, pairs_fine = self.predict(latent, intrinsics, cam2ego, image_size, fine)
            passes.append((fine, out_fine))
            pairs += pairs_fine
        dense, count = {}, torch.zeros(b, X * Y, device=device)
        for cells, out in passes:
            count.scatter_add_(1, cells, torch.ones_like(cells, dtype=count.dtype))
            for key, v in out.items():
                if key not in dense:
                    dense[key] = v.new_zeros(b, v.shape[-1], X * Y)
                dense[key] = dense[key].scatter_add(2, cells[:, None].expand(-1, v.shape[-1], -1), v.transpose(1, 2))
        result = {key: (v / count.clamp_min(1)[:, None].to(v.dtype)).view(b, -1, X, Y) for key, v in dense.items()}
        result["point_mask"] = (count > 0).view(b, 1, X, Y)
        self._last = {"cameras": n, "pairs": pairs, "device": device.type,
                      "active": [torch.zeros(b, X * Y, dtype=torch.bool, device=device).scatter_(1, c, True).view(b, X, Y)
                                 for c, _ in passes]}
        return result

    # ------------------------------------------------------------------ cost
    def uncounted_flops(self, num_cameras: int) -> int:
        """FLOPs of one forward that ``torch.utils.flop_counter.FlopCounterMode`` does not see.

        * The bilinear sampling: 4 taps x 2 FLOPs x ``latent_dim`` per (point, camera) pair
          sampled. After a forward: the pairs that forward sampled (exact: only the pairs where
          the camera sees the point); before any forward: the upper bound of a dense forward in
          which every camera sees every point (``X Y Z num_cameras`` pairs).
        * The sparse convolutions only when the last forward ran on a GPU: there spconv runs its
          own GEMM kernels (counted exactly, :func:`sparse_conv_flops`: the kernel taps each
          layer actually uses between active sites). On the CPU, spconv's native algorithm
          calls ``torch.mm`` per kernel tap, which the counter already counts (tested).
        """
        if not isinstance(num_cameras, int) or isinstance(num_cameras, bool) or num_cameras <= 0:
            raise ValueError(f"num_cameras must be a positive int, got {num_cameras!r}.")
        last = self._last
        if last is None or last["cameras"] != num_cameras:
            X, Y = self.grid.shape
            return X * Y * self.grid.z_bins * num_cameras * self.latent_dim * 4 * 2
        flops = last["pairs"] * self.latent_dim * 4 * 2
        if last["device"] != "cpu":
            flops += sum(sparse_conv_flops(self, a.cpu()) for a in last["active"])
        return int(flops)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, latent_dim={self.latent_dim}, grid={self.grid}, "
                f"N_coarse={self.N_coarse}, with_fine={self.with_fine}, N_fine={self.N_fine}, "
                f"N_anchor={self.N_anchor}, reference_cells={self.reference_cells}, cpu_threads={self.cpu_threads}, "
                f"fine_patch_size={self.fine_patch_size}, fine_thresh={self.fine_thresh}")
