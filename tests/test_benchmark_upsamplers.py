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
