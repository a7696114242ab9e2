"""DySample (``jafar.upsamplers.dysample``): one x2 stage against a loop-level transcription of the
official module (offsets -> sampling points -> bilinear sampling with border padding), its
gradient, the stacked stages and the resize, and the refusals."""

import math

import pytest
import torch
import torch.nn.functional as F

from jafar.upsamplers import build_upsampler
from jafar.upsamplers.dysample import DySample, DySampleStage, dysample_sample, initial_offsets


def _bilinear_border(img: torch.Tensor, px, py) -> torch.Tensor:
    """``img`` ``(C, H, W)`` at the point ``(px, py)`` in pixel-index units (centres at integers),
    the point clamped to ``[0, W - 1] x [0, H - 1]`` first (grid_sample's border padding)."""
    _, h, w = img.shape
    px = px.clamp(0, w - 1)
    py = py.clamp(0, h - 1)
    x0, y0 = int(math.floor(px.item())), int(math.floor(py.item()))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    ax, ay = px - x0, py - y0
    return ((1 - ay) * ((1 - ax) * img[:, y0, x0] + ax * img[:, y0, x1])
            + ay * ((1 - ax) * img[:, y1, x0] + ax * img[:, y1, x1]))


def _loop_stage(stage: DySampleStage, x: torch.Tensor) -> torch.Tensor:
    """The stage pixel by pixel, from the official ``DySample`` ('lp', static scope): raw offsets
    ``O`` = the 1x1 conv of ``x``; output pixel ``(y * s + i, x * s + j)`` of group ``g`` samples the
    source map at ``(x + 0.5 + dx, y + 0.5 + dy)`` (corners at integers, i.e. pixel index ``(x + dx,
    y + dy)``), ``dx = 0.25 * O[(0 * G + g) * s * s + i * s + j] + (j - (s - 1) / 2) / s``, ``dy = 0.25
    * O[(1 * G + g) * s * s + i * s + j] + (i - (s - 1) / 2) / s``."""
    raw = stage.offset(x)
    s, g = stage.scale, stage.groups
    b, c, h, w = x.shape
    cg = c // g
    out = torch.zeros(b, c, s * h, s * w, dtype=x.dtype)
    for n in range(b):
        for yy in range(h):
            for xx in range(w):
                for i in range(s):
                    for j in range(s):
                        for grp in range(g):
                            sub = grp * s * s + i * s + j
                            dx = 0.25 * raw[n, sub, yy, xx] + (j - (s - 1) / 2) / s
                            dy = 0.25 * raw[n, g * s * s + sub, yy, xx] + (i - (s - 1) / 2) / s
                            out[n, grp * cg:(grp + 1) * cg, yy * s + i, xx * s + j] = _bilinear_border(
                                x[n, grp * cg:(grp + 1) * cg], xx + dx, yy + dy)
    return out


def _random_stage(channels, seed=0, **kw):
    torch.manual_seed(seed)
    stage = DySampleStage(channels, **kw).double()
    with torch.no_grad():  # the official init (std 0.001) barely moves the points: move them by pixels
        stage.offset.weight.normal_(0, 2.0)
        stage.offset.bias.normal_(0, 2.0)
    return stage


@pytest.mark.parametrize("groups", [4, 2])
def test_one_stage_matches_the_loop_transcription_forward_and_gradient(groups):
    stage = _random_stage(4, groups=groups)
    x = torch.randn(1, 4, 3, 5, dtype=torch.float64, requires_grad=True)
    out = stage(x)
    assert out.shape == (1, 4, 6, 10)
    x_ref = x.detach().clone().requires_grad_(True)
    ref = _loop_stage(stage, x_ref)
    # large offsets: some points leave the map, so border padding is exercised
    raw = stage.offset(x).detach()
    assert (raw.abs() * 0.25 > 3).any()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(out)
    params = list(stage.parameters())
    grads = torch.autograd.grad((out * weights).sum(), [x] + params)
    grads_ref = torch.autograd.grad((ref * weights).sum(), [x_ref] + params)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_the_sampler_passes_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    # offsets away from pixel centres and the border (bilinear is not differentiable on the grid lines)
    offset = (0.3 * torch.rand(1, 2 * 2 * 4, 3, 4, dtype=torch.float64) + 0.1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, o: dysample_sample(a, o, 2, 2), (x, offset))


def test_initial_offsets_are_bilinear_upsampling():
    # DySample's _init_pos for scale 2: x offsets -0.25, 0.25 along j, y offsets along i, per group
    pos = initial_offsets(2, 3).view(2, 3, 2, 2)
    torch.testing.assert_close(pos[0], torch.tensor([[-0.25, 0.25], [-0.25, 0.25]]).expand(3, 2, 2))
    torch.testing.assert_close(pos[1], torch.tensor([[-0.25, -0.25], [0.25, 0.25]]).expand(3, 2, 2))
    pos3 = initial_offsets(3, 1).view(2, 3, 3)
    torch.testing.assert_close(pos3[0, 0], torch.tensor([-1 / 3, 0.0, 1 / 3]))
    # a zero offset generator is bilinear x2 (align_corners=False; border padding = edge replicate)
    stage = DySampleStage(8).double()
    with torch.no_grad():
        stage.offset.weight.zero_()
    x = torch.randn(2, 8, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(stage(x), F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


def test_the_init_is_dysamples():
    torch.manual_seed(0)
    stage = DySampleStage(16)
    assert stage.offset.weight.shape == (2 * 4 * 4, 16, 1, 1) and not hasattr(stage, "scope")
    assert stage.offset.weight.std() < 0.002 and (stage.offset.bias == 0).all()
    assert sorted(stage.state_dict()) == ["init_pos", "offset.bias", "offset.weight"]
    pl = DySampleStage(16, style="pl", dyscope=True)
    assert pl.offset.weight.shape == (2 * 4, 4, 1, 1) and (pl.scope.weight == 0).all() and pl.scope.bias is None
    x = torch.randn(1, 16, 3, 4)
    assert pl(x).shape == (1, 16, 6, 8)


@pytest.mark.parametrize("style", ["lp", "pl"])
def test_pl_and_dyscope_use_their_own_offsets(style):
    # dynamic scope: 0.5 * sigmoid(scope) (0.25 at init, as the static scope); 'pl': from pixel_shuffle(x)
    torch.manual_seed(0)
    static = DySampleStage(8, style=style).double()
    dynamic = DySampleStage(8, style=style, dyscope=True).double()
    dynamic.load_state_dict(static.state_dict(), strict=False)
    x = torch.randn(1, 8, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(dynamic(x), static(x))
    if style == "pl":
        raw = F.pixel_unshuffle(static.offset(F.pixel_shuffle(x, 2)), 2)
        torch.testing.assert_close(static.offsets(x), 0.25 * raw + static.init_pos.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_four_stages_then_bilinear_at_any_size(dtype):
    torch.manual_seed(0)
    up = build_upsampler("dysample", feature_dim=8).to(dtype)
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
    up = build_upsampler("dysample", feature_dim=12, stages=2, groups=3, style="pl", dyscope=True)
    assert isinstance(up, DySample) and len(up.stages) == 2
    assert up(torch.rand(1, 3, 10, 10), torch.randn(1, 12, 5, 3), (11, 13)).shape == (1, 12, 11, 13)
    line = up.describe()
    assert line.startswith("DySample (2 x2 stages = x4, style pl, 3 groups, dynamic scope") and "image is not used" in line
    assert line.endswith("random init.")


def test_weights_round_trip(tmp_path):
    up = build_upsampler("dysample", feature_dim=8, stages=1)
    with torch.no_grad():
        up.stages[0].offset.weight.normal_()
    torch.save(up.state_dict(), tmp_path / "dysample.pt")
    again = build_upsampler("dysample", feature_dim=8, stages=1, checkpoint=str(tmp_path / "dysample.pt"))
    feats = torch.randn(1, 8, 3, 3)
    torch.testing.assert_close(again(None, feats, (6, 6)), up(None, feats, (6, 6)))
    with pytest.raises(ValueError, match="does not fit DySample"):
        build_upsampler("dysample", feature_dim=8, stages=1, dyscope=True, checkpoint=str(tmp_path / "dysample.pt"))


@pytest.mark.parametrize("kwargs, message", [
    ({}, r"^the 'dysample' upsampler needs feature_dim \(or backbone\)\.$"),
    ({"feature_dim": 6}, r"^dysample splits the channels into groups=4 blocks: feature_dim must be a multiple of 4, "
                         r"got 6\.$"),
    ({"feature_dim": 6, "groups": 2, "style": "pl"}, r"^dysample style 'pl' pixel-shuffles the features by scale=2: "
                                                      r"feature_dim must be a multiple of 4, got 6\.$"),
    ({"feature_dim": 8, "style": "lq"}, r"^dysample style must be one of \('lp', 'pl'\), got 'lq'\.$"),
    ({"feature_dim": 8, "stages": 0}, r"^dysample stages must be a positive int, got 0\.$"),
    ({"feature_dim": 8, "dyscope": "yes"}, r"^dysample dyscope must be True or False, got 'yes'\.$"),
    ({"feature_dim": 8, "scope": 0.5}, r"^the 'dysample' upsampler takes stages, .* got \['scope'\]\.$"),
])
def test_bad_options_are_refused_in_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_upsampler("dysample", **kwargs)


def test_features_of_another_width_are_refused():
    up = build_upsampler("dysample", feature_dim=8, stages=1)
    with pytest.raises(ValueError, match=r"^DySample built for 8-channel features got 4\.$"):
        up(None, torch.randn(1, 4, 3, 3), (6, 6))
