import os
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import DEVICES, ROOT, rel_err
from jafar import JAFAR
from jafar.layers.norm import GroupNorm

MODES = ["reference", "chunked", "sdpa"] + (["triton"] if torch.cuda.is_available() else [])


def _official(official_reference, device, **kwargs):
    model = JAFAR(**official_reference["config"], **kwargs)
    model.load_state_dict(official_reference["state_dict"])  # strict: same names and shapes
    return model.to(device).eval()


def test_parameter_names_shapes_and_count(official_reference):
    model = JAFAR()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in official_reference["state_dict"].items()}
    assert ours == theirs
    assert sum(p.numel() for p in model.parameters()) == 628_480


def test_dead_official_parameters_are_frozen():
    model = JAFAR()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {
        "cross_decode.cross_attn.norm_v.weight",
        "cross_decode.cross_attn.attention.v_proj_weight",
        "cross_decode.cross_attn.attention.out_proj.weight",
        "cross_decode.cross_attn.attention.out_proj.bias",
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_reproduces_official_forward(official_reference, mode, device):
    if mode == "triton" and device == "cpu":
        pytest.skip("the Triton kernel runs on CUDA (the CPU interpreter is tests/test_kernels.py)")
    model = _official(official_reference, device, attention=mode)
    for case in official_reference["cases"]:
        with torch.no_grad():
            out = model(case["image"].to(device), case["features"].to(device), tuple(case["output_size"]))
        assert out.shape == case["output"].shape
        assert rel_err(out.cpu(), case["output"]) < 1e-5, (mode, case["output_size"])


@pytest.mark.parametrize("mode", ["chunked", "sdpa"])
def test_many_small_chunks_give_the_same_output(official_reference, mode):
    # a budget of a few KiB forces chunks of a handful of queries
    model = _official(official_reference, "cpu", attention=mode, memory_budget_mb=0.05)
    case = official_reference["cases"][0]
    with torch.no_grad():
        out = model(case["image"], case["features"], tuple(case["output_size"]))
    assert rel_err(out, case["output"]) < 1e-5


def _random_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = JAFAR(**kwargs)
    with torch.no_grad():  # move every parameter off its initial value so that each matters
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["chunked", "sdpa", "auto", "triton"])
def test_gradients_match_reference(mode, device):
    if mode == "triton" and device == "cpu":
        pytest.skip("the Triton kernel runs on CUDA (the CPU interpreter is tests/test_kernels.py)")
    torch.manual_seed(1)
    # the Triton kernel needs a power-of-two head width >= 16: qk_dim 64 over 4 heads
    model = _random_model(v_dim=48, qk_dim=64 if mode == "triton" else 32).to(device)
    image = torch.randn(2, 3, 20, 26, device=device, requires_grad=True)
    feats = torch.randn(2, 48, 4, 5, device=device, requires_grad=True)
    weight = torch.randn(2, 48, 23, 17, device=device)

    def grads(attention):
        model.attention = attention
        model.memory_budget = 20_000  # several chunks
        model.zero_grad()
        image.grad = feats.grad = None
        (model(image, feats, (23, 17)) * weight).sum().backward()
        named = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return image.grad.clone(), feats.grad.clone(), named

    ref_img, ref_feat, ref_params = grads("reference")
    img, feat, params = grads(mode)
    assert rel_err(img, ref_img) < 1e-5
    assert rel_err(feat, ref_feat) < 1e-5
    for name, g in ref_params.items():
        assert g.abs().sum() > 0, name  # every trainable parameter influences the output
        assert rel_err(params[name], g) < 1e-4, name


@pytest.mark.parametrize("output_size", [(1, 1), (5, 97), (31, 17), (64, 48), (100, 3)])
def test_any_output_size(output_size):
    model = _random_model(v_dim=32, qk_dim=32).eval()
    image, feats = torch.randn(3, 3, 24, 32), torch.randn(3, 32, 3, 4)
    with torch.no_grad():
        model.attention = "reference"
        ref = model(image, feats, output_size)
        model.attention = "chunked"
        out = model(image, feats, output_size)
    assert out.shape == (3, 32, *output_size)
    assert rel_err(out, ref) < 1e-5


def test_output_is_a_convex_combination_of_the_features():
    # head-averaged softmax weights sum to one: a constant feature map stays constant
    model = _random_model(v_dim=16, qk_dim=32).eval()
    feats = torch.full((1, 16, 3, 3), 2.5)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 12, 12), feats, (20, 20))
    torch.testing.assert_close(out, torch.full_like(out, 2.5))


def test_batch_elements_are_independent():
    model = _random_model(v_dim=16, qk_dim=32).eval()
    image, feats = torch.randn(3, 3, 16, 16), torch.randn(3, 16, 2, 2)
    with torch.no_grad():
        whole = model(image, feats, (9, 9))
        one = model(image[1:2], feats[1:2], (9, 9))
    torch.testing.assert_close(whole[1:2], one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["chunked", "sdpa", "auto", "triton"])
def test_autocast_runs_and_stays_close(official_reference, dtype, mode, device):
    if mode == "triton" and device == "cpu":
        pytest.skip("the Triton kernel runs on CUDA (the CPU interpreter is tests/test_kernels.py)")
    model = _official(official_reference, device, attention=mode)
    case = official_reference["cases"][2]
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        out = model(case["image"].to(device), case["features"].to(device), tuple(case["output_size"])).cpu()
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert rel_err(out.float(), case["output"]) < 3e-2


def test_rope_angles_stay_float32_under_autocast():
    model = JAFAR()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        angles = model.rope.angles(7, 9)
    assert angles.dtype == torch.float32
    # bottom-right pixel: coordinates (1, 1)
    torch.testing.assert_close(angles[:, -1, -1], model.rope.freqs.sum(0).detach())


@pytest.mark.parametrize("bad, message", [
    (dict(image=torch.randn(1, 4, 8, 8)), "image must be a (B, 3, H, W)"),
    (dict(features=torch.randn(1, 10, 2, 2)), "features must be a (B, 16, h, w)"),
    (dict(features=torch.randn(2, 16, 2, 2)), "same batch size"),
    (dict(output_size=(8,)), "output_size must be a pair"),
    (dict(output_size=(0, 8)), "output_size must be a pair"),
    (dict(output_size=(8.0, 8)), "output_size must be a pair"),
])
def test_bad_input_is_one_clear_sentence(bad, message):
    model = JAFAR(v_dim=16, qk_dim=32)
    args = dict(image=torch.randn(1, 3, 8, 8), features=torch.randn(1, 16, 2, 2), output_size=(8, 8))
    args.update(bad)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model(**args)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="attention must be one of"):
        JAFAR(attention="flash")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        JAFAR(qk_dim=128, num_heads=3)


MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from jafar import JAFAR
    torch.set_num_threads(2)
    model = JAFAR(v_dim=64, attention=sys.argv[1], memory_budget_mb=64).eval()
    image, feats = torch.randn(1, 3, 256, 256), torch.randn(1, 64, 48, 48)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        model(image, feats, (256, 256))
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
""")


def test_memory_is_bounded_where_the_official_algorithm_materialises():
    # 65,536 queries x 2,304 keys x 4 heads in float32 is 2.4 GB for the official weights alone
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    growth = float(subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, "chunked"], env=env, check=True,
                                  capture_output=True, text=True).stdout)
    assert growth < 700, f"process memory grew by {growth:.0f} MB"


# --- the lean encoder path: GroupNorm, padding, half-precision encoders, compile ----------------

def _group_norms(affine):
    torch.manual_seed(0)
    official = torch.nn.GroupNorm(8, 16, affine=affine)
    if affine:
        with torch.no_grad():
            official.weight.normal_()
            official.bias.normal_()
    ours = GroupNorm(8, 16, affine=affine)
    ours.load_state_dict(official.state_dict())  # strict: the same keys
    return official, ours


@pytest.mark.parametrize("impl", ["var_mean", "native", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_equals_nn_group_norm_with_gradients(affine, train, dtype, impl):
    official, ours = _group_norms(affine)
    official.train(train), ours.train(train)
    ours.impl = impl
    x = (torch.randn(2, 16, 7, 9) * 3 + 1).to(dtype)
    grad = torch.randn(2, 16, 7, 9).to(dtype)

    def run(module):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        y = module.to(dtype)(xi)
        y.backward(grad)
        return [y, xi.grad] + ([module.weight.grad, module.bias.grad] if affine else [])

    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for a, b in zip(run(ours), run(official)):
        assert a.dtype == b.dtype
        assert rel_err(a, b) < tol
    with torch.no_grad():  # without autograd: the forward-only path
        assert rel_err(ours(x), official(x)) < tol


def test_group_norm_gradcheck_in_float64():
    from jafar.layers.norm import group_norm

    x = torch.randn(2, 8, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: group_norm(x, 4, w, b), (x, w, b), fast_mode=True)
    assert torch.autograd.gradcheck(lambda x: group_norm(x, 2), (x,), fast_mode=True)


@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_under_autocast_writes_half_precision_once(affine):
    official, ours = _group_norms(affine)
    ours.impl = "var_mean"
    x = (torch.randn(1, 16, 6, 6) * 2).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x)
    assert y.dtype == torch.bfloat16  # nn.GroupNorm's float32 result, rounded once
    torch.testing.assert_close(y, official(x.float()).bfloat16(), rtol=8e-3, atol=1e-2)


def test_group_norm_saves_no_more_than_nn_group_norm_for_backward():
    # the input and the (N, G) statistics, nothing image-sized in float32 (the first var_mean
    # version did: a 4.3 -> 6.6 GB fwd+bwd peak at 448)
    official, ours = _group_norms(True)
    ours.impl = "var_mean"

    def saved_bytes(module, dtype, autocast):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        x = torch.randn(1, 16, 32, 32).to(dtype).requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            torch.nn.functional.silu(module(x))
        return sum(total)

    for dtype, autocast in ((torch.float32, False), (torch.bfloat16, True)):
        assert saved_bytes(ours, dtype, autocast) <= saved_bytes(official, dtype, autocast)


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_no_padding_copy_for_1x1_convolutions(kernel_size):
    model = JAFAR(v_dim=16, qk_dim=32, kernel_size=kernel_size).eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (1, 1)]
    assert convs and all(m.padding == (0, 0) and m.padding_mode == "zeros" for m in convs)
    with torch.no_grad(), _RecordOps() as rec:
        model(torch.randn(1, 3, 12, 12), torch.randn(1, 16, 3, 3), (12, 12))
    pads = [op for op in rec.ops if "pad" in op]
    # kernel 3: the first image convolution keeps the official reflect padding, once
    assert pads == ([] if kernel_size == 1 else ["reflection_pad2d"])
    # the state-dict keys (padding mode is not state) are the official ones
    assert set(model.state_dict()) == set(JAFAR(v_dim=16, qk_dim=32, kernel_size=kernel_size).state_dict())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("impl", ["auto", "var_mean"])  # var_mean: CUDA's default, also on the CPU here
def test_per_pixel_encoders_run_in_half_precision_under_autocast(impl, device):
    model = _random_model(v_dim=16, qk_dim=32).set_group_norm(impl).eval().to(device)
    assert all(m.impl == impl for m in model.modules() if isinstance(m, GroupNorm))
    encoders = [model.image_encoder, model.query_encoder, model.key_encoder, model.key_features_encoder]
    dtypes = {}

    def record(name):
        def hook(module, inputs, output):
            dtypes[name] = output.dtype
        return hook

    hooks = [m.register_forward_hook(record(name)) for i, enc in enumerate(encoders)
             for name, m in enc.named_modules(prefix=f"encoder{i}") if "." in name]
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        model(torch.randn(1, 3, 16, 16, device=device), torch.randn(1, 16, 2, 2, device=device), (16, 16))
    for h in hooks:
        h.remove()
    assert len(dtypes) == 4 * 11  # per encoder: the conv and 2 blocks of (norm, conv) x 2 and the block
    assert set(dtypes.values()) == {torch.bfloat16}, dtypes


def test_compile_option_keeps_outputs_and_state():
    import copy

    ref = _random_model(v_dim=16, qk_dim=32).eval()
    model = _random_model(v_dim=16, qk_dim=32)
    model.compile = dict(backend="eager")  # dynamo capture without a C++ toolchain
    model.eval()
    image, feats = torch.randn(1, 3, 12, 12), torch.randn(1, 16, 3, 3)
    with torch.no_grad():
        expected = ref(image, feats, (10, 10))
        torch.testing.assert_close(model(image, feats, (10, 10)), expected)
    assert model._compiled_encode is not None
    assert list(model.state_dict()) == list(ref.state_dict())
    clone = copy.deepcopy(model)
    assert clone._compiled_encode is None  # rebuilt for the copy, not bound to the original
    with torch.no_grad():
        clone.image_encoder[0].weight.zero_()
        assert not torch.allclose(clone(image, feats, (10, 10)), expected)
    assert "compile=" in repr(model) and "compile" not in model.config
    with pytest.raises(ValueError, match="compile must be"):
        JAFAR(compile="yes")
