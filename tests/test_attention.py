import math

import pytest
import torch

from conftest import rel_err
from jafar.kernels.checks import cases as kernel_checks
from jafar.layers.attention import chunk_rows, head_averaged_attention, reference_attention


def _inputs(b=2, nq=37, nk=11, heads=4, d=8, c=24, dtype=torch.float64, scale_logits=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, nq, heads * d, generator=g) * scale_logits).to(dtype).requires_grad_()
    k = torch.randn(b, nk, heads * d, generator=g).to(dtype).requires_grad_()
    f = torch.randn(b, nk, c, generator=g).to(dtype).requires_grad_()
    return q, k, f


def test_reference_is_head_averaged_softmax_times_values():
    q, k, f = _inputs(heads=2, d=3)
    out = reference_attention(q, k, f, 2)
    expected = 0
    for h in range(2):
        s = q[..., 3 * h:3 * h + 3] @ k[..., 3 * h:3 * h + 3].transpose(1, 2) / math.sqrt(3)
        expected = expected + torch.softmax(s, -1) @ f / 2
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("mode", ["chunked", "sdpa"])
def test_gradcheck_in_float64(mode):
    q, k, f = _inputs(b=1, nq=9, nk=5, heads=2, d=3, c=4)
    fn = lambda q, k, f: head_averaged_attention(q, k, f, 2, mode=mode, memory_budget=600)  # noqa: E731
    assert chunk_rows(1, 5, 4, 2, 600) < 9  # several chunks
    assert torch.autograd.gradcheck(fn, (q, k, f))


@pytest.mark.parametrize("mode", ["chunked", "sdpa"])
@pytest.mark.parametrize("case", [
    dict(),                                   # plain
    dict(nk=1),                               # a single key
    dict(nq=1),                               # a single query
    dict(scale_logits=30.0),                  # peaked softmax, large logits
    dict(nk=257, c=64),                       # keys not a multiple of any block size
])
def test_fast_paths_match_reference_outputs_and_gradients(mode, case):
    q, k, f = _inputs(dtype=torch.float32, **case)
    grad = torch.randn(q.shape[0], q.shape[1], f.shape[2])
    ref = reference_attention(q, k, f, 4)
    ref_grads = torch.autograd.grad((ref * grad).sum(), (q, k, f))
    out = head_averaged_attention(q, k, f, 4, mode=mode, memory_budget=50_000)
    grads = torch.autograd.grad((out * grad).sum(), (q, k, f))
    assert rel_err(out, ref) < 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-4


def test_heads_that_disagree_are_averaged_not_mixed():
    # head 0 attends to key 0 only, head 1 to key 1 only: the output is the mean of both values
    q = torch.zeros(1, 1, 2)
    k = torch.tensor([[[50.0, -50.0], [-50.0, 50.0]]])
    q[0, 0] = torch.tensor([1.0, 1.0])
    f = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    for mode in ("reference", "chunked", "sdpa"):
        out = head_averaged_attention(q, k, f, num_heads=2, scale=1.0, mode=mode)
        torch.testing.assert_close(out, torch.tensor([[[0.5, 0.5]]]), atol=1e-6, rtol=0)


def test_gradients_only_for_inputs_that_need_them():
    q, k, f = _inputs(dtype=torch.float32)
    f = f.detach()
    out = head_averaged_attention(q, k, f, 4, mode="chunked")
    gq, gk = torch.autograd.grad(out.sum(), (q, k))
    assert gq.shape == q.shape and gk.shape == k.shape


def test_chunk_rows_respects_the_budget():
    rows = chunk_rows(batch=1, num_keys=1024, channels=384, num_heads=4, memory_budget=256 * 2**20)
    per_row = 4 * ((3 * 4 + 2) * 1024 + 6 * 384)
    assert rows == (256 * 2**20) // per_row
    assert chunk_rows(1, 10**9, 384, 4, 1) == 1  # never zero


def test_bad_shapes_are_refused():
    q, k, f = _inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="do not agree"):
        head_averaged_attention(q, k[:, :3], f, 4)
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        head_averaged_attention(q, k, f, 5)
    with pytest.raises(ValueError, match="attention mode must be one of"):
        head_averaged_attention(q, k, f, 4, mode="flash")


@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
@pytest.mark.parametrize("mode", ["chunked", "sdpa"])
@pytest.mark.parametrize("case", kernel_checks.CASES, ids=[c.name for c in kernel_checks.CASES])
def test_fast_paths_on_the_kernel_cases(case, mode, dtype):
    # the seeded cases of the Triton kernels (tests/test_kernels.py): peaked and huge logits,
    # a single key, heads that disagree, 3 heads of width 8, widths 64/96/1536, 128x128 keys
    errors = kernel_checks.run_case(case, dtype, "cpu", mode=mode)
    assert max(errors.values()) < kernel_checks.TOLERANCE[dtype], errors
