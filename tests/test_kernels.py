"""The Triton attention kernels: the seeded cases of ``jafar/kernels/checks/cases.py`` (outputs and the
gradients of q, k, f, and through the module those of the image and the features) against the
reference path, on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, in a
subprocess: the interpreter is chosen when the kernels are defined) and on CUDA where there is
one."""

import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from jafar.kernels.checks import cases as kc
from jafar.layers.attention import head_averaged_attention, reference_attention, resolve_mode

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
ALL_CASES = [c.name for c in kc.CASES]

#: one interpreter subprocess per group (each pays a few seconds of start-up), so that no test
#: waits for all of them; each case runs in its ``interpreter_dtypes``
GROUPS = {
    "fp32": dict(dtypes=["fp32"], cases=ALL_CASES),
    "half": dict(dtypes=["bf16", "fp16"], cases=ALL_CASES),
    "module": dict(dtypes=["fp32", "bf16"], cases=[], module=True),
}
INTERPRETED = {f"{c.name}/{dt}": group for group, spec in GROUPS.items() for c in kc.CASES
               if c.name in spec["cases"] for dt in spec["dtypes"] if dt in c.interpreter_dtypes}
INTERPRETED.update({f"module/{dt}": "module" for dt in GROUPS["module"]["dtypes"]})


@functools.lru_cache(maxsize=None)
def _interpreted(group: str) -> dict:
    spec = GROUPS[group]
    cmd = [sys.executable, "-m", "jafar.kernels.checks.cases", "--device", "cpu", "--dtypes", *spec["dtypes"],
           "--cases", *spec["cases"]] + ([] if spec.get("module") else ["--no-module"])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("key", sorted(INTERPRETED))
def test_kernels_match_reference_in_the_interpreter(key):
    if CUDA:
        # the compiled kernels run the same cases below; the interpreter of Triton 3.6 (on the
        # GPU machines) fails on these kernels where 3.8 (CI's) runs them
        pytest.skip("CUDA available: the compiled kernels are tested instead")
    errors = _interpreted(INTERPRETED[key])[key]
    assert max(errors.values()) < kc.tolerance(key), errors


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["fp32", "tf32", "bf16", "fp16"])
@pytest.mark.parametrize("case", kc.CASES, ids=ALL_CASES)
def test_kernels_match_reference_on_cuda(case, dtype):
    errors = kc.run_case(case, dtype, "cuda")
    assert max(errors.values()) < kc.TOLERANCE[dtype], errors


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_module_gradients_match_reference_on_cuda(dtype):
    errors = kc.module_case("cuda", dtype)
    assert max(errors.values()) < kc.tolerance(f"module/{dtype}"), errors


def test_interpreter_cases_cover_what_the_issue_asks():
    by_name = {c.name: c for c in kc.CASES}
    assert by_name["single_key"].keys == 1
    assert by_name["keys_128x128"].keys == 128 * 128
    assert {64, 96, 1536} <= {c.channels for c in kc.CASES}
    assert any(c.keys % 16 and c.keys > 64 for c in kc.CASES)  # several tiles, the last partial
    # every case in fp32 and in at least one half dtype under the interpreter
    for c in kc.CASES:
        assert f"{c.name}/fp32" in INTERPRETED
        assert f"{c.name}/bf16" in INTERPRETED or f"{c.name}/fp16" in INTERPRETED or c.name.startswith(
            ("width_64", "width_1536", "keys_")), c.name  # those: half precision on the GPU only


def test_huge_logits_case_overflows_float16_before_and_after_scaling():
    case = next(c for c in kc.CASES if c.name == "huge_logits")
    q, k, f, _ = kc.make_inputs(case, torch.float16)
    d = case.head_dim
    logits = torch.einsum("bqhd,bkhd->bhqk", q.double().unflatten(-1, (case.heads, d)),
                          k.double().unflatten(-1, (case.heads, d)))
    assert (logits.abs() / math.sqrt(d) > 65504).any()  # beyond float16 after scaling, and so before
    # the official algorithm in float16 overflows on it; ours does not (CPU: the chunked path)
    assert not torch.isfinite(reference_attention(q, k, f, case.heads)).all()
    assert torch.isfinite(head_averaged_attention(q, k, f, case.heads, mode="chunked")).all()


def test_heads_disagree_case_peaks_each_head_on_a_different_key():
    case = next(c for c in kc.CASES if c.name == "heads_disagree")
    q, k, f, _ = kc.make_inputs(case, torch.float32)
    targets = kc.head_targets(case, q, k)  # (B, H, Nq)
    assert all(len(set(targets[0, :, i].tolist())) == case.heads for i in range(case.queries))
    probs = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q.unflatten(-1, (case.heads, -1)),
                                       k.unflatten(-1, (case.heads, -1))) / math.sqrt(case.head_dim), -1)
    assert probs.amax(-1).min() > 0.9  # peaked, but not so much that the gradients vanish
    assert probs.amax(-1).max() < 0.9999


def test_error_is_relative_and_absolute_where_the_reference_vanishes():
    ref = torch.tensor([3.0, 4.0])
    assert kc.error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert kc.error(torch.tensor([1e-3, 0.0]), torch.zeros(2)) == pytest.approx(1e-3)
    assert kc.error(torch.tensor([float("nan"), 0.0]), ref) == math.inf
    assert kc.failures({"plain/fp32": {"out": 2e-5, "dq": 0.0}}) == ["plain/fp32 out: 2.00e-05 > 1e-05"]


def test_tf32_inputs_are_tf32_numbers():
    x = torch.tensor([1.0, 1.0 + 2**-11, 1.0 + 3 * 2**-12, -(1.0 + 2**-11), 300.123, 0.0])
    assert kc.round_to_tf32(x).tolist() == [1.0, 1.0 + 2**-10, 1.0 + 2**-10, -(1.0 + 2**-10), 300.0, 0.0]
    q = kc.make_inputs(kc.CASES[0], torch.float32, tf32=True)[0]
    assert (q.view(torch.int32) & 0x1FFF).eq(0).all()  # 10 mantissa bits: what the tensor cores read


def test_auto_mode_picks_the_kernel_on_cuda_for_half_and_tf32_only():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        assert resolve_mode("auto", cuda, dtype=torch.bfloat16) == "triton"
        assert resolve_mode("auto", cuda, dtype=torch.float16) == "triton"
        assert resolve_mode("auto", cuda, dtype=torch.float32) == "chunked"  # exact float32: cuBLAS is faster
        assert resolve_mode("auto", cuda, dtype=torch.float64) == "chunked"
        assert resolve_mode("auto", cpu, dtype=torch.bfloat16) == "chunked"
        torch.backends.cuda.matmul.allow_tf32 = True
        assert resolve_mode("auto", cuda, dtype=torch.float32) == "triton"
        assert resolve_mode("auto", cpu, dtype=torch.float32) == "chunked"
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def test_triton_mode_refuses_a_plain_cpu_tensor():
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter enabled")
    with pytest.raises(RuntimeError, match="needs Triton and a CUDA device"):
        head_averaged_attention(torch.randn(1, 4, 32), torch.randn(1, 3, 32), torch.randn(1, 3, 8), 2, mode="triton")



def _benchmark_tool():
    from tools import benchmark

    return benchmark


def test_benchmark_runs_on_the_cpu_and_writes_its_own_section(tmp_path, capsys):
    bench = _benchmark_tool()
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nintro\n\n<!-- benchmark:pending -->\nto be measured\n<!-- /benchmark:pending -->\n\n"
                   "## GPU: an earlier table\n\n| kept |\n")
    argv = ["--device", "cpu", "--sizes", "28", "--dim", "32", "--dtypes", "fp32", "--repeats", "1", "--warmup",
            "0", "--no-isolate", "--check", "--check-cases", "single_key", "--out", str(out)]
    assert bench.main(argv) == 0
    text = out.read_text()
    printed = capsys.readouterr().out
    assert "| 28x28 | 2x2 | fp32 |" in printed and "| 28x28 | 2x2 | fp32 |" in text
    assert "forward (reference)" in text and "fwd+bwd peak (auto)" in text
    assert "| single_key | " in text and "FAIL" not in text  # the --check table
    assert "## GPU: an earlier table\n\n| kept |" in text and "to be measured" in text  # CPU keeps the placeholder
    assert text.index("## CPU") < text.index("## GPU: an earlier table")
    assert text.count("<!-- benchmark:CPU") == 1


def test_benchmark_section_replaces_the_pending_placeholder_for_a_gpu(tmp_path):
    bench = _benchmark_tool()
    out = tmp_path / "b.md"
    out.write_text("# B\n\n<!-- benchmark:pending -->\nto be measured\n<!-- /benchmark:pending -->\n\n## Old\n")
    bench.write_section(out, "NVIDIA H100 80GB HBM3", "## GPU: NVIDIA H100 80GB HBM3, current code\n\n| a |", True)
    text = out.read_text()
    assert "to be measured" not in text and text.index("## GPU: NVIDIA H100") < text.index("## Old")
    bench.write_section(out, "NVIDIA H100 80GB HBM3", "## GPU: NVIDIA H100 80GB HBM3, current code\n\n| b |", True)
    assert "| a |" not in out.read_text() and out.read_text().count("| b |") == 1
    assert bench.parse_mode("auto+compile+gn=native") == dict(attention="auto", compile=True, gn="native",
                                                              encoders="torch")
    assert bench.parse_mode("auto+enc=triton")["encoders"] == "triton"
    assert bench.parse_mode("reference")["gn"] == "official"
    with pytest.raises(ValueError, match="unknown option"):
        bench.parse_mode("auto+fast")
    with pytest.raises(ValueError, match="cannot be combined"):
        bench.parse_mode("auto+compile+enc=triton")


def test_benchmark_tunes_launch_configurations_in_the_interpreter(tmp_path):
    if CUDA:
        pytest.skip("CUDA available: tools/benchmark.py --tune runs on the GPU")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT),
               JAFAR_TRITON_CONFIG='{"fwd": {"num_warps": 8}}')
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--device", "cpu", "--tune", "--modes", "--sizes",
           "14", "--dtypes", "bf16", "--repeats", "1", "--warmup", "0", "--tune-candidates", "1",
           "--out", str(tmp_path / "b.md")]
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    text = (tmp_path / "b.md").read_text()
    # the environment's configuration is the default, timed first; one row per kernel
    assert "| 14x14 | bf16 | fwd | 64x64x128, 8 warps, 2 stages (default) |" in text
    assert "| bwd_dq |" in text and "| bwd_dkdf |" in text and "JAFAR_TRITON_CONFIG='" in text
    assert "| 14x14 | bf16 | encoder | 32 pixels, 8 warps, 2 stages, 2 programs/SM (default) |" in text


def test_kernel_configuration_from_the_environment(monkeypatch):
    from jafar.kernels import attention as kernels

    saved = {k: dict(v) for k, v in kernels.CONFIGS.items()}
    try:
        monkeypatch.setenv("JAFAR_TRITON_CONFIG", '{"bwd_dq": {"num_warps": 8, "block_c": 32}}')
        kernels._merge_env_config()
        assert kernels.CONFIGS["bwd_dq"] == dict(saved["bwd_dq"], num_warps=8, block_c=32)
        for bad in ('{"bwd": {}}', '{"fwd": {"warps": 8}}', "num_warps=8"):
            monkeypatch.setenv("JAFAR_TRITON_CONFIG", bad)
            with pytest.raises(ValueError, match="JAFAR_TRITON_CONFIG must be JSON"):
                kernels._merge_env_config()
    finally:
        for k, v in saved.items():  # in place: other modules hold these dicts
            kernels.CONFIGS[k].clear()
            kernels.CONFIGS[k].update(v)


def test_kernels_compile_for_an_h100_without_a_gpu():
    # the interpreter runs Python, not the compiler: this goes through Triton's sm_90 pipeline down
    # to the cubin (types, layouts, shared memory), as the GPU will at its first call
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("interpreter enabled: the kernels are not compilable functions")

    from jafar.kernels.checks.compile import compile_attention

    compiled = compile_attention(torch.bfloat16, num_heads=4, head_dim=32, arch=90)
    assert set(compiled) == {"fwd", "fwd_stats", "fwd_from_lse", "bwd_dq", "bwd_dkdf"}
    for kernel in compiled.values():
        assert kernel.asm["cubin"] and kernel.metadata.shared <= 232448  # an H100 block's shared memory


_CAST_SCRIPT = r"""
import json, torch, triton, triton.language as tl
from jafar.kernels.checks import interpreter; interpreter.apply()  # the interpreter fixes

@triton.jit
def cast(X, Y, N: tl.constexpr):
    o = tl.arange(0, N)
    tl.store(Y + o, tl.load(X + o).to(tl.bfloat16))

g = torch.Generator().manual_seed(0)
x = torch.cat([torch.randn(1020, generator=g) * 10, torch.tensor([0.0, -0.0, 1e-40, 3.0e38])])
x[5] = 1.0 + 2.0 ** -8  # a tie: rounds to even (1.0), where truncation also gives 1.0
x[6] = 1.0 + 3 * 2.0 ** -9  # above half an ulp: rounds up, truncation goes down
y = torch.empty(1024, dtype=torch.bfloat16)
cast[(1,)](x, y, N=1024)
print(json.dumps(int((y.view(torch.int16) != x.to(torch.bfloat16).view(torch.int16)).sum())))
"""


def test_interpreter_casts_to_bfloat16_as_the_gpu_does():
    # Triton's interpreter truncates float32 -> bfloat16; jafar/kernels/checks/interpreter.py makes it round to nearest
    # even, as the GPU and torch do, so that the bf16 checks under the interpreter mean something
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", _CAST_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == 0  # bit for bit
