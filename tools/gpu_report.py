#!/usr/bin/env python
r"""The GPU report: everything we claim about speed and memory, measured in one command
of at most ``--budget-s`` seconds (default 480, eight minutes) on one H100/H200, written as one
Markdown report (and JSON) that ``docs/benchmarks.md`` takes verbatim.

What it runs, in this order (each later part only while the budget lasts; what it skips is listed
in the report with the reason):

1. **Kernel correctness**: the seeded cases of ``jafar/kernels/checks/cases.py`` on the GPU (through
   ``tools/benchmark.py``'s ``run_checks``: the Triton attention in fp32, tf32, bf16 and fp16, the
   module's gradients, the fused encoders, the Triton GroupNorm). If one fails the run writes the
   report and stops with status 1: no timing of wrong kernels.
2. **JAFAR** (``tools/benchmark.py``'s ``measure``, the official ``test_time_and_memory.py``
   protocol): forward and forward+backward, median of ``--repeats`` (>= 20) runs after warm-up,
   peak ``max_memory_allocated``, at 448 (bf16 and TF32) and 896 (bf16); the official algorithm
   (``reference``: ``attention="reference"``, ``group_norm="official"``) beside ours (``auto``);
   then the options worth choosing among: ``auto+enc=triton`` (``JAFAR(encoders="triton")``),
   ``auto+gn=triton`` (``group_norm="triton"``), both, ``auto+compile`` (``compile=True``),
   ``auto+gn=native``; then a short launch-configuration sweep (``run_tuning``: the first four
   candidates per kernel, the default first, at 448 and then 896 in bf16).
3. **Pretraining step** (``tools/bench_pretrain.py``'s ``bench``: the official recipe, 448
   images, batch 4, frozen DINOv2 ViT-S/14 with random weights, bf16 autocast, AdamW), the
   official attention beside ours.
4. **BeV training step** in the paper's setting (Table 14): six 224x476 images, batch 1, the
   DINOv2 ViT-S/14 architecture with random weights, the 200x200x8 grid, forward + backward +
   AdamW in float32 (the BeV config's ``trainer.precision: 32-true``), for ``simplebev``
   and ``bevformer`` x ``none | bilinear | jafar`` (heads built from ``configs/model/*.yaml``
   by importing their classes: no Hydra); PointBeV only where spconv is installed (the table says
   where it is not).

Plain Python: torch, Triton, timm, Lightning (the pretraining step) and PyYAML (the head
configs) only; no Hydra, OmegaConf, nuscenes-devkit or spconv. On a GPU machine::

    python3 tools/gpu_report.py --out "$OUT" --commit <commit>   # at most 8 minutes; report.md, report.json

``--smoke`` runs every part at toy sizes (32-pixel JAFAR, a one-block ViT, a 25x25 BeV grid) in
seconds on the CPU, so that the script cannot rot (``tests/test_gpu_report.py``); there the kernel
checks and the Triton options are skipped unless ``TRITON_INTERPRET=1``.

What to do with the numbers (the defaults follow them):

* ``docs/benchmarks.md``: the report replaces the placeholder between the ``<!-- gpu-report -->``
  markers of its "GPU report" section, verbatim.
* Fused encoders: if ``auto+enc=triton`` (or ``auto+enc=triton+gn=triton``) has the fastest
  forward at 448 and 896 (and, for training, the fastest fwd+bwd), make ``encoders="triton"`` what
  JAFAR uses on CUDA (``JAFAR(encoders=...)`` in ``jafar/upsamplers/jafar.py`` and
  ``configs/upsampler/jafar.yaml``).
* GroupNorm: if ``auto+gn=triton`` beats ``auto`` in forward and fwd+bwd, make ``"triton"`` what
  ``GroupNorm(impl="auto")`` picks on CUDA (``jafar/layers/norm.py``); if ``auto+gn=native`` beats
  ``auto``, the var_mean path goes.
* ``compile=True``: the default only if it beats the best uncompiled option by a clear margin
  (its compile time is paid once per shape).
* Launch configurations: the "Fastest at the largest output" line of the sweep goes into
  ``CONFIGS`` of ``jafar/kernels/attention.py`` (the four kernels, the fused encoder kernel among them).
* Options that lose everywhere are removed from the code; their numbers stay in the docs.
* The README's performance sentence and ``docs/pretraining.md`` / ``docs/bev.md`` (the cost
  table's GPU columns) take the 448 bf16, pretraining and BeV numbers; the speed targets are
  in the report's targets table (448 bf16: forward <= 3 ms and <= 1 GB, fwd+bwd <= 15 ms and
  <= 3 GB; 896 forward <= 25 ms).
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # the budget counts from here when run as a script (imports included)

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import sys
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


#: ``tools/benchmark.py``: ``measure``, ``_timed``, ``parse_mode``, ``run_checks``, ``run_tuning``,
#: ``targets_table`` (importing it also applies the interpreter's bfloat16 fix under TRITON_INTERPRET=1)
from tools import benchmark as bench  # noqa: E402

BACKBONE = "vit_small_patch14_dinov2.lvd142m"

#: the paper's Table 14 as far as this repository records it (docs/bev.md quotes JAFAR's GFLOPs over
#: no upsampling per head). Its GPU memory column is in neither docs/bev.md nor tools/bev_cost.py:
#: ``PAPER_MEMORY_GB[(model, upsampler)]`` is where those numbers go once copied from the paper.
PAPER_GFLOPS_PCT = {"simplebev": 3.1, "pointbev": 11.1, "bevformer": 6.9}
PAPER_MEMORY_GB: dict = {}

#: sizes of a full report and of ``--smoke`` (CPU, seconds)
FULL = dict(size=448, large=896, dim=384, warmup=3, repeats=20, tune_candidates=4,
            backbone_kwargs={}, bev_image=(224, 476), bev_grid={}, bev_warmup=2, bev_repeats=10,
            bev_max_s=10.0, pre_batch=4, pre_size=448, pre_steps=20, pre_warmup=3)
SMOKE = dict(size=32, large=48, dim=32, warmup=0, repeats=2, tune_candidates=1,
             backbone_kwargs=dict(depth=1, embed_dim=32, num_heads=2), bev_image=(28, 56),
             bev_grid=dict(resolution=4.0, z_bins=2),
             bev_warmup=0, bev_repeats=2, bev_max_s=1.0, pre_batch=1, pre_size=112, pre_steps=2, pre_warmup=0)

SECTIONS = ("checks", "jafar", "options", "pretrain", "bev", "compile", "tune")

#: the speed targets (448 bf16, ``tools/benchmark.py``'s TARGETS carries them and more)
TARGET_TEXT = "448 bf16: forward <= 3 ms and <= 1 GB, fwd+bwd <= 15 ms and <= 3 GB; 896 bf16 forward <= 25 ms"


def mode_text(mode: str) -> str:
    spec = bench.parse_mode(mode)
    if spec["attention"] == "reference":
        return "official algorithm (materialised attention, `nn.GroupNorm`)"
    parts = [f"attention `{spec['attention']}`"]
    if spec["encoders"] == "triton":
        parts.append('`encoders="triton"`')
    if spec["gn"] != "auto":
        parts.append(f'`group_norm="{spec["gn"]}"`')
    if spec["compile"]:
        parts.append("`compile=True`")
    return ", ".join(parts) + (" (the default)" if mode == "auto" else "")


def _needs_triton(mode: str) -> bool:
    spec = bench.parse_mode(mode)
    return spec["encoders"] == "triton" or spec["gn"] == "triton" or spec["attention"] == "triton"


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _num(x):
    """A float from a number or a formatted string; strings such as ``"OOM"`` stay."""
    if isinstance(x, (int, float)):
        return float(x)
    try:
        return float(x)
    except (TypeError, ValueError):
        return x


# --- the parts ---------------------------------------------------------------------------------

class Round:
    """The state of one run: what was measured, skipped and failed, and the report."""

    def __init__(self, args, cfg: dict, device: torch.device):
        self.args, self.cfg, self.device = args, cfg, device
        self.cuda = device.type == "cuda"
        self.started = _STARTED if __name__ == "__main__" else time.perf_counter()
        self.checks = {"status": "not run"}
        self.jafar, self.tuning, self.pretrain, self.bev = [], [], [], []
        self.tune_md = ""
        self.skipped, self.errors, self.timings, self.notes = [], [], {}, []
        self._bench_pretrain = None

    # ------------------------------------------------------------------ time
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def log(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f} s] {text}", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ checks
    def run_checks(self) -> bool:
        """The seeded kernel cases; False if one fails."""
        from jafar.kernels import attention as kernels
        from jafar.kernels.checks import cases as kc

        if not kernels.available(self.device):
            self.checks = {"status": "skipped", "reason": "no CUDA device and TRITON_INTERPRET is not 1: the Triton "
                           "kernels cannot run here (`TRITON_INTERPRET=1` runs a subset under the interpreter)"}
            self.log("kernel checks skipped: " + self.checks["reason"])
            return True
        interpreted = self.device.type == "cpu"
        # under the interpreter (CPU) a few cases only: its CPU time is the point of --smoke
        names = ["plain", "enc_plain", "gn_plain"] if interpreted else None
        results, md = bench.run_checks(str(self.device), names)
        failed = kc.failures(results)
        self.checks = {"status": "failed" if failed else "passed", "results": results, "failures": failed,
                       "markdown": md, "interpreter": interpreted,
                       "cases": "plain, enc_plain, gn_plain (the interpreter's subset)" if interpreted else "all"}
        self.log(f"kernel checks {self.checks['status']}" + (f": {failed}" if failed else ""))
        return not failed

    # ------------------------------------------------------------------ JAFAR
    def jafar_row(self, size: int, dtype: str, mode: str, group: str) -> dict:
        r = bench.measure(size=size, mode=mode, dtype=dtype, device=str(self.device), dim=self.cfg["dim"],
                          warmup=self.cfg["warmup"], repeats=self.cfg["repeats"], backward=True)
        r["group"] = group
        self.jafar.append(r)
        self.log(f"jafar {size} {dtype} {mode}: " + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items() if k.endswith(("_ms", "_gb"))))
        return r

    def tune(self, sizes) -> None:
        rows, md = bench.run_tuning(str(self.device), sizes, ["bf16"], self.cfg["warmup"], self.cfg["repeats"],
                                    self.cfg["dim"], candidates=self.cfg["tune_candidates"])
        self.tuning += rows
        self.tune_md = md if not self.tune_md else self.tune_md + "\n\n" + md

    # ------------------------------------------------------------------ pretraining
    def pretrain_row(self, mode: str) -> dict:
        """``tools/bench_pretrain.py``'s ``bench`` (its ``reference`` row: the official attention and
        GroupNorm)."""
        if self._bench_pretrain is None:
            from tools import bench_pretrain

            self._bench_pretrain = bench_pretrain
        cfg = self.cfg
        r = self._bench_pretrain.bench(mode, self.device, BACKBONE, cfg["pre_batch"], cfg["pre_size"], cfg["pre_steps"],
                                       cfg["pre_warmup"], "bf16", backbone_kwargs=cfg["backbone_kwargs"])
        row = {"mode": mode, "step_ms": _num(r["ms"]), "steps_per_s": _num(r["sps"]),
               "peak_gb": _num(r["gb"]) if self.cuda else None}
        self.pretrain.append(row)
        self.log(f"pretrain {mode}: {row}")
        return row

    # ------------------------------------------------------------------ BeV
    def build_head(self, model: str, in_channels: int, grid):
        """The head of ``configs/model/<model>.yaml`` (``--smoke``: the class's ``SMOKE_OPTIONS`` over
        it) through :func:`bev.heads.build_head`, the BeV tool's construction path; no Hydra."""
        from bev.heads import HEADS, build_head, model_config

        options = model_config(model)
        if self.args.smoke:
            options.update(getattr(HEADS.get(model), "SMOKE_OPTIONS", {}))
        return build_head(model, in_channels, grid, **options), f"configs/model/{model}.yaml"

    def bev_row(self, model: str, upsampler: str) -> dict:
        """One BeV training step (forward, backward, AdamW) as ``tools/bev_cost.py`` times it."""
        from torch.utils.flop_counter import FlopCounterMode

        import jafar
        from bev.encoder import build_multicamera_encoder
        from bev.geometry import BevGrid
        from bev.losses import SimpleBevLoss

        dev, cfg = self.device, self.cfg
        torch.manual_seed(0)
        H, W = cfg["bev_image"]
        backbone = jafar.build_backbone(BACKBONE, pretrained=False, **cfg["backbone_kwargs"])
        encoder = build_multicamera_encoder(backbone, upsampler, guidance_size="output")
        grid = BevGrid(**cfg["bev_grid"])
        head, config = self.build_head(model, encoder.out_channels, grid)
        loss = SimpleBevLoss()
        encoder, head, loss = encoder.to(dev), head.to(dev), loss.to(dev)
        params = [p for m in (encoder, head, loss) for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-7)
        batch = {k: v.to(dev) for k, v in bev_batch(H, W, grid.shape).items()}

        def step():
            out = head(encoder(batch["images"]), batch["intrinsics"], batch["cam2ego"], (H, W))
            loss(out, batch, point_mask=out.get("point_mask"))["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        # GFLOPs of one forward (FlopCounterMode cannot see Triton kernels: JAFAR's attention is counted
        # on its chunked PyTorch path, the same arithmetic), plus what each head counts analytically
        up = encoder.upsampler
        attention = getattr(up, "attention", None)
        if isinstance(attention, str):
            up.attention = "chunked"
        try:
            with torch.no_grad(), FlopCounterMode(display=False) as counter:
                head(encoder(batch["images"]), batch["intrinsics"], batch["cam2ego"], (H, W))
        finally:
            if isinstance(attention, str):
                up.attention = attention
        flops = counter.get_total_flops() + (head.uncounted_flops(6) if hasattr(head, "uncounted_flops") else 0)
        if hasattr(up, "uncounted_flops"):
            flops += up.uncounted_flops()
        _free(dev)
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        for _ in range(cfg["bev_warmup"]):
            step()
        bench._sync(dev)
        per_step = (time.perf_counter() - t0) / max(1, cfg["bev_warmup"])
        repeats = max(min(cfg["bev_repeats"], 3), min(cfg["bev_repeats"], int(cfg["bev_max_s"] / max(per_step, 1e-6))))
        ms = bench._timed(step, dev, 0, repeats)
        h, w = encoder.output_size_for(H, W)
        row = {"model": model, "upsampler": upsampler, "features": f"{h}x{w}", "gflops": flops / 1e9,
               "config": config,
               "step_ms": ms, "repeats": repeats,
               "peak_gb": torch.cuda.max_memory_allocated(dev) / 2**30 if self.cuda else None}
        self.bev.append(row)
        self.log(f"bev {model} {upsampler}: {row}")
        return row


def bev_batch(H: int, W: int, grid_shape, n: int = 6) -> dict:
    """Six cameras around the ego looking outwards (``tools/bev_cost.py``'s rig), random images and
    targets."""
    cam2ego = torch.eye(4).repeat(1, n, 1, 1)
    R = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # camera -> ego, facing +x
    for k in range(n):
        yaw = 2 * math.pi * k / n
        Rz = torch.tensor([[math.cos(yaw), -math.sin(yaw), 0.0], [math.sin(yaw), math.cos(yaw), 0.0], [0, 0, 1.0]])
        cam2ego[0, k, :3, :3] = Rz @ R
        cam2ego[0, k, :3, 3] = torch.tensor([1.0, 0.0, 1.5])
    K = torch.tensor([[0.3 * 1266.0, 0, W / 2], [0, 0.3 * 1266.0, H / 2], [0, 0, 1]]).repeat(1, n, 1, 1)
    X, Y = grid_shape
    g = torch.Generator().manual_seed(0)
    return {"images": torch.rand(1, n, 3, H, W, generator=g), "intrinsics": K, "cam2ego": cam2ego,
            "seg": (torch.rand(1, 1, X, Y, generator=g) > 0.9).float(),
            "visibility": torch.full((1, 1, X, Y), 4, dtype=torch.uint8),
            "centerness": torch.rand(1, 1, X, Y, generator=g), "offset": torch.randn(1, 2, X, Y, generator=g)}


def _spconv_available() -> bool:
    try:
        return importlib.util.find_spec("spconv") is not None
    except (ImportError, ValueError):
        return False


# --- the plan --------------------------------------------------------------------------------

def plan(rnd: Round) -> list:
    """``(section, name, estimated seconds on an H100/H200, function)`` in priority order: the
    budget check skips an item whose estimate does not fit in what is left."""
    S, L = rnd.cfg["size"], rnd.cfg["large"]
    items = []

    def jafar(section, size, dtype, mode, est):
        items.append((section, f"JAFAR {size} {dtype} {mode}", est,
                      lambda: rnd.jafar_row(size, dtype, mode, section)))

    for dtype, mode in (("bf16", "reference"), ("bf16", "auto"), ("tf32", "reference"), ("tf32", "auto")):
        jafar("jafar", S, dtype, mode, 10)
    jafar("jafar", L, "bf16", "auto", 20)
    for mode in ("auto+enc=triton", "auto+gn=triton", "auto+enc=triton+gn=triton"):
        jafar("options", S, "bf16", mode, 12)
    for mode in ("reference", "auto"):
        items.append(("pretrain", f"pretraining step {mode}", 20, lambda mode=mode: rnd.pretrain_row(mode)))
    for model, est in (("simplebev", 15), ("bevformer", 30)):
        for up in ("none", "bilinear", "jafar"):
            items.append(("bev", f"BeV {model} {up}", est, lambda model=model, up=up: rnd.bev_row(model, up)))
    if rnd.cuda and _spconv_available():  # spconv is optional
        for up in ("none", "bilinear", "jafar"):
            items.append(("bev", f"BeV pointbev {up}", 20, lambda up=up: rnd.bev_row("pointbev", up)))
    jafar("compile", S, "bf16", "auto+compile", 120)
    for mode in ("auto+enc=triton", "auto+gn=triton", "auto+enc=triton+gn=triton"):
        jafar("options", L, "bf16", mode, 25)
    for mode in ("auto+enc=triton", "auto+gn=triton"):
        jafar("options", S, "tf32", mode, 10)
    jafar("options", S, "bf16", "auto+gn=native", 8)
    items.append(("tune", f"launch configurations at {S} bf16", 45, lambda: rnd.tune([S])))
    items.append(("tune", f"launch configurations at {L} bf16", 60, lambda: rnd.tune([L])))
    return items


def _unavailable(rnd: Round, section: str, name: str):
    """Why an item cannot run here, or None."""
    from jafar.kernels import attention as kernels

    if name.startswith("JAFAR"):
        mode = name.split()[-1]
        if _needs_triton(mode) and not kernels.available(rnd.device):
            return "needs Triton on CUDA (or TRITON_INTERPRET=1 on the CPU)"
        if _needs_triton(mode) and rnd.args.smoke and rnd.device.type == "cpu" and \
                name != f"JAFAR {rnd.cfg['size']} bf16 auto+enc=triton+gn=triton":
            return "--smoke under Triton's interpreter runs one Triton row (auto+enc=triton+gn=triton)"
        if bench.parse_mode(mode)["compile"] and rnd.args.smoke:
            return "torch.compile is not run under --smoke (its compilation alone takes longer than the smoke run)"
    if section == "tune" and not kernels.available(rnd.device):
        return "needs Triton on CUDA (or TRITON_INTERPRET=1 on the CPU)"
    if section == "tune" and rnd.args.smoke and "launch configurations at" in name \
            and name.split()[3] != str(rnd.cfg["size"]):
        return "--smoke sweeps one size"
    if section == "bev" and rnd.args.smoke and "bilinear" in name:
        return "--smoke runs none and jafar"
    return None


# --- the report --------------------------------------------------------------------------------

def _ms(x):
    return x if isinstance(x, str) else "-" if x is None else f"{x:.1f} ms" if x >= 10 else f"{x:.2f} ms"


def _gb(x):
    return x if isinstance(x, str) else "-" if x is None else f"{x:.2f} GB"


def _ratio(base, x):
    if isinstance(base, (int, float)) and isinstance(x, (int, float)) and x > 0:
        return f"{base / x:.2f}x"
    return "-"


def _commit() -> str:
    """The checkout's commit, ``+ uncommitted changes`` where the tree differs from it; ``unknown
    commit`` without git (the GPU machine's copy may have none: pass ``--commit``)."""
    import subprocess

    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30)

    try:
        head = git("rev-parse", "--short", "HEAD")
        if head.returncode:
            return "unknown commit"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + (" + uncommitted changes" if dirty else "")
    except Exception:
        return "unknown commit"


def environment(rnd: Round) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    env = {"device": torch.cuda.get_device_name(rnd.device) if rnd.cuda else
           f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
           "python": platform.python_version(), "commit": rnd.args.commit or _commit(),
           "date": datetime.datetime.now().isoformat(timespec="seconds"), "smoke": rnd.args.smoke,
           "budget_s": rnd.args.budget_s, "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1"}
    if rnd.cuda:
        p = torch.cuda.get_device_properties(rnd.device)
        env.update(capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count)
    return env


def jafar_table(rnd: Round) -> str:
    rows = rnd.jafar
    auto = {(r["size"], r["dtype"]): r for r in rows if r["mode"] == "auto"}
    lines = ["| output | keys | dtype | mode | what | forward | forward peak | fwd+bwd | fwd+bwd peak | "
             "forward vs auto | fwd+bwd vs auto |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    order = {"bf16": 0, "tf32": 1, "fp32": 2, "fp16": 3}
    for r in sorted(rows, key=lambda r: (order.get(r["dtype"], 9), r["size"], r["mode"] != "reference",
                                         r["mode"] != "auto")):
        a = auto.get((r["size"], r["dtype"]), {})
        lines.append(f"| {r['size']}x{r['size']} | {r['keys']}x{r['keys']} | {r['dtype']} | `{r['mode']}` | "
                     f"{mode_text(r['mode'])} | {_ms(r.get('fwd_ms'))} | {_gb(r.get('fwd_gb'))} | "
                     f"{_ms(r.get('fwdbwd_ms'))} | {_gb(r.get('fwdbwd_gb'))} | "
                     f"{_ratio(a.get('fwd_ms'), r.get('fwd_ms'))} | {_ratio(a.get('fwdbwd_ms'), r.get('fwdbwd_ms'))} |")
    return "\n".join(lines)


def reading(rnd: Round) -> list:
    """What the JAFAR rows say, mechanically: the fastest of ours per size and dtype, each option
    against ``auto`` everywhere it was measured."""
    out = []
    ours = [r for r in rnd.jafar if r["mode"] != "reference"]
    for size, dtype in sorted({(r["size"], r["dtype"]) for r in ours}):
        group = [r for r in ours if (r["size"], r["dtype"]) == (size, dtype)]
        for key, what in (("fwd_ms", "forward"), ("fwdbwd_ms", "fwd+bwd")):
            timed = [r for r in group if isinstance(r.get(key), float)]
            if len(timed) > 1:
                best = min(timed, key=lambda r: r[key])
                out.append(f"- {size} {dtype}, fastest {what}: `{best['mode']}` ({_ms(best[key])}).")
    auto = {(r["size"], r["dtype"]): r for r in ours if r["mode"] == "auto"}
    for mode in dict.fromkeys(r["mode"] for r in ours if r["mode"] != "auto"):
        wins, losses, cells = 0, 0, []
        for r in (r for r in ours if r["mode"] == mode):
            a = auto.get((r["size"], r["dtype"]))
            if a is None:
                continue
            for key, what in (("fwd_ms", "forward"), ("fwdbwd_ms", "fwd+bwd")):
                if isinstance(r.get(key), float) and isinstance(a.get(key), float):
                    faster = r[key] < a[key]
                    wins, losses = wins + faster, losses + (not faster)
                    cells.append(f"{what} {r['size']} {r['dtype']} {_ratio(a[key], r[key])}")
        if cells:
            verdict = "wins everywhere measured" if not losses else "loses everywhere measured" if not wins else "mixed"
            out.append(f"- `{mode}` against `auto` (>1x: faster): {', '.join(cells)}: **{verdict}**.")
    ref = {(r["size"], r["dtype"]): r for r in rnd.jafar if r["mode"] == "reference"}
    for (size, dtype), r in sorted(ref.items()):
        a = auto.get((size, dtype))
        if a:
            out.append(f"- {size} {dtype}, the official algorithm's time over `auto`'s (>1x: ours faster): forward "
                       f"{_ratio(r.get('fwd_ms'), a.get('fwd_ms'))}, peak {_gb(r.get('fwd_gb'))} -> "
                       f"{_gb(a.get('fwd_gb'))}; fwd+bwd {_ratio(r.get('fwdbwd_ms'), a.get('fwdbwd_ms'))}, peak "
                       f"{_gb(r.get('fwdbwd_gb'))} -> {_gb(a.get('fwdbwd_gb'))}.")
    return out


def pretrain_table(rnd: Round) -> str:
    ref = next((r for r in rnd.pretrain if r["mode"] == "reference"), {})
    lines = ["| attention | step time | steps/s | peak memory | vs official |", "|---|---|---|---|---|"]
    for r in rnd.pretrain:
        sps = r["steps_per_s"] if isinstance(r["steps_per_s"], str) else f"{r['steps_per_s']:.2f}"
        lines.append(f"| `{r['mode']}` ({mode_text(r['mode'])}) | {_ms(r['step_ms'])} | {sps} | "
                     f"{_gb(r['peak_gb'])} | {_ratio(ref.get('step_ms'), r['step_ms'])} |")
    return "\n".join(lines)


def bev_table(rnd: Round) -> str:
    base = {r["model"]: r["gflops"] for r in rnd.bev if r["upsampler"] == "none"}
    lines = ["| model | upsampler | features per camera | GFLOPs (forward) | vs none | paper: vs none | step time | "
             "peak memory | paper: GPU memory |", "|---|---|---|---|---|---|---|---|---|"]
    done = {(r["model"], r["upsampler"]) for r in rnd.bev}
    for r in rnd.bev:
        rel = f"+{100 * (r['gflops'] / base[r['model']] - 1):.1f} %" if r["model"] in base and r["upsampler"] != "none" \
            else ""
        paper = f"+{PAPER_GFLOPS_PCT[r['model']]} %" if r["upsampler"] == "jafar" and r["model"] in PAPER_GFLOPS_PCT \
            else ""
        mem = PAPER_MEMORY_GB.get((r["model"], r["upsampler"]))
        lines.append(f"| {r['model']} | {r['upsampler']} | {r['features']} | {r['gflops']:.1f} | {rel} | {paper} | "
                     f"{_ms(r['step_ms'])} | {_gb(r['peak_gb'])} | {_gb(mem) if mem else 'not recorded'} |")
    if not any(m == "pointbev" for m, _ in done):
        why = ("not run: it needs spconv (sparse convolutions), which this machine lacks" if not _spconv_available()
               else "not run (--smoke)" if rnd.args.smoke else "not run (budget)")
        mem = PAPER_MEMORY_GB.get(("pointbev", "jafar"))
        lines.append(f"| pointbev | none, bilinear, jafar | {why} | | | +{PAPER_GFLOPS_PCT['pointbev']} % (jafar) | | | "
                     f"{_gb(mem) if mem else 'not recorded'} |")
    return "\n".join(lines)


def render(rnd: Round, env: dict, done: bool) -> str:
    cfg = rnd.cfg
    command = "python tools/gpu_report.py " + " ".join(rnd.args.argv)
    parts = [f"## GPU report{' (--smoke)' if rnd.args.smoke else ''}: {env['device']}, commit {env['commit']}", "",
             f"Measured {env['date']} with `{command.strip()}` (`tools/gpu_report.py`) in "
             f"{rnd.elapsed():.0f} s of a {rnd.args.budget_s:.0f} s budget"
             + ("" if done else " (**partial**: the run was cut short or is still going)")
             + f". torch {env['torch']} (CUDA {env['cuda']}), Triton {env['triton'] or 'not installed'}, Python "
             f"{env['python']}" + (f"; {env['device']}, compute capability {env['capability']}, {env['memory_gb']} GB, "
                                   f"{env['multiprocessors']} SMs" if rnd.cuda else "")
             + ". Batch 1 throughout except pretraining; medians after warm-up; peak = "
             + ("`torch.cuda.max_memory_allocated` (model and inputs included)." if rnd.cuda else
                "the process's peak RSS (CPU: not comparable between rows).")]
    if rnd.args.smoke:
        parts += ["", "**Smoke run** (`--smoke`): toy sizes, so that the script cannot rot; the numbers mean nothing."]

    parts += ["", "### Kernel correctness", ""]
    c = rnd.checks
    if c["status"] == "skipped":
        parts.append(f"Skipped: {c['reason']}.")
    elif c["status"] == "not run":
        parts.append("Not run.")
    else:
        head = (f"**{c['status'].upper()}**" + (f" ({len(c['failures'])} failures: "
                                                + "; ".join(c["failures"]) + ")" if c["failures"] else "")
                + (" under Triton's interpreter (`TRITON_INTERPRET=1`), cases " + c["cases"] if c["interpreter"] else
                   " on the GPU, every case of `jafar/kernels/checks/cases.py`") + ".")
        parts += [head, "", c["markdown"]]

    parts += ["", "### JAFAR upsampler", "",
              f"The official protocol (`test/test_time_and_memory.py`; `tools/benchmark.py`'s `measure`): a random "
              f"guidance image and output of S x S, random S/14 x S/14 features of {cfg['dim']} channels; fwd+bwd adds a "
              f"1x1 conv head, `sum()` and `backward()` with the image and features requiring grad. Median of "
              f"{cfg['repeats']} runs after {cfg['warmup']} warm-up runs. bf16: autocast on float32 inputs and weights; "
              "tf32: float32 with TF32 matmuls and cuDNN. `vs auto`: `auto`'s time over the row's (>1x: faster)."]
    if rnd.jafar:
        parts += ["", jafar_table(rnd)]
        if rnd.cuda:
            for mode in dict.fromkeys(r["mode"] for r in rnd.jafar if r["mode"] != "reference"):
                tt = bench.targets_table(rnd.jafar, mode)
                if tt and mode in ("auto", "auto+enc=triton", "auto+gn=triton", "auto+enc=triton+gn=triton"):
                    parts += ["", tt]
        read = reading(rnd)
        if read:
            parts += ["", "Reading (mechanical; the defaults follow it, see the script's docstring):", ""] + read
    else:
        parts += ["", "Not measured."]
    if rnd.tune_md:
        parts += ["", "### Launch configurations", "", rnd.tune_md]

    parts += ["", "### Pretraining step", "",
              f"One optimiser step of the official recipe (`tools/bench_pretrain.py`: {cfg['pre_size']} px images, batch "
              f"{cfg['pre_batch']}, input views at scale U(0.25, 0.5), guidance at half size, consistency term, bf16 "
              f"autocast, AdamW) with a frozen DINOv2 ViT-S/14"
              + (" (smoke: one block of width 32)" if rnd.args.smoke else "") + f" with random weights; median of "
              f"{cfg['pre_steps']} steps after {cfg['pre_warmup']} warm-up steps. The official row runs the official "
              "GroupNorm too."]
    parts += ["", pretrain_table(rnd) if rnd.pretrain else "Not measured."]

    H, W = cfg["bev_image"]
    parts += ["", "### BeV training step", "",
              f"The paper's setting (Table 14): six {H}x{W} images, batch 1, the DINOv2 ViT-S/14 architecture with random "
              f"weights{' (smoke: one block of width 32, a 25x25x2 grid, smaller heads)' if rnd.args.smoke else ''}, "
              "the default 200x200x8 grid and head settings (`configs/model/*.yaml`), the upsampler at x2 with the "
              "guidance image at its output size (`encoder.guidance_size=output`); one step = forward, backward and "
              "AdamW in float32 (`precision: 32-true`, PyTorch's TF32 defaults); median of up to "
              f"{cfg['bev_repeats']} steps after {cfg['bev_warmup']} warm-up steps, peak over the warm-up and timed "
              "steps. GFLOPs: `FlopCounterMode` on one forward (JAFAR's attention counted on its chunked PyTorch path) "
              "plus each head's analytic `uncounted_flops` (as `tools/bev_cost.py`). \"paper\" columns: Table 14 as "
              "`docs/bev.md` records it, which quotes only JAFAR's GFLOPs over no upsampling; its GPU memory column "
              "is not recorded in this repository (`PAPER_MEMORY_GB` in the script is where it goes)."]
    parts += ["", bev_table(rnd) if rnd.bev else "Not measured."]

    parts += ["", "### Not measured", ""]
    if rnd.skipped or rnd.errors:
        parts += [f"- {s['item']}: {s['reason']}" for s in rnd.skipped]
        parts += [f"- {e['item']}: **error** {e['error']}" for e in rnd.errors]
    else:
        parts.append("Nothing: every part ran.")
    if rnd.notes:
        parts += ["", "Notes:", ""] + [f"- {n}" for n in rnd.notes]
    timing = ", ".join(f"{k} {v:.0f} s" for k, v in rnd.timings.items())
    if timing:
        parts += ["", f"Time per part: {timing}."]
    return "\n".join(parts) + "\n"


def write(rnd: Round, env: dict, done: bool) -> None:
    out = rnd.args.out
    out.mkdir(parents=True, exist_ok=True)
    data = {"environment": env, "done": done, "elapsed_s": rnd.elapsed(), "config": rnd.cfg,
            "checks": {k: v for k, v in rnd.checks.items() if k != "markdown"}, "jafar": rnd.jafar,
            "tuning": rnd.tuning, "pretrain": rnd.pretrain, "bev": rnd.bev, "skipped": rnd.skipped,
            "errors": rnd.errors, "notes": rnd.notes, "timings_s": rnd.timings, "targets": TARGET_TEXT}
    for name, text in (("report.md", render(rnd, env, done)), ("report.json", json.dumps(data, indent=1, default=str))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


# --- main ----------------------------------------------------------------------------------------

#: seconds an item may run past the budget before it is cut (the report is written after it)
GRACE_S = 20.0


class BudgetExceeded(Exception):
    """Raised in the main thread by the alarm of :func:`_deadline`."""


@contextlib.contextmanager
def _deadline(seconds: float):
    """Cut the block after ``seconds`` (SIGALRM: the main thread on Unix; the exception lands when
    control is back in Python, e.g. after a CUDA synchronisation). Elsewhere, no limit."""
    import signal
    import threading

    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def alarm(signum, frame):
        raise BudgetExceeded()

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1.0))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_report",
                   help="folder of report.md and report.json (default outputs/gpu_report/)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="the whole run's time: later parts are skipped when their estimate no longer fits (default 480)")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU in seconds (the test of this script)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu (then --smoke is needed)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                   help=f"parts to run (default all: {' '.join(SECTIONS)})")
    p.add_argument("--commit", default=None, help="the commit to name in the report (default: git's, where the "
                   "checkout has git)")
    p.add_argument("--repeats", type=int, default=None, help="timed runs of each JAFAR row (default 20; smoke 2)")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke:
        p.error("the full report needs a CUDA GPU; on the CPU run --smoke")
    cfg = dict(SMOKE if args.smoke else FULL)
    if args.repeats is not None:
        if args.repeats < 1:
            p.error(f"--repeats must be >= 1, got {args.repeats}")
        cfg["repeats"] = args.repeats
    threads = torch.get_num_threads()
    if args.smoke and device.type == "cpu":
        torch.set_num_threads(1)  # toy sizes: one thread, not two spinning against whatever else shares the cores
    try:
        return run(args, cfg, device)
    finally:
        torch.set_num_threads(threads)


def run(args, cfg: dict, device: torch.device) -> int:
    rnd = Round(args, cfg, device)
    env = environment(rnd)
    rnd.log(f"GPU report on {env['device']}, torch {env['torch']}, Triton {env['triton']}, budget {args.budget_s:.0f} s,"
            f" report in {args.out}")
    write(rnd, env, False)

    if "checks" in args.sections:
        t0 = time.perf_counter()
        try:
            ok = rnd.run_checks()
        except Exception as e:  # a crash in the cases counts as a failure
            traceback.print_exc()
            rnd.checks = {"status": "failed", "failures": [f"{type(e).__name__}: {e}"], "results": {},
                          "markdown": "", "interpreter": device.type == "cpu", "cases": "-"}
            ok = False
        rnd.timings["checks"] = time.perf_counter() - t0
        if not ok:
            write(rnd, env, True)
            print(render(rnd, env, True))
            print("CORRECTNESS FAILURES:\n" + "\n".join(rnd.checks["failures"]), file=sys.stderr)
            return 1
        write(rnd, env, False)
    else:
        rnd.checks = {"status": "skipped", "reason": "not asked for (--sections)"}

    for section, name, estimate, fn in plan(rnd):
        if section not in args.sections:
            continue
        why = _unavailable(rnd, section, name)
        left = args.budget_s - rnd.elapsed()
        need = 0.0 if args.smoke else estimate
        if why is None and left <= need:
            why = (f"budget: about {need:.0f} s needed, {max(left, 0):.0f} s left" if need else
                   f"budget spent ({args.budget_s:.0f} s)")
        if why is not None:
            rnd.skipped.append({"item": name, "section": section, "reason": why})
            rnd.log(f"skip {name}: {why}")
            continue
        t0 = time.perf_counter()
        try:
            with _deadline(max(left, need) + GRACE_S):
                fn()
        except BudgetExceeded:
            rnd.skipped.append({"item": name, "section": section,
                                "reason": f"cut after {time.perf_counter() - t0:.0f} s: it ran past the budget"})
            rnd.log(f"cut {name}: past the budget")
        except Exception as e:
            traceback.print_exc()
            rnd.errors.append({"item": name, "section": section,
                               "error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"})
        finally:
            rnd.timings[section] = rnd.timings.get(section, 0.0) + time.perf_counter() - t0
            _free(device)
        write(rnd, env, False)

    write(rnd, env, True)
    print(render(rnd, env, True))
    rnd.log(f"done: {args.out / 'report.md'}")
    return 2 if rnd.errors else 0


if __name__ == "__main__":
    sys.exit(main())
