"""tools/benchmark.py --upsamplers all: one table with every registered upsampler (those that need
a backbone named as skipped) beside the official JAFAR algorithm (the ``reference`` row), tiny."""

import pytest

from jafar import list_upsamplers
from jafar.upsamplers import upsampler_entry


def test_every_registered_upsampler_is_a_row_beside_the_official_algorithm(capsys):
    from tools import benchmark

    argv = ["--device", "cpu", "--sizes", "28", "--dim", "16", "--dtypes", "fp32", "--repeats", "1", "--warmup", "0",
            "--no-isolate", "--no-backward", "--modes", "reference", "auto", "--upsamplers", "all"]
    assert benchmark.main(argv) == 0
    out = capsys.readouterr()
    header = next(line for line in out.out.splitlines() if line.startswith("| output"))
    rows = [n for n in list_upsamplers() if not upsampler_entry(n).needs_backbone]
    assert {"carafe", "dysample", "sapa", "resfu", "loftup", "anyup", "featup", "lift", "jafar"} <= set(rows)
    for name in ["reference", "auto", *rows]:
        assert f"forward ({name})" in header
    for name in (n for n in list_upsamplers() if upsampler_entry(n).needs_backbone):
        assert f"skipping the {name!r} upsampler" in out.err
    row = next(line for line in out.out.splitlines() if line.startswith("| 28x28 | 2x2 | fp32 |"))
    assert row.count(" ms |") == 2 + len(rows)


def test_all_is_the_only_special_name():
    from tools import benchmark

    with pytest.raises(SystemExit):
        benchmark.main(["--device", "cpu", "--sizes", "28", "--upsamplers", "every"])


def test_cost_table_states_parameters_gflops_and_the_floor():
    from tools import benchmark

    rows = [dict(mode="auto", size=224, params=628480, gflops=42.0, fwd_ms=420.0),
            dict(mode="bilinear", size=224, params=0, gflops=0.0, fwd_ms=30.0)]
    table = benchmark.cost_table(rows, rate=210.0)  # 42 GFLOPs at 210 GFLOP/s: a 200 ms floor
    auto = next(line for line in table.splitlines() if line.startswith("| auto |"))
    assert auto == "| auto | 628,480 | 42.0 | 200 ms | 2.1x |"
    assert "| bilinear | 0 | 0.0 | 0 ms | - |" in table  # no floor to divide by
    assert benchmark.cost_table(rows).splitlines()[2] == "| auto | 628,480 | 42.0 |"  # GPU: no rate, no floor


def test_a_configuration_counts_its_parameters_and_flops():
    from tools import benchmark

    r = benchmark.measure(28, "auto", "fp32", "cpu", dim=16, warmup=0, repeats=1, backward=False)
    assert r["params"] == sum(p.numel() for p in benchmark.JAFAR(v_dim=16).parameters())
    assert r["gflops"] > 0
