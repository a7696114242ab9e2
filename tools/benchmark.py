#!/usr/bin/env python
r"""Speed and memory of JAFAR: the official algorithm beside ours, as a Markdown table, and (with
``--check``) the kernels' correctness on the device.

Protocol of the official ``test/test_time_and_memory.py`` (github PaulCouairon/JAFAR @
94d4d54): batch 1, a random guidance image and output of ``S x S``, random features of
``S/14 x S/14`` keys and 384 channels; "fwd+bwd" is a forward, a 1x1 conv head, ``sum()``
and ``backward()`` with the image and the features requiring grad. Reported: the median of
``--repeats`` timed runs after ``--warmup`` runs, and the peak memory (CUDA:
``max_memory_allocated`` including the model and inputs; CPU: the whole process's peak RSS,
Python and libraries included, each configuration in a fresh process unless ``--no-isolate``).

Rows (``--modes``): ``reference`` is the official algorithm (``attention="reference"``: the
``(heads, queries, keys)`` weights materialised, and ``nn.GroupNorm`` as it is); ``auto`` (or
``chunked``, ``triton``, ``sdpa``) is ours: that attention path, the var_mean GroupNorm and the
half-precision encoders. A mode may carry options after ``+``: ``auto+compile`` (``JAFAR(compile=
True)``), ``auto+gn=native`` or ``auto+gn=triton`` (another GroupNorm implementation,
``JAFAR(group_norm=...)``), ``auto+enc=triton`` (``JAFAR(encoders="triton")``: the fused encoder kernels of
``jafar.kernels.encoders``, in the forward and the fwd+bwd columns).

Other upsamplers (``--upsamplers NAME [NAME ...]``, or ``--upsamplers all``: every registered one): one row per
registered upsampler under the same
protocol, built by ``jafar.build_upsampler(name, feature_dim=--dim)`` with random weights (its defaults
otherwise), so that e.g. LoftUp and bilinear stand beside JAFAR as in the paper's Tables 12-13; the
upsamplers that encode the image again (``large_image``, ``strided``: they need a backbone) are
skipped with one line.

Dtypes (``--dtypes``): ``fp32`` float32 with TF32 off for matmuls and cuDNN (exact), ``tf32``
float32 inputs with TF32 on for both (``auto`` then runs the Triton kernels with TF32 products),
``bf16``/``fp16`` autocast on float32 inputs and weights.

``--check`` first runs the seeded correctness cases of ``jafar/kernels/checks/cases.py`` (the cases of
``tests/test_kernels.py``) on the device and prints the largest relative error per case and
dtype: on CUDA the Triton kernels in fp32, tf32, bf16 and fp16, and the module's gradients; on
the CPU the ``chunked`` path (or the kernels under ``TRITON_INTERPRET=1``); where Triton runs,
also the fused encoder kernels and the Triton GroupNorm (``cases.ENCODER_CASES``,
``GN_CASES``).

``--out FILE`` writes the tables to ``FILE`` as one section headed with the device's name,
between ``<!-- benchmark:NAME -->`` markers: a later run on the same device replaces that
section, other sections (earlier measurements, other devices, other ``--label``s) stay; the first
GPU section also replaces the ``<!-- benchmark:pending -->`` placeholder. The file is rewritten after every
configuration, so a run cut short leaves what it measured. Plain Python, no Hydra, so that it
runs on a bare GPU machine::

    python tools/benchmark.py --check --out docs/benchmarks.md       # checks, then the speed targets' protocol
    python tools/benchmark.py --sizes 448 896 --dtypes bf16 tf32 \
        --modes auto auto+gn=native auto+gn=triton auto+compile auto+enc=triton \
        --label options --out docs/benchmarks.md                     # what each option pays
    python tools/benchmark.py --tune --modes --sizes 448 896 --dtypes bf16 tf32 \
        --label tuning --out docs/benchmarks.md                      # the kernels' launch configurations
    python tools/benchmark.py --device cpu --sizes 56 --dtypes fp32 --repeats 1 --warmup 0
    python tools/benchmark.py --device cpu --sizes 112 224 --dtypes fp32 --modes auto \
        --upsamplers bilinear loftup jafar                          # other upsamplers beside JAFAR
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from jafar import JAFAR, build_upsampler  # noqa: E402
from jafar.kernels.checks import interpreter  # noqa: E402
from jafar.layers.norm import GROUP_NORM_IMPLS  # noqa: E402
from jafar.upsamplers import list_upsamplers, upsampler_entry  # noqa: E402
from jafar.upsamplers.jafar import ENCODERS  # noqa: E402
from tools.bev_cost import flop_counter  # noqa: E402

interpreter.apply()  # under TRITON_INTERPRET=1: the interpreter's bfloat16 fixes (jafar/kernels/checks/interpreter.py)


class LaunchRecorder:
    """Records the compiled kernel of each launch of the Triton kernels (``n_regs``, ``n_spills`` on
    a GPU) while active, by wrapping the kernel objects of ``jafar.kernels``: the package keeps no
    launch bookkeeping of its own."""

    KERNELS = {"fwd": ("attention", "_fwd_kernel"), "bwd_dq": ("attention", "_bwd_dq_kernel"),
               "bwd_dkdf": ("attention", "_bwd_dkdf_kernel"), "encoder": ("encoders", "_pointwise_conv_kernel")}

    def __init__(self):
        self.last = {}
        self._saved = []

    def __enter__(self):
        import importlib

        recorder = self

        class Proxy:
            def __init__(self, name, fn):
                self.name, self.fn = name, fn

            def __getitem__(self, grid):
                launch = self.fn[grid]

                def run(*args, **kwargs):
                    recorder.last[self.name] = launch(*args, **kwargs)
                    return recorder.last[self.name]
                return run

            def __getattr__(self, attr):
                return getattr(self.fn, attr)

        for name, (module, attr) in self.KERNELS.items():
            mod = importlib.import_module(f"jafar.kernels.{module}")
            self._saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, Proxy(name, getattr(mod, attr)))
        return self

    def __exit__(self, *exc):
        for mod, attr, fn in self._saved:
            setattr(mod, attr, fn)
        self._saved.clear()

DTYPES = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: the project's speed targets for JAFAR (one H100, batch 1, ViT-S width, keys = output/14), checked on ``auto``
TARGETS = [
    # (size, dtype, metric, limit, unit, text)
    (448, "bf16", "fwd_ms", 3.0, "ms", "448 bf16 forward <= 3 ms"),
    (448, "bf16", "fwd_gb", 1.0, "GB", "448 bf16 forward peak <= 1 GB"),
    (448, "tf32", "fwd_ms", 6.0, "ms", "448 float32 inputs, TF32 matmuls, forward <= 6 ms"),
    (448, "bf16", "fwdbwd_ms", 15.0, "ms", "448 bf16 fwd+bwd <= 15 ms"),
    (448, "bf16", "fwdbwd_gb", 3.0, "GB", "448 bf16 fwd+bwd peak <= 3 GB"),
    (896, "bf16", "fwd_ms", 25.0, "ms", "896 bf16 forward <= 25 ms"),
    (896, "bf16", "fwd_gb", 4.0, "GB", "896 bf16 forward peak <= 4 GB"),
    (1792, "bf16", "fwd_ms", None, "ms", "1792 bf16 forward runs"),
]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device, warmup, repeats):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def parse_mode(mode: str) -> dict:
    """``"auto+compile+gn=native"`` -> ``{"attention": "auto", "compile": True, "gn": "native",
    "encoders": "torch"}``."""
    attention, *options = mode.split("+")
    spec = dict(attention=attention, compile=False, gn="official" if attention == "reference" else "auto",
                encoders="torch")
    for opt in options:
        if opt == "compile":
            spec["compile"] = True
        elif opt.startswith("gn=") and opt[3:] in GROUP_NORM_IMPLS:
            spec["gn"] = opt[3:]
        elif opt.startswith("enc=") and opt[4:] in ENCODERS:
            spec["encoders"] = opt[4:]
        else:
            raise ValueError(f"unknown option {opt!r} in mode {mode!r}: expected 'compile', 'gn=' one of "
                             f"{GROUP_NORM_IMPLS} or 'enc=' one of {ENCODERS}.")
    if spec["compile"] and spec["encoders"] == "triton":
        raise ValueError(f"mode {mode!r}: 'compile' and 'enc=triton' cannot be combined.")
    return spec


class _Precision:
    """TF32 off (``fp32``, exact) or on (``tf32``) for matmuls and cuDNN within the block."""

    def __init__(self, dtype: str):
        self.tf32 = dtype == "tf32"

    def __enter__(self):
        self.old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.tf32

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.old


def measure(size: int, mode: str, dtype: str, device: str, dim: int = 384, warmup: int = 5,
            repeats: int = 20, backward: bool = True, patch: int = 14, parts=("fwd", "fwdbwd"),
            upsampler: str = None, count_flops: bool = True) -> dict:
    """One configuration: forward (no grad) and forward+backward time (ms) and peak (GB), the
    parameter count and (``count_flops``) the forward's GFLOPs (``tools/bev_cost.py``'s counter: matrix
    products and convolutions, 2 FLOPs per multiply-add; elementwise ops not counted). ``upsampler``:
    the registered upsampler of that name (random weights) instead of the JAFAR of ``mode``."""
    device = torch.device(device)
    torch.manual_seed(0)
    if upsampler is None:
        spec = parse_mode(mode)
        model = JAFAR(v_dim=dim, attention=spec["attention"], compile=spec["compile"],
                      encoders=spec["encoders"], group_norm=spec["gn"]).to(device)
    else:
        model = build_upsampler(upsampler, feature_dim=dim).to(device)
    image = torch.randn(1, 3, size, size, device=device)
    feats = torch.randn(1, dim, size // patch, size // patch, device=device)
    head = torch.nn.Conv2d(dim, 1, 1).to(device)
    amp = DTYPES[dtype]
    result = dict(size=size, keys=size // patch, mode=mode, dtype=dtype, **({"upsampler": upsampler} if upsampler else {}))

    def autocast():
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None)

    def forward():
        with torch.no_grad(), autocast():
            model(image, feats, (size, size))

    def forward_backward():
        img, f = image.clone().requires_grad_(), feats.clone().requires_grad_()
        with autocast():
            loss = head(model(img, f, (size, size))).float().sum()
        loss.backward()

    result["params"] = sum(p.numel() for p in model.parameters())
    with _Precision(dtype):
        if "fwd" in parts and count_flops:  # one forward under the counter, before the timed ones
            with flop_counter() as counter:
                forward()
            uncounted = model.uncounted_flops() if hasattr(model, "uncounted_flops") else 0  # FeatUp's filtering
            result["gflops"] = (counter.get_total_flops() + uncounted) / 1e9
        for name, fn in (("fwd", forward), ("fwdbwd", forward_backward if backward else None)):
            if fn is None or name not in parts:
                continue
            try:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                result[f"{name}_ms"] = _timed(fn, device, warmup, repeats)
                if device.type == "cuda":
                    result[f"{name}_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                else:
                    result[f"{name}_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            except torch.OutOfMemoryError:
                result[f"{name}_ms"] = result[f"{name}_gb"] = "OOM"
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return result


def _measure_isolated(kwargs: dict) -> dict:
    """Run each part of one configuration in a fresh process (peak RSS is per process)."""
    result = {}
    for part in ("fwd", "fwdbwd") if kwargs.get("backward", True) else ("fwd",):
        out = subprocess.run([sys.executable, __file__, "--one", json.dumps(dict(kwargs, parts=[part]))],
                             capture_output=True, text=True)
        if out.returncode in (-9, 137):
            result.update({f"{part}_ms": "OOM", f"{part}_gb": "OOM"})
        elif out.returncode:
            raise RuntimeError(out.stderr)
        else:
            result.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return result


def _fmt(x, unit):
    if isinstance(x, str):
        return x
    if x is None:
        return "-"
    return f"{x:.1f} {unit}" if unit == "ms" else f"{x:.2f} {unit}"


def table(rows) -> str:
    by = {(r["size"], r["dtype"], r["mode"]): r for r in rows}
    modes = list(dict.fromkeys(r["mode"] for r in sorted(rows, key=lambda r: r["mode"] != "reference")))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    header = ["output", "keys", "dtype"]
    for metric in ("forward", "forward peak", "fwd+bwd", "fwd+bwd peak"):
        header += [f"{metric} ({m})" for m in modes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size, dtype in sorted({(r["size"], r["dtype"]) for r in rows}, key=lambda t: (dtypes.index(t[1]), t[0])):
        cells = [f"{size}x{size}", f"{size // 14}x{size // 14}", dtype]
        for key, unit in (("fwd_ms", "ms"), ("fwd_gb", "GB"), ("fwdbwd_ms", "ms"), ("fwdbwd_gb", "GB")):
            cells += [_fmt(by.get((size, dtype, m), {}).get(key), unit) for m in modes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a ``size x size`` float32 matrix product on the CPU (median of ``repeats``): the rate
    against which the cost table states each row's floor."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size**3 / statistics.median(times) / 1e9


def cost_table(rows, rate: float = None) -> str:
    """Per row and size: parameters, forward GFLOPs and, given the CPU's matmul ``rate`` (GFLOP/s),
    the floor (GFLOPs / rate: every counted FLOP at the speed of a large matrix product) and the
    measured forward over it."""
    by = {(r["mode"], r["size"]): r for r in rows if r.get("gflops") is not None}
    if not by:
        return ""
    header = ["row", "parameters"] + [f"{s}: GFLOPs" + ("" if rate is None else f" | {s}: floor | {s}: forward / floor")
                                      for s in sorted({k[1] for k in by})]
    sizes = sorted({k[1] for k in by})
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * (1 + sum(3 if rate else 1 for _ in sizes) + 1)]
    for mode in dict.fromkeys(r["mode"] for r in rows):
        first = next((by[(mode, s)] for s in sizes if (mode, s) in by), None)
        if first is None:
            continue
        cells = [mode, f"{first['params']:,}"]
        for s in sizes:
            r = by.get((mode, s))
            if r is None:
                cells += ["-"] * (3 if rate else 1)
                continue
            cells.append(f"{r['gflops']:.1f}")
            if rate:
                floor = r["gflops"] / rate * 1e3
                fwd = r.get("fwd_ms")
                cells += [f"{floor:.0f} ms", f"{fwd / floor:.1f}x" if isinstance(fwd, (int, float)) and floor > 0 else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(rows, mode: str = "auto") -> str:
    by = {(r["size"], r["dtype"]): r for r in rows if r["mode"] == mode}
    lines = [f"| speed target (`{mode}`) | measured | met |", "|---|---|---|"]
    for size, dtype, metric, limit, unit, text in TARGETS:
        value = by.get((size, dtype), {}).get(metric)
        if value is None:
            continue
        met = "no (OOM)" if value == "OOM" else "yes" if limit is None or value <= limit else "no"
        lines.append(f"| {text} | {_fmt(value, unit)} | {met} |")
    return "\n".join(lines) if len(lines) > 2 else ""


# --- correctness on the device ---------------------------------------------------------------

def run_checks(device: str, cases=None) -> tuple:
    """``(results, markdown)``: the errors of ``jafar/kernels/checks/cases.py`` on ``device``."""
    from jafar.kernels import attention as kernels
    from jafar.kernels.checks import cases as kc

    dev = torch.device(device)
    interpreter = dev.type == "cpu" and kernels.available(dev)
    if dev.type == "cuda" or interpreter:
        mode, dtypes = "triton", (["fp32", "tf32", "bf16", "fp16"] if dev.type == "cuda" else ["fp32", "bf16", "fp16"])
    else:
        mode, dtypes = "chunked", ["fp32", "fp16"]
    results = {}
    for case in kc.CASES:
        if cases and case.name not in cases:
            continue
        for dt in dtypes:
            if interpreter and dt not in case.interpreter_dtypes:
                continue
            results[f"{case.name}/{dt}"] = kc.run_case(case, dt, device, case.interpreter_blocks if interpreter else None,
                                                       mode=mode)
            print(f"check {case.name}/{dt}: " + ", ".join(f"{k} {v:.1e}" for k, v in results[f"{case.name}/{dt}"].items()),
                  file=sys.stderr, flush=True)
    for dt in [d for d in dtypes if d != "tf32"] if not cases or "module" in cases else []:
        results[f"module/{dt}"] = kc.module_case(device, dt, mode=mode)
    if mode == "triton":  # the fused encoder kernels and the Triton GroupNorm (where Triton runs)
        checks = [(c.name, kc.encoder_case, c) for c in kc.ENCODER_CASES]
        checks += [(c[0], kc.group_norm_case, c) for c in kc.GN_CASES]
        for name, fn, case in checks:
            if cases and name not in cases:
                continue
            for dt in dtypes:
                results[f"{name}/{dt}"] = fn(case, device, dt)
                print(f"check {name}/{dt}: " + ", ".join(f"{k} {v:.1e}" for k, v in results[f"{name}/{dt}"].items()),
                      file=sys.stderr, flush=True)
    names = list(dict.fromkeys(k.split("/")[0] for k in results))
    what = {c.name: c.what for c in kc.CASES + kc.ENCODER_CASES}
    what.update({c[0]: f"Triton GroupNorm: {c[-1]}" for c in kc.GN_CASES})
    what["module"] = "JAFAR: output, image and feature gradients (encoders in the autocast dtype too)"
    lines = [f"Correctness (`--check`, attention `{mode}`): largest relative error of the output and of every "
             "gradient against the reference path in float64 (`jafar/kernels/checks/cases.py`; tolerance in brackets; "
             "the `enc_` rows: the fused encoders' queries, keys and output at inference and output and every "
             "gradient in training, and the `gn_` rows: output and gradients of the Triton GroupNorm, which also "
             "must be within 1.5x of PyTorch's own error in that precision).",
             "", "| case | " + " | ".join(dtypes) + " | what |", "|---|" + "---|" * (len(dtypes) + 1)]
    for name in names:
        cells = []
        for dt in dtypes:
            errs = results.get(f"{name}/{dt}")
            ours = None if errs is None else max(v for k, v in errs.items() if not k.startswith("torch:"))
            bad = errs is not None and kc.failures({f"{name}/{dt}": errs})
            cells.append("-" if errs is None else f"{ours:.1e} ({kc.tolerance(f'{name}/{dt}'):.0e})"
                         + (" **FAIL**" if bad else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {what.get(name, '')} |")
    return results, "\n".join(lines)


# --- launch configurations of the Triton kernels ----------------------------------------------

def _cfg(bm, bn, bc, warps, stages=2):
    return dict(block_m=bm, block_n=bn, block_c=bc, num_warps=warps, num_stages=stages)


#: candidates per kernel (the current default, ``jafar.kernels.attention.CONFIGS``, is timed first); chosen
#: from offline sm_90 compilations (register spills, shared memory), to be timed with ``--tune``
TUNE_CANDIDATES = {
    "fwd": [_cfg(64, 64, 128, 4), _cfg(64, 64, 128, 8), _cfg(64, 64, 256, 8), _cfg(128, 64, 128, 8),
            _cfg(32, 64, 512, 8), _cfg(64, 64, 64, 4), _cfg(128, 32, 128, 8, 3)],
    "bwd_dq": [_cfg(64, 64, 64, 4), _cfg(64, 64, 64, 8), _cfg(64, 32, 64, 8), _cfg(64, 32, 32, 8),
               _cfg(128, 32, 64, 8), _cfg(32, 64, 64, 4)],
    "bwd_dkdf": [_cfg(64, 64, 64, 4), _cfg(64, 64, 64, 8), _cfg(32, 64, 64, 8), _cfg(32, 64, 32, 8),
                 _cfg(64, 32, 64, 8), _cfg(64, 64, 128, 8), _cfg(64, 128, 128, 8)],
    # the fused encoder kernel (jafar.kernels.encoders): pixels per tile, warps, stages, programs per SM
    "encoder": [dict(block_p=bp, num_warps=w, num_stages=st, programs_per_sm=pps)
                for bp, w, st, pps in ((32, 8, 2, 2), (32, 8, 2, 1), (32, 8, 2, 4), (32, 4, 2, 2), (64, 8, 2, 1),
                                       (64, 8, 3, 2), (32, 8, 3, 2), (16, 4, 2, 4))],
}


def _int(x) -> str:
    return "-" if x is None else str(int(x))


def _cfg_text(c: dict) -> str:
    if "block_p" in c:
        return (f"{c['block_p']} pixels, {c['num_warps']} warps, {c['num_stages']} stages, "
                f"{c['programs_per_sm']} programs/SM")
    return f"{c['block_m']}x{c['block_n']}x{c['block_c']}, {c['num_warps']} warps, {c['num_stages']} stages"


def run_tuning(device: str, sizes, dtypes, warmup: int, repeats: int, dim: int = 384, qk_dim: int = 128,
               heads: int = 4, candidates: int = None) -> tuple:
    """Time each candidate launch configuration of each kernel alone on the benchmark's attention
    shapes (queries = S*S, keys = (S/14)^2, ``dim`` channels): ``(rows, markdown)``. The backward
    rows time both backward kernels, the other one at its default."""
    from jafar.kernels import attention as kernels
    from jafar.kernels import encoders as ek

    dev = torch.device(device)
    if not kernels.available(dev):
        return [], "Tuning (`--tune`) needs CUDA (or `TRITON_INTERPRET=1` on the CPU): skipped."
    rows = []
    scale = 1.0 / (qk_dim // heads) ** 0.5
    for dtype in [d for d in dtypes if d in ("bf16", "fp16", "tf32")]:
        tdtype = torch.float32 if dtype == "tf32" else DTYPES[dtype]
        for size in sizes:
            nq, nk = size * size, (size // 14) ** 2
            g = torch.Generator(device="cpu").manual_seed(0)
            q, k, f, go = (torch.randn(1, n, w, generator=g).to(dev, tdtype)
                           for n, w in ((nq, qk_dim), (nk, qk_dim), (nk, dim), (nq, dim)))
            with _Precision(dtype):
                _, lse = kernels.head_averaged_attention_fwd(q, k, f, heads, scale, return_lse=True)

                # the encoder kernel: a ResBlock's second convolution (GroupNorm-apply, SiLU, residual,
                # statistics) on S*S pixels of qk_dim channels
                x = torch.randn(1, qk_dim, nq, generator=g).to(dev, tdtype)
                w = (torch.randn(qk_dim, qk_dim, generator=g) / qk_dim ** 0.5).to(dev)
                coef = tuple(torch.randn(1, qk_dim, generator=g).to(dev) for _ in range(2))
                for kernel, cands in TUNE_CANDIDATES.items():
                    default = dict(kernels.CONFIGS[kernel])
                    cands = [default] + [c for c in cands if c != default]
                    for i, cfg in enumerate(cands[:candidates]):
                        if kernel == "encoder":
                            def fn(cfg=cfg):
                                ek.pointwise_conv(x, w, coef, residual=x, stats_groups=8, config=cfg)
                        elif kernel == "fwd":
                            def fn(cfg=cfg):
                                kernels.head_averaged_attention_fwd(q, k, f, heads, scale, return_lse=True, config=cfg)
                        else:
                            arg = "dq_config" if kernel == "bwd_dq" else "dkdf_config"

                            def fn(cfg=cfg, arg=arg):
                                kernels.head_averaged_attention_bwd(q, k, f, lse, go, heads, scale, **{arg: cfg})
                        row = dict(size=size, dtype=dtype, kernel=kernel, config=cfg, default=i == 0)
                        try:
                            with LaunchRecorder() as launches:
                                row["ms"] = _timed(fn, dev, warmup, repeats)
                            handle = launches.last.get(kernel)
                            row["regs"] = getattr(handle, "n_regs", None)
                            row["spills"] = getattr(handle, "n_spills", None)
                        except Exception as e:  # out of resources (shared memory, registers)
                            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
                        rows.append(row)
                        print(json.dumps(row), file=sys.stderr, flush=True)
    best = {}
    for r in rows:
        key = (r["size"], r["dtype"], r["kernel"])
        if "ms" in r and r["ms"] < best.get(key, (float("inf"), None))[0]:
            best[key] = (r["ms"], r["config"])
    lines = ["Launch configurations of the Triton kernels (`--tune`): each kernel alone on the attention of "
             f"that output, median of {repeats} runs; tiles (queries x keys x channels), warps, pipeline stages; "
             "the backward rows time both backward kernels, the other one at its default; `encoder`: the fused "
             "encoder kernel alone on one ResBlock convolution (GroupNorm-apply, SiLU, residual, statistics) of "
             "S x S pixels. **Bold**: the fastest per kernel.", "", "| output | dtype | kernel | config | time | regs | spills |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r.get("error") or _fmt(r["ms"], "ms")
        if "ms" in r and best[(r["size"], r["dtype"], r["kernel"])][1] is r["config"]:
            t = f"**{t}**"
        lines.append(f"| {r['size']}x{r['size']} | {r['dtype']} | {r['kernel']} | {_cfg_text(r['config'])}"
                     f"{' (default)' if r['default'] else ''} | {t} | {_int(r.get('regs'))} | {_int(r.get('spills'))} |")
    largest = {}
    for (size, dtype, kernel), (_, cfg) in best.items():
        if size >= largest.get((dtype, kernel), (0, None))[0]:
            largest[(dtype, kernel)] = (size, cfg)
    for dtype in dict.fromkeys(d for d, _ in largest):
        choice = {kernel: cfg for (d, kernel), (_, cfg) in largest.items() if d == dtype}
        lines += ["", f"Fastest at the largest output, {dtype}: `JAFAR_TRITON_CONFIG='{json.dumps(choice)}'` "
                  "(or make it the default in `CONFIGS` of `jafar/kernels/attention.py`)."]
    return rows, "\n".join(lines)


# --- the Markdown file -------------------------------------------------------------------------

def write_section(path: Path, key: str, body: str, replace_pending: bool) -> None:
    """Put ``body`` between ``<!-- benchmark:KEY -->`` markers in ``path``: replace that section if
    present (and the pending placeholder if asked), else insert it after the last section of this
    tool, or before the first ``## `` heading, or at the end."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"<!-- benchmark:{key} -->\n{body.strip()}\n<!-- /benchmark:{key} -->\n"

    def pattern(k):
        return re.compile(rf"<!-- benchmark:{re.escape(k)} -->\n.*?<!-- /benchmark:{re.escape(k)} -->\n?", re.S)

    if pattern(key).search(text):
        text = pattern(key).sub(lambda m: block, text, count=1)
        if replace_pending:
            text = pattern("pending").sub("", text)
    elif replace_pending and pattern("pending").search(text):
        text = pattern("pending").sub(lambda m: block, text, count=1)
    else:  # after the last section of this tool, else before the first heading, else at the end
        ends = list(re.finditer(r"^<!-- /benchmark:.*?-->\n?", text, re.M))
        m = re.search(r"^## ", text, re.M)
        if ends:
            at = ends[-1].end()
            text = text[:at].rstrip("\n") + "\n\n" + block + "\n" + text[at:].lstrip("\n")
        elif m:
            text = text[:m.start()] + block + "\n" + text[m.start():]
        else:
            text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown commit"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[56, 112, 224, 448, 896, 1792])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "tf32", "bf16"], choices=list(DTYPES))
    p.add_argument("--modes", nargs="*", default=["reference", "auto"],
                   help="rows: reference, auto, chunked, triton, sdpa, each optionally +compile, +gn=IMPL")
    p.add_argument("--upsamplers", nargs="+", default=[], metavar="NAME",
                   help="also a row per registered upsampler (jafar.build_upsampler(NAME, feature_dim=--dim), random "
                        "weights), e.g. bilinear loftup jafar, or all; large_image and strided (need a backbone) are skipped")
    p.add_argument("--dim", type=int, default=384, help="feature channels (ViT-S: 384)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--backward-up-to", type=int, default=896,
                   help="fwd+bwd only up to this output size (default 896: 1792 is forward only)")
    p.add_argument("--skip-reference-above", type=int, default=448,
                   help="skip the reference rows above this output size (it needs O(S^4) memory: 52.6 GB of "
                        "weights at 896); 0 runs them all")
    p.add_argument("--fp32-up-to", type=int, default=896,
                   help="exact fp32 rows only up to this size (1792 in exact float32 takes ~4 s a run)")
    p.add_argument("--check", action="store_true", help="run the kernels' correctness cases first")
    p.add_argument("--tune", action="store_true",
                   help="time candidate launch configurations of the Triton kernels (bf16/fp16/tf32 of --dtypes, "
                        "outputs --sizes); '--modes' with no value then skips the model rows")
    p.add_argument("--tune-candidates", type=int, default=None, help=argparse.SUPPRESS)  # first N (tests)
    p.add_argument("--check-cases", nargs="+", default=None,
                   help="only these cases (names in jafar/kernels/checks/cases.py CASES, and 'module')")
    p.add_argument("--out", type=Path, help="write the tables into this Markdown file (a section per device)")
    p.add_argument("--label", default="", help="a section of its own for this run (e.g. 'options'): the section "
                   "key and heading get this label, so the run does not replace the device's main section")
    p.add_argument("--no-isolate", action="store_true", help="CPU: measure in this process (peak = whole run)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:  # child process of _measure_isolated
        print(json.dumps(measure(**json.loads(args.one))))
        return 0
    for mode in args.modes:
        parse_mode(mode)  # bad options fail before any work
    upsamplers, skipped = [], []
    names = list_upsamplers() if args.upsamplers == ["all"] else args.upsamplers  # "all": every registered one
    for name in dict.fromkeys(names):
        try:
            entry = upsampler_entry(name)  # an unknown name fails before any work, naming the registered ones
        except ValueError as exc:
            p.error(str(exc))
        if entry.needs_backbone:
            skipped.append(name)
            print(f"skipping the {name!r} upsampler: it encodes the image again and needs a backbone.", file=sys.stderr)
        else:
            upsamplers.append(name)

    cuda = args.device.startswith("cuda")
    if cuda:
        name = torch.cuda.get_device_name(torch.device(args.device))
        heading = f"## GPU: {name}, current code"
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
        heading = f"## {name}, current code"
    try:
        import triton

        triton_version = f"Triton {triton.__version__}"
    except Exception:
        triton_version = "no Triton"
    rate = None if cuda else matmul_rate()
    command = "python tools/benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv)
    started = time.time()
    check_md, tune_md, failed = "", "", []

    def render(rows, done):
        protocol = (f"Measured {datetime.date.today().isoformat()} at commit {_commit()} with `{command}`"
                    f"{'' if done else ' (partial: the run was cut short or is still going)'}. "
                    f"torch {torch.__version__}, {triton_version}; batch 1, {args.dim} channels, keys = output/14; "
                    f"median of {args.repeats} runs after {args.warmup} warm-up runs; peak = "
                    + ("`max_memory_allocated`" if cuda else "the process's peak RSS")
                    + ". fp32: TF32 off (matmul and cuDNN); tf32: on for both; bf16/fp16: autocast on float32 "
                    "inputs and weights. **reference**: the official algorithm (materialising attention, "
                    "`nn.GroupNorm`); the other rows are ours"
                    + (f"; {', '.join(f'**{n}**' for n in upsamplers)}: that registered upsampler, "
                       f"`jafar.build_upsampler(name, feature_dim={args.dim})`, random weights" if upsamplers else "")
                    + (f"; skipped (they encode the image again and need a backbone): {', '.join(skipped)}"
                       if skipped else "") + ".")
        parts = [heading, "", protocol, ""]
        if rows:
            parts += [table(rows), ""]
            ct = cost_table(rows, rate)
            if ct:
                parts += [("Parameters and forward GFLOPs" + (f"; floor = GFLOPs at the {rate:.0f} GFLOP/s of a 2048x2048 "
                                                              "float32 matmul on these cores, measured in this run"
                                                              if rate else "") + ":"), "", ct, ""]
            for mode in dict.fromkeys(r["mode"] for r in rows if not r["mode"].startswith("reference")
                                      and not r.get("upsampler")):
                tt = targets_table(rows, mode)  # one table per row of ours (auto, auto+enc=triton, ...)
                if tt and cuda:
                    parts += [tt, ""]
        if check_md:
            parts += [check_md, ""]
        if tune_md:
            parts += [tune_md, ""]
        return "\n".join(parts)

    key = f"{name} / {args.label}" if args.label else name
    if args.label:
        heading += f" ({args.label})"
    if args.check:
        results, check_md = run_checks(args.device, args.check_cases)
        from jafar.kernels.checks.cases import failures

        failed = failures(results)
        print(check_md + "\n", flush=True)
        if args.out:
            write_section(args.out, key, render([], False), replace_pending=cuda and not args.label)

    if args.tune:
        _, tune_md = run_tuning(args.device, args.sizes, args.dtypes, args.warmup, args.repeats, args.dim,
                                candidates=args.tune_candidates)
        print(tune_md + "\n", flush=True)
        if args.out:
            write_section(args.out, key, render([], False), replace_pending=cuda and not args.label)

    rows = []
    for dtype in args.dtypes:
        for size in args.sizes:
            if dtype == "fp32" and size > args.fp32_up_to:
                continue
            for mode, upsampler in [(m, None) for m in args.modes] + [(n, n) for n in upsamplers]:
                if mode.startswith("reference") and upsampler is None and args.skip_reference_above and \
                        size > args.skip_reference_above:
                    continue
                kwargs = dict(size=size, mode=mode, dtype=dtype, device=args.device, dim=args.dim,
                              warmup=args.warmup, repeats=args.repeats,
                              backward=not args.no_backward and size <= args.backward_up_to, upsampler=upsampler)
                isolate = not cuda and not args.no_isolate
                r = _measure_isolated(kwargs) if isolate else measure(**kwargs)
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
                if args.out:
                    write_section(args.out, key, render(rows, False), replace_pending=cuda and not args.label)
    text = render(rows, True)
    print(text)
    print(f"({time.time() - started:.0f} s)", file=sys.stderr)
    if args.out:
        write_section(args.out, key, text, replace_pending=cuda and not args.label)
    if failed:
        print("CORRECTNESS FAILURES:\n" + "\n".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
