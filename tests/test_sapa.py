"""SAPA (``jafar.upsamplers.sapa``): one stage against a loop-level transcription of the formula of
SAPA's CUDA ops (``QKForward`` / ``ATNForward`` in github poppinace/sapa), its gradients, the
stacked x2 stages + bilinear path, and the shape / dtype contract."""

import pytest
import torch
import torch.nn.functional as F

from jafar.upsamplers import build_upsampler
from jafar.upsamplers.sapa import SAPA, sapa_attention


def loop_sapa(query, key, value, kernel_size):
    """For each output pixel (y, x): its query, the k x k low-res pixels around (y // s, x // s);
    a neighbour outside the grid has similarity 0 (it stays in the softmax) and contributes no
    value; softmax of the similarities; weighted sum of the values."""
    b, _, big_h, big_w = query.shape
    h, w = key.shape[-2:]
    sh, sw, r = big_h // h, big_w // w, kernel_size // 2
    out = query.new_zeros(b, value.shape[1], big_h, big_w)
    for n in range(b):
        for y in range(big_h):
            for x in range(big_w):
                cy, cx = y // sh, x // sw
                sims, vals = [], []
                for dy in range(-r, r + 1):
                    for dx in range(-r, r + 1):
                        ky, kx = cy + dy, cx + dx
                        inside = 0 <= ky < h and 0 <= kx < w
                        sims.append((query[n, :, y, x] * key[n, :, ky, kx]).sum() if inside else query.new_zeros(()))
                        vals.append(value[n, :, ky, kx] if inside else value.new_zeros(value.shape[1]))
                weights = torch.stack(sims).softmax(0)
                out[n, :, y, x] = (weights[:, None] * torch.stack(vals)).sum(0)
    return out


@pytest.mark.parametrize("kernel_size,scale", [(5, (2, 2)), (3, (3, 2))])
def test_one_stage_matches_the_loop_transcription_and_its_gradients(kernel_size, scale):
    torch.manual_seed(0)
    h, w = 3, 4
    q = torch.randn(2, 6, h * scale[0], w * scale[1], dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 6, h, w, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 5, h, w, dtype=torch.float64, requires_grad=True)
    # a tiny chunk budget: several chunks of output rows
    ours = sapa_attention(q, k, v, kernel_size, max_elements=500)
    ref = loop_sapa(q, k, v, kernel_size)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(ref)
    g_ours = torch.autograd.grad((ours * weights).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * weights).sum(), (q, k, v))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_gradcheck_on_a_tiny_double_case():
    torch.manual_seed(1)
    q = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: sapa_attention(a, b, c, 3, max_elements=40), (q, k, v))


def test_the_stages_then_bilinear_path():
    # the module is its x2 stages (guidance: the image resized to each stage's grid) then bilinear
    torch.manual_seed(2)
    up = SAPA(6, stages=3, kernel_size=3, embedding_dim=8, guidance_dim=4).double()
    image, feats = torch.randn(1, 3, 20, 30, dtype=torch.float64), torch.randn(1, 6, 2, 3, dtype=torch.float64)
    x = feats
    for stage in up.stages:
        hh, ww = x.shape[-2:]
        y = stage.guidance(F.interpolate(image, size=(2 * hh, 2 * ww), mode="bilinear", align_corners=False,
                                         antialias=2 * hh < 20 or 2 * ww < 30))
        q = stage.q(stage.norm_y(y.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        k = stage.k(stage.norm_x(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        x = loop_sapa(q, k, x, 3)
    assert x.shape[-2:] == (16, 24)
    expected = F.interpolate(x, size=(11, 17), mode="bilinear", align_corners=False)
    torch.testing.assert_close(up(image, feats, (11, 17)), expected, rtol=1e-9, atol=1e-9)
    # at exactly x8 no resize
    assert up(image, feats, (16, 24)).shape == (1, 6, 16, 24)


@pytest.mark.parametrize("feats_hw,out_hw", [((3, 5), (7, 13)), ((1, 1), (9, 2)), ((4, 3), (50, 37))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_at_odd_sizes_and_ratios(feats_hw, out_hw, dtype):
    torch.manual_seed(3)
    up = build_upsampler("sapa", feature_dim=5, stages=2).to(dtype)
    out = up(torch.rand(2, 3, 17, 23, dtype=dtype), torch.randn(2, 5, *feats_hw, dtype=dtype), out_hw)
    assert out.shape == (2, 5, *out_hw) and out.dtype == dtype and torch.isfinite(out).all()


def test_defaults_and_refusals():
    up = build_upsampler("sapa", feature_dim=8)
    assert len(up.stages) == 4 and up.kernel_size == 5 and up.embedding_dim == 64
    assert up.describe().endswith(".") and "random init" in up.describe()
    with pytest.raises(ValueError, match="needs feature_dim"):
        build_upsampler("sapa")
    with pytest.raises(ValueError, match="8-channel features got 4"):
        up(torch.rand(1, 3, 8, 8), torch.rand(1, 4, 2, 2), (4, 4))
    with pytest.raises(ValueError, match="positive odd"):
        sapa_attention(torch.rand(1, 2, 4, 4), torch.rand(1, 2, 2, 2), torch.rand(1, 2, 2, 2), 4)
