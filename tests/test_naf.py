"""NAF (``jafar/upsamplers/naf.py``): the official forward reproduced from its fixture
(``tests/fixtures/naf_official_reference.pt``, made by the official code of github valeoai/NAF), the
pure-PyTorch neighbourhood attention against a per-query loop, upstream's parameter names, any
encoder's width, the upsampler contract, its checkpoints and release offline, and the one-sentence
refusals. CPU, seconds, no network, no natten."""

import pytest
import torch

from conftest import FIXTURES, refuse_network, rel_err
from jafar.upsamplers import build_upsampler, list_upsamplers, upsampler_entry
from jafar.upsamplers.naf import (
    NAF,
    NAF_RELEASES,
    cell_attention,
    find_naf_release,
    neighborhood_attention,
    neighborhood_index,
)


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def reference():
    path = FIXTURES / "naf_official_reference.pt"
    if not path.is_file():
        pytest.fail(f"fixture {path} is missing: tests/fixtures/README.md says how it is made.")
    return torch.load(path, weights_only=True)


def _official(reference, **kwargs) -> NAF:
    model = NAF(**reference["config"], **kwargs)
    model.load_state_dict(reference["state_dict"])  # strict: upstream's names and shapes
    return model.eval()


def test_parameter_names_shapes_and_count(reference):
    ours = {k: tuple(v.shape) for k, v in _official(reference).state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference["state_dict"].items()}
    assert {k.rsplit(".", 1)[0].split(".")[1] for k in ours} == {"encoder", "sem_encoder", "rope"}
    assert "image_encoder.rope.periods" in ours
    assert sum(p.numel() for p in NAF().parameters()) == 662_528  # upstream's NAF(), the release


@pytest.mark.parametrize("rows_per_chunk", [None, 1, 4])
def test_reproduces_official_forward(reference, rows_per_chunk):
    model = _official(reference, rows_per_chunk=rows_per_chunk)
    widths = set()
    for case in reference["cases"]:
        with torch.no_grad():
            out = model(case["image"], case["features"], tuple(case["output_size"]))
        assert out.shape == case["output"].shape and out.dtype == torch.float32
        assert rel_err(out, case["output"]) < 1e-5, (rows_per_chunk, case["output_size"])
        widths.add(case["features"].shape[1])
    assert len(widths) == len(reference["cases"])  # one model, several feature widths
    assert any(o[0] != o[1] for o in (c["output_size"] for c in reference["cases"]))  # a non-square output


def test_a_tiny_chunk_budget_gives_the_same_output(reference):
    model = _official(reference, chunk_elements=1)  # one row of queries a chunk
    case = reference["cases"][1]
    with torch.no_grad():
        out = model(case["image"], case["features"], tuple(case["output_size"]))
    assert model.rows_per_chunk is None and rel_err(out, case["output"]) < 1e-5


# ---------------------------------------------------------------------------------------------
# the neighbourhood attention against natten's definition, one query at a time
# ---------------------------------------------------------------------------------------------


def _natten_start(i: int, length: int, k: int, d: int) -> int:
    """natten's ``get_window_start`` (odd kernel)."""
    half = k // 2
    if d <= 1:
        return max(i - half, 0) + (length - i - half - 1 if i + half >= length else 0)
    if i - half * d < 0:
        return i % d
    if i + half * d >= length:
        a = (length // d) * d
        if i % d < length - a:
            return a + i % d - (k - 1) * d
        return a + i % d - k * d
    return i - half * d


def _brute_force(q, k, v, kernel, dilation, scale):
    B, H, W, n, _ = q.shape
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    for i in range(H):
        for j in range(W):
            si, sj = _natten_start(i, H, kernel[0], dilation[0]), _natten_start(j, W, kernel[1], dilation[1])
            ys = [si + a * dilation[0] for a in range(kernel[0])]
            xs = [sj + c * dilation[1] for c in range(kernel[1])]
            kn = k[:, ys][:, :, xs].reshape(B, -1, n, k.shape[-1])
            vn = v[:, ys][:, :, xs].reshape(B, -1, n, v.shape[-1])
            w = (torch.einsum("bnd,bknd->bnk", q[:, i, j], kn) * scale).softmax(-1)
            out[:, i, j] = torch.einsum("bnk,bknd->bnd", w, vn)
    return out


@pytest.mark.parametrize("size, kernel, dilation", [((7, 6), (3, 5), (1, 1)), ((13, 11), (3, 3), (2, 3)),
                                                    ((9, 10), (5, 3), (1, 2))])
def test_neighborhood_attention_is_natten_s_including_the_borders(size, kernel, dilation):
    torch.manual_seed(0)
    H, W = size
    q, k = torch.randn(2, H, W, 2, 4, dtype=torch.float64), torch.randn(2, H, W, 2, 4, dtype=torch.float64)
    v = torch.randn(2, H, W, 2, 3, dtype=torch.float64)  # another head width than the queries'
    expected = _brute_force(q, k, v, kernel, dilation, 0.7)
    for rows in (None, 1, 3):
        assert rel_err(neighborhood_attention(q, k, v, kernel, dilation, 0.7, rows), expected) < 1e-12


@pytest.mark.parametrize("grid, ratio, kernel", [((5, 4), (3, 2), (3, 3)), ((3, 6), (4, 1), (3, 5)),
                                                 ((2, 3), (2, 2), (2, 3))])
def test_cell_attention_is_the_brute_force_on_nearest_exact_upsampled_keys(grid, ratio, kernel):
    # upstream's recipe, transcribed: keys and values nearest-exact upsampled to the output size, then
    # natten's dilated window per query (the brute force above); kernel 2x3 on a 2x3 grid: the whole grid
    torch.manual_seed(0)
    (h, w), (dh, dw), heads = grid, ratio, 2
    H, W = h * dh, w * dw
    q = torch.randn(2, 8, H, W, dtype=torch.float64)
    k, v = torch.randn(2, 8, h, w, dtype=torch.float64), torch.randn(2, 6, h, w, dtype=torch.float64)
    up = lambda x: torch.nn.functional.interpolate(x, size=(H, W), mode="nearest-exact")  # noqa: E731
    split = lambda x: x.reshape(2, heads, -1, H, W).permute(0, 3, 4, 1, 2)  # noqa: E731
    expected = _brute_force(split(q), split(up(k)), split(up(v)), kernel, (dh, dw), 0.4)
    expected = expected.permute(0, 3, 4, 1, 2).reshape(2, 6, H, W)
    for chunk in (1, 10**9):  # one cell row per chunk; all at once
        assert rel_err(cell_attention(q, k, v, kernel, 0.4, heads, chunk), expected) < 1e-12


def test_neighbourhoods_stay_inside_and_shift_at_the_borders():
    idx = neighborhood_index(11, 3, 2)
    assert idx.shape == (11, 3) and idx.min() == 0 and idx.max() == 10
    assert idx[0].tolist() == [0, 2, 4] and idx[1].tolist() == [1, 3, 5] and idx[10].tolist() == [6, 8, 10]
    assert idx[5].tolist() == [3, 5, 7] and idx[9].tolist() == [5, 7, 9]
    assert all((row % 2 == i % 2).all() for i, row in enumerate(idx))  # a query's sub-grid only


# ---------------------------------------------------------------------------------------------
# the upsampler contract
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("width", [4, 12, 384])
def test_any_encoder_width(width):
    torch.manual_seed(0)
    model = NAF(feature_dim=768, dim=32).eval()  # feature_dim is recorded, not enforced
    with torch.no_grad():
        out = model(torch.randn(2, 3, 28, 28), torch.randn(2, width, 4, 4), (14, 12))
    assert out.shape == (2, width, 14, 12) and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(1, 1), (5, 9), (30, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_output_size_in_the_features_dtype(size, dtype):
    torch.manual_seed(0)
    model = NAF(dim=32).to(dtype).eval()
    image, feats = torch.randn(2, 3, 14, 21, dtype=torch.float32), torch.randn(2, 8, 2, 3, dtype=dtype)
    with torch.no_grad():
        out = model(image, feats, size)
    assert out.shape == (2, 8, *size) and out.dtype == dtype and torch.isfinite(out).all()


def test_the_output_size_defaults_to_the_image_size():
    model = NAF(dim=32).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 20, 24), torch.randn(1, 8, 5, 6)).shape == (1, 8, 20, 24)


def test_gradient_reaches_the_parameters_and_both_inputs(reference):
    model = _official(reference)
    case = reference["cases"][1]
    image, feats = case["image"].clone().requires_grad_(), case["features"].clone().requires_grad_()
    model(image, feats, (21, 19)).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == [] and feats.grad.abs().sum() > 0 and image.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# registry, checkpoints, release
# ---------------------------------------------------------------------------------------------


def test_the_registry_lists_it_and_builds_it_with_random_weights():
    assert "naf" in list_upsamplers()
    assert "NAF" in upsampler_entry("naf").summary and not upsampler_entry("naf").needs_backbone
    up = build_upsampler("naf", feature_dim=16, dim=32)
    assert isinstance(up, NAF) and up.weights_source == "random init"
    assert up.describe().startswith("NAF (encoder-agnostic") and "multiple of 4" in up.describe()
    assert "weights: random init." in up.describe()
    assert isinstance(build_upsampler("naf", dim=32), NAF)  # no width needed


def test_checkpoint_files_load(reference, tmp_path):
    state = reference["state_dict"]
    release_layout = tmp_path / "naf_release.pth"  # hubconf.py: a state dict of NAF
    torch.save(state, release_layout)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, wrapped)
    case = reference["cases"][2]
    for path in (release_layout, wrapped):
        up = build_upsampler("naf", feature_dim=16, checkpoint=str(path), dim=64).eval()
        assert up.weights_source == str(path) and str(path) in up.describe()
        with torch.no_grad():
            assert rel_err(up(case["image"], case["features"], tuple(case["output_size"])), case["output"]) < 1e-5
    with pytest.raises(ValueError, match=r"does not fit NAF\(dim=256, heads_rope=4, img_layers=2\)"):
        build_upsampler("naf", checkpoint=str(release_layout))


def test_release_names_and_their_url():
    assert set(NAF_RELEASES) == {"naf"}
    assert find_naf_release("naf_release") == find_naf_release("naf_release.pth") == "naf"
    assert find_naf_release("dinov3") is None
    assert NAF_RELEASES["naf"].url == "https://github.com/valeoai/NAF/releases/download/model/naf_release.pth"


def test_the_release_offline_says_what_to_do_or_falls_back_when_asked(monkeypatch, tmp_path):
    calls = refuse_network(monkeypatch, tmp_path, hf_offline=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"NAF's 'naf' weights is not in the cache and HF_HUB_OFFLINE is set: download "
                                           r"https://github.com/valeoai/NAF/releases/download/model/naf_release.pth .* "
                                           r"or pass its path as checkpoint=\.\.\."):
        build_upsampler("naf", feature_dim=384, checkpoint="naf")
    with pytest.warns(UserWarning, match="using random weights"):
        up = build_upsampler("naf", feature_dim=384, checkpoint="naf_release", on_missing="random")
    assert up.weights_source.startswith("random init ('naf_release' not loaded") and calls == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(RuntimeError, match="could not download NAF's 'naf' weights"):
        build_upsampler("naf", checkpoint="naf")  # the socket refuses


# ---------------------------------------------------------------------------------------------
# one-sentence refusals
# ---------------------------------------------------------------------------------------------

BAD_CALLS = [
    ("grey image", lambda m: m(torch.randn(1, 1, 8, 8), torch.randn(1, 16, 2, 2), (8, 8)),
     "NAF's guidance must be a (B, 3, H, W) image, got 1 channels."),
    ("image batch", lambda m: m(torch.randn(2, 3, 8, 8), torch.randn(1, 16, 2, 2), (8, 8)),
     "image must be a (B, 3, H, W) tensor with the batch of the features (1, 16, 2, 2), got (2, 3, 8, 8)."),
    ("3-d features", lambda m: m(torch.randn(1, 3, 8, 8), torch.randn(16, 2, 2), (8, 8)),
     "features must be a (B, C, h, w) tensor, got (16, 2, 2)."),
    ("bad size", lambda m: m(torch.randn(1, 3, 8, 8), torch.randn(1, 16, 2, 2), (0, 8)),
     "output_size must be a pair of positive ints (H_out, W_out), got (0, 8) (int, int)."),
    ("odd width", lambda m: m(torch.randn(1, 3, 8, 8), torch.randn(1, 6, 2, 2), (8, 8)),
     "NAF splits the features into heads_attn=4 groups of channels: their width must be a multiple of 4, got 6."),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_inputs_are_refused_in_one_sentence(case):
    _, call, message = case
    with pytest.raises(ValueError) as info:
        call(NAF(dim=32))
    assert str(info.value) == message


@pytest.mark.parametrize("kwargs, message", [
    (dict(dim=40), "NAF's dim must be a multiple of 16 (its two GroupNorm(8) halves), of heads_attn=4 and of "
                   "4 * heads_rope=16, got 40."),
    (dict(dim=32, kernel_size=4), "NAF's kernel_size must be a positive odd int, got 4."),
    (dict(dim=32, attention="flash"), "NAF attention must be one of local, natten, got 'flash'."),
    (dict(dim=32, rows_per_chunk=0), "NAF rows_per_chunk must be a positive int or None, got 0."),
    (dict(on_missing="skip"), "naf on_missing must be 'error' or 'random', got 'skip'."),
    (dict(checkpoint="/nonexistent/naf.pth"), "weights file '/nonexistent/naf.pth' does not exist."),
])
def test_bad_construction_is_refused_in_one_sentence(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        build_upsampler("naf", **kwargs)
    assert str(info.value) == message
