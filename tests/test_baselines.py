import pytest
import torch
import torch.nn.functional as F

from jafar import JAFAR, build_upsampler


@pytest.mark.parametrize("name", ["nearest", "bilinear", "bicubic"])
def test_interpolation_baselines_share_the_call(name):
    up = build_upsampler(name)
    feats = torch.randn(2, 7, 3, 5)
    out = up(torch.randn(2, 3, 30, 50), feats, (13, 29))
    assert out.shape == (2, 7, 13, 29)
    kwargs = {} if name == "nearest" else {"align_corners": False}
    torch.testing.assert_close(out, F.interpolate(feats, size=(13, 29), mode=name, **kwargs))


def test_bilinear_keeps_a_linear_ramp_linear():
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    out = build_upsampler("bilinear")(None, ramp, (4, 8))
    # interior columns of a x2 bilinear upsampling of 0,1,2,3 step by 0.5
    torch.testing.assert_close(out[0, 0, 0, 1:-1].diff(), torch.full((5,), 0.5))


def test_registry():
    assert isinstance(build_upsampler("jafar", feature_dim=96, qk_dim=32), JAFAR)
    assert build_upsampler("jafar", feature_dim=96, qk_dim=32).v_dim == 96
    with pytest.raises(ValueError, match="upsampler='no_such_upsampler' is not a registered upsampler"):
        build_upsampler("no_such_upsampler")
    with pytest.raises(ValueError, match="takes no checkpoint or options"):
        build_upsampler("bilinear", checkpoint="x.pth")
    with pytest.raises(ValueError, match="output_size must be a pair"):
        build_upsampler("nearest")(None, torch.randn(1, 2, 3, 3), 5)


def test_featup_uncounted_flops_by_hand():
    from jafar.upsamplers import FeatUpJBU

    up = FeatUpJBU(4).eval()
    assert up.uncounted_flops() == 0  # before any forward
    with torch.no_grad():
        up(torch.rand(1, 3, 32, 32), torch.rand(1, 4, 2, 2), (32, 32))
    # steps at 4x4, 8x8, 16x16, 32x32 = 1,360 output pixels; 49 taps; 2 FLOPs per tap and
    # channel, over the 4 feature channels (filtering) and the 32 key channels (similarities)
    assert up.uncounted_flops() == 1360 * 49 * 2 * (4 + 32)
