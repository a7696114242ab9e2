#!/usr/bin/env python
"""Cost of one BeV training step per model x upsampler, in the paper's setting (Table 14):
six 224 x 476 images, batch 1, the DINOv2 ViT-S/14 architecture (random weights: the cost does
not depend on them), the default 200 x 200 x 8 grid.

    python tools/bev_cost.py                                  # every head x upsampler, table on stdout
    python tools/bev_cost.py --models simplebev --upsamplers none bilinear jafar --out docs/bev_cost.md
    python tools/bev_cost.py --models bevformer --layer-queries pointbev chained   # a BEVFormer row per mode

Each configuration runs in its own process (so the CPU peak memory of one does not hide
another's): ``--warmup`` untimed steps, then the median of ``--repeats`` timed steps (forward,
backward, AdamW step). Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, the process's
peak resident set (``ru_maxrss``) minus the resident set before the first step on the CPU.
GFLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on one forward (multiply-adds counted as
2 FLOPs; it counts matrix products and convolutions, which is where JAFAR's and the heads'
work is, on the CPU path), plus what the counter does not see (``grid_sample``, sparse
convolutions, FeatUp's per-tap filtering), counted analytically by each head's
``uncounted_flops(num_cameras)`` and the upsampler's ``uncounted_flops()`` where it has one.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

UPSAMPLERS = ("none", "bilinear", "jafar", "featup")  # featup: its JBU stack (x16, then resized to the output), random weights
MODELS = tuple(sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml")))


#: BEVFormer's model.layer_query modes (bev.heads.bevformer.LAYER_QUERIES)
LAYER_QUERIES = ("pointbev", "chained")


def build_head(model: str, in_channels: int, grid, options=None):
    """The head of ``configs/model/<model>.yaml`` with its default settings (``options``
    override model keys, e.g. ``{"layer_query": "chained"}``), through the BeV tool's own
    construction path (:func:`bev.heads.build_head`)."""
    from bev.heads import build_head as build
    from bev.heads import model_config

    return build(model, in_channels, grid, **{**model_config(model), **(options or {})})


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(model: str, upsampler: str, image_size, grid_cells: int, warmup: int, repeats: int, device: str,
            guidance="output", options=None) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import jafar
    from bev.encoder import build_multicamera_encoder
    from bev.geometry import BevGrid
    from bev.losses import SimpleBevLoss

    torch.manual_seed(0)
    dev = torch.device(device)
    H, W = image_size
    backbone = jafar.build_backbone("vit_small_patch14_dinov2.lvd142m", pretrained=False)
    encoder = build_multicamera_encoder(backbone, upsampler, guidance_size=guidance)
    grid = BevGrid()
    head = build_head(model, encoder.out_channels, grid, options)
    encoder, head, loss = encoder.to(dev), head.to(dev), SimpleBevLoss().to(dev)
    params = [p for m in (encoder, head, loss) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-7)
    X, Y = grid.shape
    n = 6
    cam2ego = torch.eye(4).repeat(1, n, 1, 1)
    for k in range(n):  # cameras around the ego, looking outwards (camera z -> ego yaw direction)
        import math
        yaw = 2 * math.pi * k / n
        R = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # camera -> ego, facing +x
        Rz = torch.tensor([[math.cos(yaw), -math.sin(yaw), 0.0], [math.sin(yaw), math.cos(yaw), 0.0], [0, 0, 1.0]])
        cam2ego[0, k, :3, :3] = Rz @ R
        cam2ego[0, k, :3, 3] = torch.tensor([1.0, 0.0, 1.5])
    K = torch.tensor([[0.3 * 1266.0, 0, W / 2], [0, 0.3 * 1266.0, H / 2], [0, 0, 1]]).repeat(1, n, 1, 1)
    batch = {"images": torch.rand(1, n, 3, H, W), "intrinsics": K, "cam2ego": cam2ego,
             "seg": (torch.rand(1, 1, X, Y) > 0.9).float(), "visibility": torch.full((1, 1, X, Y), 4, dtype=torch.uint8),
             "centerness": torch.rand(1, 1, X, Y), "offset": torch.randn(1, 2, X, Y)}
    batch = {k: v.to(dev) for k, v in batch.items()}

    def step():
        out = head(encoder(batch["images"]), batch["intrinsics"], batch["cam2ego"], (H, W))
        loss(out, batch, point_mask=out.get("point_mask"))["loss"].backward()  # as bev.module: a sparse head's cells
        opt.step()
        opt.zero_grad(set_to_none=True)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        head(encoder(batch["images"]), batch["intrinsics"], batch["cam2ego"], (H, W))
    h, w = encoder.output_size_for(H, W)
    uncounted = head.uncounted_flops(n) if hasattr(head, "uncounted_flops") else 0
    if hasattr(encoder.upsampler, "uncounted_flops"):  # FeatUp's per-pixel filtering
        uncounted += encoder.upsampler.uncounted_flops()
    base_rss = _rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss) / 1024
    label = model + "".join(f" ({v})" for v in (options or {}).values())
    return {"model": label, "upsampler": upsampler, "features": f"{h}x{w}",
            "gflops": (counter.get_total_flops() + uncounted) / 1e9, "step_s": statistics.median(times),
            "peak_gb": peak, "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--upsamplers", nargs="+", default=list(UPSAMPLERS), choices=UPSAMPLERS)
    p.add_argument("--layer-queries", nargs="+", default=list(LAYER_QUERIES), choices=LAYER_QUERIES,
                   help="BEVFormer's model.layer_query modes, one row each (default: both)")
    p.add_argument("--image-size", nargs=2, type=int, default=[224, 476], metavar=("H", "W"))
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.warmup < 0 or args.repeats < 1:
        p.error(f"--warmup must be >= 0 and --repeats >= 1, got {args.warmup} and {args.repeats}.")
    if args.one:
        options = {"layer_query": args.layer_queries[0]} if args.models[0] == "bevformer" else None
        res = measure(args.models[0], args.upsamplers[0], args.image_size, 200, args.warmup, args.repeats,
                      args.device or "cpu", options=options)
        print(json.dumps(res))
        return 0
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    runs = [(m, q) for m in args.models for q in (args.layer_queries if m == "bevformer" else [None])]
    for model, layer_query in runs:
        for up in args.upsamplers:
            cmd = [sys.executable, __file__, "--one", "--models", model, "--upsamplers", up, "--image-size",
                   *map(str, args.image_size), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
                   "--device", args.device] + (["--layer-queries", layer_query] if layer_query else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{model} x {up} failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{rows[-1]['model']:21s} {up:9s} {rows[-1]['step_s']:.2f} s", file=sys.stderr)
    base = {r["model"]: r["gflops"] for r in rows if r["upsampler"] == "none"}
    lines = [f"One training step, six {args.image_size[0]}x{args.image_size[1]} images, batch 1, DINOv2 ViT-S/14 "
             f"architecture, 200x200x8 grid, on {rows[0]['device']} (median of {args.repeats} steps after "
             f"{args.warmup} warm-up).", "",
             "| model | upsampler | features per camera | GFLOPs (forward) | vs none | step time | peak memory |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"+{100 * (r['gflops'] / base[r['model']] - 1):.1f} %" if r["model"] in base else "n/a"
        lines.append(f"| {r['model']} | {r['upsampler']} | {r['features']} | {r['gflops']:.1f} | {rel} | "
                     f"{r['step_s']:.2f} s | {r['peak_gb']:.2f} GB |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
