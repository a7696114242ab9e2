"""JAFAR's ablation options (paper section 4.4 / Table 5: ``key_mode``, ``num_heads``; appendix D.2 /
Table 11: ``rope``; ``docs/ablations.md``): each changes the forward as the paper describes (checked
against a transcription with the official ``nn.MultiheadAttention``), every attention path and the
fused encoders agree with the reference path, checkpoints round-trip, the pretraining presets run a
few steps at smoke size, and the 2-D evaluation presets and rows build."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from jafar import JAFAR, build_backbone, build_upsampler, load_checkpoint, save_checkpoint
from jafar.upsamplers.jafar import KEY_MODES, infer_config, read_state_dict

#: one model per table row: the constructor options that differ from the official model
OPTIONS = {
    "official": {},
    "keys_linear": {"key_mode": "linear"},
    "keys_concat": {"key_mode": "concat"},
    "keys_no_sft": {"key_mode": "none"},
    "heads_1": {"num_heads": 1},
    "heads_2": {"num_heads": 2},
    "heads_8": {"num_heads": 8},
    "no_rope": {"rope": False},
}
ABLATIONS = [k for k in OPTIONS if k != "official"]
V, QK = 16, 32  # tiny widths: 32 channels split into 1, 2, 4 or 8 heads
SIZE = (9, 11)  # output size: pooled queries, ratios that are not integers


def _model(options: dict, seed: int = 0, dtype=torch.float64, **runtime) -> JAFAR:
    """A tiny JAFAR whose parameters are moved off their initial values (so that GroupNorm affines,
    biases and RoPE frequencies all matter)."""
    torch.manual_seed(seed)
    model = JAFAR(v_dim=V, qk_dim=QK, **options, **runtime).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(seed: int = 1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 18, 22, generator=g, dtype=dtype), torch.randn(2, V, 3, 4, generator=g, dtype=dtype)


def _by_hand(model: JAFAR, image, features, size):
    """The forward written out from the paper (section 3.1, section 4.4's key strategies) and the
    official code: the encoders are the model's own modules, the key strategy, RoPE and the
    attention are transcribed; the attention weights are those of the official
    ``nn.MultiheadAttention(..., average_attn_weights=True)`` (``src/layers/attentions.py``)."""
    x = model.image_encoder(image)
    if model.config.get("rope", True):
        x = model.rope(x)
    queries = model.norm(F.adaptive_avg_pool2d(model.query_encoder(x), size))
    f = F.normalize(features, dim=1)
    mode = model.config.get("key_mode", "sft")
    if mode != "linear":
        prelim = F.adaptive_avg_pool2d(model.key_encoder(x), features.shape[-2:])  # K~
    if mode == "sft":  # paper eq. 2: gamma_F * K~ + beta_F (official: K~ GroupNorm'ed, no affine)
        e = model.key_features_encoder(f)
        keys = (F.conv2d(e, model.sft_key.gamma.weight) * F.group_norm(prelim, 8, eps=1e-5)
                + F.conv2d(e, model.sft_key.beta.weight))
    elif mode == "concat":  # [K~; E] along the channels, one linear map back to qk_dim
        keys = torch.einsum("oc,bchw->bohw", model.key_concat.weight[:, :, 0, 0],
                            torch.cat([prelim, model.key_features_encoder(f)], dim=1))
    elif mode == "linear":  # a linear layer on F_lr only
        keys = torch.einsum("oc,bchw->bohw", model.key_linear.weight[:, :, 0, 0], f)
    else:  # w/o SFT: the preliminary keys as they are
        keys = prelim
    block = model.cross_decode
    q = block.conv2d(queries).flatten(2).transpose(1, 2)
    k = keys.flatten(2).transpose(1, 2)
    v = features.flatten(2).transpose(1, 2)
    attn = block.cross_attn
    mha = torch.nn.MultiheadAttention(QK, model.config["num_heads"], vdim=V, batch_first=True).to(image.dtype)
    mha.load_state_dict(attn.attention.state_dict())
    _, weights = mha(attn.norm_q(q), attn.norm_k(k), attn.norm_v(v), average_attn_weights=True)
    out = weights @ v
    return out.view(image.shape[0], *size, V).permute(0, 3, 1, 2)


# ---------------------------------------------------------------------------------------------
# the options and their refusals
# ---------------------------------------------------------------------------------------------


def test_defaults_are_the_official_model():
    model, explicit = JAFAR(), JAFAR(key_mode="sft", rope=True, num_heads=4)
    assert model.config == explicit.config == dict(input_dim=3, qk_dim=128, v_dim=384, num_heads=4, kernel_size=1)
    assert list(model.state_dict()) == list(explicit.state_dict())
    assert model.describe() == "JAFAR, weights: random init." and "key_mode" not in repr(model)


@pytest.mark.parametrize("kwargs, message", [
    ({"key_mode": "film"}, "key_mode must be one of ('sft', 'concat', 'linear', 'none') (the paper's Table 5 key "
                           "strategies), got 'film'."),
    ({"key_mode": None}, "key_mode must be one of .* got None."),
    ({"rope": "no"}, "rope must be True or False, got 'no'."),
    ({"rope": 0}, "rope must be True or False, got 0."),
    ({"num_heads": 3}, "qk_dim=32 is not divisible by num_heads=3."),
])
def test_bad_options_are_one_sentence_naming_the_value_and_the_choices(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)") if "*" not in message
                       else message):
        JAFAR(v_dim=V, qk_dim=QK, **kwargs)


@pytest.mark.parametrize("row", ABLATIONS)
def test_state_dict_holds_exactly_the_modules_of_the_option(row):
    official, model = set(_model({}).state_dict()), set(_model(OPTIONS[row]).state_dict())
    prefixes = lambda keys: {k.split(".")[0] for k in keys}  # noqa: E731
    expected = {
        "keys_linear": (official - {k for k in official if k.startswith(("key_encoder.", "key_features_encoder.",
                                                                            "sft_key."))}) | {"key_linear.weight"},
        "keys_concat": (official - {k for k in official if k.startswith("sft_key.")}) | {"key_concat.weight"},
        "keys_no_sft": official - {k for k in official if k.startswith(("key_features_encoder.", "sft_key."))},
        "no_rope": official - {"rope.freqs"},
    }.get(row, official)
    assert model == expected, prefixes(model ^ expected)
    m = _model(OPTIONS[row])
    if row == "keys_linear":
        assert m.key_linear.weight.shape == (QK, V, 1, 1) and m.key_linear.bias is None
    if row == "keys_concat":
        assert m.key_concat.weight.shape == (QK, 2 * QK, 1, 1) and m.key_concat.bias is None
    # every parameter that reaches the output gets a gradient (no dead module for DDP to wait for)
    image, features = _inputs()
    m.train()
    m(image, features, SIZE).square().sum().backward()
    assert all(p.grad is not None for p in m.parameters() if p.requires_grad)


def test_describe_and_repr_name_the_non_default_options():
    model = _model({"key_mode": "concat", "num_heads": 8, "rope": False})
    line = model.describe()
    assert line.startswith("JAFAR (") and "Concatenation" in line and "8 attention heads" in line and "no RoPE" in line
    assert "key_mode=concat" in repr(model) and "rope=False" in repr(model) and "num_heads=8" in repr(model)
    assert "Linear Projection" in _model({"key_mode": "linear"}).describe()
    assert "w/o SFT" in _model({"key_mode": "none"}).describe()


# ---------------------------------------------------------------------------------------------
# the forward of each option
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", list(OPTIONS))
def test_forward_is_the_paper_transcribed(row):
    model = _model(OPTIONS[row])
    image, features = _inputs()
    with torch.no_grad():
        out = model(image, features, SIZE)
        torch.testing.assert_close(out, _by_hand(model, image, features, SIZE), rtol=1e-10, atol=1e-12)
    assert out.shape == (2, V, *SIZE)


def test_linear_keys_are_a_linear_map_of_the_features_and_ignore_the_image():
    model = _model({"key_mode": "linear"})
    image, features = _inputs()
    with torch.no_grad():
        _, keys = model.encode(image, features, SIZE)
        _, keys_other_image = model.encode(torch.randn_like(image), features, SIZE)
        torch.testing.assert_close(keys, keys_other_image, rtol=0, atol=0)
        w = model.key_linear.weight[:, :, 0, 0]
        torch.testing.assert_close(keys, torch.einsum("oc,bchw->bohw", w, F.normalize(features, dim=1)))
    # the official model's keys do depend on the image
    official = _model({})
    with torch.no_grad():
        assert not torch.allclose(official.encode(image, features, SIZE)[1],
                                  official.encode(torch.randn_like(image), features, SIZE)[1])


def test_keys_without_sft_ignore_the_features_but_the_output_does_not():
    model = _model({"key_mode": "none"})
    image, features = _inputs()
    other = torch.randn_like(features)
    with torch.no_grad():
        queries, keys = model.encode(image, features, SIZE)
        torch.testing.assert_close(keys, model.encode(image, other, SIZE)[1], rtol=0, atol=0)
        encoded = model.rope(model.image_encoder(image))
        torch.testing.assert_close(keys, F.adaptive_avg_pool2d(model.key_encoder(encoded), features.shape[-2:]))
        assert not torch.allclose(model(image, features, SIZE), model(image, other, SIZE))
        official = _model({})
        assert not torch.allclose(official.encode(image, features, SIZE)[1], official.encode(image, other, SIZE)[1])


def test_concat_keys_are_one_linear_map_of_the_preliminary_keys_and_the_encoded_features():
    model = _model({"key_mode": "concat"})
    image, features = _inputs()
    with torch.no_grad():
        _, keys = model.encode(image, features, SIZE)
        encoded = model.rope(model.image_encoder(image))
        prelim = F.adaptive_avg_pool2d(model.key_encoder(encoded), features.shape[-2:])
        e = model.key_features_encoder(F.normalize(features, dim=1))
        w = model.key_concat.weight[:, :, 0, 0]
        # additive: W [K~; E] = W_K K~ + W_E E (SFT multiplies, concatenation adds)
        torch.testing.assert_close(keys, torch.einsum("oc,bchw->bohw", w[:, :QK], prelim)
                                   + torch.einsum("oc,bchw->bohw", w[:, QK:], e))
        # both the image and the features reach the keys
        assert not torch.allclose(keys, model.encode(torch.randn_like(image), features, SIZE)[1])
        assert not torch.allclose(keys, model.encode(image, torch.randn_like(features), SIZE)[1])


def test_no_rope_is_the_official_model_with_zero_rotation():
    """RoPE with all frequencies 0 rotates by nothing (cos 0 = 1, sin 0 = 0): the official model so
    set equals the model without RoPE that shares its other weights, and the real frequencies differ."""
    official, plain = _model({}), JAFAR(v_dim=V, qk_dim=QK, rope=False).double().eval()
    state = {k: v for k, v in official.state_dict().items() if k != "rope.freqs"}
    plain.load_state_dict(state)  # strict: the same modules less rope.freqs
    image, features = _inputs()
    with torch.no_grad():
        out = plain(image, features, SIZE)
        assert not torch.allclose(out, official(image, features, SIZE))
        official.rope.freqs.zero_()
        torch.testing.assert_close(out, official(image, features, SIZE), rtol=0, atol=0)
        torch.testing.assert_close(plain.encode_image(image), plain.image_encoder(image), rtol=0, atol=0)


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
def test_heads_split_the_width_and_average_their_softmax_weights(heads):
    """Same weights, ``num_heads`` heads: the output is the mean over heads of softmax(Q_h K_h^T /
    sqrt(qk_dim / heads)) @ F, a convex combination of the features."""
    model = _model({"num_heads": heads})
    image, features = _inputs()
    with torch.no_grad():
        q, k = model.encode(image, features, SIZE)
        block, attn = model.cross_decode, model.cross_decode.cross_attn.attention
        qt = block.cross_attn.norm_q(block.conv2d(q).flatten(2).transpose(1, 2))
        kt = block.cross_attn.norm_k(k.flatten(2).transpose(1, 2))
        qp = F.linear(qt, attn.q_proj_weight, attn.in_proj_bias[:QK]).unflatten(-1, (heads, QK // heads))
        kp = F.linear(kt, attn.k_proj_weight, attn.in_proj_bias[QK:2 * QK]).unflatten(-1, (heads, QK // heads))
        probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", qp, kp) / (QK // heads) ** 0.5, dim=-1).mean(1)
        expected = (probs @ features.flatten(2).transpose(1, 2)).view(2, *SIZE, V).permute(0, 3, 1, 2)
        out = model(image, features, SIZE)
    assert out.shape == (2, V, *SIZE) and model.cross_decode.cross_attn.attention.num_heads == heads
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    if heads > 1:  # the split matters: one head over the same weights gives another output
        one = JAFAR(v_dim=V, qk_dim=QK, num_heads=1).double().eval()
        one.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert not torch.allclose(one(image, features, SIZE), out)


# ---------------------------------------------------------------------------------------------
# every attention path and the fused encoders
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", ABLATIONS)
def test_attention_paths_agree_with_the_reference_path(row):
    image, features = _inputs()
    ref = _model(OPTIONS[row], attention="reference")
    img_r, feat_r = image.clone().requires_grad_(), features.clone().requires_grad_()
    out_r = ref(img_r, feat_r, SIZE)
    weight = torch.randn_like(out_r)
    (out_r * weight).sum().backward()
    for mode in ("auto", "chunked", "sdpa"):
        model = _model(OPTIONS[row], attention=mode, memory_budget_mb=0.005)  # a few queries per chunk
        img, feat = image.clone().requires_grad_(), features.clone().requires_grad_()
        out = model(img, feat, SIZE)
        torch.testing.assert_close(out, out_r, rtol=1e-9, atol=1e-11, msg=lambda m: f"{mode}: {m}")
        (out * weight).sum().backward()
        torch.testing.assert_close(img.grad, img_r.grad, rtol=1e-8, atol=1e-10)
        torch.testing.assert_close(feat.grad, feat_r.grad, rtol=1e-8, atol=1e-10)
        for (name, p), p_r in zip(model.named_parameters(), ref.parameters()):
            if p_r.grad is not None:
                torch.testing.assert_close(p.grad, p_r.grad, rtol=1e-8, atol=1e-10, msg=lambda m: f"{mode} {name}: {m}")


#: the options whose gradients the interpreter checks too: the fused training units without a key
#: encoder and without RoPE (PyTorch's RoPE is skipped), and the attention kernels' backward at 8 heads
TRAINED = ("keys_linear", "no_rope", "heads_8")


def _interpreted_errors() -> dict:
    """Under Triton's interpreter (``TRITON_INTERPRET=1``, a subprocess): for each option, the
    relative error in float32 against the reference path in float64 of a model that runs the Triton
    attention (``attention="triton"``) and the fused encoders (``encoders="triton"``,
    :meth:`JAFAR.encode_fused`: at inference one kernel per 1x1 convolution, RoPE in the epilogue;
    not for the head counts, which do not reach the encoders); for :data:`TRAINED`, also the output
    and the image's gradient with gradients on (the fused training units, the attention's backward).
    Small inputs: the interpreter runs every kernel program in Python."""
    from jafar.kernels.checks.cases import error

    g = torch.Generator().manual_seed(1)
    image, features, size = torch.randn(1, 3, 8, 10, generator=g), torch.randn(1, V, 2, 3, generator=g), (5, 6)
    result = {}
    for row in ABLATIONS:
        ref = _model(OPTIONS[row], attention="reference")
        img_r = image.double().requires_grad_()
        out_r = ref(img_r, features.double(), size)
        out_r.sum().backward()
        # the head count does not reach the encoders: those rows run the attention kernels only
        encoders = "torch" if row.startswith("heads_") else "triton"
        model = _model(OPTIONS[row], attention="triton", encoders=encoders).float()
        with torch.no_grad():
            errors = {"out": error(model(image, features, size), out_r.detach())}
        if row in TRAINED:
            img = image.clone().requires_grad_()
            out = model(img, features, size)
            out.sum().backward()
            errors.update(train_out=error(out.detach(), out_r.detach()), d_image=error(img.grad, img_r.grad))
        result[row] = errors
    return result


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    code = "import json, test_ablations; print(json.dumps(test_ablations._interpreted_errors()))"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA available: the compiled kernels are checked instead")
@pytest.mark.parametrize("row", ABLATIONS)
def test_triton_attention_and_fused_encoders_honour_the_option(interpreted, row):
    """One subprocess for all the options (about 30 s: Triton's interpreter runs every kernel program
    in Python; the only check of the Triton paths without a GPU)."""
    errors = interpreted[row]
    assert set(errors) == ({"out", "train_out", "d_image"} if row in TRAINED else {"out"})
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("row", ABLATIONS)
def test_triton_paths_honour_the_option_on_cuda(row):
    image, features = (t.float().cuda() for t in _inputs())
    ref = _model(OPTIONS[row], attention="reference").cuda()
    with torch.no_grad():
        out_r = ref(image.double(), features.double(), SIZE)
        for runtime in (dict(attention="triton"), dict(attention="chunked", encoders="triton")):
            out = _model(OPTIONS[row], **runtime).float().cuda()(image, features, SIZE)
            assert ((out.double() - out_r).norm() / out_r.norm()).item() < 1e-4, runtime


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row", ABLATIONS)
def test_checkpoints_round_trip_the_option(tmp_path, row):
    model = _model(OPTIONS[row], dtype=torch.float32)
    image, features = _inputs(dtype=torch.float32)
    with torch.no_grad():
        expected = model(image, features, SIZE)
    path = save_checkpoint(model, tmp_path / "j.safetensors")
    state, config = read_state_dict(path)
    assert config == model.config == {**dict(input_dim=3, qk_dim=QK, v_dim=V, num_heads=4, kernel_size=1),
                                      **OPTIONS[row]}
    loaded = load_checkpoint(path, feature_dim=V, attention="sdpa")
    assert loaded.config == model.config and loaded.describe().startswith(model.describe().split(",")[0])
    with torch.no_grad():
        torch.testing.assert_close(loaded(image, features, SIZE), expected, rtol=1e-5, atol=1e-6)
    # the registered factory, as the tools call it, and the state dict alone (an official-style .pth)
    assert build_upsampler("jafar", feature_dim=V, checkpoint=str(path)).config == model.config
    sd = model.state_dict()
    inferred = infer_config(sd, num_heads=model.config["num_heads"])
    assert inferred == model.config
    torch.save({"jafar": sd}, tmp_path / "j.pth")
    if row.startswith("heads_"):  # the head count does not show in a state dict: official files have 4
        assert load_checkpoint(tmp_path / "j.pth").config["num_heads"] == 4
    else:
        assert load_checkpoint(tmp_path / "j.pth").config == model.config
    # our pretraining's Lightning checkpoint records the head count in its run configuration
    torch.save({"state_dict": {f"upsampler.{k}": v for k, v in sd.items()},
                "run_config": {"upsampler": {"num_heads": model.config["num_heads"]}}}, tmp_path / "last.ckpt")
    assert load_checkpoint(tmp_path / "last.ckpt").config == model.config


@pytest.mark.parametrize("saved, asked, message", [
    ({"key_mode": "linear"}, {"key_mode": "sft"}, "has key_mode=linear but key_mode=sft was asked for: ask for "
                                                  "key_mode=linear"),
    ({}, {"rope": False}, "has rope=True but rope=False was asked for: ask for rope=True"),
    ({"num_heads": 8}, {"num_heads": 4}, "has num_heads=8 but num_heads=4 was asked for"),
    ({}, {"key_mode": "concat"}, "has key_mode=sft but key_mode=concat was asked for"),
])
def test_architecture_options_must_agree_with_the_checkpoint(tmp_path, saved, asked, message):
    path = save_checkpoint(_model(saved, dtype=torch.float32), tmp_path / "j.safetensors")
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path, **asked)
    # the matching value is accepted (and consumed, not passed twice)
    assert load_checkpoint(path, **{k: {**{"key_mode": "sft", "rope": True, "num_heads": 4}, **saved}[k]
                                    for k in asked}).config == _model(saved).config


def test_the_factory_passes_the_options_through():
    up = build_upsampler("jafar", feature_dim=V, qk_dim=QK, key_mode="concat", rope=False, num_heads=2)
    assert up.config == dict(input_dim=3, qk_dim=QK, v_dim=V, num_heads=2, kernel_size=1, key_mode="concat", rope=False)
    assert set(KEY_MODES) == {"sft", "concat", "linear", "none"}


# ---------------------------------------------------------------------------------------------
# pretraining presets
# ---------------------------------------------------------------------------------------------

PRESETS = {f"ablation_{row}": OPTIONS[row] for row in ABLATIONS}


def test_every_preset_is_the_official_recipe_and_one_option():
    from jafar.runs.common import config_changes
    from jafar.train.config import compose
    from jafar.train.run import PRETRAINING

    assert sorted(p.stem for p in (ROOT / "configs" / "experiment" / "pretrain").glob("ablation_*.yaml")) == sorted(PRESETS)
    official = compose("data.root=/x", "experiment=official")
    assert "key_mode" not in PRETRAINING.identity(official)["upsampler"]  # the official run's record is unchanged
    names = set()
    for preset, options in PRESETS.items():
        cfg = compose("data.root=/x", f"experiment={preset}")
        changes = config_changes(PRETRAINING.identity(official), PRETRAINING.identity(cfg))
        (key, value), = options.items()
        assert cfg.upsampler[key] == value and len(changes) == 1 and changes[0].startswith(f"upsampler.{key}:"), changes
        assert cfg.name == f"{preset}_{cfg.backbone.name}"
        names.add(cfg.name)
    assert len(names) == len(PRESETS)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    from test_pretrain import _write_images

    return _write_images(tmp_path_factory.mktemp("ablation_images"), 3, size=(60, 80))


@pytest.mark.parametrize("preset", list(PRESETS))
def test_pretraining_preset_trains_at_smoke_size(tmp_path, images, preset):
    """A step of the tool's run at smoke size (the tiny ViT, 56 px, qk_dim 32): the checkpoint it
    writes is the ablation's, and the run's recorded identity names the option."""
    from jafar.train.config import compose
    from jafar.train.run import run

    cfg = compose(f"experiment={preset}", "backbone=tiny_vit", f"data.root={images}", "data.num_workers=0",
                  "data.batch_size=2", "data.val_images=1", "recipe.image_size=56", "upsampler.qk_dim=32",
                  "trainer.max_steps=1", "trainer.accelerator=cpu", "trainer.devices=1", "trainer.precision=32-true",
                  "trainer.enable_progress_bar=false", "validation.ratios=[2]", "checkpoint_every=1")
    results = run(cfg, tmp_path / "run")
    assert results["step"] == 1
    options = PRESETS[preset]
    expected = {**dict(input_dim=3, qk_dim=32, v_dim=32, num_heads=4, kernel_size=1), **options}
    assert load_checkpoint(tmp_path / "run" / "jafar.safetensors", feature_dim=32).config == expected
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt", feature_dim=32).config == expected
    record = json.loads((tmp_path / "run" / "run_config.json").read_text())["config"]
    (key, value), = options.items()
    assert record["upsampler"][key] == value


def test_a_bad_key_mode_in_the_pretraining_config_is_refused_by_name(tmp_path, images):
    from jafar.train.config import compose
    from jafar.train.run import run

    with pytest.raises(ValueError, match="upsampler.key_mode must be one of sft, concat, linear, none"):
        run(compose(f"data.root={images}", "upsampler.key_mode=film"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# evaluation presets and rows
# ---------------------------------------------------------------------------------------------


def test_eval_presets_set_the_tables_settings():
    from jafar.eval.config import compose

    t5 = compose("experiment=ablation_table5")
    assert list(t5.task.datasets) == ["voc", "ade20k", "cityscapes"] and t5.task.image_size == 448
    assert list(t5.compare) == ["keys_linear", "keys_concat", "keys_no_sft", "jafar", "heads_1", "heads_2", "heads_8"]
    for row in t5.compare:
        pretrain = "official" if row == "jafar" else f"ablation_{row}"
        assert t5.upsamplers[row].checkpoint == f"outputs/pretrain/{pretrain}_{t5.backbone.name}/jafar.safetensors"
        for key, value in OPTIONS.get(row, {}).items():
            assert t5.upsamplers[row][key] == value
    for side in (8, 16, 32):
        t10 = compose(f"experiment=ablation_table10_in{side}", "task.target_size=896")
        assert (t10.task.image_size, t10.task.target_size) == (14 * side, 896)
        assert list(t10.task.datasets) == ["cityscapes", "voc"] and list(t10.compare) == ["bilinear", "jafar"]
        assert t10.name == f"ablation_table10_in{side}_out896_{t10.backbone.name}"
    t11 = compose("experiment=ablation_table11", "task.image_size=112")
    assert (t11.task.image_size, t11.task.target_size, list(t11.compare)) == (112, None, ["jafar_no_rope", "jafar"])
    assert t11.upsamplers.jafar_no_rope.rope is False and t11.name.startswith("ablation_table11_112_")


def test_eval_rows_load_non_default_checkpoints(tmp_path):
    """``jafar.eval.run.build_upsampler_row`` -> ``jafar.build_upsampler`` on the Table 5 and 11
    presets' rows, each given a tiny checkpoint of its option; the default row with a non-default
    checkpoint is refused in one sentence naming the key, and accepted with that key."""
    from jafar.eval.config import compose
    from jafar.eval.run import build_upsampler_row

    backbone = build_backbone("vit_small_patch14_reg4_dinov2.lvd142m", pretrained=False, depth=1, embed_dim=32,
                              num_heads=2)
    files = {}
    for row, options in OPTIONS.items():
        files[row] = save_checkpoint(JAFAR(v_dim=32, qk_dim=32, **options), tmp_path / f"{row}.safetensors")
    t5 = compose("experiment=ablation_table5", *[f"upsamplers.{r}.checkpoint={files[r]}" for r in ABLATIONS
                                                if r.startswith(("keys_", "heads_"))],
                 f"upsamplers.jafar.checkpoint={files['official']}", "upsamplers.jafar.qk_dim=32")
    for row in t5.compare:
        module, info = build_upsampler_row(t5, row, backbone)
        assert module.config == {**dict(input_dim=3, qk_dim=32, v_dim=32, num_heads=4, kernel_size=1),
                                 **OPTIONS.get(row, {})}
        assert str(files.get(row, files["official"])) in info["note"]
    t11 = compose("experiment=ablation_table11", f"upsamplers.jafar_no_rope.checkpoint={files['no_rope']}")
    module, info = build_upsampler_row(t11, "jafar_no_rope", backbone)
    assert module.rope is None and info["label"] == "JAFAR w/o RoPE" and "no RoPE" in info["note"]
    # any task's default jafar row: the yaml's architecture keys are checked against the file
    cfg = compose(f"upsamplers.jafar.checkpoint={files['heads_8']}", "upsamplers.jafar.qk_dim=32")
    with pytest.raises(ValueError, match="has num_heads=8 but num_heads=4 was asked for: ask for num_heads=8"):
        build_upsampler_row(cfg, "jafar", backbone)
    cfg = compose(f"upsamplers.jafar.checkpoint={files['heads_8']}", "upsamplers.jafar.qk_dim=32",
                  "upsamplers.jafar.num_heads=8")
    assert build_upsampler_row(cfg, "jafar", backbone)[0].config["num_heads"] == 8
