"""task=cam: the Grad-CAM metrics against hand-computed values, Grad-CAM from upsampled features,
the classifiers split at their target layer, the ImageNet folder loader and a tiny end-to-end run."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jafar import build_backbone, build_upsampler
from jafar.eval.cam import (CamClassifier, CamMeter, adcc, average_drop, average_gain, average_increase, cam_metrics,
                            coherency, complexity, explanation_map, grad_cam)
from jafar.eval.datasets import ImageNetFolder
from jafar.eval.run import run
from test_eval_2d import compose_eval

# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------


def test_drop_increase_gain_by_hand():
    y = torch.tensor([0.8, 0.5, 0.4])  # class probability on the image
    o = torch.tensor([0.4, 0.75, 0.4])  # on the explanation map
    assert average_drop(y, o).tolist() == pytest.approx([0.5, 0.0, 0.0])  # (0.8 - 0.4) / 0.8
    assert average_increase(y, o).tolist() == [0.0, 1.0, 0.0]  # strictly more confident only
    assert average_gain(y, o).tolist() == pytest.approx([0.0, 0.5, 0.0])  # (0.75 - 0.5) / (1 - 0.5)
    assert average_gain(torch.tensor([1.0]), torch.tensor([1.0])).tolist() == [0.0]  # no head-room: 0, not NaN


def test_coherency_is_the_rescaled_pearson_correlation():
    a = torch.tensor([[[1.0, 2.0, 3.0]]])
    # centred: (-1, 0, 1) and (-1, 1, 0): r = 1 / (sqrt 2 sqrt 2) = 0.5 -> (0.5 + 1) / 2
    assert coherency(a, torch.tensor([[[1.0, 3.0, 2.0]]])).item() == pytest.approx(0.75)
    assert coherency(a, 2 * a + 1).item() == pytest.approx(1.0)
    assert coherency(a, -a).item() == pytest.approx(0.0)
    assert coherency(a, torch.full_like(a, 0.3)).item() == 0.0  # undefined (constant map): 0, as the reference code


def test_complexity_is_the_mean_absolute_value():
    assert complexity(torch.tensor([[[0.0, 0.5], [1.0, 0.5]]])).item() == pytest.approx(0.5)
    assert complexity(torch.zeros(1, 4, 4)).item() == 0.0


def test_adcc_formula_by_hand():
    # 3 / (1/0.75 + 1/(1 - 0.5) + 1/(1 - 0.25)) = 3 / (4/3 + 2 + 4/3) = 9/14
    value = adcc(torch.tensor([0.25]), torch.tensor([0.75]), torch.tensor([0.5]))
    assert value.item() == pytest.approx(9 / 14)
    assert adcc(torch.tensor([1.0]), torch.tensor([0.9]), torch.tensor([0.1])).item() == 0.0  # drop of 100 %
    assert adcc(torch.tensor([0.1]), torch.tensor([0.0]), torch.tensor([0.1])).item() == 0.0  # no coherency
    assert adcc(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(1.0)


def test_meter_averages_per_image_and_gives_adcc_of_means():
    meter = CamMeter()
    cam = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 0.5, 1.0]]])
    cam_e = torch.tensor([[[1.0, 3.0, 2.0]], [[0.0, 0.5, 1.0]]])
    meter.update(cam_metrics(torch.tensor([0.8, 0.5]), torch.tensor([0.4, 0.75]), cam.clamp(0, 1), cam_e.clamp(0, 1)))
    out = meter.compute()
    assert out["images"] == 2
    assert out["average_drop"] == pytest.approx(0.25) and out["average_increase"] == pytest.approx(0.5)
    assert out["average_gain"] == pytest.approx(0.25)
    # image 1: clamped maps (1, 1, 1) -> constant -> coherency 0, ADCC 0; image 2: r = 1
    assert out["coherency"] == pytest.approx(0.5)
    assert out["complexity"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["adcc"] == pytest.approx((0.0 + 3 / (1 / 1 + 1 / 0.5 + 1 / 1)) / 2)
    assert out["adcc_of_means"] == pytest.approx(3 / (1 / 0.5 + 1 / 0.25 + 1 / 0.75))
    assert CamMeter().compute()["images"] == 0


# ---------------------------------------------------------------------------------------------
# Grad-CAM from upsampled features
# ---------------------------------------------------------------------------------------------


class PooledLinear(CamClassifier):
    """Features: the image average-pooled 4x4; head: a linear layer on their spatial mean."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[1.0, -1.0, 0.0], [0.0, 0.5, 2.0]]))
            self.fc.bias.zero_()

    def split(self, image):
        return F.avg_pool2d(image, 4), ()

    def head(self, features, state):
        return self.fc(features.mean(dim=(2, 3)))


def test_grad_cam_weights_the_upsampled_channels_by_the_mean_gradient():
    torch.manual_seed(0)
    clf = PooledLinear()
    image = torch.randn(2, 3, 16, 16)
    classes = torch.tensor([0, 1])
    cam, low = grad_cam(clf, build_upsampler("bilinear"), image, classes, (16, 16), return_low_res=True)
    feats = F.avg_pool2d(image, 4)
    # the gradient of a mean-pooled linear head is W_c / (h w) at every cell: alpha = W_c / 16
    for b, c in enumerate(classes.tolist()):
        alpha = clf.fc.weight[c] / 16
        hr = F.interpolate(feats[b:b + 1], size=(16, 16), mode="bilinear", align_corners=False)[0]
        expected = torch.relu(torch.einsum("c,chw->hw", alpha, hr))
        expected = (expected - expected.min()) / (expected.max() - expected.min())
        assert torch.allclose(cam[b], expected, atol=1e-6)
        lo = torch.relu(torch.einsum("c,chw->hw", alpha, feats[b]))
        assert torch.allclose(low[b], (lo - lo.min()) / (lo.max() - lo.min()), atol=1e-6)
    assert cam.shape == (2, 16, 16) and float(cam.min()) == 0.0 and float(cam.max()) == 1.0
    nearest = grad_cam(clf, build_upsampler("nearest"), image, classes, (16, 16))
    assert torch.allclose(nearest, low.repeat_interleave(4, 1).repeat_interleave(4, 2), atol=1e-6)


def test_explanation_map_in_both_spaces():
    img01 = torch.rand(1, 3, 4, 4)
    cam = torch.rand(1, 4, 4)
    norm = lambda x: (x - 0.5) / 0.25  # noqa: E731
    assert torch.allclose(explanation_map(norm(img01), img01, cam, norm), norm(img01) * cam[:, None])
    assert torch.allclose(explanation_map(norm(img01), img01, cam, norm, "pixels"), norm(img01 * cam[:, None]))
    with pytest.raises(ValueError, match="mask_space"):
        explanation_map(img01, img01, cam, norm, "logits")


def test_mobilenet_classifier_reproduces_the_network():
    from jafar.backbones import load_mobilenet_v2
    from jafar.eval.cam import build_cam_classifier

    backbone = build_backbone("mobilenetv2_s16")
    clf = build_cam_classifier(backbone, {"pretrained": True})
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(clf.logits(x), load_mobilenet_v2()(x), atol=1e-5)
    assert clf.split(x)[0].shape == (1, 96, 6, 6)


def test_vit_classifier_splits_before_the_last_attention():
    from jafar.eval.cam import build_cam_classifier

    torch.manual_seed(0)
    backbone = build_backbone("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, depth=2, embed_dim=32,
                              num_heads=2, num_classes=5)
    clf = build_cam_classifier(backbone)
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        assert torch.allclose(clf.logits(x), backbone.model(x), atol=1e-5)
    feats, _ = clf.split(x)
    assert feats.shape == (2, 32, 3, 3)
    cam = grad_cam(clf, build_upsampler("bilinear"), x, torch.tensor([0, 4]), (42, 42))
    assert cam.shape == (2, 42, 42) and float(cam.max()) == 1.0  # the patch tokens there do carry gradient
    headless = build_backbone("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, depth=1, embed_dim=32,
                              num_heads=2)
    with pytest.raises(ValueError, match="num_classes=1000"):
        build_cam_classifier(headless)


# ---------------------------------------------------------------------------------------------
# data and the run
# ---------------------------------------------------------------------------------------------


def test_imagenet_folder_reads_synset_folders_with_the_1000_class_indices(tmp_path):
    for wnid, n in (("n01440764", 2), ("n02123045", 1)):  # tench (0), tabby (281)
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (40, 30), (i * 50, 0, 0)).save(tmp_path / "val" / wnid / f"img{i}.JPEG")
    ds = ImageNetFolder(tmp_path, "val", image_size=24)
    assert len(ds) == 3 and [int(ds[i]["label"]) for i in range(3)] == [0, 0, 281]
    item = ds[2]
    assert item["image"].shape == (3, 24, 24) and item["name"] == "img0" and item["index"] == 2
    assert len(ImageNetFolder(tmp_path, "val", image_size=24, sample=2)) == 2
    (tmp_path / "val" / "cats").mkdir()
    with pytest.raises(ValueError, match="not ImageNet-1k synsets"):
        ImageNetFolder(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="ImageNet split 'train'"):
        ImageNetFolder(tmp_path, "train")


def tiny_cam(data_dir, *overrides):
    """task=cam experiment=demo at test size: one crop per photograph, 96 px, two rows."""
    return compose_eval("task=cam", "experiment=demo", f"dataset.demo_cam.root={data_dir}",
                        "dataset.demo_cam.prepare_args.crops=1", "dataset.demo_cam.prepare_args.size=96",
                        "task.image_size=96", "task.pictures=3", "compare=[nearest,bilinear]",
                        "upsamplers.jafar.checkpoint=null", "upsamplers.jafar.pretrain_if_missing=null",
                        "trainer.enable_progress_bar=false", *overrides)


def test_cam_demo_end_to_end(tmp_path):
    cfg = tiny_cam(tmp_path / "data")
    assert cfg.backbone.name == "mobilenetv2_s16" and list(cfg.task.datasets) == ["demo_cam"]
    run(cfg, tmp_path / "run")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["task"] == "cam" and res["datasets"]["demo_cam"]["val_images"] == 3
    m = res["results"]["demo_cam"]["bilinear"]
    assert m["classified_images"] == 3 and m["images"] >= 1  # the espresso crop at least is recognised
    for key in ("average_drop", "average_increase", "average_gain", "coherency", "complexity", "adcc"):
        assert 0 <= m[key] <= 1
    assert res["results"]["demo_cam"]["nearest"]["images"] == m["images"]  # the same correctly classified images
    assert m["adcc"] != res["results"]["demo_cam"]["nearest"]["adcc"]
    table = (tmp_path / "run" / "table.md").read_text()
    assert "| Upsampler | Demo photos A.D ↓ | Demo photos A.I ↑ | Demo photos A.G ↑ |" in table
    assert "Demo photos ADCC ↑ |" in table and "Grad-CAM target: MobileNetV2 features[:14]" in table
    assert (tmp_path / "run" / "pictures" / "demo_cam.png").stat().st_size > 0


@pytest.mark.parametrize("override, message", [
    ("task.mask_space=logits", "task.mask_space"),
    ("task.batch_size=0", "task.batch_size"),
    ("task.target_size=64", "task.target_size"),
    ("task.datasets=[demo_seg]", "demo_seg .VOCSegmentation. is not a classification"),
])
def test_cam_bad_settings_are_refused_before_any_work(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run(tiny_cam(tmp_path / "data", override), tmp_path / "run")
    assert not (tmp_path / "data").exists()


def test_cam_refuses_re_encoding_rows_with_a_vit(tmp_path):
    cfg = compose_eval("task=cam", "backbone=tiny_vit", "+backbone.num_classes=5", "compare=[bilinear,large_image]")
    with pytest.raises(ValueError, match="compare includes large_image"):
        run(cfg, tmp_path / "run")


def test_the_paper_setting_composes():
    cfg = compose_eval("task=cam")
    assert cfg.backbone.name == "vit_base_patch16_224.augreg2_in21k_ft_in1k" and cfg.backbone.num_classes == 1000
    assert list(cfg.compare) == ["bilinear", "featup", "lift", "jafar"] and list(cfg.task.datasets) == ["imagenet"]
    assert cfg.task.image_size == 224 and cfg.upsamplers.jafar.checkpoint == cfg.backbone.name  # the official release
    assert compose_eval("task=cam", "backbone=mobilenetv2_s16").backbone.name == "mobilenetv2_s16"  # still choosable
