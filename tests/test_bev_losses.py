"""SimpleBEV's losses, the visibility mask, the IoU metric and the prior-map baseline, against
hand-computed values."""

import math

import numpy as np
import torch
from torchmetrics.classification import BinaryJaccardIndex

from bev.losses import SimpleBevLoss, balanced_mse, visibility_mask
from bev.module import IGNORE, iou_of, prior_baseline
from bev.run import shuffle_extrinsics


def test_visibility_mask_ignores_only_poorly_visible_vehicle_cells():
    seg = torch.tensor([[0, 1, 1, 1, 1]])
    vis = torch.tensor([[0, 1, 2, 3, 4]])
    assert visibility_mask(seg, vis, 1).tolist() == [[True] * 5]
    assert visibility_mask(seg, vis, 2).tolist() == [[True, False, True, True, True]]
    assert visibility_mask(seg, vis, 4).tolist() == [[True, False, False, False, True]]


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


def test_balanced_mse_weights_positives_and_negatives_equally():
    target = torch.tensor([1.0, 0.0, 0.0, 0.0])
    pred = torch.tensor([0.0, 0.0, 0.0, 1.0])
    valid = torch.ones(4, dtype=torch.bool)
    assert abs(balanced_mse(pred, target, valid).item() - 0.5 * (1.0 + 1 / 3)) < 1e-6


def test_iou_metric_ignores_masked_cells():
    prob = torch.tensor([0.9, 0.8, 0.2, 0.7, 0.1])
    target = torch.tensor([1, IGNORE, 1, 0, 0])
    metric = BinaryJaccardIndex(threshold=0.5, ignore_index=IGNORE)
    metric.update(prob, target)
    # kept: cells 0, 2, 3, 4 -> intersection 1 (cell 0), union 3 (cells 0, 2, 3)
    assert abs(metric.compute().item() - 1 / 3) < 1e-6
    assert abs(iou_of(prob.numpy() > 0.5, target.numpy() == 1, target.numpy() != IGNORE) - 1 / 3) < 1e-9


def test_prior_baseline_learns_where_vehicles_usually_are():
    train = np.zeros((4, 3, 3), dtype=np.uint8)
    train[:, 0, 0] = 1          # always a vehicle in the corner
    train[0, 2, 2] = 1          # once elsewhere
    val = np.zeros((2, 3, 3), dtype=np.uint8)
    val[:, 0, 0] = 1
    val[1, 1, 1] = 1
    vis = np.full_like(train, 4)
    out = prior_baseline(train, vis, val, np.full_like(val, 4))
    assert out["threshold"] > 0.25          # the one-off cell is not predicted
    assert abs(out["iou_vis1"] - 2 / 3) < 1e-9  # predicts the corner: 2 hits, 1 miss


def test_shuffle_extrinsics_is_a_derangement():
    cam2ego = torch.eye(4).repeat(6, 1, 1)
    cam2ego[:, 0, 3] = torch.arange(6.0)
    for seed in range(20):
        out = shuffle_extrinsics({"cam2ego": cam2ego}, seed)["cam2ego"]
        moved = out[:, 0, 3]
        assert sorted(moved.tolist()) == list(range(6)) and (moved != torch.arange(6.0)).all()
