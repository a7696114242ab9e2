"""tools/train_bev.py's composition on a tiny synthetic nuScenes: every upsampler runs training
and validation steps, results.json is written, and a rerun resumes from the last checkpoint."""

import csv
import json

import lightning as L
import pytest
import torch

from bev.run import run
from conftest import CountSteps, KillAt, compose_bev_demo

pytest.importorskip("nuscenes")


def compose_demo(root, *overrides):
    return compose_bev_demo(root, "model.latent_dim=16", *overrides)


@pytest.mark.parametrize("upsampler", ["none", "bilinear", "jafar", "featup"])
def test_simplebev_trains_with_each_upsampler(synthetic_root, tmp_path, upsampler):
    extra = ["upsampler.checkpoint=null"] if upsampler == "featup" else []  # random FeatUp: no release download
    cfg = compose_demo(synthetic_root, f"upsampler={upsampler}", *extra)
    assert cfg.model.name == "simplebev" and cfg.upsampler.name == upsampler
    results = run(cfg, tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["step"] == 1 and saved["upsampler"] == upsampler
    assert 0.0 <= saved["val"]["iou"] <= 1.0 and set(saved["val"]) >= {"iou_vis1", "iou_vis2"}
    assert 0.0 <= saved["prior"]["iou_vis1"] <= 1.0
    assert (tmp_path / "pictures" / "val_latest.png").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert results["val"] == saved["val"]


HEAD_ARGS = {
    "simplebev": (),
    # dropout in every layer: the random state must resume too
    "bevformer": ("model=bevformer", "model.num_layers=1", "model.num_heads=2", "model.ffn_dim=16",
                  "model.self_points=2", "model.cross_points=8"),
    # sparse training on the 16 x 16 test grid: random coarse cells, fine cells around anchors
    "pointbev": ("model=pointbev", "model.N_coarse=60", "model.N_fine=40", "model.N_anchor=4",
                 "model.fine_patch_size=3", "model.unet_channels=8"),
}


@pytest.mark.parametrize("head", list(HEAD_ARGS))
def test_killed_run_resumes_exactly(synthetic_root, tmp_path, head):
    """A run killed after step 2 of 3 and started again with the same command ends with the
    weights of an uninterrupted run: batches, augmentation, optimiser, schedule, dropout and
    PointBeV's cell sampling all resume."""
    if head == "pointbev":
        pytest.importorskip("spconv")
    args = ("upsampler=jafar", "trainer.max_steps=3", "checkpoint_every=1", "trainer.val_check_interval=3",
            *HEAD_ARGS[head])
    run(compose_demo(synthetic_root, *args), tmp_path / "straight")
    with pytest.raises(RuntimeError, match="killed"):
        run(compose_demo(synthetic_root, *args), tmp_path / "killed", callbacks=[KillAt(2)])
    assert torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    count = CountSteps()
    results = run(compose_demo(synthetic_root, *args), tmp_path / "killed", callbacks=[count])
    assert results["step"] == 3 and count.steps == 1  # resumed, not retrained from scratch
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class KillInValidation(L.Callback):
    """Dies at the end of the validation of step ``at``, after best.ckpt and before last.ckpt."""

    def __init__(self, at: int):
        self.at = at

    def on_validation_end(self, trainer, pl_module):
        if trainer.global_step == self.at and trainer.state.fn == "fit":
            raise RuntimeError("killed")


def test_best_validation_checkpoint_is_kept_and_resumes_exactly(synthetic_root, tmp_path):
    """Validation after every step of 4: results.json gives the best validation IoU with its
    step beside the last one, checkpoints/best.ckpt holds that step's weights; runs killed before a
    step, or inside a validation between best.ckpt and last.ckpt, end with the same best record and
    the same best weights as the uninterrupted run."""
    args = ("upsampler=bilinear", "trainer.max_steps=4", "checkpoint_every=1", "trainer.val_check_interval=1",
            "optimizer.lr=0.05", "prior_baseline=false", "pictures=0")
    straight = run(compose_demo(synthetic_root, *args), tmp_path / "straight")
    saved = json.loads((tmp_path / "straight" / "results.json").read_text())
    best, last = saved["best"], saved["val"]
    assert last["step"] == 4 and 1 <= best["step"] <= 4 and best["checkpoint"] == "checkpoints/best.ckpt"
    assert best["iou"] == best["iou_vis2"] >= last["iou"] and straight["best"] == best
    ckpt = torch.load(tmp_path / "straight" / "checkpoints" / "best.ckpt", weights_only=False)
    assert ckpt["global_step"] == best["step"] and ckpt["best_validation"]["iou"] == best["iou"]
    history = [float(r["val/iou_vis2"]) for r in csv.DictReader(open(tmp_path / "straight" / "csv" / "metrics.csv"))
               if r.get("val/iou_vis2")]
    assert len(history) == 4 and best["iou"] == pytest.approx(max(history)) and history.index(max(history)) + 1 == best["step"]
    for name, kill in (("before", KillAt(3)), ("inside", KillInValidation(best["step"]))):
        with pytest.raises(RuntimeError, match="killed"):
            run(compose_demo(synthetic_root, *args), tmp_path / name, callbacks=[kill])
        resumed = run(compose_demo(synthetic_root, *args), tmp_path / name)
        assert resumed["best"] == best, name
        other = torch.load(tmp_path / name / "checkpoints" / "best.ckpt", weights_only=False)["state_dict"]
        for k in ckpt["state_dict"]:
            assert torch.equal(ckpt["state_dict"][k], other[k]), (name, k)


def test_bad_config_is_refused_before_any_work(synthetic_root, tmp_path):
    with pytest.raises(ValueError, match="min_visibility"):
        run(compose_demo(synthetic_root, "min_visibility=7"), tmp_path)
    with pytest.raises(ValueError, match="negative_control"):
        run(compose_demo(synthetic_root, "negative_control=flip"), tmp_path)
    assert not any(tmp_path.iterdir())
