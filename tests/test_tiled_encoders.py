"""JAFAR's CPU inference plan (``jafar.layers.tiled``, ``JAFAR.encode_tiled``): the same queries and
keys as the module path, for every option that changes the encoders, across tile borders."""

import pytest
import torch

import jafar
from jafar.layers import tiled
from jafar.layers.norm import GroupNorm


def _model(**kwargs):
    torch.manual_seed(0)
    model = jafar.build_upsampler("jafar", feature_dim=24, qk_dim=16, **kwargs).eval()
    with torch.no_grad():  # away from the initialisation's zeros and ones, so every term counts
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def _inputs(batch=2, size=(20, 18), grid=(3, 4), dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(batch, 3, *size, generator=g, dtype=dtype),
            torch.randn(batch, 24, *grid, generator=g, dtype=dtype))


@pytest.mark.parametrize("options", [{}, {"key_mode": "linear"}, {"key_mode": "none"}, {"key_mode": "concat"},
                                     {"rope": False}])
@pytest.mark.parametrize("output_size", [(20, 18), (11, 13)])
def test_tiled_encoders_match_the_modules(monkeypatch, options, output_size):
    monkeypatch.setattr(tiled, "TILE_TOKENS", 47)  # 360 tokens: 8 tiles, the last one partial
    model = _model(**options)
    image, features = _inputs()
    with torch.no_grad():
        q_ref, k_ref = model.encode(image, features, output_size)
        q, k = model.encode_tiled(image, features, output_size)
    assert q.shape == q_ref.shape and k.shape == k_ref.shape
    torch.testing.assert_close(q, q_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k, k_ref, rtol=1e-5, atol=1e-5)


def test_tiled_encoders_float64_to_rounding(monkeypatch):
    monkeypatch.setattr(tiled, "TILE_TOKENS", 64)
    model = _model().double()
    image, features = _inputs(dtype=torch.float64)
    with torch.no_grad():
        q_ref, k_ref = model.encode(image, features, (20, 18))
        q, k = model.encode_tiled(image, features, (20, 18))
    torch.testing.assert_close(q, q_ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(k, k_ref, rtol=1e-11, atol=1e-11)


def test_forward_takes_the_tiled_plan_only_at_cpu_inference(monkeypatch):
    model = _model()
    image, features = _inputs()
    calls = []
    original = model.encode_tiled
    monkeypatch.setattr(model, "encode_tiled", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        out = model(image, features, (20, 18))
    assert calls == [1]
    train_out = model(image, features, (20, 18))  # parameters require grad: the module path
    assert calls == [1] and train_out.requires_grad
    torch.testing.assert_close(out, train_out.detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(image, features, (20, 18))
    assert calls == [1]  # autocast: the module path


def test_group_stats_against_the_definition():
    # a large common offset: E[x^2] - E[x]^2 in float32 would lose every digit of the variance
    g = torch.Generator().manual_seed(2)
    x = 1000.0 + torch.randn(2, 300, 8, generator=g) * torch.tensor([0.5, 1, 2, 3, 0.1, 1, 4, 2])
    stats = tiled.GroupStats(2, 8, "cpu")
    for b in range(2):
        for s in range(0, 300, 70):
            stats.add(b, x[b, s:s + 70])
    mean, var = stats.group(4)
    groups = x.double().view(2, 300, 4, 2).permute(0, 2, 1, 3).reshape(2, 4, -1)  # (B, group, tokens x channels)
    want_mean = groups.mean(-1)
    want_var = ((groups - want_mean[..., None]) ** 2).mean(-1)
    torch.testing.assert_close(mean, want_mean, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(var, want_var, rtol=1e-5, atol=0)


def test_norm_coefficients_are_the_group_norm():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 5, 7, generator=g) * 3 + 1
    norm = GroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16, generator=g))
        norm.bias.copy_(torch.randn(16, generator=g))
    tokens = x.permute(0, 2, 3, 1).reshape(2, 35, 16)
    stats = tiled.GroupStats(2, 16, "cpu")
    for b in range(2):
        stats.add(b, tokens[b, :20])
        stats.add(b, tokens[b, 20:])
    a, s = tiled.norm_coefficients(stats, norm, torch.float32)
    got = tiled.tokens_to_map(tokens * a[:, None] + s[:, None], 5, 7)
    torch.testing.assert_close(got, torch.nn.functional.group_norm(x, 4, norm.weight, norm.bias), rtol=1e-5, atol=1e-5)
