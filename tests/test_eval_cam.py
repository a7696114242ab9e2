"""task=cam: the Grad-CAM metrics against hand-computed values, Grad-CAM from upsampled features,
the classifiers split at their target layer, the ImageNet folder loader and a tiny end-to-end run."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from test_eval_2d import compose_eval

from jafar import build_backbone, build_upsampler
from jafar.eval.cam import (
    CamClassifier,
    CamMeter,
    adcc,
    average_drop,
    average_gain,
    average_increase,
    cam_metrics,
    cam_row,
    coherency,
    complexity,
    draw_correct,
    explanation_map,
    grad_cam,
    score_explanations,
)
from jafar.eval.datasets import ImageNetFolder
from jafar.eval.run import run

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


#: a 4 x 4 CAM with 5 positive pixels summing to 3.0 (hand-made for the tests below)
CAM_4x4 = torch.tensor([[[0.0, 0.0, 0.5, 1.0],
                         [0.0, 0.25, 0.5, 0.0],
                         [0.0, 0.0, 0.0, 0.0],
                         [0.75, 0.0, 0.0, 0.0]]])


def test_complexity_paper_l0_fraction_and_reference_l1_mean_on_4x4():
    # paper (A.1): #{CAM > 0} / (H W) = 5 / 16; ADCC reference: (0.5 + 1 + 0.25 + 0.5 + 0.75) / 16 = 3 / 16
    assert complexity(CAM_4x4).item() == pytest.approx(5 / 16)
    assert complexity(CAM_4x4, "paper").item() == pytest.approx(0.3125)
    assert complexity(CAM_4x4, "adcc_reference").item() == pytest.approx(0.1875)
    assert complexity(torch.zeros(1, 4, 4)).item() == 0.0
    with pytest.raises(ValueError, match="task.definition"):
        complexity(CAM_4x4, "l1")


def test_coherency_on_4x4_binary_maps_by_hand():
    # A: the top row; B: the top-left 2 x 2 block. Both binary: Pearson = phi coefficient
    # (n11 n00 - n10 n01) / sqrt(n1. n0. n.1 n.0) = (2*10 - 2*2) / sqrt(4*12*4*12) = 16/48 = 1/3,
    # coherency = (1/3 + 1) / 2 = 2/3
    a = torch.zeros(1, 4, 4)
    a[0, 0, :] = 1
    b = torch.zeros(1, 4, 4)
    b[0, :2, :2] = 1
    assert coherency(a, b).item() == pytest.approx(2 / 3)
    assert coherency(0.5 * a, 3 * b + 0.1).item() == pytest.approx(2 / 3)  # scaling-free: max or min-max alike


class SumOfPixels(CamClassifier):
    """Two classes: logits ``(log(sum of the pixels), 0)``, so P(class 0) = s / (s + 1)."""

    def split(self, image):
        return image, ()

    def head(self, features, state):
        s = features.sum(dim=(1, 2, 3))
        return torch.stack([s.log(), torch.zeros_like(s)], 1)


def test_paper_metrics_on_a_4x4_case_by_hand():
    # CAM: positive on the top row only, (1, 0.5, 0.25, 0.75) (4 of 16 pixels); its CAM on the
    # explanation image: the top-left 2 x 2 block. Pearson by hand: sums 2.5 and 4, sum of products
    # 1.5, so cov = 1.5 - 2.5 * 4 / 16 = 7/8, var terms 1.875 - 2.5^2/16 = 95/64 and 4 - 1 = 3:
    # r = (7/8) / sqrt(95/64 * 3) = 7 / sqrt(285), coherency (1 + r) / 2.
    # Image 1: pixel (0, 0) = 1 (kept by the mask), (2, 2) = 2 (masked): Y = 3/4, O = 1/2.
    # Image 2: (0, 0) = 3, (2, 2) = -2: Y = 1/2, O = 3/4.
    cam = torch.zeros(2, 4, 4)
    cam[:, 0, :] = torch.tensor([1.0, 0.5, 0.25, 0.75])
    cam_e = torch.zeros(2, 4, 4)
    cam_e[:, :2, :2] = 1.0
    x = torch.zeros(2, 1, 4, 4)
    x[0, 0, 0, 0], x[0, 0, 2, 2] = 1.0, 2.0
    x[1, 0, 0, 0], x[1, 0, 2, 2] = 3.0, -2.0
    m = score_explanations(SumOfPixels(), x, x, torch.tensor([0, 0]), cam, lambda e: cam_e, lambda v: v)
    # A.D: (3/4 - 1/2) / (3/4) = 1/3, and 0; A.I: 0, 1; A.G: 0, (3/4 - 1/2) / (1 - 1/2) = 1/2
    assert m["average_drop"].tolist() == pytest.approx([1 / 3, 0.0])
    assert m["average_increase"].tolist() == [0.0, 1.0]
    assert m["average_gain"].tolist() == pytest.approx([0.0, 0.5])
    coh = (1 + 7 / 285 ** 0.5) / 2  # 0.70732...
    assert m["coherency"].tolist() == pytest.approx([coh, coh])
    assert m["complexity"].tolist() == pytest.approx([0.25, 0.25])  # 4 / 16 positive pixels
    # ADCC = 3 / (1/coh + 1/(1 - com) + 1/(1 - A.D)) with 1 - com = 3/4 and 1 - A.D = 2/3, then 1
    assert m["adcc"].tolist() == pytest.approx([3 / (1 / coh + 4 / 3 + 3 / 2), 3 / (1 / coh + 4 / 3 + 1)])
    # the ADCC reference code multiplies by the CAM itself: image 2's kept pixel becomes 3 * 1.0,
    # image 1's 1 * 1.0 (unchanged here), Complexity = (1 + 0.5 + 0.25 + 0.75) / 16 = 5/32
    ref = score_explanations(SumOfPixels(), x, x, torch.tensor([0, 0]), cam, lambda e: cam_e, lambda v: v,
                             definition="adcc_reference")
    assert ref["complexity"].tolist() == pytest.approx([5 / 32, 5 / 32])
    assert ref["average_drop"].tolist() == pytest.approx([1 / 3, 0.0])


def test_paper_explanation_image_is_the_binary_mask_on_4x4():
    x = torch.arange(16.0).view(1, 1, 4, 4) - 8  # normalised values, negative ones included
    norm = lambda v: (v - 0.5) / 0.25  # noqa: E731
    binary = (CAM_4x4 > 0).float()
    expected = torch.tensor([[0, 0, -6, -5], [0, -3, -2, 0], [0, 0, 0, 0], [4, 0, 0, 0]], dtype=torch.float32)
    assert torch.equal(explanation_map(x, x, CAM_4x4, norm)[0, 0], expected)  # x * 1[CAM > 0]
    assert torch.allclose(explanation_map(x, x, CAM_4x4, norm, definition="adcc_reference")[0, 0],
                          x[0, 0] * CAM_4x4[0])
    img01 = torch.rand(1, 3, 4, 4)
    assert torch.allclose(explanation_map(norm(img01), img01, CAM_4x4, norm, "pixels"), norm(img01 * binary))


def test_adcc_formula_by_hand():
    # 3 / (1/0.75 + 1/(1 - 0.5) + 1/(1 - 0.25)) = 3 / (4/3 + 2 + 4/3) = 9/14
    value = adcc(torch.tensor([0.25]), torch.tensor([0.75]), torch.tensor([0.5]))
    assert value.item() == pytest.approx(9 / 14)
    assert adcc(torch.tensor([1.0]), torch.tensor([0.9]), torch.tensor([0.1])).item() == 0.0  # drop of 100 %
    assert adcc(torch.tensor([0.1]), torch.tensor([0.0]), torch.tensor([0.1])).item() == 0.0  # no coherency
    assert adcc(torch.tensor([0.0]), torch.tensor([1.0]), torch.tensor([0.0])).item() == pytest.approx(1.0)


def test_meter_averages_per_image_and_gives_adcc_of_the_means():
    meter = CamMeter()
    cam = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 0.5, 1.0]]])
    cam_e = torch.tensor([[[1.0, 3.0, 2.0]], [[0.0, 0.5, 1.0]]])
    meter.update(cam_metrics(torch.tensor([0.8, 0.5]), torch.tensor([0.4, 0.75]), cam.clamp(0, 1), cam_e.clamp(0, 1),
                             "adcc_reference"))
    out = meter.compute()
    assert out["images"] == 2
    assert out["average_drop"] == pytest.approx(0.25) and out["average_increase"] == pytest.approx(0.5)
    assert out["average_gain"] == pytest.approx(0.25)
    # image 1: clamped maps (1, 1, 1) -> constant -> coherency 0, ADCC 0; image 2: r = 1
    assert out["coherency"] == pytest.approx(0.5)
    assert out["complexity"] == pytest.approx((1.0 + 0.5) / 2)
    assert out["adcc_mean_per_image"] == pytest.approx((0.0 + 3 / (1 / 1 + 1 / 0.5 + 1 / 1)) / 2)
    assert out["adcc"] == pytest.approx(3 / (1 / 0.5 + 1 / 0.25 + 1 / 0.75))  # of the means (1 - 0.75, 1 - 0.25)


#: the paper's Table 2 (A.D, Coh., Cplx., ADCC in %), transcribed from ../shared/reference/jafar_paper.md
TABLE_2 = {"Bilinear": (19.0, 88.8, 59.9, 61.7), "Large Image (x8)": (48.8, 67.9, 38.0, 59.5),
           "Strided": (19.8, 85.9, 54.2, 65.3), "CARAFE": (49.9, 66.9, 34.9, 59.7), "SAPA": (8.5, 96.5, 69.6, 55.4),
           "Dysample": (17.8, 90.2, 60.7, 61.6), "ReSFU": (14.5, 92.1, 64.2, 59.4), "FeatUp": (15.3, 91.6, 58.2, 64.3),
           "LIFT": (66.9, 65.2, 9.4, 53.0), "JAFAR": (17.4, 91.4, 44.1, 73.3)}


@pytest.mark.parametrize("row", list(TABLE_2))
def test_the_paper_table_2_adcc_is_the_adcc_of_its_column_means(row):
    """Equation 10 by hand on the printed means gives every printed ADCC of Table 2 to 0.1
    (JAFAR: 3 / (100/91.4 + 100/55.9 + 100/82.6) = 73.3), and our adcc() gives the same."""
    drop, coh, cplx, printed = TABLE_2[row]
    by_hand = 300 / (100 / coh + 100 / (100 - cplx) + 100 / (100 - drop))
    assert abs(by_hand - printed) <= 0.1 + 1e-9
    ours = 100 * adcc(torch.tensor([drop / 100]), torch.tensor([coh / 100]), torch.tensor([cplx / 100])).item()
    assert ours == pytest.approx(by_hand, rel=1e-6)
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
    ref = "adcc_reference"
    assert torch.allclose(explanation_map(norm(img01), img01, cam, norm, definition=ref), norm(img01) * cam[:, None])
    assert torch.allclose(explanation_map(norm(img01), img01, cam, norm, "pixels", ref), norm(img01 * cam[:, None]))
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
                        "task.image_size=96", "task.pictures=3", "compare=[nearest,bilinear]", "task.images=2",
                        "upsamplers.jafar.checkpoint=null", "upsamplers.jafar.pretrain_if_missing=null",
                        "trainer.enable_progress_bar=false", *overrides)


def test_cam_demo_end_to_end(tmp_path):
    cfg = tiny_cam(tmp_path / "data")
    assert cfg.backbone.name == "mobilenetv2_s16" and list(cfg.task.datasets) == ["demo_cam"]
    run(cfg, tmp_path / "run")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["task"] == "cam" and res["datasets"]["demo_cam"]["val_images"] == 3
    m = res["results"]["demo_cam"]["bilinear"]
    assert m["classified_images"] == 3 and m["correct_images"] >= 1  # the espresso crop at least is recognised
    assert m["images"] == min(m["correct_images"], 2)  # task.images=2 drawn among the correct ones
    for key in ("average_drop", "average_increase", "average_gain", "coherency", "complexity", "adcc"):
        assert 0 <= m[key] <= 1
    assert res["results"]["demo_cam"]["nearest"]["images"] == m["images"]  # the same correctly classified images
    assert m["adcc"] != res["results"]["demo_cam"]["nearest"]["adcc"]
    table = (tmp_path / "run" / "table.md").read_text()
    assert "| Upsampler | Demo photos A.D ↓ | Demo photos A.I ↑ | Demo photos A.G ↑ |" in table
    assert "Demo photos ADCC ↑ |" in table and "Grad-CAM target: MobileNetV2 features[:14]" in table
    assert "Definitions: paper" in table and "No Strided row: MobileNetV2 is a CNN" in table
    assert (tmp_path / "run" / "pictures" / "demo_cam.png").stat().st_size > 0


@pytest.mark.parametrize("override, message", [
    ("task.mask_space=logits", "task.mask_space"),
    ("task.batch_size=0", "task.batch_size"),
    ("task.target_size=64", "task.target_size"),
    ("task.datasets=[demo_seg]", "demo_seg .VOCSegmentation. is not a classification"),
    ("task.definition=soft", "task.definition must be 'paper'"),
    ("task.images=0", "task.images must be a positive integer"),
])
def test_cam_bad_settings_are_refused_before_any_work(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run(tiny_cam(tmp_path / "data", override), tmp_path / "run")
    assert not (tmp_path / "data").exists()


def _tiny_vit_classifier():
    from jafar.eval.cam import build_cam_classifier

    torch.manual_seed(0)
    backbone = build_backbone("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, depth=2, embed_dim=32,
                              num_heads=2, num_classes=5)
    return backbone, build_cam_classifier(backbone)


def test_large_image_and_strided_rows_read_the_vit_grad_cam_layer_again():
    backbone, clf = _tiny_vit_classifier()
    x = torch.randn(1, 3, 28, 28)  # 2 x 2 patches of 14
    large = cam_row(clf, build_upsampler("large_image", backbone=backbone, scale=2.0))
    feats, _ = clf.split(F.interpolate(x, size=(56, 56), mode="bilinear", align_corners=False))
    assert feats.shape == (1, 32, 4, 4)  # the enlarged image's grid at the Grad-CAM layer
    expected = F.interpolate(feats, size=(28, 28), mode="bilinear", align_corners=False)
    assert torch.allclose(large(x, None, (28, 28)), expected, atol=1e-6)
    strided = cam_row(clf, build_upsampler("strided", backbone=backbone, stride=7))
    feats, _ = clf.split(x, stride=7)
    assert feats.shape == (1, 32, 3, 3)  # (28 - 14) // 7 + 1
    assert clf.model.patch_embed.proj.stride == (14, 14)  # restored
    assert torch.allclose(strided(x, None, (28, 28)),
                          F.interpolate(feats, size=(28, 28), mode="bilinear", align_corners=False), atol=1e-6)
    cam = grad_cam(clf, large, x, torch.tensor([3]), (28, 28), scaling="max")
    assert cam.shape == (1, 28, 28) and float(cam.max()) == pytest.approx(1.0)
    bilinear = build_upsampler("bilinear")
    assert cam_row(clf, bilinear) is bilinear  # every other row as it is


def test_draw_correct_draws_among_the_correct_ones_with_a_fixed_seed():
    correct = [3, 8, 9, 14, 20, 21, 30]
    # an independent transcription of the draw: a seeded permutation of the positions, first k, sorted
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(5)).tolist()[:3]
    assert draw_correct(correct, 3, 5) == sorted(correct[i] for i in perm)
    assert draw_correct(correct, 3, 5) == draw_correct(correct, 3, 5) and set(draw_correct(correct, 3, 5)) <= set(correct)
    assert draw_correct(correct, 3, 6) != draw_correct(correct, 3, 5)
    assert draw_correct(correct, None, 0) == correct and draw_correct(correct, 100, 0) == correct


def test_the_paper_setting_composes():
    cfg = compose_eval("task=cam")
    assert cfg.backbone.name == "vit_base_patch16_224.augreg2_in21k_ft_in1k" and cfg.backbone.num_classes == 1000
    # Table 2's ten rows in its order; the task-dependent ones trained first (upsampler_training)
    assert list(cfg.compare) == ["bilinear", "large_image", "strided", "carafe", "sapa", "dysample", "resfu", "featup",
                                 "lift", "jafar"]
    assert [r for r in cfg.compare if cfg.upsamplers[r].get("train_with_probe")] == ["carafe", "sapa", "dysample", "resfu"]
    assert list(cfg.task.datasets) == ["imagenet"] and cfg.upsamplers.large_image.scale == 8  # Table 2: x8
    assert cfg.task.definition == "paper" and cfg.task.images == 2000 and cfg.dataset.imagenet.sample is None
    assert cfg.task.image_size == 224 and cfg.upsamplers.jafar.checkpoint == cfg.backbone.name  # the official release
    assert compose_eval("task=cam", "backbone=mobilenetv2_s16").backbone.name == "mobilenetv2_s16"  # still choosable
