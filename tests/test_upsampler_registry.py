"""The upsampler interface and registry (``jafar.upsamplers``): every registered upsampler shares the
call and describes itself in one line, and a new upsampler is one file that registers a factory."""

import importlib.util
import sys
import textwrap

import pytest
import torch

import jafar
from jafar.upsamplers import Upsampler, build_upsampler, create_upsampler, list_upsamplers, upsampler_entry


@pytest.fixture(scope="module")
def vit():
    """A one-block timm ViT with random weights: what every upsampler takes, the re-encoding ones
    (Large Image, Strided) included."""
    torch.manual_seed(0)
    return jafar.build_backbone("vit_small_patch14_dinov2.lvd142m", pretrained=False, depth=1, embed_dim=8,
                                num_heads=2).eval()


def test_the_registry_finds_every_module_of_the_package():
    assert {"nearest", "bilinear", "bicubic", "large_image", "strided", "featup", "lift", "jafar"} <= set(
        list_upsamplers())
    assert jafar.list_upsamplers() == list_upsamplers()
    assert upsampler_entry("large_image").needs_backbone and not upsampler_entry("jafar").needs_backbone


@pytest.mark.parametrize("name", list_upsamplers())
def test_every_registered_upsampler_shares_the_call_and_describes_itself(name, vit):
    """The contract, for every name the registry holds (a new upsampler is covered without editing
    this test): built by name with its defaults, the one call gives the requested size and the
    backbone's width, in the features' dtype, and a one-line description."""
    up = build_upsampler(name, backbone=vit).eval()
    assert isinstance(up, Upsampler)
    image = torch.rand(2, 3, 28, 42)
    feats = vit(vit.normalize(image))
    with torch.no_grad():
        out = up(vit.normalize(image), feats, (12, 20))
    assert out.shape == (2, 8, 12, 20) and out.dtype == feats.dtype and torch.isfinite(out).all()
    line = up.describe()
    assert isinstance(line, str) and line.endswith(".") and "\n" not in line


def test_a_name_not_registered_is_refused_with_the_registered_ones():
    with pytest.raises(ValueError, match=r"upsampler='no_such_upsampler' is not a registered upsampler; expected one of .*jafar"):
        build_upsampler("no_such_upsampler")


def test_reencoding_upsamplers_refuse_to_start_without_the_backbone():
    with pytest.raises(ValueError, match="encodes the image again: pass backbone="):
        create_upsampler("large_image")


def test_adding_an_upsampler_is_one_file(tmp_path):
    # a new file registers its factory; build_upsampler (and every tool through it) finds it by name
    (tmp_path / "jafar_test_nearest_twice.py").write_text(textwrap.dedent('''
        import torch.nn.functional as F
        from jafar.upsamplers.base import Upsampler, check_output_size, register_upsampler

        class NearestTwice(Upsampler):
            def forward(self, image, features, output_size):
                h, w = check_output_size(output_size)
                up = F.interpolate(features, scale_factor=2, mode="nearest")
                return F.interpolate(up, size=(h, w), mode="bilinear", align_corners=False)

            def describe(self):
                return "nearest x2 then bilinear (a test upsampler)."

        @register_upsampler("test_nearest_twice", summary="nearest x2, then bilinear")
        def build(feature_dim=None, checkpoint=None, backbone=None, **options):
            return NearestTwice()
    '''))
    spec = importlib.util.spec_from_file_location("jafar_test_nearest_twice", tmp_path / "jafar_test_nearest_twice.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert "test_nearest_twice" in list_upsamplers()
        up = build_upsampler("test_nearest_twice", feature_dim=5)
        feats = torch.arange(4.0).view(1, 1, 2, 2).expand(1, 5, 2, 2)
        out = up(None, feats, (4, 4))
        torch.testing.assert_close(out, feats.repeat_interleave(2, -1).repeat_interleave(2, -2))
        assert up.describe().startswith("nearest x2")
        with pytest.raises(ValueError, match="already registered"):
            spec.loader.exec_module(module)
    finally:
        from jafar.upsamplers import UPSAMPLERS

        UPSAMPLERS.unregister("test_nearest_twice")
        sys.modules.pop(spec.name, None)


def test_one_yaml_selects_a_new_upsampler_in_every_tool(tmp_path):
    # the yaml half: upsampler/<name>.yaml beside the others (here on Hydra's search path) makes it a
    # choice of train_bev's upsampler group and a row of eval_2d's tables, built by build_upsampler
    from hydra.utils import instantiate

    from bev.config import compose as compose_bev
    from jafar.eval.config import compose as compose_eval

    (tmp_path / "upsampler").mkdir()
    (tmp_path / "upsampler" / "bicubic_again.yaml").write_text(
        "_target_: jafar.build_upsampler\nname: bicubic\n")
    search = f"hydra.searchpath=[file://{tmp_path}]"
    cfg = compose_bev(search, "upsampler=bicubic_again")
    up = instantiate(cfg.upsampler, feature_dim=8)
    assert up.describe() == "bicubic interpolation (training-free)."
    cfg = compose_eval(search, "+upsampler@upsamplers.bicubic_again=bicubic_again", "compare=[bilinear,bicubic_again]")
    assert cfg.upsamplers.bicubic_again.name == "bicubic" and list(cfg.compare) == ["bilinear", "bicubic_again"]
