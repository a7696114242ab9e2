"""``tools/gpu_report.py --smoke``: the GPU report at toy sizes on the CPU, so that the script a GPU
machine runs, once and with no second try, cannot rot."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "gpu_report.py"

#: what the GPU machines lack (docs/benchmarks.md, "GPU report"): the smoke run must not import any of them
ABSENT = ("hydra", "omegaconf", "spconv", "nuscenes")

SECTIONS = ("## GPU report (--smoke): CPU", "### Kernel correctness", "### JAFAR upsampler", "### Pretraining step",
            "### BeV training step", "### Not measured")


def _tool():
    from tools import gpu_report

    return gpu_report


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA available: the smoke run would time the GPU")
def test_smoke_run_writes_every_section_without_the_packages_the_gpu_machine_lacks(tmp_path):
    """The smoke run in a fresh interpreter in which Hydra, OmegaConf, spconv and nuscenes-devkit
    cannot be imported (as on the GPU machines). About 50 s on one thread, over the 30 s rule
    for a reason: the GPU runs this script once per session with no second try, so every section
    runs here, and bf16 autocast on the CPU (the official precision of its JAFAR and pretraining
    rows) is ~45x slower than float32 even at these toy sizes."""
    out = tmp_path / "report"
    runner = textwrap.dedent(f"""
        import importlib.abc, os, runpy, sys

        class Absent(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {ABSENT!r}:
                    raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: the GPU machine lacks it)")
                return None

        sys.meta_path.insert(0, Absent())
        os.environ.pop("TRITON_INTERPRET", None)
        sys.argv = [{str(TOOL)!r}, "--smoke", "--out", {str(out)!r}]
        try:
            runpy.run_path({str(TOOL)!r}, run_name="__main__")
        except SystemExit as e:
            sys.exit(e.code)
    """)
    proc = subprocess.run([sys.executable, "-c", runner], capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]

    report = (out / "report.md").read_text()
    data = json.loads((out / "report.json").read_text())
    for heading in SECTIONS:
        assert heading in report, heading
    assert "--smoke" in report and "torch " in report and "Triton" in report
    assert "Skipped: no CUDA device and TRITON_INTERPRET is not 1" in report  # the checks, said so
    assert "pointbev" in report and "spconv" in report or "not run (--smoke)" in report

    assert data["done"] and not data["errors"], data["errors"]
    assert data["checks"]["status"] == "skipped"
    env = data["environment"]
    assert env["smoke"] and env["torch"] == torch.__version__ and "triton" in env and env["device"].startswith("CPU")
    jafar = {(r["size"], r["dtype"], r["mode"]) for r in data["jafar"]}
    assert {(32, "bf16", "reference"), (32, "bf16", "auto"), (32, "tf32", "reference"), (32, "tf32", "auto"),
            (48, "bf16", "auto")} <= jafar
    assert all(isinstance(r["fwd_ms"], float) and isinstance(r["fwdbwd_ms"], float) for r in data["jafar"])
    assert [r["mode"] for r in data["pretrain"]] == ["reference", "auto"]
    assert {(r["model"], r["upsampler"]) for r in data["bev"]} == {
        ("simplebev", "none"), ("simplebev", "jafar"), ("bevformer", "none"), ("bevformer", "jafar")}
    assert all(r["gflops"] > 0 and r["step_ms"] > 0 for r in data["bev"])
    skipped = {s["item"]: s["reason"] for s in data["skipped"]}
    assert "Triton" in skipped["JAFAR 32 bf16 auto+enc=triton"] and "compile" in skipped["JAFAR 32 bf16 auto+compile"]


def test_budget_cuts_every_part_and_still_writes_the_report(tmp_path):
    tool = _tool()
    assert tool.main(["--smoke", "--device", "cpu", "--budget-s", "0", "--sections", "jafar", "pretrain", "bev",
                      "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["done"] and not data["jafar"] and not data["bev"] and not data["pretrain"]
    reasons = {s["item"]: s["reason"] for s in data["skipped"]}
    assert reasons["JAFAR 32 bf16 auto"].startswith("budget") and reasons["BeV simplebev jafar"].startswith("budget")
    assert all(r.startswith("budget") or "--smoke" in r for r in reasons.values()), reasons
    report = (tmp_path / "report.md").read_text()
    assert "budget" in report and "### BeV training step" in report
    assert "Skipped: not asked for (--sections)" in report


def test_a_failing_kernel_check_stops_the_report_with_status_1(tmp_path, monkeypatch):
    tool = _tool()

    def fail(self):
        self.checks = {"status": "failed", "failures": ["plain/bf16 out: 1.0e+00 > 1e-02"], "results": {},
                       "markdown": "| case |", "interpreter": False, "cases": "all"}
        return False

    monkeypatch.setattr(tool.Round, "run_checks", fail)
    assert tool.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 1
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["checks"]["status"] == "failed" and not data["jafar"]
    assert "**FAILED** (1 failures: plain/bf16" in (tmp_path / "report.md").read_text()


def test_a_full_report_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA available")
    with pytest.raises(SystemExit):
        _tool().main(["--device", "cpu"])


def test_an_item_running_past_the_budget_is_cut_and_the_report_still_written(tmp_path, monkeypatch):
    import time

    tool = _tool()
    ran = []

    def slow():
        ran.append("slow")
        time.sleep(30)

    monkeypatch.setattr(tool, "GRACE_S", 0.5)
    monkeypatch.setattr(tool, "plan", lambda rnd: [("jafar", "slow item", 0, slow),
                                                   ("jafar", "next item", 0, lambda: ran.append("next"))])
    started = time.perf_counter()
    assert tool.main(["--smoke", "--device", "cpu", "--budget-s", "1", "--sections", "jafar",
                      "--out", str(tmp_path)]) == 0
    assert time.perf_counter() - started < 10 and ran == ["slow"]
    reasons = {s["item"]: s["reason"] for s in json.loads((tmp_path / "report.json").read_text())["skipped"]}
    assert "past the budget" in reasons["slow item"] and reasons["next item"].startswith("budget")


def test_the_gpu_report_renders_targets_and_readings(tmp_path, monkeypatch):
    """The GPU-only parts of the report (targets, peaks, the PointBeV row), from made-up rows."""
    import argparse

    tool = _tool()
    monkeypatch.setattr(tool, "_spconv_available", lambda: False)
    args = argparse.Namespace(smoke=False, budget_s=480.0, out=tmp_path, argv=["--out", str(tmp_path)], commit="abc1234")
    rnd = tool.Round(args, dict(tool.FULL), torch.device("cpu"))
    rnd.cuda = True

    def row(size, dtype, mode, fwd, fwdbwd):
        return dict(size=size, keys=size // 14, mode=mode, dtype=dtype, fwd_ms=fwd, fwd_gb=0.5, fwdbwd_ms=fwdbwd,
                    fwdbwd_gb=2.5, group="jafar")

    rnd.jafar = [row(448, "bf16", "reference", 49.0, 78.0), row(448, "bf16", "auto", 10.0, 90.0),
                 row(448, "bf16", "auto+enc=triton", 2.5, 14.0), row(896, "bf16", "auto", 80.0, 480.0),
                 row(896, "bf16", "auto+enc=triton", 20.0, 300.0), row(448, "bf16", "auto+gn=triton", 11.0, "OOM")]
    rnd.pretrain = [{"mode": "reference", "step_ms": 120.0, "steps_per_s": 8.3, "peak_gb": 20.0},
                    {"mode": "auto", "step_ms": 100.0, "steps_per_s": 10.0, "peak_gb": 9.0}]
    rnd.bev = [{"model": "simplebev", "upsampler": u, "features": f, "gflops": g, "config": "configs/model/simplebev.yaml",
                "step_ms": 100.0, "repeats": 10, "peak_gb": 3.0}
               for u, f, g in (("none", "16x34", 289.7), ("jafar", "32x68", 309.3))]
    rnd.checks = {"status": "passed", "results": {}, "failures": [], "markdown": "| case |", "interpreter": False,
                  "cases": "all"}
    env = dict(device="NVIDIA H200", torch="2.11.0", cuda="13.0", triton="3.6.0", python="3.12.3", commit="abc1234",
               date="2026-12-02T00:00:00", smoke=False, budget_s=480.0, triton_interpret=False, capability="9.0",
               memory_gb=139.8, multiprocessors=132)
    report = tool.render(rnd, env, True)
    assert report.startswith("## GPU report: NVIDIA H200, commit abc1234")
    assert "Triton 3.6.0" in report and "compute capability 9.0" in report and "**PASSED** on the GPU" in report
    assert "| speed target (`auto`) | measured | met |" in report
    assert "| 448 bf16 forward <= 3 ms | 2.5 ms | yes |" in report  # the fused encoders' table
    assert "`auto+enc=triton` against `auto` (>1x: faster): forward 448 bf16 4.00x" in report
    assert "**wins everywhere measured**" in report
    assert "| simplebev | jafar | 32x68 | 309.3 | +6.8 % | +3.1 % | 100.0 ms | 3.00 GB | not recorded |" in report
    assert "| pointbev | none, bilinear, jafar | not run: it needs spconv" in report
    assert "| `auto` (attention `auto` (the default)) | 100.0 ms | 10.00 | 9.00 GB | 1.20x |" in report
