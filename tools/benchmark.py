#!/usr/bin/env python
"""Speed and memory of JAFAR: the official algorithm beside ours, as a Markdown table.

Protocol of the official ``test/test_time_and_memory.py`` (github PaulCouairon/JAFAR @
94d4d54): batch 1, a random guidance image and output of ``S x S``, random features of
``S/14 x S/14`` keys and 384 channels; "fwd+bwd" is a forward, a 1x1 conv head, ``sum()``
and ``backward()`` with the image and the features requiring grad. Reported: the median of
``--repeats`` timed runs after ``--warmup`` runs, and the peak memory (CUDA:
``max_memory_allocated`` including the model and inputs; CPU: the whole process's peak RSS,
Python and libraries included, each configuration in a fresh process).

"reference" is the official algorithm (``attention="reference"``: the ``(heads, queries,
keys)`` weights are materialised, and PyTorch's GroupNorm); the other rows are our attention
paths (``auto``: the Triton kernel on CUDA) with our GroupNorm. Plain Python, no Hydra, so
that it runs on a bare GPU machine::

    python tools/benchmark.py                       # all sizes, fp32 and bf16, writes nothing
    python tools/benchmark.py --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jafar import JAFAR  # noqa: E402
from jafar.model import GroupNorm  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def measure(size: int, mode: str, dtype: str, device: str, dim: int = 384, warmup: int = 5,
            repeats: int = 20, backward: bool = True, patch: int = 14, parts=("fwd", "fwdbwd")) -> dict:
    """One configuration: forward (no grad) and forward+backward time (ms) and peak (GB)."""
    device = torch.device(device)
    torch.manual_seed(0)
    # the reference rows are the official algorithm throughout: materialising attention and
    # PyTorch's GroupNorm
    GroupNorm.use_var_mean = mode != "reference"
    model = JAFAR(v_dim=dim, attention=mode).to(device)
    image = torch.randn(1, 3, size, size, device=device)
    feats = torch.randn(1, dim, size // patch, size // patch, device=device)
    head = torch.nn.Conv2d(dim, 1, 1).to(device)
    amp = DTYPES[dtype]
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else (lambda: torch.autocast(device.type, enabled=False))
    result = dict(size=size, keys=size // patch, mode=mode, dtype=dtype)

    def forward():
        with torch.no_grad(), autocast():
            model(image, feats, (size, size))

    def forward_backward():
        img, f = image.clone().requires_grad_(), feats.clone().requires_grad_()
        with autocast():
            loss = head(model(img, f, (size, size))).float().sum()
        loss.backward()

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


def table(rows, device_name: str) -> str:
    by = {(r["size"], r["dtype"], r["mode"]): r for r in rows}
    modes = sorted({r["mode"] for r in rows}, key=lambda m: m != "reference")
    header = ["output", "keys", "dtype"]
    for metric in ("forward", "forward peak", "fwd+bwd", "fwd+bwd peak"):
        header += [f"{metric} ({m})" for m in modes]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for size, dtype in sorted({(r["size"], r["dtype"]) for r in rows}, key=lambda t: (t[1], t[0])):
        cells = [f"{size}x{size}", f"{size // 14}x{size // 14}", dtype]
        for key, unit in (("fwd_ms", "ms"), ("fwd_gb", "GB"), ("fwdbwd_ms", "ms"), ("fwdbwd_gb", "GB")):
            cells += [_fmt(by.get((size, dtype, m), {}).get(key), unit) for m in modes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[56, 112, 224, 448, 896])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--modes", nargs="+", default=["reference", "auto"],
                   help="attention paths to compare: reference, auto, chunked, sdpa")
    p.add_argument("--dim", type=int, default=384, help="feature channels (ViT-S: 384)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--skip-reference-above", type=int, default=None,
                   help="skip the reference path above this output size (it needs O(S^4) memory)")
    p.add_argument("--out", type=Path, help="also write the table (Markdown) to this file")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:  # child process of _measure_isolated
        print(json.dumps(measure(**json.loads(args.one))))
        return

    if args.device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(args.device))
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    rows = []
    for dtype in args.dtypes:
        for size in args.sizes:
            for mode in args.modes:
                if mode == "reference" and args.skip_reference_above and size > args.skip_reference_above:
                    continue
                kwargs = dict(size=size, mode=mode, dtype=dtype, device=args.device, dim=args.dim,
                              warmup=args.warmup, repeats=args.repeats, backward=not args.no_backward)
                r = measure(**kwargs) if args.device.startswith("cuda") else _measure_isolated(kwargs)
                rows.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    text = (f"Device: {name}; torch {torch.__version__}; batch 1, {args.dim} channels, keys = output/14, "
            f"median of {args.repeats} runs after {args.warmup} warm-up runs; fp32 runs use PyTorch's defaults "
            f"(TF32 matmul {tf32[0]}, TF32 cuDNN {tf32[1]}); bf16 = autocast on fp32 inputs.\n\n"
            + table(rows, name) + "\n")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
