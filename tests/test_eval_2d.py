"""tools/eval_2d.py: the configs compose, tiny task=seg and task=depth runs go end to end, a rerun
reuses finished work, bad settings are refused, and the probe itself learns."""

import json
import subprocess
import sys

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf, open_dict
from torch.utils.data import DataLoader, Dataset

from conftest import ROOT
from jafar.backbones import Backbone
from jafar.eval.config import compose as compose_eval
from jafar.eval.probes import SegmentationProbe
from jafar.eval.report import Column
from jafar.eval.run import run
from jafar.eval.tasks import TASKS, Task, picture_indices, register_task
from jafar.runs import RunConfigMismatch


def tiny(task, data_dir, *overrides):
    """experiment=demo shrunk to test size: a tiny random ViT, 3 + 2 images of 32 px, 1 epoch."""
    return compose_eval(
        f"task={task}", "experiment=demo", "backbone=tiny_vit", f"dataset.demo_{task}.root={data_dir}",
        f"dataset.demo_{task}.prepare_args.train=3", f"dataset.demo_{task}.prepare_args.val=2",
        f"dataset.demo_{task}.prepare_args.size=32", "task.image_size=28", "task.probe.epochs=1",
        "task.probe.batch_size=2", "task.probe.num_workers=0", "task.pictures=2", "upsamplers.jafar.checkpoint=null",
        "upsamplers.jafar.pretrain_if_missing=null", "trainer.enable_progress_bar=false", *overrides)


def test_configs_compose_for_every_task_and_the_demo():
    seg = compose_eval()
    assert list(seg.task.datasets) == ["coco", "voc", "ade20k", "cityscapes"]
    assert seg.task.probe.batch_size == 4 and seg.task.probe.scheduler == "official" and seg.task.normalize_input
    # the paper's epochs: 5 on COCO-Stuff (the data set's own), 20 on the others (the task's)
    assert seg.task.probe.epochs == 20 and seg.dataset.coco.epochs == 5
    assert all(seg.dataset[k].epochs is None for k in ("voc", "ade20k", "cityscapes"))
    assert seg.upsamplers.large_image.scale == 8 and compose_eval("task=ovseg").upsamplers.large_image.scale == 2
    assert seg.dataset.cityscapes.num_classes == 19 and seg.upsamplers.jafar.checkpoint == seg.backbone.name
    assert compose_eval("dataset.cityscapes.classes=27").dataset.cityscapes.num_classes == 27
    depth = compose_eval("task=depth", "experiment=demo")
    assert list(depth.task.datasets) == ["demo_depth"] and depth.backbone.name == "mobilenetv2_s16"
    assert "recipe" not in depth  # the eval demo, not the pretraining demo (configs/experiment/pretrain/demo.yaml)
    assert "strided" not in depth.compare and "strided" in seg.compare
    # Table 1's rows in its order (seg and depth); the paper's task-dependent rows train with the probe
    table_1 = ["nearest", "bilinear", "large_image", "strided", "carafe", "sapa", "dysample", "resfu", "featup", "lift",
               "jafar"]
    assert list(seg.compare) == table_1 and list(compose_eval("task=depth").compare) == table_1
    assert [r for r in seg.upsamplers if seg.upsamplers[r].get("train_with_probe")] == ["carafe", "sapa", "dysample",
                                                                                         "resfu"]
    assert seg.task.probe.upsampler_lr is None
    assert {"carafe", "dysample"} <= set(depth.compare)  # the demo trains these two with the probe


def test_depth_presets_paper_and_the_authors_command():
    paper = compose_eval("task=depth")  # the paper: COCO images, 5 epochs, batch 4
    assert list(paper.task.datasets) == ["coco"] and paper.task.probe.epochs == 5 and paper.dataset.coco.epochs == 5
    assert paper.task.probe.batch_size == 4 and paper.task.normalize_input and paper.task.gradient_weight == 0.5
    # github PaulCouairon/JAFAR issues/5: optimizer.lr=5e-3 dataset_evaluation=coco
    # train_dataloader.batch_size=2 num_epochs=5, on train_probes.py's unnormalised depth images
    cmd = compose_eval("task=depth", "experiment=official_command")
    assert list(cmd.task.datasets) == ["coco"] and cmd.task.probe.optimizer.lr == 5e-3 and cmd.task.probe.batch_size == 2
    assert cmd.task.probe.epochs == 5 and cmd.dataset.coco.epochs is None and cmd.task.probe.scheduler == "official"
    assert cmd.task.normalize_input is False and cmd.task.gradient_weight == 0
    seg = compose_eval("task=seg", "experiment=official_command")  # config/eval.yaml as released
    assert seg.task.probe.batch_size == 2 and seg.task.probe.epochs == 20 and seg.dataset.coco.epochs is None


def test_epochs_per_data_set_in_one_run(tmp_path):
    """The paper's COCO-Stuff 5 / others 20 in one invocation, at test size: one data set at its
    own 2 epochs, the other at the task's 1."""
    cfg = tiny("seg", tmp_path / "data", "compare=[bilinear]")
    with open_dict(cfg):
        cfg.dataset.demo_seg_b = OmegaConf.merge(cfg.dataset.demo_seg, {"name": "Demo B", "epochs": 2})
        cfg.task.datasets = ["demo_seg", "demo_seg_b"]
    res = run(cfg, tmp_path / "run")
    assert res["results"]["demo_seg"]["bilinear"]["epochs"] == 1 and res["results"]["demo_seg_b"]["bilinear"]["epochs"] == 2
    # what Lightning ran: 3 training images in batches of 2 = 2 steps per epoch
    steps = {k: torch.load(tmp_path / "run" / k / "bilinear" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
             for k in ("demo_seg", "demo_seg_b")}
    assert steps == {"demo_seg": 2, "demo_seg_b": 4}
    assert res["datasets"]["demo_seg_b"]["epochs"] == 2 and "epochs" not in res["datasets"]["demo_seg"]


def test_seg_end_to_end_then_reuse(tmp_path):
    cfg = tiny("seg", tmp_path / "data", "compare=[bilinear,strided,jafar]", "upsamplers.strided.stride=7")
    out = run(cfg, tmp_path / "run")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["task"] == "seg" and res["datasets"]["demo_seg"]["val_images"] == 2
    assert set(res["results"]["demo_seg"]) == {"bilinear", "strided", "jafar"}
    for row in ("bilinear", "strided", "jafar"):
        m = res["results"]["demo_seg"][row]
        assert 0 <= m["miou"] <= 1 and 0 <= m["accuracy"] <= 1 and m["epochs"] == 1
    table = (tmp_path / "run" / "table.md").read_text()
    assert "| Upsampler | Demo mosaics mIoU ↑ | Demo mosaics Acc. ↑ |" in table
    assert sum(line.startswith("| ") for line in table.splitlines()) == 4  # header + 3 rows
    assert "| Strided |" in table and "JAFAR: JAFAR, weights: random init." in table
    assert (tmp_path / "run" / "pictures" / "demo_seg.png").stat().st_size > 0
    assert (tmp_path / "run" / "demo_seg" / "jafar" / "checkpoints" / "last.ckpt").is_file()
    ckpt = torch.load(tmp_path / "run" / "demo_seg" / "jafar" / "checkpoints" / "last.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == {"classifier.weight", "classifier.bias"}  # the probe only
    assert out["results"] == res["results"]

    # the same command again: every pair is reused, nothing retrained
    result_file = tmp_path / "run" / "demo_seg" / "bilinear" / "result.json"
    stamp = result_file.stat().st_mtime_ns
    again = run(cfg, tmp_path / "run")
    assert again["results"] == res["results"] and result_file.stat().st_mtime_ns == stamp

    # killed after training, before scoring: the probe is restored from its checkpoint, not retrained
    result_file.unlink()
    resumed = run(cfg, tmp_path / "run")
    assert resumed["results"]["demo_seg"]["bilinear"]["miou"] == pytest.approx(res["results"]["demo_seg"]["bilinear"]["miou"])

    # another setting in the same run directory: refused before any work, naming the key and the
    # ways out; with resume=null the pair is redone under the new setting
    finished = (tmp_path / "run" / "results.json").read_text()
    changed = tiny("seg", tmp_path / "data", "compare=[bilinear]", "task.probe.optimizer.lr=0.05")
    with pytest.raises(RunConfigMismatch, match=r"task\.probe\.optimizer\.lr: 0\.005 -> 0\.05.*new name=.*resume=null"):
        run(changed, tmp_path / "run")
    assert result_file.is_file() and (tmp_path / "run" / "results.json").read_text() == finished
    run(tiny("seg", tmp_path / "data", "compare=[bilinear]", "task.probe.optimizer.lr=0.05", "resume=null"), tmp_path / "run")
    assert result_file.stat().st_mtime_ns != stamp

    # a new row in the same configuration is added, the finished ones reused
    again = run(tiny("seg", tmp_path / "data", "compare=[bilinear,nearest]", "task.probe.optimizer.lr=0.05"), tmp_path / "run")
    assert set(again["results"]["demo_seg"]) == {"bilinear", "nearest"}


def test_depth_end_to_end(tmp_path):
    cfg = tiny("depth", tmp_path / "data", "compare=[nearest,bilinear]")
    run(cfg, tmp_path / "run")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    m = res["results"]["demo_depth"]["bilinear"]
    assert 0 <= m["d1"] <= 1 and m["rmse"] > 0 and m["images"] == 2
    table = (tmp_path / "run" / "table.md").read_text()
    assert "Demo scenes δ1 ↑ | Demo scenes RMSE ↓" in table and "| Nearest |" in table
    assert (tmp_path / "run" / "pictures" / "demo_depth.png").is_file()


@pytest.mark.parametrize("override, message", [
    ("compare=[bilinear,pixelshuffle]", "compare lists 'pixelshuffle'"),
    ("task.datasets=[pascal_context]", "task.datasets names 'pascal_context'"),
    ("task.probe.epochs=0", "task.probe.epochs"),
    ("task.probe.scheduler=batch", "task.probe.scheduler must be official"),
    ("task.normalize_input=maybe", "task.normalize_input must be true"),
    ("dataset.demo_seg.epochs=0", "dataset.demo_seg.epochs must be a positive integer"),
    ("resume=always", "resume must be"),
])
def test_bad_settings_are_refused_before_any_work(tmp_path, override, message):
    cfg = tiny("seg", tmp_path / "data", override)
    with pytest.raises(ValueError, match=message):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "data").exists()  # nothing was prepared


def test_strided_with_a_cnn_is_refused(tmp_path):
    cfg = tiny("seg", tmp_path / "data", "backbone=mobilenetv2_s16", "compare=[bilinear,strided]")
    with pytest.raises(ValueError, match="strided, which needs a timm ViT"):
        run(cfg, tmp_path / "run")


def test_a_new_task_plugs_into_the_run(tmp_path):
    """How task=cam / task=ovseg will be added: a Task subclass, registered, with its columns."""

    class Constant(Task):
        name = "constant_test"
        title = "A constant score"
        columns = (Column("score", "Score", True, 100.0, 1),)
        needs_train = False

        def evaluate(self, ctx, data, row, upsampler, out_dir):
            return {"metrics": {"score": 0.5 if row == "bilinear" else 0.25}, "pictures": []}

    register_task(Constant())
    try:
        cfg = tiny("seg", tmp_path / "data", "compare=[nearest,bilinear]")
        with open_dict(cfg):
            cfg.task.name = "constant_test"
            cfg.task.datasets = ["demo_seg"]
        run(cfg, tmp_path / "run")
        table = (tmp_path / "run" / "table.md").read_text()
        assert "## A constant score" in table and "| Bilinear | **50.0** |" in table and "| Nearest | 25.0 |" in table
    finally:
        TASKS.unregister("constant_test")


def test_picture_indices_are_fixed_and_spread():
    assert picture_indices(24, 4) == [0, 8, 15, 23]
    assert picture_indices(3, 8) == [0, 1, 2] and picture_indices(5, 0) == [] and picture_indices(5, 1) == [0]


# ---------------------------------------------------------------------------------------------
# the probe learns
# ---------------------------------------------------------------------------------------------


class PooledPixels(Backbone):
    """A 'backbone' whose features are the image average-pooled 4x4: colour is linearly separable."""

    def __init__(self):
        super().__init__("pooled_pixels", 3, 4, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.dummy = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def feature_size(self, height, width):
        return height // 4, width // 4

    def _features(self, images):
        return torch.nn.functional.avg_pool2d(images, 4)


class Halves(Dataset):
    """Red or blue left/right halves; label 0 where red, 1 where blue."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        cut = int(torch.randint(8, 24, (), generator=g))
        label = torch.zeros(32, 32, dtype=torch.long)
        label[:, cut:] = 1
        image = torch.zeros(3, 32, 32)
        image[0][label == 0] = 1.0
        image[2][label == 1] = 1.0
        return {"image": image, "label": label, "name": str(i), "index": i}


def test_segmentation_probe_learns_a_separable_task(tmp_path):
    from jafar import build_upsampler

    L.seed_everything(0, verbose=False)
    probe = SegmentationProbe(PooledPixels(), build_upsampler("bilinear"), num_classes=2, target_size=32, lr=0.1,
                              epochs=15, hflip=0.5, picture_indices=[0])
    trainer = L.Trainer(max_epochs=15, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    before = probe.classifier.weight.detach().clone()
    trainer.fit(probe, DataLoader(Halves(), batch_size=4))
    trainer.validate(probe, DataLoader(Halves(), batch_size=4), verbose=False)
    assert not torch.equal(before, probe.classifier.weight)
    assert probe.val_results["accuracy"] > 0.9 and probe.val_results["miou"] > 0.8
    assert len(probe.pictures) == 1 and probe.pictures[0]["prediction"].shape == (32, 32)


def test_frozen_parts_move_with_the_probe_but_are_neither_trained_nor_saved():
    from jafar import build_upsampler
    from jafar.eval.probes import DepthProbe

    torch.manual_seed(0)
    up = build_upsampler("jafar", feature_dim=3, qk_dim=16)
    probe = SegmentationProbe(PooledPixels(), up, num_classes=2, target_size=32)
    children = list(probe.children())
    assert any(m is probe.backbone for m in children) and any(m is up for m in children)
    probe.to(torch.float64)  # one call moves the frozen parts too
    assert probe.backbone.dummy.dtype == torch.float64
    assert all(p.dtype == torch.float64 for p in up.parameters())
    hr, _ = probe.upsampled(torch.rand(1, 3, 32, 32, dtype=torch.float64))
    assert hr.shape == (1, 3, 32, 32)
    probe.train()
    assert probe.training and not up.training and not probe.backbone.training
    assert not any(p.requires_grad for p in up.parameters())
    trained = {id(p) for g in probe.configure_optimizers()["optimizer"].param_groups for p in g["params"]}
    assert trained == {id(p) for p in probe.classifier.parameters()}
    # the state dict (and so the checkpoints) holds the classifier only; such a state dict loads strictly
    state = probe.state_dict()
    assert set(state) == {"classifier.weight", "classifier.bias"}
    fresh = SegmentationProbe(PooledPixels(), build_upsampler("jafar", feature_dim=3, qk_dim=16), num_classes=2,
                              target_size=32).to(torch.float64)
    fresh.load_state_dict(state, strict=True)
    assert torch.equal(fresh.classifier.weight, probe.classifier.weight)
    # the depth probe's pseudo-labeller is frozen the same way
    labeler = torch.nn.Conv2d(3, 1, 1)
    depth = DepthProbe(PooledPixels(), build_upsampler("bilinear"), target_size=32, pseudo_labeler=labeler).to(
        torch.float64)
    assert labeler.weight.dtype == torch.float64 and not labeler.weight.requires_grad
    assert not any(k.startswith("pseudo_labeler") for k in depth.state_dict())


@pytest.mark.parametrize("scheduler", ["official", "naf", "per_epoch"])
def test_the_three_schedules_against_their_formulas(tmp_path, scheduler):
    """The learning rate of every training step of a 3-epoch, 2-batch run, against the cosine
    0.5 lr (1 + cos(pi t / T_max)) written out per source: official (train_probes.py: T_max =
    num_epochs, t = batches done), naf (valeoai/NAF: T_max = epochs x batches), per_epoch (t =
    epochs done)."""
    import math

    from jafar import build_upsampler

    lrs = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    probe = SegmentationProbe(PooledPixels(), build_upsampler("bilinear"), num_classes=2, target_size=32, lr=1.0,
                              epochs=3, scheduler=scheduler, hflip=0.0)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False, callbacks=[Record()],
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(probe, DataLoader(Halves(), batch_size=4))  # 8 images: 2 batches per epoch, 6 steps
    cos = lambda t, T: 0.5 * (1 + math.cos(math.pi * t / T))  # noqa: E731
    expected = {"official": [cos(k, 3) for k in range(6)],  # period 2 x 3 batches: back up after step 3
                "naf": [cos(k, 6) for k in range(6)],
                "per_epoch": [cos(k // 2, 3) for k in range(6)]}[scheduler]
    assert lrs == pytest.approx(expected, abs=1e-9)
    with pytest.raises(ValueError, match="scheduler must be one of"):
        SegmentationProbe(PooledPixels(), build_upsampler("bilinear"), num_classes=2, target_size=32, scheduler="step")


def test_normalize_input_false_feeds_the_image_in_0_1():
    """The official depth run: backbone and upsampler get the image as it is (mean 0, std 1)."""
    from jafar import build_upsampler

    seen = []

    class Shifted(PooledPixels):
        def __init__(self):
            super().__init__()
            self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

        def _features(self, images):
            seen.append(images.clone())
            return super()._features(images)

    image = torch.rand(1, 3, 32, 32)
    for flag, expected in ((True, (image - 0.5) / 0.25), (False, image)):
        probe = SegmentationProbe(Shifted(), build_upsampler("bilinear"), num_classes=2, target_size=32,
                                  normalize_input=flag)
        probe.upsampled(image)
        assert torch.allclose(seen[-1], expected)


def test_the_tool_runs_from_the_command_line(tmp_path):
    """tools/eval_2d.py composes through Hydra (configs/eval_2d.yaml) and writes its outputs."""
    cmd = [sys.executable, str(ROOT / "tools" / "eval_2d.py"), "experiment=demo", "backbone=tiny_vit",
           f"dataset.demo_seg.root={tmp_path / 'data'}", "dataset.demo_seg.prepare_args.train=2",
           "dataset.demo_seg.prepare_args.val=1", "dataset.demo_seg.prepare_args.size=32", "task.image_size=28",
           "task.probe.epochs=1", "task.probe.num_workers=0", "compare=[bilinear]",
           "trainer.enable_progress_bar=false", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["results"]["demo_seg"]["bilinear"]["miou"] >= 0
    assert OmegaConf.load(tmp_path / "run" / ".hydra" / "config.yaml").backbone.depth == 1


def test_feature_cache_runs_the_frozen_parts_once_per_image_and_flip():
    from jafar import build_upsampler

    calls = []
    up = build_upsampler("bilinear")
    up.register_forward_hook(lambda m, i, o: calls.append(i[1].shape[0]))
    cached = SegmentationProbe(PooledPixels(), up, num_classes=2, target_size=32, cache_features=True)
    plain = SegmentationProbe(PooledPixels(), build_upsampler("bilinear"), num_classes=2, target_size=32)
    plain.classifier.load_state_dict(cached.classifier.state_dict())
    image = torch.stack([Halves()[0]["image"], Halves()[1]["image"]])
    key = [("train", 0, False), ("train", 1, False)]
    first = cached.logits(image, (32, 32), key)
    again = cached.logits(image, (32, 32), key)
    assert calls == [2] and torch.equal(first, again)
    cached.logits(image.flip(-1), (32, 32), [("train", 0, True), ("train", 1, False)])
    assert calls == [2, 1]  # only the new (image, flip) pair is computed
    assert torch.allclose(first, plain.logits(image, (32, 32)), atol=1e-2)  # float16 storage


def test_depth_probe_token_half_equals_the_concatenated_convolution():
    from jafar import build_upsampler
    from jafar.eval.probes import DepthProbe

    torch.manual_seed(0)
    probe = DepthProbe(PooledPixels(), build_upsampler("bilinear"), target_size=32, global_token="mean")
    assert probe.classifier.in_channels == 6  # features and the global token (official: Conv2d(2C, 256))
    image = torch.rand(2, 3, 32, 32)
    hr, token = probe.upsampled(image)
    full = probe.classifier(torch.cat([hr, token[:, :, None, None].expand(-1, -1, 32, 32)], 1))
    probs = torch.relu(full) + 0.1
    expected = ((probs / probs.sum(1, keepdim=True)) * probe.bins.view(1, -1, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose(probe.logits(image, (32, 32)), expected, atol=1e-5)
