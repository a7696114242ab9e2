"""task=ovseg: MaskCLIP's value path on a tiny random CLIP, the text embeddings, the per-pixel
argmax, and a tiny end-to-end run of the demo config (a smoke test that says so)."""

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

pytest.importorskip("open_clip")

from test_eval_2d import compose_eval  # noqa: E402

from jafar import build_upsampler  # noqa: E402
from jafar.eval.maskclip import build_maskclip  # noqa: E402
from jafar.eval.ovseg import segment  # noqa: E402
from jafar.eval.run import run  # noqa: E402

#: a tiny open_clip CLIP (random weights): 2 vision blocks of width 32 on 16 px patches, 1 text block
TINY = {"embed_dim": 24,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(0)
    return build_maskclip(model_cfg=TINY)


def test_value_path_of_the_last_block(tiny_clip):
    """MaskCLIP features = ln_post(out_proj(v_proj(ln_1(x)))) @ proj on the tokens x entering the
    last block; an attention over a single token is exactly that value path, which gives an
    independent reference through nn.MultiheadAttention itself."""
    visual = tiny_clip.clip.visual
    image = torch.randn(2, 3, 64, 64)
    feats = tiny_clip(image)
    assert feats.shape == (2, 24, 4, 4) and tiny_clip.embed_dim == 24 and tiny_clip.patch_size == 16
    with torch.no_grad():
        (before_last,) = visual.forward_intermediates(image, indices=[0], intermediates_only=True,
                                                      output_fmt="NLC")["image_intermediates"]  # after block 0
        last = visual.transformer.resblocks[-1]
        tokens = last.ln_1(before_last).reshape(-1, 1, 32)  # every patch token as its own sequence
        value = last.attn(tokens, tokens, tokens, need_weights=False)[0].reshape(2, 16, 32)
        expected = (visual.ln_post(value) @ visual.proj).transpose(1, 2).reshape(2, 24, 4, 4)
    assert torch.allclose(feats, expected, atol=1e-5)
    assert tiny_clip(torch.randn(1, 3, 96, 32)).shape == (1, 24, 6, 2)  # position embedding resampled
    with pytest.raises(ValueError, match="multiple of the patch size"):
        tiny_clip(torch.randn(1, 3, 60, 64))


def test_text_embeddings_average_the_templates(tiny_clip):
    emb = tiny_clip.text_embeddings(["cat", "dog"], ["a photo of a {}.", "there is a {} in the scene."])
    assert emb.shape == (2, 24) and torch.allclose(emb.norm(dim=1), torch.ones(2), atol=1e-5)
    one = [tiny_clip.text_embeddings(["cat"], [t])[0] for t in ("a photo of a {}.", "there is a {} in the scene.")]
    assert torch.allclose(emb[0], F.normalize(one[0] + one[1], dim=0), atol=1e-5)
    with pytest.raises(ValueError, match="'{}'"):
        tiny_clip.text_embeddings(["cat"], ["a photo"])


class Stub(torch.nn.Module):
    """A 'backbone' with 2-channel features = the image's first two channels average-pooled 4x4."""

    patch_size, embed_dim = 4, 2

    def normalize(self, x):
        return x

    def forward(self, x):
        return F.avg_pool2d(x[:, :2], 4)


def test_each_pixel_takes_the_most_similar_class():
    image = torch.zeros(1, 3, 8, 8)
    image[0, 0, :, :4] = 1.0  # left half points along (1, 0), right half along (0, 1)
    image[0, 1, :, 4:] = 2.0
    text = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])  # 'right', 'left', a mixture
    logits = segment(Stub(), build_upsampler("nearest"), image, text, (8, 8))
    assert logits.shape == (1, 3, 8, 8)
    assert (logits.argmax(1)[0, :, :4] == 1).all() and (logits.argmax(1)[0, :, 4:] == 0).all()
    assert logits[0, 2, 0, 0].item() == pytest.approx(0.6)  # cosine, whatever the feature's norm


def tiny_ovseg(data_dir, *overrides):
    cfg = compose_eval("task=ovseg", "experiment=demo", f"dataset.demo_seg.root={data_dir}",
                       "dataset.demo_seg.prepare_args.train=1", "dataset.demo_seg.prepare_args.val=2",
                       "dataset.demo_seg.prepare_args.size=32", "task.image_size=32", "task.pictures=2",
                       "compare=[nearest,bilinear]", "trainer.enable_progress_bar=false", *overrides)
    with open_dict(cfg):
        cfg.backbone.model_cfg = TINY
    return cfg


def test_ovseg_demo_end_to_end_says_it_is_a_smoke_test(tmp_path):
    cfg = tiny_ovseg(tmp_path / "data")
    assert cfg.backbone.pretrained is None and list(cfg.task.datasets) == ["demo_seg"]
    run(cfg, tmp_path / "run")
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["task"] == "ovseg" and res["datasets"]["demo_seg"]["train_images"] == 0  # training-free
    for row in ("nearest", "bilinear"):
        m = res["results"]["demo_seg"][row]
        assert 0 <= m["miou"] <= 1 and 0 <= m["accuracy"] <= 1
    table = (tmp_path / "run" / "table.md").read_text()
    assert "## Open-vocabulary segmentation (MaskCLIP, training-free)" in table
    assert "Smoke test: the CLIP weights are randomly initialised" in table
    assert "| Upsampler | Demo mosaics mIoU ↑ | Demo mosaics Acc. ↑ |" in table
    assert (tmp_path / "run" / "pictures" / "demo_seg.png").stat().st_size > 0


@pytest.mark.parametrize("override, message", [
    ("task.templates=[a photo]", "task.templates"),
    ("task.batch_size=0", "task.batch_size"),
    ("task.datasets=[ade20k]|dataset.ade20k.skip_other_class=false", "skip_other_class=true"),
    ("task.datasets=[demo_depth]", "demo_depth is not one"),
])
def test_ovseg_bad_settings_are_refused_before_any_work(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run(tiny_ovseg(tmp_path / "data", *override.split("|")), tmp_path / "run")
    assert not (tmp_path / "data").exists()


def test_ovseg_needs_a_maskclip_backbone(tmp_path):
    with pytest.raises(ValueError, match="task=ovseg needs a CLIP backbone"):
        run(compose_eval("task=ovseg", "backbone=tiny_vit"), tmp_path / "run")


def test_the_paper_setting_composes():
    cfg = compose_eval("task=ovseg")
    assert cfg.backbone.name == "ViT-B-16" and cfg.backbone.pretrained == "openai"
    assert list(cfg.task.datasets) == ["coco", "voc", "ade20k", "cityscapes"] and cfg.task.image_size == 448
    assert cfg.dataset.ade20k.skip_other_class is True  # the 150 named classes; "other" ignored
    assert cfg.upsamplers.featup.checkpoint == "maskclip" and cfg.upsamplers.jafar.checkpoint is None
    assert cfg.dataset.voc.get("class_names") is None  # VOCSegmentation names its 21 classes itself


def test_ade20k_names_its_150_classes_and_skipping_other_leaves_class_0_unlabelled(tmp_path):
    """ADE20K with skip_other_class: id 0 maps to 255, so no label is class 0 ("other"), and
    task=ovseg (which never predicts a class no label id maps to) scores the 150 named classes."""
    import numpy as np
    from PIL import Image

    from jafar.eval.datasets import ADE20K, ADE20K_CLASSES

    root = tmp_path / "ADEChallengeData2016"
    for split in ("validation",):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / split / "a.jpg")
        Image.fromarray(np.full((8, 8), 3, np.uint8)).save(root / "annotations" / split / "a.png")
    ds = ADE20K(tmp_path, "val", image_size=8, skip_other_class=True)
    assert len(ADE20K_CLASSES) == 151 and ds.class_names[0] == "other" and ds.class_names[1] == "wall"
    present = {int(v) for v in np.unique(ds.lut)}
    assert 0 not in present and set(range(1, 151)) <= present
    from jafar.eval.ovseg import never_labelled

    assert never_labelled(ds, 151) == [0]
    assert never_labelled(ADE20K(tmp_path, "val", image_size=8), 151) == []  # "other" kept as a class
