"""Every Hydra config in configs/ composes and instantiates (offline, random weights)."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import ROOT
from jafar import JAFAR, Backbone, Interpolate
from jafar.baselines import FeatUpJBU, LiFT

CONFIGS = ROOT / "configs"


@pytest.mark.parametrize("path", sorted((CONFIGS / "upsampler").glob("*.yaml")), ids=lambda p: p.stem)
def test_upsampler_configs_instantiate(path: Path):
    cfg = OmegaConf.load(path)
    cfg.feature_dim = 32 if "feature_dim" in cfg else None
    if cfg.feature_dim is None:
        del cfg["feature_dim"]
    if "checkpoint" in cfg and path.stem != "jafar":
        cfg.checkpoint = None  # FeatUp's default is a release download; the tests stay offline
    up = instantiate(cfg)
    expected = {"jafar": JAFAR, "featup": FeatUpJBU, "lift": LiFT}.get(path.stem, Interpolate)
    assert isinstance(up, expected)
    out = up(torch.randn(1, 3, 14, 14), torch.randn(1, 32, 2, 2), (7, 9))
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
    else:  # no pretrained weights offline: the same target with a tiny random architecture
        backbone = instantiate(cfg, pretrained=False, depth=1, embed_dim=32, num_heads=2)
    assert isinstance(backbone, Backbone)
    h, w = backbone.feature_size(56, 84) if backbone.patch_size == 14 else backbone.feature_size(64, 96)
    image = torch.randn(1, 3, h * backbone.patch_size, w * backbone.patch_size)
    assert backbone(image).shape == (1, backbone.embed_dim, h, w)
