"""AnyUp (``jafar/upsamplers/anyup.py``): the official forward reproduced from its fixture
(``tests/fixtures/anyup_official_reference.pt``, made by the official code of github
wimmerth/anyup), upstream's parameter names, any feature width, the upsampler contract, its
checkpoints and releases offline, and the one-sentence refusals. CPU, seconds, no network, no natten."""

import pytest
import torch

from conftest import FIXTURES, refuse_network, rel_err
from jafar.upsamplers import build_upsampler, list_upsamplers, upsampler_entry
from jafar.upsamplers.anyup import ANYUP_RELEASES, AnyUp, find_anyup_release


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def reference():
    path = FIXTURES / "anyup_official_reference.pt"
    if not path.is_file():
        pytest.fail(f"fixture {path} is missing: tests/fixtures/README.md says how it is made.")
    return torch.load(path, weights_only=True)


def _official(reference, **kwargs) -> AnyUp:
    c = reference["config"]
    model = AnyUp(qk_dim=c["qk_dim"], kernel_size=c["kernel_size"], kernel_size_lfu=c["kernel_size_lfu"],
                  window_ratio=c["window_ratio"], num_heads=c["num_heads"], **kwargs)
    model.load_state_dict(reference["state_dict"])  # strict: upstream's names and shapes
    return model.eval()


def test_parameter_names_shapes_and_count(reference):
    ours = {k: tuple(v.shape) for k, v in _official(reference).state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference["state_dict"].items()}
    assert {k.split(".")[0] for k in ours} == {"image_encoder", "key_encoder", "query_encoder", "key_features_encoder",
                                               "cross_decode", "aggregation", "rope"}
    assert sum(p.numel() for p in AnyUp().parameters()) == 878_080  # upstream's AnyUp(), both releases


@pytest.mark.parametrize("attention, q_chunk_size", [("local", None), ("local", 7), ("reference", None), ("reference", 50)])
def test_reproduces_official_forward(reference, attention, q_chunk_size):
    model = _official(reference, attention=attention, q_chunk_size=q_chunk_size)
    widths = set()
    for case in reference["cases"]:
        with torch.no_grad():
            out = model(case["image"], case["features"], tuple(case["output_size"]))
        assert out.shape == case["output"].shape and out.dtype == torch.float32
        assert rel_err(out, case["output"]) < 1e-5, (attention, q_chunk_size, case["output_size"])
        widths.add(case["features"].shape[1])
    assert len(widths) == len(reference["cases"])  # one model, several feature widths


def test_a_tiny_attention_budget_gives_the_same_output(reference):
    model = _official(reference, chunk_elements=1)  # one query a chunk
    case = reference["cases"][1]
    with torch.no_grad():
        out = model(case["image"], case["features"], tuple(case["output_size"]))
    assert model.q_chunk_size is None and rel_err(out, case["output"]) < 1e-5


def test_the_output_size_defaults_to_the_image_size(reference):
    model = _official(reference)
    case = reference["cases"][0]
    with torch.no_grad():
        out = model(case["image"], case["features"])
    assert rel_err(out, case["output"]) < 1e-5


def test_without_windows_local_and_reference_agree():
    torch.manual_seed(0)
    image, feats = torch.randn(1, 3, 12, 12), torch.randn(1, 5, 3, 3)
    local, ref = AnyUp(qk_dim=16, window_ratio=0.0, q_chunk_size=5).eval(), AnyUp(qk_dim=16, window_ratio=0.0,
                                                                                   attention="reference").eval()
    ref.load_state_dict(local.state_dict())
    with torch.no_grad():
        assert rel_err(local(image, feats, (7, 10)), ref(image, feats, (7, 10))) < 1e-6


@pytest.mark.parametrize("width", [1, 3, 17, 64])
def test_any_feature_width(width):
    torch.manual_seed(0)
    model = AnyUp(feature_dim=384, qk_dim=16).eval()  # feature_dim is recorded, not enforced
    with torch.no_grad():
        out = model(torch.randn(2, 3, 14, 14), torch.randn(2, width, 2, 2), (5, 9))
    assert out.shape == (2, width, 5, 9) and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(1, 1), (5, 9), (30, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_output_size_in_the_features_dtype(size, dtype):
    torch.manual_seed(0)
    model = AnyUp(qk_dim=16).to(dtype).eval()
    image, feats = torch.randn(2, 3, 14, 21, dtype=torch.float32), torch.randn(2, 8, 2, 3, dtype=dtype)
    with torch.no_grad():
        out = model(image, feats, size)
    assert out.shape == (2, 8, *size) and out.dtype == dtype and torch.isfinite(out).all()


def test_gradient_reaches_the_parameters_and_both_inputs(reference):
    model = _official(reference)
    case = reference["cases"][1]
    image, feats = case["image"].clone().requires_grad_(), case["features"].clone().requires_grad_()
    model(image, feats, (9, 13)).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # upstream computes nn.MultiheadAttention's output and ignores it: its output projection is unused
    assert missing == ["cross_decode.cross_attn.attention.out_proj.weight", "cross_decode.cross_attn.attention.out_proj.bias"]
    assert feats.grad.abs().sum() > 0 and image.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# registry, checkpoints, releases
# ---------------------------------------------------------------------------------------------


def test_the_registry_lists_it_and_builds_it_with_random_weights():
    assert "anyup" in list_upsamplers()
    assert "AnyUp" in upsampler_entry("anyup").summary and not upsampler_entry("anyup").needs_backbone
    up = build_upsampler("anyup", feature_dim=16)
    assert isinstance(up, AnyUp) and up.weights_source == "random init"
    assert up.describe().startswith("AnyUp (feature-agnostic") and "weights: random init." in up.describe()
    assert isinstance(build_upsampler("anyup", qk_dim=16), AnyUp)  # no width needed


def test_checkpoint_files_load(reference, tmp_path):
    state = reference["state_dict"]
    release_layout = tmp_path / "anyup_paper.pth"  # hubconf.py: a state dict of AnyUp
    torch.save(state, release_layout)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, wrapped)
    case = reference["cases"][2]
    for path in (release_layout, wrapped):
        up = build_upsampler("anyup", feature_dim=16, checkpoint=str(path), qk_dim=32).eval()
        assert up.weights_source == str(path) and str(path) in up.describe()
        with torch.no_grad():
            assert rel_err(up(case["image"], case["features"], tuple(case["output_size"])), case["output"]) < 1e-5
    with pytest.raises(ValueError, match=r"does not fit AnyUp\(qk_dim=128, lfu_dim=128, kernel_size_lfu=5\)"):
        build_upsampler("anyup", checkpoint=str(release_layout))


def test_release_names_and_their_urls():
    assert set(ANYUP_RELEASES) == {"anyup", "anyup_multi_backbone"}
    assert find_anyup_release("paper") == find_anyup_release("anyup_paper.pth") == "anyup"
    assert find_anyup_release("multi_backbone") == "anyup_multi_backbone" and find_anyup_release("dinov2s") is None
    assert ANYUP_RELEASES["anyup"].url == "https://github.com/wimmerth/anyup/releases/download/checkpoint/anyup_paper.pth"
    assert ANYUP_RELEASES["anyup_multi_backbone"].url == ("https://github.com/wimmerth/anyup/releases/download/"
                                                          "checkpoint_v2/anyup_multi_backbone.pth")


def test_a_release_offline_says_what_to_do_or_falls_back_when_asked(monkeypatch, tmp_path):
    calls = refuse_network(monkeypatch, tmp_path, hf_offline=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"AnyUp's 'anyup_multi_backbone' weights is not in the cache and HF_HUB_OFFLINE "
                                           r"is set: download https://github.com/wimmerth/anyup/releases/download/"
                                           r"checkpoint_v2/anyup_multi_backbone.pth .* or pass its path as checkpoint=\.\.\."):
        build_upsampler("anyup", feature_dim=384, checkpoint="anyup_multi_backbone")
    with pytest.warns(UserWarning, match="using random weights"):
        up = build_upsampler("anyup", feature_dim=384, checkpoint="paper", on_missing="random")
    assert up.weights_source.startswith("random init ('paper' not loaded") and calls == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(RuntimeError, match="could not download AnyUp's 'anyup' weights"):
        build_upsampler("anyup", checkpoint="anyup")  # the socket refuses


# ---------------------------------------------------------------------------------------------
# one-sentence refusals
# ---------------------------------------------------------------------------------------------

BAD_CALLS = [
    ("grey image", lambda m: m(torch.randn(1, 1, 8, 8), torch.randn(1, 16, 2, 2), (8, 8)),
     "AnyUp's guidance must be a (B, 3, H, W) image, got 1 channels."),
    ("image batch", lambda m: m(torch.randn(2, 3, 8, 8), torch.randn(1, 16, 2, 2), (8, 8)),
     "image must be a (B, 3, H, W) tensor with the batch of the features (1, 16, 2, 2), got (2, 3, 8, 8)."),
    ("3-d features", lambda m: m(torch.randn(1, 3, 8, 8), torch.randn(16, 2, 2), (8, 8)),
     "features must be a (B, C, h, w) tensor, got (16, 2, 2)."),
    ("bad size", lambda m: m(torch.randn(1, 3, 8, 8), torch.randn(1, 16, 2, 2), (0, 8)),
     "output_size must be a pair of positive ints (H_out, W_out), got (0, 8) (int, int)."),
    ("one row", lambda m: m(torch.randn(1, 3, 8, 8), torch.randn(1, 16, 1, 4), (8, 8)),
     "AnyUp needs features of at least 2 x 2 cells (its keys' 3x3 reflect-padded convolution), got 1 x 4."),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_inputs_are_refused_in_one_sentence(case):
    _, call, message = case
    with pytest.raises(ValueError) as info:
        call(AnyUp(qk_dim=16))
    assert str(info.value) == message


@pytest.mark.parametrize("kwargs, message", [
    (dict(qk_dim=20), "AnyUp's qk_dim must be a multiple of 8 (its GroupNorm groups) and of num_heads=4, got 20."),
    (dict(qk_dim=16, attention="natten"), "AnyUp attention must be one of local, reference, got 'natten'."),
    (dict(qk_dim=16, q_chunk_size=0), "AnyUp q_chunk_size must be a positive int or None, got 0."),
    (dict(on_missing="skip"), "anyup on_missing must be 'error' or 'random', got 'skip'."),
    (dict(checkpoint="/nonexistent/anyup.pth"), "weights file '/nonexistent/anyup.pth' does not exist."),
])
def test_bad_construction_is_refused_in_one_sentence(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        build_upsampler("anyup", **kwargs)
    assert str(info.value) == message
