"""LiFT (jafar/upsamplers/lift.py) against a forward written out from upstream's lift.py (github
saksham-s/lift @ fd6d929: ``LiFT.forward``, ``Up``, ``DoubleConv``) with the functional ops on the
state dict: the patch-16 and patch-8 paths equal it, the patch-14 resize is an adaptive max-pool
(LoftUp's published patch-14 LiFT), and LiFT-iterative is the module applied twice with the image
enlarged x2 (upstream's ``lift_extractor.py``)."""

import pytest
import torch
import torch.nn.functional as F

from jafar import build_upsampler
from jafar.upsamplers.lift import LiFT

C = 16


def _lift(seed: int = 0, **options) -> LiFT:
    """A LiFT whose parameters and BatchNorm statistics are moved off their initial values (so that
    the eval-mode BatchNorms matter)."""
    torch.manual_seed(seed)
    lift = LiFT(C, **options).double().eval()
    with torch.no_grad():
        for p in lift.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for name, b in lift.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand_like(b))
    return lift


def _conv_bn_relu(x, s, conv, bn, stride=1):
    x = F.conv2d(x, s[f"{conv}.weight"], s.get(f"{conv}.bias"), stride=stride, padding=1)
    x = F.batch_norm(x, s[f"{bn}.running_mean"], s[f"{bn}.running_var"], s[f"{bn}.weight"], s[f"{bn}.bias"],
                     training=False, eps=1e-5)
    return F.relu(x)


def _upstream(s: dict, imgs: torch.Tensor, x: torch.Tensor, scale_adapter) -> torch.Tensor:
    """lift.py ``LiFT.forward(imgs, x)`` with ``pre_shape=post_shape=False``, op by op on the state
    dict ``s``: image_convs_1 (two stride-2 conv-BN-ReLU), the scale adapter, image_convs_2 (one
    more), cat(features, imgs_2), Up (ConvTranspose2d 2x2 stride 2, cat imgs_1, DoubleConv without
    conv bias), outc (1x1)."""
    imgs_1 = _conv_bn_relu(imgs, s, "image_convs_1.0", "image_convs_1.1", stride=2)
    imgs_1 = _conv_bn_relu(imgs_1, s, "image_convs_1.3", "image_convs_1.4", stride=2)
    imgs_1 = scale_adapter(imgs_1)
    imgs_2 = _conv_bn_relu(imgs_1, s, "image_convs_2.0", "image_convs_2.1", stride=2)
    x = torch.cat([x, imgs_2], dim=1)
    x = F.conv_transpose2d(x, s["up1.up.weight"], s["up1.up.bias"], stride=2)
    x = torch.cat([x, imgs_1], dim=1)
    x = _conv_bn_relu(x, s, "up1.conv_1.double_conv.0", "up1.conv_1.double_conv.1")
    x = _conv_bn_relu(x, s, "up1.conv_1.double_conv.3", "up1.conv_1.double_conv.4")
    return F.conv2d(x, s["outc.weight"], s["outc.bias"])


def _inputs(side: int, grid: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, side, side, generator=g, dtype=torch.float64),
            torch.randn(2, C, grid, grid, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("patch, adapter", [(16, lambda t: F.max_pool2d(t, 2, 2)), (8, lambda t: t)])
def test_patch_8_and_16_equal_the_upstream_forward(patch, adapter):
    lift = _lift()
    image, feats = _inputs(4 * patch, 4)
    s = lift.state_dict()
    expected = _upstream(s, image, feats, adapter)
    with torch.no_grad():
        assert expected.shape == (2, C, 8, 8)
        torch.testing.assert_close(lift.upsample2(image, feats), expected, rtol=0, atol=1e-12)
        # forward: the x2 map itself at 2x the grid, bilinear beyond it (the paper's A.2 usage)
        torch.testing.assert_close(lift(image, feats, (8, 8)), expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(lift(image, feats, (4 * patch, 4 * patch)),
                                   F.interpolate(expected, (4 * patch, 4 * patch), mode="bilinear", align_corners=False),
                                   rtol=0, atol=1e-12)


def _adaptive_max_by_hand(t: torch.Tensor, out: int) -> torch.Tensor:
    """PyTorch's adaptive pooling windows, written out: output cell i covers input rows
    floor(i n / out) .. ceil((i + 1) n / out) - 1."""
    n = t.shape[-1]
    res = torch.empty(*t.shape[:2], out, out, dtype=t.dtype)
    for i in range(out):
        r0, r1 = (i * n) // out, -((-(i + 1) * n) // out)
        for j in range(out):
            c0, c1 = (j * n) // out, -((-(j + 1) * n) // out)
            res[:, :, i, j] = t[:, :, r0:r1, c0:c1].amax(dim=(-2, -1))
    return res


def test_patch_14_resizes_the_stride_4_image_features_to_twice_the_grid():
    """Patch 14 (a 4 x 4 grid of 56 px): the 14 x 14 stride-4 image features are max-pooled to 8 x 8
    in overlapping windows (andrehuang/loftup upsamplers/lift.py: adaptive_max_pool2d to 2h x 2w)."""
    lift = _lift()
    image, feats = _inputs(56, 4)
    expected = _upstream(lift.state_dict(), image, feats, lambda t: _adaptive_max_by_hand(t, 8))
    with torch.no_grad():
        assert lift.image_convs_1(image).shape[-1] == 14
        torch.testing.assert_close(lift.upsample2(image, feats), expected, rtol=0, atol=1e-12)
        assert lift(image, feats, (56, 56)).shape == (2, C, 56, 56)
        # 14 -> 8 is not an integer ratio: no plain 2x2 max-pool gives it
        assert F.max_pool2d(lift.image_convs_1(image), 2, 2).shape[-1] == 7


def test_iterative_is_the_module_twice_with_the_image_enlarged():
    lift = _lift(iterative=True)
    single = _lift(iterative=False)
    single.load_state_dict(lift.state_dict())
    image, feats = _inputs(64, 4)  # patch 16
    s = lift.state_dict()
    first = _upstream(s, image, feats, lambda t: F.max_pool2d(t, 2, 2))
    big = F.interpolate(image, size=(128, 128), mode="bilinear", align_corners=False)
    second = _upstream(s, big, first, lambda t: F.max_pool2d(t, 2, 2))
    stages = []
    hook = lift.outc.register_forward_hook(lambda m, a, out: stages.append(out))
    with torch.no_grad():
        out = lift(image, feats, (16, 16))
        hook.remove()
        assert [tuple(t.shape[-2:]) for t in stages] == [(8, 8), (16, 16)]
        torch.testing.assert_close(stages[0], single.upsample2(image, feats), rtol=0, atol=0)  # stage 1 = one pass
        torch.testing.assert_close(stages[0], first, rtol=0, atol=1e-12)
        torch.testing.assert_close(out, second, rtol=0, atol=1e-12)  # x4 exactly: no resize
        wide = lift(image, feats, (64, 48))
        torch.testing.assert_close(wide, F.interpolate(second, (64, 48), mode="bilinear", align_corners=False),
                                   rtol=0, atol=1e-12)
        assert not torch.allclose(single(image, feats, (16, 16)), out)  # not the single pass resized
    assert "x2 twice" in lift.describe() and "iterative=True" in repr(lift)


def test_the_factory_and_config_take_iterative(tmp_path):
    from jafar.eval.config import compose

    cfg = compose()
    assert cfg.upsamplers.lift.iterative is False and cfg.upsamplers.lift.checkpoint is None
    torch.save({f"module.{k}": v for k, v in LiFT(C).state_dict().items()}, tmp_path / "lift_dino_vits16.pth")
    up = build_upsampler("lift", feature_dim=C, checkpoint=str(tmp_path / "lift_dino_vits16.pth"), iterative=True)
    assert up.iterative and up.weights_source.endswith("lift_dino_vits16.pth")
    assert build_upsampler("lift", feature_dim=C).iterative is False


@pytest.mark.parametrize("make, message", [
    (lambda: LiFT(C, iterative="yes"), "LiFT iterative must be true or false, got 'yes'."),
    (lambda: LiFT(C)(torch.randn(1, 3, 32, 32), torch.randn(1, C, 8, 8), (16, 16)),
     "LiFT needs an image of at least 8x the feature grid 8x8"),
])
def test_bad_input_is_one_sentence(make, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make()
