"""LoftUp (``jafar/upsamplers/loftup.py``): the official forward reproduced from its fixture
(``tests/fixtures/loftup_official_reference.pt``, made by the official code of github
andrehuang/loftup), upstream's parameter names, the upsampler contract, its checkpoints and
releases offline, the one-sentence refusals, and its rows in ``tools/benchmark.py``. CPU, seconds,
no network."""

import pytest
import torch

from conftest import FIXTURES, refuse_network, rel_err
from jafar.upsamplers import build_upsampler, list_upsamplers, upsampler_entry
from jafar.upsamplers.loftup import LOFTUP_RELEASES, LoftUp, find_loftup_release


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def reference():
    path = FIXTURES / "loftup_official_reference.pt"
    if not path.is_file():
        pytest.fail(f"fixture {path} is missing: tests/fixtures/README.md says how it is made.")
    return torch.load(path, weights_only=True)


def _official(reference, **kwargs) -> LoftUp:
    c = reference["config"]
    model = LoftUp(c["dim"], n_freqs=c["n_freqs"], num_heads=c["num_heads"], num_layers=c["num_layers"], **kwargs)
    model.load_state_dict(reference["state_dict"])  # strict: upstream's names and shapes
    return model.eval()


def test_parameter_names_shapes_and_count(reference):
    ours = {k: tuple(v.shape) for k, v in _official(reference).state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in reference["state_dict"].items()}
    assert {k.split(".")[0] for k in ours} == {"upsampler", "channelnorm"}
    # the released width: hubconf.py's LoftUp(384) with ChannelNorm(384), the paper's "4.3M"
    assert sum(p.numel() for p in LoftUp(384).parameters()) == 4_303_894


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_reproduces_official_forward(reference, attention):
    model = _official(reference, attention=attention)
    for case in reference["cases"]:
        with torch.no_grad():
            out = model(case["image"], case["features"], tuple(case["output_size"]))
        assert out.shape == case["output"].shape and out.dtype == torch.float32
        assert rel_err(out, case["output"]) < 1e-5, (attention, case["output_size"])


def test_many_small_query_chunks_give_the_same_output(reference):
    model = _official(reference, chunk_elements=300)  # 300 // (2 * 4 * 6) = 6 queries a chunk
    case = reference["cases"][0]
    with torch.no_grad():
        out = model(case["image"], case["features"], tuple(case["output_size"]))
    assert rel_err(out, case["output"]) < 1e-5


@pytest.mark.parametrize("size", [(1, 1), (5, 9), (30, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_any_output_size_in_the_features_dtype(size, dtype):
    torch.manual_seed(0)
    model = LoftUp(8, num_layers=1).to(dtype).eval()
    image, feats = torch.randn(2, 3, 14, 21, dtype=dtype), torch.randn(2, 8, 1, 2, dtype=dtype)
    with torch.no_grad():
        out = model(image, feats, size)
    assert out.shape == (2, 8, *size) and out.dtype == dtype and torch.isfinite(out).all()


def test_the_guidance_is_resized_bilinearly_to_the_output_size(reference):
    model = _official(reference)
    case = reference["cases"][1]
    size = tuple(case["output_size"])
    resized = torch.nn.functional.interpolate(case["image"].double(), size=size, mode="bilinear", align_corners=False)
    with torch.no_grad():
        out = model(resized, case["features"], size)
    assert rel_err(out, case["output"]) < 1e-5


def test_autocast_runs_and_stays_close(reference):
    model = _official(reference)
    case = reference["cases"][0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(case["image"], case["features"], tuple(case["output_size"]))
    assert torch.isfinite(out).all() and rel_err(out.float(), case["output"]) < 5e-2


def test_gradient_reaches_every_parameter_and_both_inputs(reference):
    model = _official(reference)  # eval: BatchNorm's running statistics, so the conv biases matter too
    case = reference["cases"][1]
    image, feats = case["image"].clone().requires_grad_(), case["features"].clone().requires_grad_()
    model(image, feats, (9, 13)).square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert feats.grad.abs().sum() > 0 and image.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# registry, checkpoints, releases
# ---------------------------------------------------------------------------------------------


def test_the_registry_lists_it_and_builds_it_with_random_weights():
    assert "loftup" in list_upsamplers()
    assert "LoftUp" in upsampler_entry("loftup").summary and not upsampler_entry("loftup").needs_backbone
    up = build_upsampler("loftup", feature_dim=16)
    assert isinstance(up, LoftUp) and up.weights_source == "random init"
    assert up.describe().startswith("LoftUp (") and "weights: random init." in up.describe()


def test_checkpoint_files_of_each_layout_load(reference, tmp_path):
    state = reference["state_dict"]
    release_layout = tmp_path / "pytorch_model.bin"  # hubconf.py: a state dict of UpsamplerwithChannelNorm
    torch.save(state, release_layout)
    training = tmp_path / "loftup_stage2.ckpt"  # load_upsampler_weights: "upsampler.*", "model.1.norm.*", backbone
    torch.save({"state_dict": {**{k: v for k, v in state.items() if k.startswith("upsampler.")},
                               **{"model.1." + k[len("channelnorm."):]: v for k, v in state.items()
                                  if k.startswith("channelnorm.")},
                               "model.0.backbone.weight": torch.zeros(2)}, "epoch": 3}, training)
    case = reference["cases"][2]
    for path in (release_layout, training):
        up = build_upsampler("loftup", feature_dim=16, checkpoint=str(path)).eval()
        assert up.weights_source == str(path) and str(path) in up.describe()
        with torch.no_grad():
            assert rel_err(up(case["image"], case["features"], tuple(case["output_size"])), case["output"]) < 1e-5
    core_only = tmp_path / "core.bin"  # upstream's LoftUp alone, without its channel norm
    torch.save({k[len("upsampler."):]: v for k, v in state.items() if k.startswith("upsampler.")}, core_only)
    with pytest.raises(ValueError, match=r"does not fit LoftUp\(feature_dim=16.*missing keys \['channelnorm.norm"):
        build_upsampler("loftup", feature_dim=16, checkpoint=str(core_only))


def test_release_names_and_their_urls():
    assert set(LOFTUP_RELEASES) == {"dinov2s", "dinov2s_reg", "dinov2b", "dinov2b_reg", "clip", "siglip", "siglip2"}
    assert find_loftup_release("loftup_dinov2s") == find_loftup_release("haiwen/loftup-dinov2s") == "dinov2s"
    assert find_loftup_release("dinov3") is None
    assert LOFTUP_RELEASES["clip"].feature_dim == 512 and LOFTUP_RELEASES["dinov2b"].feature_dim == 768
    assert LOFTUP_RELEASES["siglip2"].url == "https://huggingface.co/haiwen/loftup-siglip2/resolve/main/pytorch_model.bin"


def test_a_release_offline_says_what_to_do_or_falls_back_when_asked(monkeypatch, tmp_path):
    calls = refuse_network(monkeypatch, tmp_path, hf_offline=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"LoftUp's 'dinov2s' weights is not in the cache and HF_HUB_OFFLINE is set: "
                                           r"download https://huggingface.co/haiwen/loftup-dinov2s/resolve/main/"
                                           r"pytorch_model.bin .* or pass its path as checkpoint=\.\.\."):
        build_upsampler("loftup", feature_dim=384, checkpoint="loftup_dinov2s")
    with pytest.warns(UserWarning, match="using random weights"):
        up = build_upsampler("loftup", feature_dim=384, checkpoint="dinov2s", on_missing="random")
    assert up.weights_source.startswith("random init ('dinov2s' not loaded") and calls == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(RuntimeError, match="could not download LoftUp's 'dinov2s' weights"):
        build_upsampler("loftup", feature_dim=384, checkpoint="dinov2s")  # the socket refuses


# ---------------------------------------------------------------------------------------------
# one-sentence refusals
# ---------------------------------------------------------------------------------------------

BAD_CALLS = [
    ("wrong width", lambda m: m(torch.randn(1, 3, 8, 8), torch.randn(1, 8, 2, 2), (8, 8)),
     "LoftUp built for 16-channel features got 8."),
    ("grey image", lambda m: m(torch.randn(1, 1, 8, 8), torch.randn(1, 16, 2, 2), (8, 8)),
     "LoftUp's guidance must be an RGB image (B, 3, H, W), got 1 channels."),
    ("image batch", lambda m: m(torch.randn(2, 3, 8, 8), torch.randn(1, 16, 2, 2), (8, 8)),
     "image must be a (B, 3, H, W) tensor with the batch of the features (1, 16, 2, 2), got (2, 3, 8, 8)."),
    ("3-d features", lambda m: m(torch.randn(1, 3, 8, 8), torch.randn(16, 2, 2), (8, 8)),
     "features must be a (B, C, h, w) tensor, got (16, 2, 2)."),
    ("bad size", lambda m: m(torch.randn(1, 3, 8, 8), torch.randn(1, 16, 2, 2), (0, 8)),
     "output_size must be a pair of positive ints (H_out, W_out), got (0, 8) (int, int)."),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_inputs_are_refused_in_one_sentence(case):
    _, call, message = case
    with pytest.raises(ValueError) as info:
        call(LoftUp(16, num_layers=1))
    assert str(info.value) == message


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "the 'loftup' upsampler needs feature_dim (or backbone)."),
    (dict(feature_dim=6), "LoftUp attends over feature_dim + 20 channels, which must divide by num_heads=4: "
                          "feature_dim=6 does not fit."),
    (dict(feature_dim=16, attention="flash"), "LoftUp attention must be one of sdpa, reference, got 'flash'."),
    (dict(feature_dim=16, on_missing="skip"), "loftup on_missing must be 'error' or 'random', got 'skip'."),
    (dict(feature_dim=16, checkpoint="dinov2b"), "LoftUp's 'dinov2b' release upsamples 768-channel features "
                                                 "(DINOv2 ViT-B/14 (dinov2_vitb14)), not 16."),
    (dict(feature_dim=16, checkpoint="/nonexistent/loftup.bin"), "weights file '/nonexistent/loftup.bin' does not exist."),
])
def test_bad_construction_is_refused_in_one_sentence(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        build_upsampler("loftup", **kwargs)
    assert str(info.value) == message


# ---------------------------------------------------------------------------------------------
# tools/benchmark.py --upsamplers
# ---------------------------------------------------------------------------------------------


def test_benchmark_adds_a_row_per_registered_upsampler(capsys):
    from tools import benchmark

    argv = ["--device", "cpu", "--sizes", "28", "--dim", "16", "--dtypes", "fp32", "--repeats", "1", "--warmup", "0",
            "--no-isolate", "--modes", "auto", "--upsamplers", "bilinear", "loftup", "large_image"]
    assert benchmark.main(argv) == 0
    captured = capsys.readouterr()
    assert "skipping the 'large_image' upsampler: it encodes the image again and needs a backbone." in captured.err
    header = next(line for line in captured.out.splitlines() if line.startswith("| output"))
    assert "forward (auto) | forward (bilinear) | forward (loftup)" in header and "fwd+bwd peak (loftup)" in header
    row = next(line for line in captured.out.splitlines() if line.startswith("| 28x28 | 2x2 | fp32 |"))
    assert row.count(" ms |") == 6 and " - |" not in row  # forward and fwd+bwd of each of the three rows
    assert "**loftup**: that registered upsampler" in captured.out and "skipped (they encode" in captured.out
    with pytest.raises(SystemExit):
        benchmark.main(argv[:-3] + ["no_such_upsampler"])
    assert "upsampler='no_such_upsampler' is not a registered upsampler" in capsys.readouterr().err
