"""Every Hydra config in configs/ composes and instantiates (offline, random weights); the tree is
one: one root per tool, shared groups, no computed group names, schemas that refuse bad keys."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from bev.config import compose as compose_bev
from conftest import ROOT
from jafar import JAFAR, Backbone, Interpolate, build_backbone
from jafar.eval.config import compose as compose_eval
from jafar.train.config import compose as compose_pretrain
from jafar.upsamplers import FeatUpJBU, LargeImage, LiFT, Strided
from jafar.upsamplers.anyup import AnyUp
from jafar.upsamplers.carafe import CARAFE
from jafar.upsamplers.dysample import DySample
from jafar.upsamplers.loftup import LoftUp
from jafar.upsamplers.naf import NAF
from jafar.upsamplers.resfu import ReSFU
from jafar.upsamplers.sapa import SAPA

CONFIGS = ROOT / "configs"
TOOLS = {"pretrain": compose_pretrain, "train_bev": compose_bev, "eval_2d": compose_eval}


@pytest.mark.parametrize("path", sorted((CONFIGS / "upsampler").glob("*.yaml")), ids=lambda p: p.stem)
def test_upsampler_configs_instantiate(path: Path):
    cfg = OmegaConf.load(path)
    assert "feature_dim" not in cfg  # the backbone's width, passed by the tools
    if path.stem == "none":  # BeV's "no upsampler"
        assert set(cfg) == {"name"}
        return
    if "checkpoint" in cfg and path.stem != "jafar":
        cfg.checkpoint = None  # FeatUp's default is a release download; the tests stay offline
    backbone = build_backbone("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, depth=1, embed_dim=32,
                              num_heads=2)
    up = instantiate(cfg, feature_dim=backbone.embed_dim, backbone=backbone)
    expected = {"jafar": JAFAR, "featup": FeatUpJBU, "lift": LiFT, "large_image": LargeImage,
                "strided": Strided, "carafe": CARAFE, "dysample": DySample,
                "sapa": SAPA, "resfu": ReSFU, "loftup": LoftUp, "anyup": AnyUp, "naf": NAF}.get(path.stem, Interpolate)
    assert isinstance(up, expected)
    out = up(torch.randn(1, 3, 28, 28), torch.randn(1, 32, 2, 2), (7, 9))
    assert out.shape == (1, 32, 7, 9)


@pytest.mark.parametrize("path", sorted((CONFIGS / "backbone").glob("*.yaml")), ids=lambda p: p.stem)
def test_backbone_configs_name_known_models(path: Path):
    cfg = OmegaConf.load(path)
    if cfg.name.startswith("mobilenet"):
        backbone = instantiate(cfg)  # the offline weights are installed by scripts/setup.sh
    elif cfg._target_.endswith("build_maskclip"):  # open_clip, random weights, a tiny CLIP of the same kind
        pytest.importorskip("open_clip")
        from test_eval_ovseg import TINY

        backbone = instantiate(cfg, pretrained=None, model_cfg=TINY)
    else:  # no pretrained weights offline: the same target with a tiny random architecture (one block)
        backbone = instantiate(cfg, pretrained=False, depth=1, embed_dim=32, num_heads=2,
                               **({"layer": 0} if cfg.get("layer") is not None else {}))
    assert isinstance(backbone, Backbone)
    h, w = backbone.feature_size(56, 84) if backbone.patch_size == 14 else backbone.feature_size(64, 96)
    image = torch.randn(1, 3, h * backbone.patch_size, w * backbone.patch_size)
    assert backbone(image).shape == (1, backbone.embed_dim, h, w)


def test_one_tree_one_root_per_tool_no_computed_groups():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == ["eval_2d.yaml", "pretrain.yaml", "train_bev.yaml"]
    assert sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()) == [
        "backbone", "data", "dataset", "experiment", "loss", "model", "task", "upsampler"]
    assert sorted(p.name for p in (CONFIGS / "experiment").iterdir()) == sorted(TOOLS)
    for path in CONFIGS.rglob("*.yaml"):
        cfg = OmegaConf.load(path)
        text = path.read_text()
        assert "searchpath" not in text and "jafar_configs" not in text, path
        for entry in cfg.get("defaults", []):  # ordinary defaults: no option name computed from others
            assert "${" not in str(entry), (path, entry)


def test_pretraining_takes_jafar_from_the_upsampler_group():
    cfg = compose_pretrain("data.root=/x")
    jafar_yaml = OmegaConf.load(CONFIGS / "upsampler" / "jafar.yaml")
    assert OmegaConf.to_container(cfg.upsampler) == OmegaConf.to_container(jafar_yaml)
    assert "qk_dim" not in (CONFIGS / "pretrain.yaml").read_text()


@pytest.mark.parametrize("tool", list(TOOLS))
def test_every_tool_composes_its_demo(tool):
    cfg = TOOLS[tool]("experiment=demo", *(["data.root=/x"] if tool == "pretrain" else []))
    assert cfg.backbone.name == "mobilenetv2_s16" and cfg.trainer.accelerator == "cpu"


def test_the_bev_demo_gives_bevformer_its_cpu_size_and_the_command_line_still_wins():
    assert compose_bev("experiment=demo", "model=bevformer").model.query_downsample == 2
    assert compose_bev("model=bevformer", "data.dataroot=/x").model.query_downsample == 1  # the paper's
    assert compose_bev("experiment=demo", "model=bevformer", "model.query_downsample=1").model.query_downsample == 1
    assert "query_downsample" not in compose_bev("experiment=demo").model  # simplebev has no such key


def test_the_eval_demo_gives_each_task_its_settings_and_the_command_line_still_wins():
    cam = compose_eval("experiment=demo", "task=cam")
    assert (cam.task.image_size, cam.task.batch_size, cam.backbone.name) == (224, 8, "mobilenetv2_s16")
    ovseg = compose_eval("experiment=demo", "task=ovseg", "compare=[bilinear]")
    assert ovseg.backbone.name == "ViT-B-16" and ovseg.backbone.pretrained is None
    assert list(ovseg.compare) == ["bilinear"] and list(ovseg.task.datasets) == ["demo_seg"]
    seg = compose_eval("experiment=demo", "task=seg")
    assert seg.task.image_size == 160 and list(seg.task.datasets) == ["demo_seg"]


@pytest.mark.parametrize("tool, override", [
    ("pretrain", "recipe.imagesize=3"), ("pretrain", "seed=abc"), ("pretrain", "recipe.image_size=big"),
    ("train_bev", "grid.resolutoin=1"), ("train_bev", "min_visibility=high"), ("eval_2d", "comparee=[bilinear]"),
    ("eval_2d", "seed=[1]"),
])
def test_a_misspelt_key_or_a_wrong_type_is_refused_by_hydra(tool, override):
    base = ["data.root=/x"] if tool == "pretrain" else []
    with pytest.raises((ConfigCompositionException, ConfigKeyError, ValidationError)):
        TOOLS[tool](*base, override)


@pytest.mark.parametrize("tool, script", [("pretrain", "pretrain_jafar.py"), ("train_bev", "train_bev.py"),
                                          ("eval_2d", "eval_2d.py")])
def test_help_lists_the_groups_and_options(tool, script):
    out = subprocess.run([sys.executable, str(ROOT / "tools" / script), "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120).stdout
    groups = {line.split(":")[0]: line.split(": ")[1] for line in out.split("== Config ==")[0].splitlines()
              if ": " in line}
    expected = {"pretrain": "ablation_heads_1, ablation_heads_2, ablation_heads_8, ablation_keys_concat, ablation_keys_linear, "
                            "ablation_keys_no_sft, ablation_no_rope, demo, featup_demo, featup_official, lift_demo, "
                            "lift_official, official",
                "eval_2d": "ablation_table10_in16, ablation_table10_in32, ablation_table10_in8, ablation_table11, "
                           "ablation_table5, demo, official_command, table7_featup, table8_lift, table9_loftup"}
    assert groups["experiment"] == expected.get(tool, "demo")
    assert "jafar" in groups["upsampler"] and "mobilenetv2_s16" in groups["backbone"]
    assert groups["model"] == "bevformer, pointbev, simplebev" and groups["task"] == "cam, depth, ovseg, seg"
