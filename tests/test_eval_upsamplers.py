"""The comparison upsamplers of the 2-D evaluation (jafar/baselines.py) behind build_upsampler."""

import pytest
import torch
import torch.nn.functional as F

from jafar import build_backbone, build_upsampler
from jafar.upsamplers import FeatUpJBU, LargeImage, LiFT, Strided
from jafar.upsamplers.featup import JBULearnedRange


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_backbone("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, depth=1, embed_dim=32, num_heads=2)


def test_strided_at_the_patch_stride_is_the_backbone(vit):
    image = torch.randn(2, 3, 56, 70)
    up = build_upsampler("strided", backbone=vit, stride=14)
    assert torch.allclose(up.encode(image), vit(image), atol=1e-5)


def test_strided_grid_and_backbone_left_unchanged(vit):
    image = torch.randn(1, 3, 56, 70)
    up = build_upsampler("strided", backbone=vit, stride=6)
    feats = up.encode(image)
    assert feats.shape == (1, 32, (56 - 14) // 6 + 1, (70 - 14) // 6 + 1)  # 8 x 10 overlapping patches
    assert vit.model.patch_embed.proj.stride == (14, 14)
    out = up(image, vit(image), (56, 70))
    assert torch.allclose(out, F.interpolate(feats, (56, 70), mode="bilinear", align_corners=False))
    # overlapping patches are not the standard grid: a real change
    assert not torch.allclose(F.interpolate(feats, (4, 5), mode="bilinear"), vit(image), atol=1e-3)


def test_strided_restores_the_stride_after_an_error(vit):
    up = Strided(vit, stride=7)
    with pytest.raises(Exception):
        up.encode(torch.randn(1, 3, 50, 56))  # 50 is not a multiple of 14: timm refuses
    assert vit.model.patch_embed.proj.stride == (14, 14)


def test_strided_needs_a_vit():
    mobilenet = build_backbone("mobilenetv2_s16")
    with pytest.raises(ValueError, match="timm ViT"):
        build_upsampler("strided", backbone=mobilenet)
    with pytest.raises(ValueError, match="stride"):
        build_upsampler("strided", backbone=build_backbone("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False,
                                                         depth=1, embed_dim=32, num_heads=2), stride=15)
    keys = build_backbone("dino_vits16", pretrained=False, depth=2, embed_dim=24, num_heads=4, facet="key", layer=1)
    with pytest.raises(ValueError, match="'key' facet of block 1"):  # it would silently give the tokens instead
        build_upsampler("strided", backbone=keys)


def test_large_image(vit):
    image = torch.randn(2, 3, 28, 42)
    same = LargeImage(vit, scale=1.0)
    expected = F.interpolate(vit(image), (28, 42), mode="bilinear", align_corners=False)
    assert torch.allclose(same(image, vit(image), (28, 42)), expected, atol=1e-5)
    big = build_upsampler("large_image", backbone=vit, scale=2.0)
    assert big.input_size(28, 42) == (56, 84)
    seen = []
    handle = vit.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    try:
        out = big(image, vit(image), (28, 42))
    finally:
        handle.remove()
    assert seen[-1] == (56, 84) and out.shape == (2, 32, 28, 42)
    with pytest.raises(ValueError, match="backbone"):
        build_upsampler("large_image")


def _adaptive_conv_reference(x, filters):
    """FeatUp's AdaptiveConv forward (featup/adaptive_conv_cuda/adaptive_conv.cpp) with unfold:
    out[b, c, h, w] = sum_{i, j} x_padded[b, c, h + i, w + j] * filters[b, h, w, i, j]."""
    b, c, hp, wp = x.shape
    _, h, w, d, _ = filters.shape
    cols = F.unfold(x, d).view(b, c, d * d, h, w)
    return torch.einsum("bckhw,bhwk->bchw", cols, filters.reshape(b, h, w, d * d))


def test_jbu_step_matches_an_independent_formulation():
    torch.manual_seed(0)
    step = JBULearnedRange(3, 8, radius=2).eval()
    source, guidance = torch.randn(2, 5, 4, 6), torch.randn(2, 3, 8, 12)
    with torch.no_grad():
        out = step(source, guidance)
        # FeatUp's formulation: unfolded range queries, spatial Gaussian, fixup, adaptive conv
        keys = step.range_proj(guidance)
        q = F.unfold(F.pad(keys, [2] * 4, mode="reflect"), 5).view(2, 8, 25, 8, 12)
        rng = F.softmax(step.range_temp.exp() * torch.einsum("bckhw,bchw->bkhw", q, keys), dim=1)
        r = torch.linspace(-1, 1, 5)
        xx, yy = torch.meshgrid(r, r, indexing="ij")
        spatial = torch.exp(-(xx ** 2 + yy ** 2) / (2 * step.sigma_spatial ** 2)).reshape(1, 25, 1, 1)
        k = rng * spatial
        k = k / k.sum(1, keepdim=True).clamp(1e-7)
        k = k + 0.1 * step.fixup_proj(torch.cat([k, guidance], 1))
        hr = F.interpolate(source, (8, 12), mode="bicubic", align_corners=False)
        ref = _adaptive_conv_reference(F.pad(hr, [2] * 4, mode="reflect"), k.permute(0, 2, 3, 1).reshape(2, 8, 12, 5, 5))
    assert torch.allclose(out, ref, atol=1e-5)


def test_featup_parameter_names_match_the_release_and_shapes():
    up = FeatUpJBU(16)
    names = set(up.state_dict())
    for i in range(1, 5):  # featup/upsamplers.py: JBUStack.up1..up4 (JBULearnedRange) and fixup_proj
        assert {f"up{i}.range_temp", f"up{i}.sigma_spatial", f"up{i}.range_proj.0.weight", f"up{i}.range_proj.3.weight",
                f"up{i}.fixup_proj.0.weight", f"up{i}.fixup_proj.3.weight"} <= names
    assert up.state_dict()["up1.fixup_proj.0.weight"].shape == (49, 52, 1, 1)
    assert {"fixup_proj.1.weight", "fixup_proj.1.bias"} <= names
    image, feats = torch.randn(1, 3, 64, 64), torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        assert up.eval()(image, feats, (64, 64)).shape == (1, 16, 64, 64)
        assert up(image, feats, (56, 50)).shape == (1, 16, 56, 50)


def test_featup_keeps_a_constant_map_when_its_corrections_are_zero():
    up = FeatUpJBU(4).eval()
    with torch.no_grad():
        for m in (up.up1, up.up2, up.up3, up.up4):
            m.fixup_proj[3].weight.zero_()
            m.fixup_proj[3].bias.zero_()
        up.fixup_proj[1].weight.zero_()
        up.fixup_proj[1].bias.zero_()
        out = up(torch.randn(1, 3, 32, 32), torch.full((1, 4, 2, 2), 3.0), (32, 32))
    assert torch.allclose(out, torch.full_like(out, 3.0), atol=1e-5)  # normalised kernels average a constant


def test_featup_loads_a_release_layout_checkpoint(tmp_path):
    src = FeatUpJBU(8, norm=True)
    state = {f"upsampler.{k}": v for k, v in src.state_dict().items() if not k.startswith("norm.")}
    state["model.1.norm.weight"] = torch.full((8,), 2.0)  # hubconf.py: Sequential(featurizer, ChannelNorm)
    state["model.1.norm.bias"] = torch.zeros(8)
    state["model.0.some_backbone_weight"] = torch.zeros(3)
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "dinov2_jbu_stack_cocostuff.ckpt")
    up = build_upsampler("featup", feature_dim=8, checkpoint=str(tmp_path / "dinov2_jbu_stack_cocostuff.ckpt"), norm=True)
    assert torch.equal(up.up3.range_proj[0].weight, src.up3.range_proj[0].weight)
    assert torch.equal(up.norm.weight, torch.full((8,), 2.0))
    assert "dinov2_jbu_stack_cocostuff.ckpt" in up.weights_source
    with pytest.raises(ValueError, match="does not fit"):
        build_upsampler("featup", feature_dim=16, checkpoint=str(tmp_path / "dinov2_jbu_stack_cocostuff.ckpt"))


def test_featup_missing_weights_fall_back_to_random_when_asked(tmp_path):
    missing = str(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError):
        build_upsampler("featup", feature_dim=8, checkpoint=missing)
    with pytest.warns(UserWarning, match="random weights"):
        up = build_upsampler("featup", feature_dim=8, checkpoint=missing, on_missing="random")
    assert up.weights_source.startswith("random init")
    with pytest.raises(ValueError, match="384"):  # the dinov2 release is for 384 channels: refused before any download
        FeatUpJBU(8).load_release("dinov2")


def test_lift_names_shapes_and_release_loading(tmp_path):
    lift = LiFT(16).eval()
    names = set(lift.state_dict())  # lift.py: up1.up, up1.conv_1.double_conv, outc, image_convs_1/2
    assert {"up1.up.weight", "up1.conv_1.double_conv.0.weight", "up1.conv_1.double_conv.4.running_mean",
            "outc.weight", "image_convs_1.0.weight", "image_convs_1.4.weight", "image_convs_2.0.bias"} <= names
    assert lift.state_dict()["up1.up.weight"].shape == (48, 24, 2, 2)  # ConvTranspose2d(C + 32, (C + 32) // 2)
    image, feats = torch.randn(2, 3, 64, 64), torch.randn(2, 16, 4, 4)  # patch 16
    with torch.no_grad():
        assert lift.upsample2(image, feats).shape == (2, 16, 8, 8)
        x2 = lift.upsample2(image, feats)
        assert torch.allclose(lift(image, feats, (64, 64)), F.interpolate(x2, (64, 64), mode="bilinear", align_corners=False))
        # patch 16: the adaptive pooling is upstream's MaxPool2d(2, 2)
        g = lift.image_convs_1(image)
        assert torch.equal(F.adaptive_max_pool2d(g, (8, 8)), F.max_pool2d(g, 2, 2))
        assert lift(torch.randn(1, 3, 56, 56), torch.randn(1, 16, 4, 4), (56, 56)).shape == (1, 16, 56, 56)  # patch 14
    torch.save({f"module.{k}": v for k, v in LiFT(16).state_dict().items()}, tmp_path / "lift_dino_vits16.pth")
    loaded = build_upsampler("lift", feature_dim=16, checkpoint=str(tmp_path / "lift_dino_vits16.pth"))
    assert loaded.weights_source.endswith("lift_dino_vits16.pth")
    with pytest.raises(ValueError, match="does not fit"):
        build_upsampler("lift", feature_dim=32, checkpoint=str(tmp_path / "lift_dino_vits16.pth"))


def test_every_upsampler_has_the_one_call(vit):
    image = torch.randn(1, 3, 56, 56)
    feats = vit(image)
    for name in ("nearest", "bilinear", "bicubic", "large_image", "strided", "featup", "lift", "jafar"):
        up = build_upsampler(name, backbone=vit).eval()
        with torch.no_grad():
            assert up(image, feats, (56, 42)).shape == (1, 32, 56, 42), name
    with pytest.raises(ValueError, match="is not a registered upsampler"):
        build_upsampler("no_such_upsampler")
