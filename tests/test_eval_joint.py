"""Task-dependent rows trained with the task (the paper's section 4.3): the probe's gradient reaches
the upsampler and only it, its weights are checkpointed with the probe, each data set trains its
own copy from the same start, and task=cam trains them through the frozen classifier, resuming
exactly after a kill."""

import json

import pytest
import torch
from omegaconf import OmegaConf, open_dict
from test_eval_2d import PooledPixels, tiny
from test_eval_cam import tiny_cam

import jafar.eval.cam as cam_module
from jafar import build_upsampler
from jafar.eval.probes import SegmentationProbe, trainable_parameters
from jafar.eval.run import run


def _probe(up, **kwargs):
    return SegmentationProbe(PooledPixels(), up, num_classes=2, target_size=32, train_upsampler=True, **kwargs)


def test_the_probe_loss_reaches_the_upsampler_and_not_the_backbone():
    torch.manual_seed(0)
    up = build_upsampler("dysample", feature_dim=3, groups=1)
    probe = _probe(up, upsampler_lr=1e-3)
    probe.train()
    assert up.training and not probe.backbone.training  # the upsampler trains (dropout, batch norm), the backbone not
    image, label = torch.rand(2, 3, 32, 32), torch.randint(0, 2, (2, 32, 32))
    loss = probe.loss(probe.logits(image, (32, 32)), label)
    loss.backward()
    grads = [p.grad for p in up.parameters()]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert probe.backbone.dummy.grad is None
    groups = probe.configure_optimizers()["optimizer"].param_groups
    assert [len(g["params"]) for g in groups] == [2, len(list(up.parameters()))]
    assert groups[0]["lr"] == 5e-4 and groups[1]["lr"] == 1e-3  # the probe's lr, the upsampler's own
    # without upsampler_lr: one optimiser, the probe's lr for both
    assert {g["lr"] for g in _probe(build_upsampler("dysample", feature_dim=3, groups=1)).configure_optimizers()[
        "optimizer"].param_groups} == {5e-4}
    # the checkpoints hold both, and load strictly into a fresh probe
    state = probe.state_dict()
    assert {k.split(".")[0] for k in state} == {"classifier", "upsampler"}
    fresh = _probe(build_upsampler("dysample", feature_dim=3, groups=1))
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.upsampler.parameters(), up.parameters()))


def test_the_cache_keeps_the_backbone_output_of_a_trained_upsampler():
    torch.manual_seed(0)
    probe = _probe(build_upsampler("dysample", feature_dim=3, groups=1), cache_features=True)
    image = torch.rand(2, 3, 32, 32)
    hr, _ = probe.features(image, [("train", 0, False), ("train", 1, False)])
    assert probe._cache[("train", 0, False)][0].shape == (3, 8, 8)  # the 4x4-pooled features, not the upsampled ones
    assert hr.requires_grad  # the upsampler runs at every step, with gradients
    direct, _ = probe.upsampled(image)
    torch.testing.assert_close(hr, direct, rtol=0, atol=2e-3)  # through float16


def test_rows_without_trainable_weights_are_refused():
    with pytest.raises(ValueError, match="Interpolate has no trainable parameter"):
        _probe(build_upsampler("bilinear"))
    re_encoding = build_upsampler("large_image", backbone=PooledPixels())
    assert trainable_parameters(re_encoding) == []  # the backbone it holds is not the row's to train


def test_joint_rows_end_to_end_each_data_set_from_the_same_start(tmp_path):
    rows = ("compare=[dysample,carafe]", "upsamplers.dysample.groups=1")
    alone = run(tiny("seg", tmp_path / "data", *rows), tmp_path / "alone")
    assert "trained with the task" in alone["upsamplers"]["carafe"]["note"]
    cfg = tiny("seg", tmp_path / "data", *rows)
    with open_dict(cfg):  # another data set first: demo_seg's pairs must not start from its trained weights
        cfg.dataset.demo_seg_b = OmegaConf.merge(cfg.dataset.demo_seg, {"name": "Demo B"})
        cfg.task.datasets = ["demo_seg_b", "demo_seg"]
    both = run(cfg, tmp_path / "both")
    for row in ("dysample", "carafe"):
        a, b = (torch.load(tmp_path / d / "demo_seg" / row / "upsampler.pt", weights_only=True) for d in ("alone", "both"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert both["results"]["demo_seg"][row]["miou"] == alone["results"]["demo_seg"][row]["miou"]
        torch.manual_seed(0)
        start = build_upsampler(row, feature_dim=32, **({"groups": 1} if row == "dysample" else {})).state_dict()
        assert any(not torch.equal(a[k], start[k]) for k in a)  # trained
        ckpt = torch.load(tmp_path / "alone" / "demo_seg" / row / "checkpoints" / "last.ckpt", weights_only=False)
        assert any(k.startswith("upsampler.") for k in ckpt["state_dict"])
        result = json.loads((tmp_path / "alone" / "demo_seg" / row / "result.json").read_text())
        assert result["upsampler_weights"] == "trained with the probe: upsampler.pt"


@pytest.mark.parametrize("key, value, message", [
    ("upsamplers.bilinear.train_with_probe", True, "Bilinear has no trainable parameter"),
    ("upsamplers.dysample.train_with_probe", "maybe", "train_with_probe must be true or false"),
    ("task.probe.upsampler_lr", -1.0, "task.probe.upsampler_lr must be a positive number"),
])
def test_bad_joint_settings_are_refused(tmp_path, key, value, message):
    cfg = tiny("seg", tmp_path / "data", "compare=[bilinear,dysample]")
    OmegaConf.update(cfg, key, value, force_add=True)
    with pytest.raises(ValueError, match=message):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "demo_seg" / "bilinear" / "result.json").exists()


def test_a_task_that_trains_no_upsampler_refuses_joint_rows(tmp_path):
    cfg = tiny_cam(tmp_path / "data", "compare=[dysample]")
    with open_dict(cfg):
        cfg.task.name, cfg.task.datasets = "ovseg", ["demo_cam"]
    with pytest.raises(ValueError, match="task=ovseg trains no upsampler"):
        from jafar.eval.run import check_config
        from jafar.eval.tasks import get_task

        check_config(cfg, get_task("ovseg"))


def test_cam_trains_the_rows_through_the_classifier_and_resumes_exactly(tmp_path, monkeypatch):
    overrides = ("compare=[dysample]", "dataset.demo_cam.prepare_args.train_crops=2", "task.upsampler_training.steps=2",
                 "task.upsampler_training.checkpoint_every=1", "task.upsampler_training.batch_size=2")
    cfg = tiny_cam(tmp_path / "data", *overrides)
    assert cfg.upsamplers.dysample.train_with_probe and cfg.task.upsampler_training.protocol == "pooled_classifier"
    res = run(cfg, tmp_path / "full")
    m = res["results"]["demo_cam"]["dysample"]
    assert 0 <= m["adcc"] <= 1
    done = json.loads((tmp_path / "full" / "demo_cam" / "dysample" / "result.json").read_text())
    assert done["upsampler_weights"].startswith("trained through the classifier (pooled_classifier, 2 steps)")
    full = torch.load(tmp_path / "full" / "demo_cam" / "dysample" / "upsampler.pt", weights_only=True)
    start = build_upsampler("dysample", feature_dim=96).state_dict()
    assert any(not torch.equal(full[k], start[k]) for k in full)

    # killed at the second step (after the step-1 state was written): the rerun resumes from it
    calls = {"n": 0}
    real = cam_module.pooled_classifier_loss

    def dies_at_step_2(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(cam_module, "pooled_classifier_loss", dies_at_step_2)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cam(tmp_path / "data", *overrides), tmp_path / "killed")
    state = torch.load(tmp_path / "killed" / "demo_cam" / "dysample" / "upsampler_training.pt", weights_only=True)
    assert state["step"] == 1
    monkeypatch.setattr(cam_module, "pooled_classifier_loss", real)
    run(tiny_cam(tmp_path / "data", *overrides), tmp_path / "killed")
    resumed = torch.load(tmp_path / "killed" / "demo_cam" / "dysample" / "upsampler.pt", weights_only=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_pooled_classifier_loss_is_the_cross_entropy_of_the_pooled_upsampled_features():
    from jafar.eval.cam import CamClassifier, pooled_classifier_loss

    class Linear(CamClassifier):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 2 * 2, 4)

        def split(self, image):
            return torch.nn.functional.avg_pool2d(image, 4), ()

        def head(self, features, state):
            return self.fc(features.flatten(1))

    torch.manual_seed(0)
    clf, up = Linear(), build_upsampler("dysample", feature_dim=3, groups=1)
    image, label = torch.rand(2, 3, 8, 8), torch.tensor([1, 3])
    loss = pooled_classifier_loss(clf, up, image, label)
    features = torch.nn.functional.avg_pool2d(image, 4)
    hr = up(image, features, (8, 8))
    pooled = hr.reshape(2, 3, 2, 4, 2, 4).mean(dim=(3, 5))  # 4x4 block means by hand
    expected = torch.nn.functional.cross_entropy(clf.fc(pooled.flatten(1)), label)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in up.parameters())
