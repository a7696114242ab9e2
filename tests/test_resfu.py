"""ReSFU (``jafar.upsamplers.resfu``): the direct step against a loop-level transcription of the
formula written in its module docstring (continuous source position, bilinear neighbours with
zeros outside, the learned pair similarity, softmax, weighted sum), its gradients, the direct path
to a non-integer ratio, and the shape / dtype contract."""

import math

import pytest
import torch

from jafar.upsamplers import build_upsampler
from jafar.upsamplers.resfu import ReSFU, resfu_attention


def bilinear_at(t, py, px):
    """``t[:, py, px]`` for a continuous pixel position, bilinear, zeros outside the grid."""
    h, w = t.shape[-2:]
    y0, x0 = math.floor(py), math.floor(px)
    total = t.new_zeros(t.shape[0])
    for yy, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
        for xx, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                total = total + wy * wx * t[:, yy, xx]
    return total


def loop_resfu(query, key, value, a, b, kernel_size):
    """For each output pixel (y, x): its query; its source position u = (y + 0.5) h / H - 0.5
    (likewise v); the k x k neighbours at (u + i - r, v + j - r), keys and values sampled
    bilinearly with zeros outside; similarity sum a q k - sum b (q - k)^2; softmax; weighted sum."""
    nb, _, big_h, big_w = query.shape
    h, w = key.shape[-2:]
    r = kernel_size // 2
    out = query.new_zeros(nb, value.shape[1], big_h, big_w)
    for n in range(nb):
        for y in range(big_h):
            for x in range(big_w):
                u, v = (y + 0.5) * h / big_h - 0.5, (x + 0.5) * w / big_w - 0.5
                q = query[n, :, y, x]
                sims, vals = [], []
                for i in range(kernel_size):
                    for j in range(kernel_size):
                        k = bilinear_at(key[n], u + i - r, v + j - r)
                        sims.append((a * q * k).sum() - (b * (q - k) ** 2).sum())
                        vals.append(bilinear_at(value[n], u + i - r, v + j - r))
                weights = torch.stack(sims).softmax(0)
                out[n, :, y, x] = (weights[:, None] * torch.stack(vals)).sum(0)
    return out


@pytest.mark.parametrize("kernel_size,out_hw", [(3, (7, 10)), (5, (5, 3))])
def test_the_direct_step_matches_the_loop_transcription_and_its_gradients(kernel_size, out_hw):
    torch.manual_seed(0)
    d = 4
    q = torch.randn(2, d, *out_hw, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, d, 3, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    a = torch.rand(d, dtype=torch.float64, requires_grad=True)
    b = torch.rand(d, dtype=torch.float64, requires_grad=True)
    ours = resfu_attention(q, k, v, a, b, kernel_size, max_elements=700)  # several chunks of rows
    ref = loop_resfu(q, k, v, a, b, kernel_size)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(ref)
    g_ours = torch.autograd.grad((ours * weights).sum(), (q, k, v, a, b))
    g_ref = torch.autograd.grad((ref * weights).sum(), (q, k, v, a, b))
    for x, y in zip(g_ours, g_ref):
        torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-10)


def test_gradcheck_on_a_tiny_double_case():
    torch.manual_seed(1)
    q = torch.randn(1, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    a = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: resfu_attention(*t, kernel_size=3, max_elements=60), (q, k, v, a, b))


def test_the_direct_path_to_a_non_integer_ratio():
    # one step, no intermediate grid: the module's output is the attention of its queries and keys
    torch.manual_seed(2)
    up = ReSFU(5, kernel_size=3, embedding_dim=6, guidance_dim=4).double()
    with torch.no_grad():
        up.difference.uniform_(0, 1)
        up.alpha_q.fill_(0.7)
    image, feats = torch.randn(1, 3, 19, 26, dtype=torch.float64), torch.randn(1, 5, 3, 4, dtype=torch.float64)
    size = (8, 11)  # x2.67 and x2.75
    q, k = up.queries_and_keys(image, feats, size)
    assert q.shape == (1, 6, 8, 11) and k.shape == (1, 6, 3, 4)
    expected = loop_resfu(q, k, feats, up.inner, up.difference, 3)
    torch.testing.assert_close(up(image, feats, size), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("feats_hw,out_hw", [((3, 5), (7, 13)), ((1, 1), (9, 2)), ((4, 3), (50, 37)), ((6, 6), (4, 5))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_and_dtype_at_odd_sizes_and_ratios(feats_hw, out_hw, dtype):
    torch.manual_seed(3)
    up = build_upsampler("resfu", feature_dim=5).to(dtype)
    out = up(torch.rand(2, 3, 17, 23, dtype=dtype), torch.randn(2, 5, *feats_hw, dtype=dtype), out_hw)
    assert out.shape == (2, 5, *out_hw) and out.dtype == dtype and torch.isfinite(out).all()


def test_defaults_and_refusals():
    up = build_upsampler("resfu", feature_dim=8)
    assert up.kernel_size == 5 and up.embedding_dim == 64 and up.guidance_dim == 32
    assert up.describe().endswith(".") and "random init" in up.describe()
    with pytest.raises(ValueError, match="needs feature_dim"):
        build_upsampler("resfu")
    with pytest.raises(ValueError, match="8-channel features got 4"):
        up(torch.rand(1, 3, 8, 8), torch.rand(1, 4, 2, 2), (4, 4))
