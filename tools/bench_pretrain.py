#!/usr/bin/env python
"""Training speed of the official pretraining recipe: our attention beside the official one.

One optimiser step of ``JafarPretraining`` (official recipe: 448 images, batch 4, input view
scale U(0.25, 0.5), guidance 224, consistency term, bf16 autocast, AdamW) with a frozen DINOv2
ViT-S/14 (random weights: the architecture is what costs), for ``attention="reference"`` (the
official, materialising algorithm) and ``attention="auto"``. Prints a Markdown table of the
median step time, steps per second and peak memory. Plain Python (no Hydra), e.g. on a bare
GPU machine::

    python tools/bench_pretrain.py --steps 30
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jafar import JAFAR, build_backbone  # noqa: E402
from jafar.train.module import JafarPretraining  # noqa: E402


def bench(mode: str, device: torch.device, backbone_name: str, batch: int, size: int, steps: int, warmup: int,
          precision: str, backbone_kwargs: dict = None) -> dict:
    """One row: ``mode`` is the attention; ``"reference"`` is the official algorithm, with the
    official GroupNorm too. ``backbone_kwargs`` go to timm (e.g. a tiny ViT for smoke runs)."""
    torch.manual_seed(0)
    backbone = build_backbone(backbone_name, pretrained=False, **(backbone_kwargs or {})).to(device)
    group_norm = "official" if mode == "reference" else "auto"
    module = JafarPretraining(backbone, JAFAR(v_dim=backbone.embed_dim, attention=mode, group_norm=group_norm)).to(device)
    module.log_dict = module.log = lambda *a, **k: None
    opt = module.configure_optimizers()
    pixels = torch.rand(batch, 3, size, size, device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = module.training_step({"image": pixels, "skipped": []}, 0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    try:
        for i in range(warmup + steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        return dict(mode=mode, ms="OOM", sps="OOM", gb="OOM")
    med = statistics.median(times)
    gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return dict(mode=mode, ms=f"{med * 1e3:.1f}", sps=f"{1 / med:.2f}", gb=f"{gb:.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", nargs="+", default=["reference", "auto"])
    p.add_argument("--backbone", default="vit_small_patch14_dinov2.lvd142m")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=448)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = [bench(m, device, args.backbone, args.batch, args.size, args.steps, args.warmup, args.precision)
            for m in args.modes]
    print(f"Device: {name}; torch {torch.__version__}; official recipe: {args.backbone} (random weights), "
          f"batch {args.batch}, {args.size}px, {args.precision} autocast; median of {args.steps} steps after "
          f"{args.warmup} warm-up steps\n")
    print("| attention | step time | steps/s | peak memory |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['ms']} ms | {r['sps']} | {r['gb']} GB |")


if __name__ == "__main__":
    main()
