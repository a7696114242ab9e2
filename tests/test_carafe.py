"""CARAFE (``jafar.upsamplers.carafe``): one x2 stage against a loop-level transcription of
CARAFEPack's kernel normaliser and of mmcv's ``carafe_naive_forward_cuda_kernel``, its gradient,
the stacked stages and the resize, and the refusals."""

import pytest
import torch
import torch.nn.functional as F

from jafar.upsamplers import build_upsampler
from jafar.upsamplers.carafe import CARAFE, CARAFEStage, carafe_reassemble


def _loop_stage(stage: CARAFEStage, x: torch.Tensor) -> torch.Tensor:
    """The stage written pixel by pixel: the encoder's output ``E`` (the stage's two convolutions),
    then for output pixel ``(Y, X)`` and group ``g`` the kernel tap ``t`` is ``E[(g * k * k + t) *
    s * s + (Y % s) * s + X % s, Y // s, X // s]`` (pixel shuffle), softmax-normalised over ``t``,
    applied to the ``k x k`` neighbourhood of the source pixel ``(Y // s, X // s)``, zero outside."""
    enc = stage.content_encoder(stage.channel_compressor(x))
    k, g, s = stage.up_kernel, stage.up_group, stage.scale_factor
    b, c, h, w = x.shape
    r = (k - 1) // 2
    out = torch.zeros(b, c, s * h, s * w, dtype=x.dtype)
    for n in range(b):
        for yy in range(s * h):
            for xx in range(s * w):
                y0, x0 = yy // s, xx // s
                for grp in range(g):
                    logits = torch.stack([enc[n, (grp * k * k + t) * s * s + (yy % s) * s + xx % s, y0, x0]
                                          for t in range(k * k)])
                    kernel = torch.exp(logits - logits.max())
                    kernel = kernel / kernel.sum()
                    for ch in range(grp * (c // g), (grp + 1) * (c // g)):
                        acc = torch.zeros((), dtype=x.dtype)
                        for dy in range(k):
                            for dx in range(k):
                                iy, ix = y0 + dy - r, x0 + dx - r
                                if 0 <= iy < h and 0 <= ix < w:
                                    acc = acc + kernel[dy * k + dx] * x[n, ch, iy, ix]
                        out[n, ch, yy, xx] = acc
    return out


def _random_stage(channels, seed=0, **kw):
    torch.manual_seed(seed)
    stage = CARAFEStage(channels, **kw).double()
    with torch.no_grad():  # CARAFEPack's init (std 0.001) gives near-uniform kernels: make them sharp
        stage.content_encoder.weight.normal_(0, 0.5)
        stage.content_encoder.bias.normal_(0, 0.5)
    return stage


@pytest.mark.parametrize("kw", [{}, {"up_kernel": 3, "up_group": 2, "compressed_channels": 6}])
def test_one_stage_matches_the_loop_transcription_forward_and_gradient(kw):
    stage = _random_stage(4, **kw)
    x = torch.randn(1, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    out = stage(x)
    assert out.shape == (1, 4, 6, 10)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = _loop_stage(stage, x_ref)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(out)
    params = list(stage.parameters())
    grads = torch.autograd.grad((out * weights).sum(), [x] + params)
    grads_ref = torch.autograd.grad((ref * weights).sum(), [x_ref] + params)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_the_reassembly_op_passes_gradcheck():
    torch.manual_seed(1)
    feats = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    masks = torch.randn(1, 2 * 9, 6, 8, dtype=torch.float64).softmax(1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f, m: carafe_reassemble(f, m, 3, 2, 2), (feats, masks))


def test_the_init_is_carafepacks():
    torch.manual_seed(0)
    stage = CARAFEStage(16)
    assert stage.channel_compressor.weight.shape == (64, 16, 1, 1)
    assert stage.content_encoder.weight.shape == (5 * 5 * 1 * 2 * 2, 64, 3, 3)
    bound = (6 / (16 + 64)) ** 0.5  # xavier-uniform, gain 1
    assert stage.channel_compressor.weight.abs().max() <= bound and (stage.channel_compressor.bias == 0).all()
    assert stage.content_encoder.weight.std() < 0.002 and (stage.content_encoder.bias == 0).all()
    # near-uniform kernels at init: every output is about the mean of the 5x5 neighbourhood (zero-padded)
    x = torch.randn(1, 16, 6, 6)
    mean5 = F.avg_pool2d(x, 5, 1, 2, count_include_pad=True)
    torch.testing.assert_close(stage(x), F.interpolate(mean5, scale_factor=2, mode="nearest"), atol=1e-2, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_four_stages_then_bilinear_at_any_size(dtype):
    torch.manual_seed(0)
    up = build_upsampler("carafe", feature_dim=8).to(dtype)
    assert len(up.stages) == 4
    feats = torch.randn(2, 8, 3, 5, dtype=dtype)
    with torch.no_grad():
        x16 = feats
        for stage in up.stages:
            x16 = stage(x16)
        assert x16.shape == (2, 8, 48, 80)
        for size in [(12, 20), (7, 9), (1, 1), (97, 33), (48, 80)]:
            out = up(None, feats, size)
            assert out.shape == (2, 8) + size and out.dtype == dtype and torch.isfinite(out).all()
            torch.testing.assert_close(out, F.interpolate(x16, size=size, mode="bilinear", align_corners=False))
    torch.testing.assert_close(out, x16, rtol=0, atol=0)  # already at the output size: no resize


def test_stages_and_options_and_describe():
    up = build_upsampler("carafe", feature_dim=6, stages=2, up_kernel=3, up_group=3)
    assert isinstance(up, CARAFE) and len(up.stages) == 2
    assert up(torch.rand(1, 3, 10, 10), torch.randn(1, 6, 5, 3), (11, 13)).shape == (1, 6, 11, 13)
    line = up.describe()
    assert line.startswith("CARAFE (MMCV's CARAFEPack, 2 x2 stages = x4") and "image is not used" in line
    assert line.endswith("random init.")


def test_weights_round_trip(tmp_path):
    up = build_upsampler("carafe", feature_dim=8, stages=1)
    torch.save(up.state_dict(), tmp_path / "carafe.pt")
    again = build_upsampler("carafe", feature_dim=8, stages=1, checkpoint=str(tmp_path / "carafe.pt"))
    feats = torch.randn(1, 8, 3, 3)
    torch.testing.assert_close(again(None, feats, (6, 6)), up(None, feats, (6, 6)))
    assert str(tmp_path / "carafe.pt") in again.describe()
    with pytest.raises(ValueError, match="does not fit CARAFE"):
        build_upsampler("carafe", feature_dim=8, stages=2, checkpoint=str(tmp_path / "carafe.pt"))


@pytest.mark.parametrize("kwargs, message", [
    ({}, r"^the 'carafe' upsampler needs feature_dim \(or backbone\)\.$"),
    ({"feature_dim": 8, "up_group": 3}, r"up_group=3 groups: feature_dim must be a multiple of it, got 8\.$"),
    ({"feature_dim": 8, "up_kernel": 4}, r"^carafe up_kernel must be a positive odd int, got 4\.$"),
    ({"feature_dim": 8, "stages": 0}, r"^carafe stages must be a positive int, got 0\.$"),
    ({"feature_dim": 8, "encoder_kernel": 4}, r"encoder_kernel=4, encoder_dilation=1\.$"),
    ({"feature_dim": 8, "kernel": 5}, r"^the 'carafe' upsampler takes stages, .* got \['kernel'\]\.$"),
])
def test_bad_options_are_refused_in_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_upsampler("carafe", **kwargs)


def test_features_of_another_width_are_refused():
    up = build_upsampler("carafe", feature_dim=8, stages=1)
    with pytest.raises(ValueError, match=r"^CARAFE built for 8-channel features got 4\.$"):
        up(None, torch.randn(1, 4, 3, 3), (6, 6))
