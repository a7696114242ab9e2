"""PointBeV's and SimpleBEV's losses, the visibility mask, the IoU metric and the prior-map baseline, against
hand-computed values."""

import math

import numpy as np
import pytest
import torch

from bev.data.targets import visibility_mask
from bev.losses import PointBevLoss, SimpleBevLoss, balanced_mse, build_loss
from bev.module import LabelCounts, VisibleIoU, prior_baseline
from bev.run import shuffle_extrinsics


def test_visibility_mask_ignores_only_poorly_visible_vehicle_cells():
    seg = torch.tensor([[0, 1, 1, 1, 1]])
    vis = torch.tensor([[0, 1, 2, 3, 4]])
    assert visibility_mask(seg, vis, 1).tolist() == [[True] * 5]
    assert visibility_mask(seg, vis, 2).tolist() == [[True, False, True, True, True]]
    assert visibility_mask(seg, vis, 4).tolist() == [[True, False, False, False, True]]
    # the same rule on numpy arrays (the pictures, the prior baseline); levels outside 1..4 refused
    assert visibility_mask(seg.numpy(), vis.numpy().astype(np.uint8), 2).tolist() == [[True, False, True, True, True]]
    with pytest.raises(ValueError, match="1..4"):
        visibility_mask(seg, vis, 0)


def test_loss_terms_by_hand():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 0.0]]]])
    seg = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]])
    vis = torch.tensor([[[[4, 0], [1, 0]]]], dtype=torch.uint8)  # the lower-left vehicle cell is 0-40 % visible
    center_t = torch.tensor([[[[1.0, 0.2], [0.6, 0.0]]]])
    center_p = torch.tensor([[[[0.5, 0.0], [0.0, 0.5]]]])
    off_t = torch.zeros(1, 2, 2, 2)
    off_t[0, :, 0, 0] = torch.tensor([1.0, -2.0])
    off_p = torch.zeros(1, 2, 2, 2)
    loss = SimpleBevLoss(min_visibility=2)
    out = loss({"seg": logits, "centerness": center_p, "offset": off_p},
               {"seg": seg, "visibility": vis, "centerness": center_t, "offset": off_t})
    sp = lambda x: math.log1p(math.exp(-x))  # -log(sigmoid(x))
    # valid cells: (0,0) vehicle, (0,1) and (1,1) background; (1,0) ignored
    bce = (2.13 * sp(2.0) + sp(1.0) + sp(0.0)) / 3
    assert abs(out["bce"].item() - bce) < 1e-5
    center = 0.5 * ((0.5 ** 2) / 1 + (0.2 ** 2 + 0.5 ** 2) / 2)  # positives: (0,0); negatives: (0,1), (1,1)
    assert abs(out["center"].item() - center) < 1e-5
    assert abs(out["offset"].item() - 3.0) < 1e-5  # |1| + |-2| on the one valid vehicle cell
    assert abs(out["loss"].item() - (10 * bce + center / 2 + 3.0 / 2)) < 1e-4
    out["loss"].backward()
    assert loss.ce_weight.grad is not None and loss.ce_weight.grad.item() != 0


def test_pointbev_loss_by_hand():
    """PointBeV's terms on a 2 x 2 map (github valeoai/PointBeV pointbev/models/trainer.py
    _common_step_losses, pointbev/loss/segmentation.py, pointbev/loss/common.py Weighting, worked
    by hand): BCE on the valid_binimg cells; plain MSE on the valid_centerness cells; L1 mean over
    both channels of the box cells kept by valid_binimg; learned weights w (here set to 0.3, -0.2,
    0.1): term * c * exp(-w) + 0.5 w with c = 10, 0.5, 0.5; the total is their mean."""
    logits = torch.tensor([[[[2.0, -1.0], [0.5, 0.0]]]])
    seg = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]]])
    vis = torch.tensor([[[[4, 0], [1, 3]]]], dtype=torch.uint8)  # (1,0) is 0-40 % visible: ignored
    valid_c = torch.tensor([[[[True, True], [False, True]]]])     # the targets' mask around that box
    center_t = torch.tensor([[[[1.0, 0.2], [0.6, 0.0]]]])
    center_p = torch.tensor([[[[0.5, 0.0], [0.0, 0.5]]]])
    off_t = torch.zeros(1, 2, 2, 2)
    off_t[0, :, 0, 0] = torch.tensor([1.0, -2.0])
    off_t[0, :, 1, 1] = torch.tensor([3.0, 0.0])
    off_p = torch.zeros(1, 2, 2, 2)
    off_p[0, :, 1, 0] = torch.tensor([5.0, 5.0])  # on the ignored cell: not counted
    loss = PointBevLoss(min_visibility=2)
    with torch.no_grad():
        loss.ce_weight.fill_(0.3), loss.center_weight.fill_(-0.2), loss.offset_weight.fill_(0.1)
    batch = {"seg": seg, "visibility": vis, "centerness": center_t, "offset": off_t, "valid_centerness": valid_c}
    out = loss({"seg": logits, "centerness": center_p, "offset": off_p}, batch)
    sp = lambda x: math.log1p(math.exp(-x))  # -log(sigmoid(x))
    eps = 1e-6
    bce = (2.13 * sp(2.0) + sp(1.0) + 2.13 * sp(0.0)) / (3 + eps)  # cells (0,0), (0,1), (1,1)
    center = (0.5 ** 2 + 0.2 ** 2 + 0.5 ** 2) / (3 + eps)      # cells (0,0), (0,1), (1,1)
    offset = (1 + 2 + 3 + 0) / (4 + eps)                          # cells (0,0), (1,1), two channels each
    assert out["bce"].item() == pytest.approx(bce, rel=1e-6)
    assert out["center"].item() == pytest.approx(center, rel=1e-6)
    assert out["offset"].item() == pytest.approx(offset, rel=1e-6)
    total = (10 * bce * math.exp(-0.3) + 0.15 + 0.5 * center * math.exp(0.2) - 0.1
             + 0.5 * offset * math.exp(-0.1) + 0.05) / 3
    assert out["loss"].item() == pytest.approx(total, rel=1e-6)
    out["loss"].backward()
    # d total / d w_ce = (-10 bce exp(-w) + 0.5) / 3
    assert loss.ce_weight.grad.item() == pytest.approx((-10 * bce * math.exp(-0.3) + 0.5) / 3, rel=1e-5)
    # a sparse head's point mask restricts every term
    mask = torch.tensor([[[[True, False], [True, True]]]])
    sparse = loss({"seg": logits, "centerness": center_p, "offset": off_p}, batch, point_mask=mask)
    assert sparse["bce"].item() == pytest.approx((2.13 * sp(2.0) + 2.13 * sp(0.0)) / (2 + eps), rel=1e-6)
    assert sparse["center"].item() == pytest.approx((0.5 ** 2 + 0.5 ** 2) / (2 + eps), rel=1e-6)
    with pytest.raises(KeyError, match="valid_centerness"):
        without = {k: v for k, v in batch.items() if k != "valid_centerness"}
        loss({"seg": logits, "centerness": center_p, "offset": off_p}, without)
    assert isinstance(build_loss("simplebev"), SimpleBevLoss)
    assert type(build_loss()) is PointBevLoss
    with pytest.raises(ValueError, match="loss.name must be one of"):
        build_loss("focal")


def test_balanced_mse_weights_positives_and_negatives_equally():
    target = torch.tensor([1.0, 0.0, 0.0, 0.0])
    pred = torch.tensor([0.0, 0.0, 0.0, 1.0])
    valid = torch.ones(4, dtype=torch.bool)
    assert abs(balanced_mse(pred, target, valid).item() - 0.5 * (1.0 + 1 / 3)) < 1e-6


def test_iou_metric_ignores_masked_cells():
    prob = torch.tensor([0.9, 0.8, 0.2, 0.7, 0.1, 0.6])
    seg = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0])
    vis = torch.tensor([4, 1, 2, 0, 0, 3], dtype=torch.uint8)
    metric = VisibleIoU(min_visibility=2)
    metric.update(prob[:3], seg[:3], vis[:3])  # accumulated over updates
    metric.update(prob[3:], seg[3:], vis[3:])
    # kept: every cell but 1 (a vehicle 0-40 % visible) -> intersection 2 (cells 0, 5), union 4 (0, 2, 3, 5)
    assert metric.compute().dtype == torch.float64 and metric.compute().item() == 2 / 4
    every = VisibleIoU(min_visibility=1)
    every.update(prob, seg, vis)
    assert every.compute().item() == 3 / 5
    empty = VisibleIoU(min_visibility=1)
    empty.update(torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.uint8))
    assert empty.compute().item() == 0.0  # no vehicle predicted or present
    with pytest.raises(ValueError, match="1..4"):
        VisibleIoU(min_visibility=5)


def _counts(seg, vis, levels):
    counts = LabelCounts(seg.shape[1:], levels)
    for s, v in zip(seg, vis):
        counts.add(s, v)
    return counts


def test_prior_baseline_learns_where_vehicles_usually_are():
    train = np.zeros((4, 3, 3), dtype=np.uint8)
    train[:, 0, 0] = 1          # always a vehicle in the corner
    train[0, 2, 2] = 1          # once elsewhere
    val = np.zeros((2, 3, 3), dtype=np.uint8)
    val[:, 0, 0] = 1
    val[1, 1, 1] = 1
    vis = np.full_like(train, 4)
    out = prior_baseline(_counts(train, vis, (2,)), _counts(val, np.full_like(val, 4), (1, 2)))
    assert out["threshold"] > 0.25          # the one-off cell is not predicted
    assert abs(out["iou_vis1"] - 2 / 3) < 1e-9  # predicts the corner: 2 hits, 1 miss


def test_prior_baseline_equals_the_counts_in_float64():
    """The baseline's IoUs are float64 quotients of the integer counts, as a direct numpy count
    gives them (the threshold search would otherwise pick among float32 ties)."""
    rng = np.random.default_rng(0)
    often = rng.random((12, 12)) ** 2
    train = (rng.random((40, 12, 12)) < often).astype(np.float32)
    train_vis = (train * rng.integers(1, 5, train.shape)).astype(np.uint8)
    val = (rng.random((9, 12, 12)) < often).astype(np.float32)
    val_vis = (val * rng.integers(1, 5, val.shape)).astype(np.uint8)

    def numpy_iou(pred, seg, vis, level):
        valid, pred, seg = ~((seg > 0) & (vis < level)), np.broadcast_to(pred, seg.shape), seg > 0
        return float((pred & seg & valid).sum() / ((pred | seg) & valid).sum())

    freq = train.mean(0, dtype=np.float64)
    scores = {float(t): numpy_iou(freq >= t, train, train_vis, 2) for t in np.unique(np.append(freq, 0.5)) if t > 0}
    best_t = max(scores, key=lambda t: (scores[t], -t))  # the first best, as the search keeps it
    out = prior_baseline(_counts(train, train_vis, (2,)), _counts(val, val_vis, (1, 2)))
    assert out["threshold"] == best_t and out["train_iou"] == scores[best_t]
    assert out["iou_vis1"] == numpy_iou(freq >= best_t, val, val_vis, 1)
    assert out["iou_vis2"] == numpy_iou(freq >= best_t, val, val_vis, 2)


def test_shuffle_extrinsics_is_a_derangement():
    cam2ego = torch.eye(4).repeat(6, 1, 1)
    cam2ego[:, 0, 3] = torch.arange(6.0)
    for seed in range(20):
        out = shuffle_extrinsics({"cam2ego": cam2ego}, seed)["cam2ego"]
        moved = out[:, 0, 3]
        assert sorted(moved.tolist()) == list(range(6)) and (moved != torch.arange(6.0)).all()
