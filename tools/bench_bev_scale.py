#!/usr/bin/env python
"""BeV data at nuScenes v1.0-trainval scale: table loading, data-set construction, label
building and the prior baseline, in time and peak memory, each phase in a fresh process.

    python tools/make_synthetic_nuscenes.py --out /tmp/trainval --tables-only \\
        --images tests/fixtures/nuscenes_frame
    python tools/bench_bev_scale.py --root /tmp/trainval [--workers 2] [--stack-samples 500]

Phases (a table row each): ``load`` (the devkit's NuScenes), ``build-twice`` (the training and
validation sets each loading the tables), ``build-once`` (``bev.run.build_datasets``: one
load for both), ``targets`` (per-sample label time), ``prior-counts`` (the
streamed per-cell counts over every training and validation sample + the threshold search, with
``--workers`` loader processes), ``prior-stack N`` (the baseline from stacked label maps,
``bev.module.stacked_prior_baseline``, on the first N training samples; its full-size
figures are extrapolated from these, and said to be). Peak RSS is the process's own
(``ru_maxrss``) plus, for ``prior-counts``, its loader workers'; "extra" is the peak minus the RSS
the phase started from.
"""

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def grid():
    from bev.geometry import BevGrid

    return BevGrid()  # the paper's 200 x 200 cells of 0.5 m


def data_cfg(root):
    from omegaconf import OmegaConf

    from bev.config import compose

    cfg = compose(f"data.dataroot={root}", "data.augment=false")
    return cfg.data if "data" in cfg else OmegaConf.create({})


def phase(name, root, args):
    start_rss = rss_mb()
    t = time.perf_counter()
    out = {}
    if name == "load":
        from bev.data.nuscenes import load_tables

        nusc = load_tables(root, "v1.0-trainval")
        out["records"] = {k: len(getattr(nusc, k)) for k in ("scene", "sample", "sample_data", "ego_pose",
                                                              "sample_annotation")}
    elif name == "build-twice":
        from bev.run import build_dataset

        cfg = data_cfg(root)
        train = build_dataset(cfg, "train", grid(), augment=False)
        val = build_dataset(cfg, "val", grid(), augment=False)
        out["samples"] = [len(train), len(val)]
    elif name == "build-once":
        from bev.run import build_datasets

        train, val = build_datasets(data_cfg(root), grid())
        out["samples"] = [len(train), len(val)]
        with open(args.cache, "wb") as f:
            pickle.dump((train, val), f)
        out["pickled_mb"] = round(os.path.getsize(args.cache) / 2 ** 20, 1)
    elif name == "targets":
        with open(args.cache, "rb") as f:
            train, _ = pickle.load(f)
        n = 300
        t = time.perf_counter()
        for i in range(n):
            train.targets(i * 37 % len(train))
        out["ms_per_sample"] = round((time.perf_counter() - t) / n * 1e3, 2)
    elif name == "prior-counts":
        from bev.module import prior_baseline
        from bev.run import label_counts

        with open(args.cache, "rb") as f:
            train, val = pickle.load(f)
        start_rss, t = rss_mb(), time.perf_counter()
        shape = tuple(grid().shape)
        tr = label_counts(train, shape, levels=(2,), num_workers=args.workers)
        va = label_counts(val, shape, levels=(1, 2), num_workers=args.workers)
        t_counts = time.perf_counter() - t
        result = prior_baseline(tr, va)
        out.update(result)
        out["counts_s"] = round(t_counts, 1)
        import numpy as np

        freq = tr.frequency()
        out["thresholds"] = int(np.unique(freq[freq > 0]).size) + 1
    elif name.startswith("prior-stack"):
        import numpy as np

        from bev.module import stacked_prior_baseline

        n = int(name.split(":")[1])
        with open(args.cache, "rb") as f:
            train, val = pickle.load(f)
        start_rss, t = rss_mb(), time.perf_counter()
        # every label map stacked, then the search over the stacks
        tr = [train.targets(i) for i in range(n)]
        tr_seg = np.stack([x["seg"][0] for x in tr])
        tr_vis = np.stack([x["visibility"][0] for x in tr])
        del tr
        nv = max(1, n * len(val) // len(train))
        va = [val.targets(i) for i in range(nv)]
        va_seg, va_vis = np.stack([x["seg"][0] for x in va]), np.stack([x["visibility"][0] for x in va])
        del va
        t_stack = time.perf_counter() - t
        t2 = time.perf_counter()
        freq = tr_seg.astype(np.float64).mean(0)
        out["thresholds"] = int(np.unique(freq[freq > 0]).size) + 1
        result = stacked_prior_baseline(tr_seg, tr_vis, va_seg, va_vis)
        out.update(result)
        out["stack_s"] = round(t_stack, 1)
        out["search_s"] = round(time.perf_counter() - t2, 1)
        out["s_per_threshold"] = round(out["search_s"] / out["thresholds"], 4)
        out["samples"] = [n, nv]
    else:
        raise ValueError(f"unknown phase {name!r}")
    out["seconds"] = round(time.perf_counter() - t, 1)
    out["peak_rss_mb"] = round(peak_mb() + (peak_mb(resource.RUSAGE_CHILDREN) if name == "prior-counts" else 0), 0)
    out["extra_mb"] = round(out["peak_rss_mb"] - start_rss, 0)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True, help="dataroot of the trainval-sized tables")
    p.add_argument("--workers", type=int, default=2, help="loader processes of the streamed prior")
    p.add_argument("--stack-samples", type=int, nargs="*", default=[500],
                   help="training samples of the stacked (old) prior, measured then extrapolated (2000 took over "
                        "40 minutes on this machine: one threshold is a pass over every stacked map)")
    p.add_argument("--phases", nargs="*", default=None, help="run only these phases")
    p.add_argument("--cache", type=Path, default=Path("/tmp/bench_bev_scale_datasets.pkl"))
    p.add_argument("--_phase", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._phase:
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(phase(args._phase, str(args.root), args)))
        return
    if not (args.root / "v1.0-trainval" / "sample.json").is_file():
        p.error(f"{args.root} holds no v1.0-trainval tables (make them with tools/make_synthetic_nuscenes.py "
                "--tables-only).")
    phases = args.phases or (["load", "build-twice", "build-once", "targets", "prior-counts"]
                             + [f"prior-stack:{n}" for n in args.stack_samples])
    rows = {}
    for name in phases:
        cmd = [sys.executable, __file__, "--root", str(args.root), "--workers", str(args.workers),
               "--cache", str(args.cache), "--_phase", name]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            print(proc.stderr[-2000:])
            raise SystemExit(f"phase {name} failed")
        rows[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{name:>16}: {json.dumps(rows[name])}", flush=True)
    if "prior-counts" in rows and any(k.startswith("prior-stack") for k in rows):
        last = max((k for k in rows if k.startswith("prior-stack")), key=lambda k: int(k.split(":")[1]))
        r, n = rows[last], int(last.split(":")[1])
        full = rows.get("build-once", {}).get("samples", [28130, 6019])
        scale = full[0] / n
        thresholds = rows["prior-counts"]["thresholds"]
        print(f"\nthe stacked prior at {full[0]} + {full[1]} samples, EXTRAPOLATED linearly from {n} samples: "
              f"memory ~{r['extra_mb'] * scale / 1024:.1f} GB, time ~{r['s_per_threshold'] * scale * thresholds / 3600:.1f} h "
              f"({thresholds} thresholds x {r['s_per_threshold'] * scale:.2f} s)")
    print("\n| phase | seconds | peak RSS (MB) | extra (MB) |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['seconds']} | {r['peak_rss_mb']:.0f} | {r['extra_mb']:.0f} |")


if __name__ == "__main__":
    main()
