"""The Triton kernel (run by Triton's interpreter on the CPU) and the GPU GroupNorm path."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT
from jafar.model import group_norm_var_mean

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import json, torch
    from jafar.attention import head_averaged_attention, reference_attention
    out = []
    torch.manual_seed(0)
    cases = [  # (B, Nq, Nk, heads, d, C, logit scale)
        (2, 37, 11, 4, 16, 24, 1.0),     # plain, batch 2
        (1, 45, 1, 4, 16, 20, 1.0),      # a single key
        (1, 33, 70, 2, 32, 48, 40.0),    # peaked, large logits; keys not a multiple of the block
        (1, 20, 17, 4, 16, 16, 1.0),     # heads that disagree (random q per head)
    ]
    for b, nq, nk, h, d, c, sc in cases:
        q = (torch.randn(b, nq, h * d) * sc).requires_grad_()
        k = torch.randn(b, nk, h * d).requires_grad_()
        f = torch.randn(b, nk, c).requires_grad_()
        g = torch.randn(b, nq, c)
        ref = reference_attention(q, k, f, h)
        rg = torch.autograd.grad((ref * g).sum(), (q, k, f))
        o = head_averaged_attention(q, k, f, h, mode="triton")
        og = torch.autograd.grad((o * g).sum(), (q, k, f))
        err = lambda a, r: ((a - r).norm() / r.norm().clamp_min(1e-12)).item()  # single key: zero grads
        out.append([err(o, ref)] + [err(a, r) for a, r in zip(og, rg)])
    # half-precision inputs: the kernel's low-precision path (fp16: Triton's interpreter
    # mis-emulates bf16 loads and stores; bf16 is checked on the GPU, tests/test_model.py)
    q, k, f = torch.randn(1, 40, 64), torch.randn(1, 30, 64), torch.randn(1, 30, 32)
    ref = reference_attention(q, k, f, 4)
    o = head_averaged_attention(q.half(), k.half(), f.half(), 4, mode="triton")
    out.append([((o.float() - ref).norm() / ref.norm()).item(), str(o.dtype)])
    print(json.dumps(out))
""")


def test_triton_kernel_matches_reference_in_the_interpreter():
    if torch.cuda.is_available():
        # the kernel itself runs in tests/test_model.py there; and the interpreter of Triton 3.6
        # (on the lent GPU machine) fails on this kernel where 3.8 (CI's) runs it
        pytest.skip("CUDA available: the compiled kernel is tested instead")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    *exact, (half_err, half_dtype) = json.loads(res.stdout.strip().splitlines()[-1])
    for errors in exact:
        assert errors[0] < 1e-5, errors  # output
        assert max(errors[1:]) < 1e-4, errors  # gradients of q, k, f
    assert half_dtype == "torch.float16" and half_err < 2e-2


def test_triton_mode_refuses_a_plain_cpu_tensor():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter enabled")
    from jafar.attention import head_averaged_attention

    with pytest.raises(RuntimeError, match="needs Triton and a CUDA device"):
        head_averaged_attention(torch.randn(1, 4, 32), torch.randn(1, 3, 32), torch.randn(1, 3, 8), 2, mode="triton")


@pytest.mark.parametrize("affine", [True, False])
def test_var_mean_group_norm_equals_group_norm(affine):
    x = torch.randn(2, 16, 7, 9) * 3 + 1
    w, b = (torch.randn(16), torch.randn(16)) if affine else (None, None)
    torch.testing.assert_close(group_norm_var_mean(x, 8, w, b, 1e-5), F.group_norm(x, 8, w, b, 1e-5),
                               rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert group_norm_var_mean(x.bfloat16(), 8, w, b).dtype == torch.float32
    assert group_norm_var_mean(x.double(), 8).dtype == torch.float64
