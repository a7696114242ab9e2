import os
import urllib.error

import pytest
import torch

from conftest import rel_err
from jafar import JAFAR, build_upsampler, load_checkpoint, save_checkpoint
from jafar.upsamplers import jafar as ckpt


def _official_layout(tmp_path, model, extra_keys=True, name="official.pth"):
    """A file laid out like the official releases, OmegaConf config and optimiser included."""
    omegaconf = pytest.importorskip("omegaconf")
    state = model.state_dict()
    if extra_keys:
        state["query_features_encoder.0.weight"] = torch.zeros(3, 3)
        state["query_features_encoder.1.norm1.weight"] = torch.zeros(3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    cfg = omegaconf.OmegaConf.create({"backbone": {"name": "vit_small_patch14_dinov2.lvd142m"},
                                      "model": {"v_dim": model.v_dim}})
    path = tmp_path / name
    torch.save({"jafar": state, "optimizer_jafar": opt.state_dict(), "epoch": 3, "cfg": cfg}, path)
    return path


def test_loads_official_layout_and_drops_stray_keys(tmp_path, official_reference):
    src = JAFAR()
    src.load_state_dict(official_reference["state_dict"])
    path = _official_layout(tmp_path, src)
    with pytest.warns(UserWarning, match="ignoring 2 stray keys"):
        model = load_checkpoint(path, feature_dim=384)
    case = official_reference["cases"][0]
    with torch.no_grad():
        out = model.eval()(case["image"], case["features"], tuple(case["output_size"]))
    assert rel_err(out, case["output"]) < 1e-5


def test_config_is_inferred_from_the_shapes(tmp_path):
    path = _official_layout(tmp_path, JAFAR(v_dim=768, kernel_size=3), extra_keys=False)
    model = load_checkpoint(path)
    assert model.config == dict(input_dim=3, qk_dim=128, v_dim=768, num_heads=4, kernel_size=3)


def test_refuses_a_checkpoint_for_another_feature_width(tmp_path):
    path = _official_layout(tmp_path, JAFAR(v_dim=768), extra_keys=False)
    with pytest.raises(ValueError, match="upsamples 768-channel features but the backbone gives 384"):
        load_checkpoint(path, feature_dim=384)


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_never_executes_pickled_code(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"jafar": JAFAR(v_dim=16, qk_dim=32).state_dict(), "cfg": _Exploit(target)}, path)
    with pytest.raises(ValueError, match="cannot be read without executing pickled code"):
        load_checkpoint(path)
    assert not target.exists()


def test_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    model = JAFAR(v_dim=40, qk_dim=32, kernel_size=3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    path = save_checkpoint(model, tmp_path / "sub" / "jafar.safetensors", metadata={"backbone": "tiny"})
    assert [p.name for p in path.parent.iterdir()] == ["jafar.safetensors"]  # no temporary left behind
    loaded = load_checkpoint(path, attention="reference")
    assert loaded.config == model.config and loaded.attention == "reference"
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    image, feats = torch.randn(1, 3, 8, 8), torch.randn(1, 40, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(image, feats, (8, 8)), loaded(image, feats, (8, 8)))


def test_save_refuses_other_suffixes(tmp_path):
    with pytest.raises(ValueError, match="writes .safetensors files"):
        save_checkpoint(JAFAR(v_dim=16, qk_dim=32), tmp_path / "x.pth")


def test_missing_file_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pth")
    torch.save({"model": {"w": torch.zeros(1)}, "note": "x"}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="holds no JAFAR state dict"):
        load_checkpoint(tmp_path / "other.pth")


def test_release_table_names_the_official_files():
    # the official hubconf.py's WEIGHTS_URLS, file names written out here (github PaulCouairon/JAFAR)
    files = {r.filename for r in ckpt.OFFICIAL_RELEASES.values()}
    assert files == {
        "vit_small_patch14_dinov2.lvd142m.pth", "vit_base_patch14_dinov2.lvd142m.pth",
        "vit_small_patch14_reg4_dinov2.pth", "vit_base_patch16_224.dino.pth", "vit_base_patch16_224.pth",
        "vit_base_patch16_clip_384.pth", "vit_base_patch16_siglip_512.v2_webli.pth",
        "vit_small_patch16_dinov3.lvd1689m.pth", "vit_small_plus_patch16_dinov3.lvd1689m.pth",
        "vit_base_patch16_dinov3.lvd1689m.pth", "vit_large_patch16_dinov3.lvd1689m.pth",
        "radio_v2.5-b.pth", "radio_v2.5-l.pth", "radio_v2.5-h.pth",
    }
    assert all(r.url == f"https://github.com/PaulCouairon/JAFAR/releases/download/Weights/{r.filename}"
               for r in ckpt.OFFICIAL_RELEASES.values())
    # widths: the official resolver's get_feature (small 384, base 768, large 1024, RADIO b/l/h 768/1024/1280)
    widths = {r.filename: r.feature_dim for r in ckpt.OFFICIAL_RELEASES.values()}
    assert [widths[f"vit_{s}_patch16_dinov3.lvd1689m.pth"] for s in ("small", "small_plus", "base", "large")] == \
        [384, 384, 768, 1024]
    assert [widths[f"radio_v2.5-{s}.pth"] for s in "blh"] == [768, 1024, 1280]
    assert ckpt.resolve_release("dinov2_vits14").url.endswith("/releases/download/Weights/"
                                                             "vit_small_patch14_dinov2.lvd142m.pth")
    assert ckpt.resolve_release("dino_vitb16").filename == "vit_base_patch16_224.dino.pth"
    assert ckpt.resolve_release("dinov3_l").filename == "vit_large_patch16_dinov3.lvd1689m.pth"
    assert ckpt.resolve_release("radio_v2.5-h").filename == "radio_v2.5-h.pth"
    with pytest.raises(ValueError, match="no official JAFAR release named"):
        ckpt.resolve_release("resnet50")


def test_from_pretrained_knows_every_release_and_offline_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded offline"))
    for name, release in ckpt.OFFICIAL_RELEASES.items():
        with pytest.raises(RuntimeError) as info:
            ckpt.from_pretrained(name, cache_dir=tmp_path)
        message = str(info.value)
        assert release.url in message and str(tmp_path / release.filename) in message and "HF_HUB_OFFLINE" in message


def _packed(state):
    """A state dict in nn.MultiheadAttention's packed layout (q, k, v rows stacked in in_proj_weight),
    as an official checkpoint with 128-channel features stores it."""
    state = dict(state)
    p = "cross_decode.cross_attn.attention."
    state[p + "in_proj_weight"] = torch.cat([state.pop(p + n) for n in ("q_proj_weight", "k_proj_weight",
                                                                        "v_proj_weight")])
    return state


def test_a_packed_in_proj_weight_checkpoint_loads(tmp_path):
    torch.manual_seed(0)
    # the layout is nn.MultiheadAttention's: with vdim == embed_dim it has in_proj_weight and no q_proj_weight
    mha = torch.nn.MultiheadAttention(128, 4, vdim=128, batch_first=True)
    assert "in_proj_weight" in mha.state_dict() and "q_proj_weight" not in mha.state_dict()
    reference = JAFAR(v_dim=128)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p))
    torch.save({"jafar": _packed(reference.state_dict())}, tmp_path / "packed.pth")
    torch.save({"jafar": reference.state_dict()}, tmp_path / "unpacked.pth")
    packed, unpacked = load_checkpoint(tmp_path / "packed.pth"), load_checkpoint(tmp_path / "unpacked.pth")
    image, features = torch.randn(1, 3, 32, 32), torch.randn(1, 128, 4, 4)
    torch.testing.assert_close(packed(image, features, (16, 16)), unpacked(image, features, (16, 16)), rtol=0, atol=0)
    assert not torch.equal(packed(image, features, (16, 16)), JAFAR(v_dim=128)(image, features, (16, 16)))
    # the row order is the official module's: its head-averaged weights times the values equal ours
    attention = packed.cross_decode.cross_attn.attention
    mha.load_state_dict({k[len("cross_decode.cross_attn.attention."):]: v for k, v in _packed(
        reference.state_dict()).items() if k.startswith("cross_decode.cross_attn.attention.")})
    q, k, v = torch.randn(1, 5, 128), torch.randn(1, 7, 128), torch.randn(1, 7, 128)
    _, weights = mha(q, k, v, average_attn_weights=True)
    torch.testing.assert_close(attention(q, k, v, mode="reference"), weights @ v, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="packed in_proj_weight"):
        JAFAR(v_dim=384).cross_decode.cross_attn.attention.load_state_dict(
            {"in_proj_weight": torch.zeros(384, 128), "in_proj_bias": torch.zeros(384)}, strict=False)


def test_offline_download_explains_the_manual_steps(tmp_path, monkeypatch):
    def offline(url, dst, progress=True):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError) as info:
        ckpt.from_pretrained("dinov2_vits14", cache_dir=tmp_path)
    message = str(info.value)
    assert "vit_small_patch14_dinov2.lvd142m.pth" in message and str(tmp_path) in message
    assert "jafar.load_checkpoint" in message
    assert list(tmp_path.iterdir()) == []  # no partial download left behind


def test_from_pretrained_uses_the_cache(tmp_path, monkeypatch):
    _official_layout(tmp_path, JAFAR(), extra_keys=False, name="vit_small_patch14_dinov2.lvd142m.pth")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("downloaded"))
    model = build_upsampler("jafar", feature_dim=384, checkpoint="vit_small_patch14_dinov2.lvd142m",
                            cache_dir=tmp_path)
    assert isinstance(model, JAFAR) and model.v_dim == 384


def test_architecture_options_must_agree_with_the_checkpoint(tmp_path):
    path = save_checkpoint(JAFAR(v_dim=16, qk_dim=32), tmp_path / "j.safetensors")
    assert load_checkpoint(path, qk_dim=32, num_heads=4, attention="sdpa").attention == "sdpa"
    with pytest.raises(ValueError, match="has qk_dim=32 but qk_dim=128 was asked for"):
        load_checkpoint(path, qk_dim=128)
