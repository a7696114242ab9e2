"""jafar.load / hubconf.py: the official hub's 14 names, the offline sentence, and a local-weights
load that runs end to end (tiny random backbones; no network)."""

import pytest
import torch
from torch import nn

import hubconf
import jafar
from conftest import refuse_network
from jafar import HUB_NAMES, JAFAR, build_backbone
from jafar.upsamplers import jafar as ckpt

#: the official hub's names and the release file each loads (github PaulCouairon/JAFAR hubconf.py:
#: load's name mapping and WEIGHTS_URLS), written out here
OFFICIAL = {
    "dinov2_s": "vit_small_patch14_dinov2.lvd142m.pth",
    "dinov2_b": "vit_base_patch14_dinov2.lvd142m.pth",
    "dinov2_reg4_s": "vit_small_patch14_reg4_dinov2.pth",
    "dinov3_s": "vit_small_patch16_dinov3.lvd1689m.pth",
    "dinov3_s_plus": "vit_small_plus_patch16_dinov3.lvd1689m.pth",
    "dinov3_b": "vit_base_patch16_dinov3.lvd1689m.pth",
    "dinov3_l": "vit_large_patch16_dinov3.lvd1689m.pth",
    "dino_b": "vit_base_patch16_224.dino.pth",
    "clip_b": "vit_base_patch16_clip_384.pth",
    "siglip2_b": "vit_base_patch16_siglip_512.v2_webli.pth",
    "vit_b": "vit_base_patch16_224.pth",
    "radio_b": "radio_v2.5-b.pth",
    "radio_l": "radio_v2.5-l.pth",
    "radio_h": "radio_v2.5-h.pth",
}
TINY = dict(depth=1, embed_dim=32, num_heads=2)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1, every socket refused (and recorded), empty caches."""
    calls = refuse_network(monkeypatch, tmp_path, hf_offline=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "load", lambda *a, **k: pytest.fail("torch.hub.load called offline"))
    return calls


def test_the_fourteen_official_names_are_known():
    assert set(HUB_NAMES) == set(OFFICIAL) == set(hubconf.NAMES)
    for name, filename in OFFICIAL.items():
        assert ckpt.resolve_release(name).filename == filename
        assert callable(getattr(hubconf, name))
    with pytest.raises(ValueError, match="no official JAFAR release named 'dinov4_s'; known: dinov2_s"):
        jafar.load("dinov4_s")


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_offline_each_name_says_which_file_to_fetch_and_where(offline, tmp_path, name):
    release = ckpt.resolve_release(name)
    with pytest.raises(RuntimeError) as info:
        jafar.load(name, cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith(f"jafar.load({name!r}) needs the JAFAR weights {OFFICIAL[name]} (download "
                              f"https://github.com/PaulCouairon/JAFAR/releases/download/Weights/{OFFICIAL[name]} "
                              f"and put it at {tmp_path / 'cache' / OFFICIAL[name]}")
    assert message.endswith("HF_HUB_OFFLINE is set.") and message.count(". ") == 0  # one sentence
    if name.startswith("radio"):
        assert f"torch.hub.load('NVlabs/RADIO', 'radio_model', version={release.backbone!r})" in message
    else:
        assert f"https://huggingface.co/timm/{release.backbone}/resolve/main/model.safetensors" in message
        assert "backbone_weights=" in message
    assert offline == []


def _local_files(tmp_path, width=32):
    torch.manual_seed(0)
    backbone = build_backbone("dinov2_vits14", pretrained=False, **TINY)
    torch.save(backbone.model.state_dict(), tmp_path / "backbone.pth")
    upsampler = JAFAR(v_dim=width, qk_dim=32)
    with torch.no_grad():
        for p in upsampler.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save({"jafar": upsampler.state_dict()}, tmp_path / OFFICIAL["dinov2_s"])  # the official layout
    return backbone, upsampler


def test_local_weights_load_runs_end_to_end_offline(offline, tmp_path):
    backbone, upsampler = _local_files(tmp_path)
    model = jafar.load("dinov2_s", resolution=28, weights=tmp_path / OFFICIAL["dinov2_s"],
                       backbone_weights=tmp_path / "backbone.pth", backbone_options=TINY, device="cpu")
    assert isinstance(model, nn.Module) and model.resolution == (28, 28)
    images = torch.rand(2, 3, 42, 56)
    # by hand: the backbone's normalisation, its features, JAFAR guided by the same normalised image
    mean, std = torch.tensor(backbone.mean).view(1, 3, 1, 1), torch.tensor(backbone.std).view(1, 3, 1, 1)
    x = (images - mean) / std
    with torch.no_grad():
        expected = upsampler(x, backbone(x), (28, 28))
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-6)
    assert model(images, output_size=14).shape == (2, 32, 14, 14)
    assert model(images, output_size=(12, 20)).shape == (2, 32, 12, 20)
    with pytest.raises(ValueError, match=r"images must be RGB in \[0, 1\] .* got values in \[255, 255\]"):
        model(torch.full((1, 3, 42, 56), 255.0))
    with pytest.raises(ValueError, match=r"images must be an RGB batch \(B, 3, H, W\)"):
        model(torch.rand(3, 42, 56))
    # the torch.hub entry point is the same call
    hub_model = hubconf.dinov2_s(resolution=28, weights=tmp_path / OFFICIAL["dinov2_s"],
                                 backbone_weights=tmp_path / "backbone.pth", backbone_options=TINY, device="cpu")
    torch.testing.assert_close(hub_model(images), expected, rtol=1e-5, atol=1e-6)
    assert offline == []


def test_missing_local_files_and_width_mismatch_are_one_sentence(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights .*nope.pth' does not exist"):
        jafar.load("dinov3_s", weights=tmp_path / "nope.pth")
    _local_files(tmp_path, width=48)
    with pytest.raises(ValueError, match="upsamples 48-channel features but the backbone gives 32"):
        jafar.load("dinov2_s", weights=tmp_path / OFFICIAL["dinov2_s"], backbone_weights=tmp_path / "backbone.pth",
                   backbone_options=TINY, device="cpu")


def test_pretrained_false_builds_random_weights_without_files(offline):
    model = jafar.load("dinov3_s", resolution=(16, 24), pretrained=False, backbone_options=TINY, device="cpu")
    assert model.backbone.patch_size == 16 and model.upsampler.weights_source == "random init"
    assert model(torch.rand(1, 3, 32, 48)).shape == (1, 32, 16, 24)


def test_radio_release_goes_through_the_hub_loader_with_a_local_jafar_file(tmp_path, monkeypatch):
    class FakeRadio(nn.Module):
        patch_size = 16

        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 768, 16, stride=16)

        def get_nearest_supported_resolution(self, h, w):
            return 16 * round(h / 16), 16 * round(w / 16)

        def forward(self, x, feature_fmt="NLC"):
            spatial = self.proj(x)
            return spatial.mean((2, 3)), spatial

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(torch.hub, "load", lambda repo, entry, **k: FakeRadio())
    torch.manual_seed(0)
    upsampler = JAFAR(v_dim=768)
    torch.save({"jafar": upsampler.state_dict()}, tmp_path / "radio_v2.5-b.pth")
    model = jafar.load("radio_b", resolution=32, weights=tmp_path / "radio_v2.5-b.pth", device="cpu")
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():  # RADIO normalises internally: the guidance is the [0, 1] image, as the official wrapper's
        expected = upsampler(images, model.backbone.model(images, feature_fmt="NCHW")[1], (32, 32))
    torch.testing.assert_close(model(images), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backbone_weights= and backbone_options= are not supported"):
        jafar.load("radio_b", backbone_weights=tmp_path / "x.pth")
