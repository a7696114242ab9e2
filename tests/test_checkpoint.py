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
    files = {r.filename for r in ckpt.OFFICIAL_RELEASES.values()}
    assert files == {
        "vit_small_patch14_dinov2.lvd142m.pth", "vit_base_patch14_dinov2.lvd142m.pth",
        "vit_small_patch14_reg4_dinov2.pth", "vit_base_patch16_224.dino.pth", "vit_base_patch16_224.pth",
        "vit_base_patch16_clip_384.pth", "vit_base_patch16_siglip_512.v2_webli.pth",
    }
    assert ckpt.resolve_release("dinov2_vits14").url.endswith("/releases/download/Weights/"
                                                             "vit_small_patch14_dinov2.lvd142m.pth")
    assert ckpt.resolve_release("dino_vitb16").filename == "vit_base_patch16_224.dino.pth"
    with pytest.raises(ValueError, match="no official JAFAR release named"):
        ckpt.resolve_release("resnet50")


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
