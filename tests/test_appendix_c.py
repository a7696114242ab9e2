"""The paper's appendix C (Tables 7, 8, 9: JAFAR against FeatUp, LiFT and LoftUp on their own
extractors) as 2-D evaluation presets: each holds its source's preprocessing (the constants typed
here again from the source files), its rows and resolutions, and runs end to end at smoke size
with a tiny random backbone, the demo mosaics and tiny weight files in each release's layout.
LiFT's extractor (the key facet of a block) is checked against the extraction written out as
upstream's ``extractor.py`` does it."""

import pytest
import torch

from conftest import refuse_network
from jafar import build_backbone
from jafar.eval.config import compose
from jafar.eval.run import run

#: image normalisation of the three sources, typed from: FeatUp featup/util.py ``norm``; LiFT
#: extractor.py ``ViTExtractor.__init__`` (models whose name has "dino"); LoftUp upsamplers/layers.py ``norm``
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
#: torch.hub dinov2_vits14 (FeatUp's and LoftUp's DINOv2Featurizer) as timm names it
DINOV2_S14 = "vit_small_patch14_dinov2.lvd142m"


def test_table7_preset_is_featup_s_extractor_and_release():
    cfg = compose("experiment=table7_featup")
    assert cfg.backbone.name == DINOV2_S14 and "facet" not in cfg.backbone  # x_norm_patchtokens: the normed tokens
    assert {k: list(cfg.backbone[k]) for k in IMAGENET} == IMAGENET
    assert list(cfg.task.datasets) == ["ade20k", "cityscapes", "voc"] and cfg.task.image_size == 448
    assert cfg.task.target_size is None  # labels at the image size
    assert list(cfg.compare) == ["bilinear", "featup", "jafar"]
    featup = cfg.upsamplers.featup
    assert (featup.checkpoint, featup.norm, featup.on_missing) == ("dinov2", False, "error")
    assert cfg.upsamplers.jafar.checkpoint == DINOV2_S14  # the official release of that backbone
    small = compose("experiment=table7_featup", "task.image_size=224")
    assert small.name == f"table7_featup_224_{DINOV2_S14}" and cfg.name == f"table7_featup_448_{DINOV2_S14}"


def test_table8_preset_is_lift_s_extractor_and_both_lift_rows():
    cfg = compose("experiment=table8_lift")
    # lift_utils.py infer_settings (dino_vits16: layer 11), lift_extractor.py / train_lift.py --facet key
    assert (cfg.backbone.name, cfg.backbone.facet, cfg.backbone.layer) == ("vit_small_patch16_224.dino", "key", 11)
    assert {k: list(cfg.backbone[k]) for k in IMAGENET} == IMAGENET
    assert list(cfg.task.datasets) == ["ade20k", "cityscapes", "voc"] and cfg.task.image_size == 448
    assert list(cfg.compare) == ["bilinear", "lift", "lift_iterative", "jafar"]
    assert cfg.labels.lift_iterative == "LiFT-iterative"
    lift, iterative = cfg.upsamplers.lift, cfg.upsamplers.lift_iterative
    assert (lift.name, lift.iterative, iterative.name, iterative.iterative) == ("lift", False, "lift", True)
    assert lift.checkpoint == iterative.checkpoint == "pretrained/lift_dino_vits16.pth"
    other = compose("experiment=table8_lift", "upsamplers.lift.checkpoint=/w/lift.pth")
    assert other.upsamplers.lift_iterative.checkpoint == "/w/lift.pth"  # one file for both rows
    assert cfg.upsamplers.jafar.checkpoint == "outputs/pretrain/lift_extractor_vit_small_patch16_224.dino/jafar.safetensors"
    assert compose("experiment=table8_lift", "task.image_size=224").name == "table8_lift_224_vit_small_patch16_224.dino"


def test_table9_preset_is_loftup_s_extractor_and_protocol():
    cfg = compose("experiment=table9_loftup")
    assert cfg.backbone.name == DINOV2_S14 and {k: list(cfg.backbone[k]) for k in IMAGENET} == IMAGENET
    # configs/eval_seg.yaml: load_size 224, batch_size 8, epochs 10, lr 1e-4; eval_seg.py: NAdam
    assert (cfg.task.image_size, cfg.task.target_size) == (224, 448)
    p = cfg.task.probe
    assert (p.epochs, p.batch_size, p.optimizer._target_, p.optimizer.lr, p.hflip) == (10, 8, "torch.optim.NAdam", 1e-4, 0)
    assert list(cfg.task.datasets) == ["cityscapes", "coco"] and cfg.dataset.coco.epochs is None
    assert (cfg.dataset.cityscapes.num_classes, cfg.dataset.coco.num_classes) == (19, 27)  # eval_seg.py n_classes
    assert list(cfg.compare) == ["loftup", "jafar"]
    assert (cfg.upsamplers.loftup.checkpoint, cfg.upsamplers.loftup.on_missing) == ("dinov2s", "error")
    for side in (56, 112, 224, 448):
        t = compose("experiment=table9_loftup", f"task.target_size={side}")
        assert t.name == f"table9_loftup_out{side}_{DINOV2_S14}" and t.task.image_size == 224


# ---------------------------------------------------------------------------------------------
# smoke runs
# ---------------------------------------------------------------------------------------------

#: the demo mosaics shrunk to test size, 1 epoch; the backbone made tiny and random
SMOKE = ["task.datasets=[demo_seg]", "dataset.demo_seg.prepare_args.train=3", "dataset.demo_seg.prepare_args.val=2",
         "dataset.demo_seg.prepare_args.size=32", "task.probe.epochs=1", "task.probe.batch_size=2",
         "task.probe.num_workers=0", "task.pictures=1", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
         "backbone.pretrained=false", "+backbone.depth=1", "+backbone.embed_dim=32", "+backbone.num_heads=2"]


def _smoke(tmp_path, preset: str, *overrides):
    return compose(f"experiment={preset}", *SMOKE, f"dataset.demo_seg.root={tmp_path / 'data'}", *overrides)


def _jafar_file(tmp_path) -> str:
    from jafar import JAFAR, save_checkpoint

    torch.manual_seed(0)
    return str(save_checkpoint(JAFAR(v_dim=32, qk_dim=32), tmp_path / "jafar.safetensors"))


def _rows(result) -> dict:
    return {row: info["note"] for row, info in result["upsamplers"].items()}


def test_table7_runs_at_smoke_size(monkeypatch, tmp_path):
    from test_featup_releases import _release_state

    refuse_network(monkeypatch, tmp_path, hf_offline=True)
    ckpt = tmp_path / "dinov2_jbu_stack_cocostuff.ckpt"
    torch.save({"state_dict": _release_state(32, norm=False, seed=0)}, ckpt)
    cfg = _smoke(tmp_path, "table7_featup", "task.image_size=28", f"upsamplers.featup.checkpoint={ckpt}",
                 f"upsamplers.jafar.checkpoint={_jafar_file(tmp_path)}", "upsamplers.jafar.qk_dim=32")
    res = run(cfg, tmp_path / "run")
    assert list(res["results"]["demo_seg"]) == ["bilinear", "featup", "jafar"]
    assert str(ckpt) in _rows(res)["featup"] and "jafar.safetensors" in _rows(res)["jafar"]
    assert all(0 <= m["miou"] <= 100 for m in res["results"]["demo_seg"].values())


def test_table8_runs_at_smoke_size(monkeypatch, tmp_path):
    from jafar.upsamplers.lift import LiFT

    refuse_network(monkeypatch, tmp_path, hf_offline=True)
    torch.save({f"module.{k}": v for k, v in LiFT(32).state_dict().items()}, tmp_path / "lift_dino_vits16.pth")
    cfg = _smoke(tmp_path, "table8_lift", "task.image_size=32", "backbone.layer=0",
                 f"upsamplers.lift.checkpoint={tmp_path / 'lift_dino_vits16.pth'}",
                 f"upsamplers.jafar.checkpoint={_jafar_file(tmp_path)}", "upsamplers.jafar.qk_dim=32")
    res = run(cfg, tmp_path / "run")
    notes = _rows(res)
    assert list(res["results"]["demo_seg"]) == ["bilinear", "lift", "lift_iterative", "jafar"]
    assert "x2 twice (LiFT-iterative)" in notes["lift_iterative"] and "lift_dino_vits16.pth" in notes["lift_iterative"]
    assert "LiFT (x2 then bilinear)" in notes["lift"]
    assert res["backbone"] == "vit_small_patch16_224.dino (key of block 0)"


def test_table8_without_lift_s_weights_is_refused_before_any_work(tmp_path):
    cfg = _smoke(tmp_path, "table8_lift", "backbone.layer=0", f"upsamplers.lift.checkpoint={tmp_path / 'missing.pth'}")
    with pytest.raises(FileNotFoundError, match=r"upsamplers.lift.checkpoint .*missing.pth' does not exist"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "data").exists()  # nothing prepared


def test_table9_runs_at_smoke_size(monkeypatch, tmp_path):
    from jafar.upsamplers.loftup import LoftUp

    refuse_network(monkeypatch, tmp_path, hf_offline=True)
    torch.manual_seed(0)
    torch.save(LoftUp(32).state_dict(), tmp_path / "pytorch_model.bin")
    cfg = _smoke(tmp_path, "table9_loftup", "task.image_size=28", "task.target_size=14",
                 f"upsamplers.loftup.checkpoint={tmp_path / 'pytorch_model.bin'}", "upsamplers.jafar.checkpoint=null")
    res = run(cfg, tmp_path / "run")
    assert list(res["results"]["demo_seg"]) == ["loftup", "jafar"] and res["target_size"] == 14
    assert "pytorch_model.bin" in _rows(res)["loftup"]


# ---------------------------------------------------------------------------------------------
# LiFT's extractor
# ---------------------------------------------------------------------------------------------


def test_key_facet_is_lift_s_descriptor(monkeypatch, tmp_path):
    """extractor.py: a forward hook on block ``layer``'s attention recomputes ``qkv`` from its input
    as ``(B, N, 3, heads, d)`` permuted to ``(3, B, heads, N, d)``; the descriptor drops the class
    token and permutes ``(B, heads, T, d)`` to ``(B, T, d, heads)`` before flattening."""
    b = build_backbone("dino_vits16", pretrained=False, depth=2, embed_dim=24, num_heads=4, facet="key", layer=1)
    assert (b.embed_dim, b.patch_size, b.mean, b.std) == (24, 16, tuple(IMAGENET["mean"]), tuple(IMAGENET["std"]))
    x = torch.randn(2, 3, 48, 64)
    m = b.model
    captured = []
    hook = m.blocks[1].attn.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    with torch.no_grad():
        m.forward_features(x)
    hook.remove()
    t = captured[0]
    B, N, C = t.shape
    qkv = m.blocks[1].attn.qkv(t).reshape(B, N, 3, 4, C // 4).permute(2, 0, 3, 1, 4)
    desc = qkv[1][:, :, 1:, :].permute(0, 2, 3, 1).flatten(start_dim=-2, end_dim=-1)  # (B, T, d * heads)
    expected = desc.reshape(B, 3, 4, C).permute(0, 3, 1, 2)
    torch.testing.assert_close(b(x), expected, rtol=0, atol=1e-6)
    # the value facet, the query facet and the last block's normed tokens are other features
    for facet in ("query", "value"):
        other = build_backbone("dino_vits16", pretrained=False, depth=2, embed_dim=24, num_heads=4, facet=facet, layer=1)
        other.load_state_dict(b.state_dict())
        assert not torch.allclose(other(x), b(x))


@pytest.mark.parametrize("kwargs, message", [
    (dict(facet="keys"), "facet must be one of token, query, key, value, got 'keys'."),
    (dict(facet="token", layer=3), "layer=3 applies to the query/key/value facets"),
    (dict(facet="key", layer=5), "layer must index one of the 2 blocks, got 5."),
    (dict(mean=[0.5, 0.5]), "mean must be 3 numbers (one per RGB channel), got [0.5, 0.5]."),
    (dict(std=[0.5, 0.0, 0.5]), "std must be positive, got [0.5, 0.0, 0.5]."),
])
def test_bad_extractor_settings_are_one_sentence(kwargs, message):
    with pytest.raises(ValueError) as excinfo:
        build_backbone("dino_vits16", pretrained=False, depth=2, embed_dim=24, num_heads=4, **kwargs)
    assert message in str(excinfo.value)


def test_lift_s_extractor_offline_is_one_sentence(monkeypatch, tmp_path):
    from omegaconf import OmegaConf

    calls = refuse_network(monkeypatch, tmp_path, hf_offline=True)
    node = OmegaConf.to_container(compose("experiment=table8_lift").backbone)
    assert node.pop("_target_") == "jafar.build_backbone"
    with pytest.raises(RuntimeError) as excinfo:
        build_backbone(**node)
    msg = str(excinfo.value)
    assert msg.startswith("Pretrained weights for 'vit_small_patch16_224.dino' could not be downloaded")
    assert "timm/vit_small_patch16_224.dino" in msg and "weights='/path/to/file'" in msg and msg.count(". ") == 0
    assert calls == []
