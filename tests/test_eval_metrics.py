"""Metrics and losses of the 2-D probes against hand-computed values."""

import math

import pytest
import torch
from torchmetrics.classification import Accuracy, JaccardIndex

from jafar.eval.metrics import DEPTH_METRICS, DepthMetrics, depth_errors, segmentation_metrics
from jafar.eval.probes import gradient_loss, sig_loss

# target / prediction of 6 pixels, one of them ignored (255)
TARGET = torch.tensor([[[0, 0, 1], [1, 255, 2]]])
PRED = torch.tensor([[[0, 1, 1], [1, 0, 2]]])


def test_miou_and_accuracy_leave_out_ignored_pixels():
    m = segmentation_metrics(3)
    m.update(PRED, TARGET)
    out = m.compute()
    # valid pixels: (t0,p0) (t0,p1) (t1,p1) (t1,p1) (t2,p2); the ignored one predicted 0 does not count
    # IoU: class 0 = 1 / (1 + 1 fn) = 1/2, class 1 = 2 / (2 + 1 fp) = 2/3, class 2 = 1
    assert out["miou"].item() == pytest.approx((1 / 2 + 2 / 3 + 1) / 3, abs=1e-6)
    assert out["accuracy"].item() == pytest.approx(4 / 5, abs=1e-6)


def test_miou_skips_absent_classes_and_counts_false_positive_classes():
    m = segmentation_metrics(5)  # classes 3 and 4 never appear: not averaged
    m.update(PRED, TARGET)
    assert m.compute()["miou"].item() == pytest.approx((1 / 2 + 2 / 3 + 1) / 3, abs=1e-6)
    m = segmentation_metrics(5)
    pred = PRED.clone()
    pred[0, 1, 2] = 4  # a pixel of class 2 predicted as the absent class 4: IoU(2) = 0, IoU(4) = 0
    m.update(pred, TARGET)
    assert m.compute()["miou"].item() == pytest.approx((1 / 2 + 2 / 3 + 0 + 0) / 4, abs=1e-6)
    assert m.compute()["accuracy"].item() == pytest.approx(3 / 5, abs=1e-6)


def test_logits_are_argmaxed_and_match_the_official_masking():
    """The official code drops the 255 pixels itself and calls JaccardIndex/Accuracy with their
    defaults; ignore_index=255 must give the same numbers (logits or class maps)."""
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 7, (3, 20, 24), generator=gen)
    target[torch.rand(target.shape, generator=gen) < 0.2] = 255
    logits = torch.randn(3, 7, 20, 24, generator=gen)
    ours = segmentation_metrics(7)
    ours.update(logits, target)
    ours = {k: v.item() for k, v in ours.compute().items()}
    valid = target != 255
    flat_pred = logits.permute(0, 2, 3, 1)[valid]
    official_iou = JaccardIndex(task="multiclass", num_classes=7)(flat_pred, target[valid]).item()
    official_acc = Accuracy(task="multiclass", num_classes=7)(flat_pred, target[valid]).item()
    assert ours["miou"] == pytest.approx(official_iou, abs=1e-6)
    assert ours["accuracy"] == pytest.approx(official_acc, abs=1e-6)


def test_segmentation_metrics_refuse_one_class():
    with pytest.raises(ValueError, match="num_classes"):
        segmentation_metrics(1)


def test_depth_errors_by_hand():
    gt = torch.tensor([1.0, 2.0, 4.0, 20.0, 0.0])  # 20 m is beyond max_depth, 0 is invalid
    pred = torch.tensor([1.2, 2.0, 2.0, 5.0, 1.0])
    e = depth_errors(pred, gt, min_depth=1e-3, max_depth=10.0)
    # valid pixels: ratios max(gt/pred, pred/gt) = 1.2, 1, 2 -> delta_1 = 2/3
    assert e["d1"] == pytest.approx(2 / 3)
    assert e["d2"] == pytest.approx(2 / 3)  # 1.25^2 = 1.5625 < 2
    assert e["d3"] == pytest.approx(2 / 3)  # 1.25^3 = 1.953 < 2
    assert e["rmse"] == pytest.approx(math.sqrt((0.2 ** 2 + 0 + 2 ** 2) / 3))
    assert e["abs_rel"] == pytest.approx((0.2 / 1 + 0 + 2 / 4) / 3)
    assert e["sq_rel"] == pytest.approx((0.04 / 1 + 0 + 4 / 4) / 3)
    assert e["log_10"] == pytest.approx((abs(math.log10(1 / 1.2)) + 0 + abs(math.log10(2))) / 3)
    assert depth_errors(pred, torch.zeros(5)) == {}


def test_depth_errors_d3_threshold():
    # 1.25^3 = 1.953125: a ratio of 2 is outside delta_3, 1.9 inside
    e = depth_errors(torch.tensor([2.0, 1.9]), torch.tensor([1.0, 1.0]))
    assert e["d3"] == pytest.approx(0.5)
    assert e["d1"] == 0.0


def test_depth_metrics_average_per_image():
    m = DepthMetrics(min_depth=1e-3, max_depth=10.0)
    gt = torch.ones(2, 1, 2, 2)
    pred = torch.ones(2, 1, 2, 2)
    pred[0, 0, 0, 0] = 2.0  # image 0: one pixel of four off by x2 -> d1 = 3/4, rmse = sqrt(1/4)
    gt[1, 0, 0, :] = 0.0  # image 1: two valid pixels, both exact -> d1 = 1, rmse = 0
    m.update(pred, gt)
    m.update(torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))  # no valid pixel: not counted
    out = m.compute()
    assert out["images"].item() == 2
    assert out["d1"].item() == pytest.approx((3 / 4 + 1) / 2)  # per-image mean, not the pooled 5/6
    assert out["rmse"].item() == pytest.approx((0.5 + 0) / 2)
    assert set(DEPTH_METRICS) <= set(out)
    empty = DepthMetrics()
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert math.isnan(empty.compute()["d1"].item())


def test_sig_loss_is_zero_for_exact_depth_and_ignores_invalid_pixels():
    t = torch.tensor([[[[1.0, 2.0], [3.0, 0.0]]]])
    assert sig_loss(t.clamp_min(0.5), t, max_depth=10.0).item() == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([[[[2.0, 4.0], [6.0, 99.0]]]])  # x2 everywhere valid: var(g) ~ 0, loss = sqrt(0.15) log 2
    assert sig_loss(p, t, max_depth=10.0).item() == pytest.approx(math.sqrt(0.15) * math.log(2), rel=2e-3)
    assert sig_loss(p, t, max_depth=10.0, warm_up=True).item() == pytest.approx(math.sqrt(0.15) * math.log(2), rel=2e-3)


def test_gradient_loss_sees_misplaced_edges_but_not_scale():
    t = torch.ones(1, 1, 8, 8)
    t[..., :, 4:] = 4.0
    assert gradient_loss(2 * t, t).item() == pytest.approx(0.0, abs=2e-3)  # a global scale has no gradient
    shifted = torch.ones(1, 1, 8, 8)
    shifted[..., :, 5:] = 4.0  # the edge one column off
    assert gradient_loss(shifted, t).item() > 0.5
