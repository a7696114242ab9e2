#!/usr/bin/env python
"""Cost of one BeV training step per model x upsampler, in the paper's setting (Table 14):
six 224 x 476 images, batch 1, the DINOv2 ViT-S/14 architecture (random weights: the cost does
not depend on them), the default 200 x 200 x 8 grid.

    python tools/bev_cost.py                                  # every head x upsampler, table on stdout
    python tools/bev_cost.py --models simplebev --upsamplers none bilinear jafar --out docs/bev_cost.md
    python tools/bev_cost.py --models bevformer --layer-queries pointbev chained   # a BEVFormer row per mode
    python tools/bev_cost.py --models simplebev --upsamplers jafar --guidance image  # JAFAR guided by the camera image

Each configuration runs in its own process (so the CPU peak memory of one does not hide
another's): ``--warmup`` untimed steps, then the median of ``--repeats`` timed steps (forward,
backward, AdamW step). Peak memory, in MiB (the unit of the paper's Table 14, whose column is
GPU training memory): ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the process's
peak resident set (``ru_maxrss``) minus the resident set before the first step, which is not
GPU memory (the table's header says which one it is).
GFLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on one forward (multiply-adds counted as
2 FLOPs; it counts matrix products and convolutions, which is where JAFAR's and the heads'
work is, on the CPU path), with PyTorch's fused CPU attention kernel counted too
(:func:`flop_counter`: the counter has no formula for it, so the backbone's attention would be
missing), plus what the counter does not see (``grid_sample``, sparse convolutions, FeatUp's
per-tap filtering), counted analytically by each head's ``uncounted_flops(num_cameras)`` and the
upsampler's ``uncounted_flops()`` where it has one.

BEVFormer rows per ``model.layer_query`` mode (``--layer-queries``, one row each, default all):
``pointbev`` (the default: PointBeV's output, one layer built and run), ``pointbev_all_layers``
(the same output at PointBeV's cost: its six layers run, five discarded) and ``chained``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: featup: its JBU stack (x16, then resized to the output); loftup: LoftUp (jafar/upsamplers/loftup.py), computed
#: at the output size; both with random weights (the cost does not depend on them), as in the paper's Table 14
UPSAMPLERS = ("none", "bilinear", "jafar", "featup", "loftup")
MODELS = tuple(sorted(p.stem for p in (ROOT / "configs" / "model").glob("*.yaml")))


#: BEVFormer's model.layer_query modes (bev.heads.bevformer.LAYER_QUERIES)
LAYER_QUERIES = ("pointbev", "pointbev_all_layers", "chained")
#: the guidance image given to an upsampler that takes one: the output size (the BeV encoder's
#: default) or the camera image itself
GUIDANCE = ("output", "image")
#: the upsamplers whose output depends on the guidance image (the table's guidance column)
GUIDED = ("jafar", "featup", "loftup")


def sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of one ``scaled_dot_product_attention`` from its shapes: ``Q K^T`` and ``P V``, 2 FLOPs
    per multiply-add, ``2 * B * heads * Lq * Lk * (d_qk + d_v)`` (``4 * B * heads * Lq * Lk *
    head_dim`` when values and queries are as wide): the two matrix products the unfused path
    computes and the counter counts there; the scaling and softmax are not counted, as nowhere else
    (torch's ``torch.utils.flop_counter.sdpa_flop_count``, which it applies to the CUDA kernels,
    counts the same)."""
    *lead, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * math.prod(lead) * lq * lk * (d + dv)


def flop_counter():
    """``torch.utils.flop_counter.FlopCounterMode`` (no display) that also counts PyTorch's fused
    attention on the CPU. ``F.scaled_dot_product_attention`` (timm's ``Attention`` with
    ``fused_attn``, the DINOv2 backbone's every block) dispatches there to
    ``aten._scaled_dot_product_flash_attention_for_cpu``, for which torch registers no formula
    (it has them for the CUDA kernels only), so the counter counts it as 0: 32.8 GFLOPs of the
    ViT-S/14's attention for six 224 x 476 images. :func:`sdpa_flops` is given for it, unless a
    torch version registers its own. The count is the forward's (the kernel's backward is not
    mapped)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    mapping = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None and op not in flop_registry:
        mapping[op] = sdpa_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


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
    """One configuration's row. ``guidance``: ``"output"``, ``"image"`` (the camera image's size)
    or an ``(H_g, W_g)`` pair, the encoder's ``guidance_size``."""
    import torch

    import jafar
    from bev.encoder import build_multicamera_encoder
    from bev.geometry import BevGrid
    from bev.losses import SimpleBevLoss

    torch.manual_seed(0)
    dev = torch.device(device)
    H, W = image_size
    backbone = jafar.build_backbone("vit_small_patch14_dinov2.lvd142m", pretrained=False)
    guidance_size = (H, W) if guidance == "image" else guidance
    encoder = build_multicamera_encoder(backbone, upsampler, guidance_size=guidance_size)
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

    with torch.no_grad(), flop_counter() as counter:
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
        peak_mib, memory = torch.cuda.max_memory_allocated() / 2 ** 20, "GPU max_memory_allocated"
    else:  # ru_maxrss: KiB on Linux
        peak_mib, memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base_rss, "CPU peak RSS"
    label = model + "".join(f" ({v})" for v in (options or {}).values())
    g_size = guidance_size if guidance_size != "output" else (h, w)
    return {"model": label, "upsampler": upsampler, "guidance": "x".join(map(str, g_size)), "features": f"{h}x{w}",
            "gflops": (counter.get_total_flops() + uncounted) / 1e9, "step_s": statistics.median(times),
            "peak_mib": peak_mib, "peak_gb": peak_mib / 1024, "memory": memory,
            "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--upsamplers", nargs="+", default=list(UPSAMPLERS), choices=UPSAMPLERS)
    p.add_argument("--layer-queries", nargs="+", default=list(LAYER_QUERIES), choices=LAYER_QUERIES,
                   help="BEVFormer's model.layer_query modes, one row each (default: all)")
    p.add_argument("--guidance", default="output", choices=GUIDANCE,
                   help="guidance image of the upsamplers that take one: the output size (default) or the camera image")
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
                      args.device or "cpu", guidance=args.guidance, options=options)
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
                   "--device", args.device, "--guidance", args.guidance] + (
                       ["--layer-queries", layer_query] if layer_query else [])
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(f"{model} x {up} failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{rows[-1]['model']:21s} {up:9s} {rows[-1]['step_s']:.2f} s", file=sys.stderr)
    base = {r["model"]: r["gflops"] for r in rows if r["upsampler"] == "none"}
    memory = rows[0]["memory"]
    legend = ("peak memory: torch.cuda.max_memory_allocated, GPU training memory as in the paper's Table 14"
              if memory.startswith("GPU") else
              "peak memory: the process's peak resident set (CPU RAM) above the one before the first step, "
              "not the GPU training memory of the paper's Table 14")
    lines = [f"One training step, six {args.image_size[0]}x{args.image_size[1]} images, batch 1, DINOv2 ViT-S/14 "
             f"architecture, 200x200x8 grid, on {rows[0]['device']} (median of {args.repeats} steps after "
             f"{args.warmup} warm-up); {legend}.", "",
             f"| model | upsampler | guidance | features per camera | GFLOPs (forward) | vs none | step time | "
             f"peak memory ({memory}, MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = ("" if r["upsampler"] == "none" else f"+{100 * (r['gflops'] / base[r['model']] - 1):.1f} %"
               if r["model"] in base else "n/a")
        lines.append(f"| {r['model']} | {r['upsampler']} | {r['guidance'] if r['upsampler'] in GUIDED else ''} | "
                     f"{r['features']} | {r['gflops']:.1f} | {rel} | {r['step_s']:.2f} s | {r['peak_mib']:.0f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
