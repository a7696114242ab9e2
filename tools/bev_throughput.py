#!/usr/bin/env python
"""Throughput of BeV training in the paper's setting: the data loader's samples/s on real-size
1600 x 900 JPEGs with 0, 2 and N loader workers, the training-step time and peak memory of the
chosen heads x upsamplers (``tools/bev_cost.py``'s measurement, one process per configuration),
and from both the wall time of 100 epochs of v1.0-trainval (28,130 samples at batch 1).

    python tools/bev_throughput.py                        # loader + simplebev x none/jafar, on this machine
    python tools/bev_throughput.py --models simplebev pointbev bevformer --upsamplers none bilinear jafar

The loader reads the real key frame of ``tests/fixtures/nuscenes_frame`` (six 1600 x 900 JPEGs,
nuScenes scene-0061, CC BY-NC-SA 4.0) through trainval-sized tables at a small scale
(:mod:`bev.data.trainval_tables`: every record names those six files), with the training
augmentation on (decode, resize, zoom, rotation, crop to 224 x 476) and the labels built; it
times ``--loader-samples`` samples after the first batch. The 100-epoch estimate is
``max(loader time, step time) x 2,813,000 steps``: on the device the steps were measured on
(extrapolated from a few steps, not run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FRAME = Path(os.environ.get("JAFAR_FIXTURES", ROOT / "tests" / "fixtures")) / "nuscenes_frame"
STEPS_100_EPOCHS = 100 * 28130  # batch 1, one device


def loader_rate(root: Path, workers: int, samples: int) -> float:
    """Samples/s of the training loader (augmentation on) over ``samples`` samples, after the first."""
    from torch.utils.data import DataLoader

    from bev.data.nuscenes import NuScenesBev
    from bev.run import SeededSamples, collate

    data = SeededSamples(NuScenesBev(root, "v1.0-trainval", "train", augment=True), seed=0)
    loader = DataLoader(data, batch_size=1, shuffle=False, num_workers=workers, collate_fn=collate,
                        sampler=range(samples + 1), **({"prefetch_factor": 2} if workers else {}))
    it = iter(loader)
    next(it)  # workers started, first batch
    t = time.perf_counter()
    n = 0
    for _ in it:
        n += 1
    rate = n / (time.perf_counter() - t)
    del it, loader
    return rate


def cache_error(root: Path, backbones) -> list:
    """What storing the frozen features in float16 (``encoder.cache_dtype``) does to them, on the
    real key frame (six cameras, 224 x 476, no augmentation): per backbone, the largest
    element-wise relative error over the elements in float16's normal range (|x| >= 2^-14), the
    largest absolute error over the largest magnitude, and the share of elements below that range."""
    import torch

    import jafar
    from bev.data.nuscenes import NuScenesBev

    images = NuScenesBev(root, "v1.0-trainval", "train")[0]["images"]
    out = []
    for name, pretrained in backbones:
        backbone = jafar.build_backbone(name, pretrained=pretrained)
        with torch.no_grad():
            f = backbone(backbone.normalize(images)).double()
        h = f.half().double()
        normal = f.abs() >= 2 ** -14
        rel = ((h - f).abs() / f.abs())[normal].max().item()
        out.append({"backbone": name + ("" if pretrained else " (random weights)"), "shape": list(f.shape),
                    "max_rel_normal": rel, "max_abs_over_max": ((h - f).abs().max() / f.abs().max()).item(),
                    "below_normal": 1 - normal.double().mean().item()})
    return out


def machine() -> str:
    cpu = platform.processor() or "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores available"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["simplebev"])
    p.add_argument("--upsamplers", nargs="+", default=["none", "jafar"])
    p.add_argument("--workers", nargs="+", type=int, default=None,
                   help="loader worker counts (default 0, 2 and the number of cores)")
    p.add_argument("--loader-samples", type=int, default=24)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default=None, help="cpu or cuda for the step rows (default: cuda when available)")
    p.add_argument("--no-steps", action="store_true", help="the loader rows only")
    p.add_argument("--cache-backbones", nargs="*", default=["mobilenetv2_s16:pretrained",
                                                             "vit_small_patch14_dinov2.lvd142m:random"],
                   help="backbones of the float16 cache error (name:pretrained|random)")
    args = p.parse_args(argv)
    if not all(next(FRAME.glob(f"*__{ch}__*.jpg"), None) for ch in ("CAM_FRONT", "CAM_BACK")):
        p.error(f"{FRAME} does not hold the fixture frame's camera images (set JAFAR_FIXTURES).")
    cores = len(os.sched_getaffinity(0))
    workers = args.workers if args.workers is not None else sorted({0, 2, cores})

    from bev.data.tables import CAMERAS
    from bev.data.trainval_tables import write_trainval_tables

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = {ch: str(next(FRAME.glob(f"*__{ch}__*.jpg"))) for ch in CAMERAS}
        write_trainval_tables(tmp, scale=0.002, images=images)
        for w in workers:
            rate = loader_rate(Path(tmp), w, args.loader_samples)
            rows.append({"what": f"data loader, {w} workers", "rate": rate})
            print(f"loader {w} workers: {rate:.2f} samples/s", file=sys.stderr, flush=True)
        errors = cache_error(Path(tmp), [(b.split(":")[0], b.split(":")[1] == "pretrained")
                                         for b in args.cache_backbones])
    steps = []
    if not args.no_steps:
        for model in args.models:
            for up in args.upsamplers:
                cmd = [sys.executable, str(ROOT / "tools" / "bev_cost.py"), "--one", "--models", model,
                       "--upsamplers", up, "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
                if args.device:
                    cmd += ["--device", args.device]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(f"{model} x {up} failed:\n{out.stderr[-2000:]}")
                steps.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"{model} x {up}: {steps[-1]['step_s']:.2f} s", file=sys.stderr, flush=True)

    best = max(rows, key=lambda r: r["rate"])
    print(f"Machine: {machine()}.\n")
    print("| data loader (training augmentation, 6 x 1600x900 JPEG -> 224x476, labels) | samples/s | 100 epochs at this rate |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r['what']} | {r['rate']:.2f} | {STEPS_100_EPOCHS / r['rate'] / 86400:.1f} days |")
    if steps:
        print(f"\n| model | upsampler | device | step time | peak memory | 100 epochs (extrapolated: "
              f"max(step, loader with {best['what'].split(', ')[1]}) x {STEPS_100_EPOCHS:,} steps) |")
        print("|---|---|---|---:|---:|---:|")
        for s in steps:
            per_step = max(s["step_s"], 1 / best["rate"])
            print(f"| {s['model']} | {s['upsampler']} | {s['device']} | {s['step_s']:.2f} s | {s['peak_gb']:.2f} GB | "
                  f"{per_step * STEPS_100_EPOCHS / 86400:.0f} days |")
    if errors:
        print("\n| feature cache in float16: backbone | features (6 cameras) | max relative error (|x| >= 2^-14) | "
              "max abs error / max abs | elements below 2^-14 |\n|---|---|---:|---:|---:|")
        for e in errors:
            print(f"| {e['backbone']} | {'x'.join(map(str, e['shape']))} | {e['max_rel_normal']:.2e} | "
                  f"{e['max_abs_over_max']:.2e} | {100 * e['below_normal']:.3f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
