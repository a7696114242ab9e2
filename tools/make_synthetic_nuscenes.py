#!/usr/bin/env python
"""Write (or reuse) a synthetic nuScenes: devkit tables, six rendered cameras, splits.json.

    python tools/make_synthetic_nuscenes.py --out data/synthetic_nuscenes --scenes 30
    python -c "from nuscenes import NuScenes; NuScenes('v1.0-mini', 'data/synthetic_nuscenes')"
    python tools/make_synthetic_nuscenes.py --out /tmp/syn --scenes 2 --picture syn.png
    python tools/make_synthetic_nuscenes.py --out /tmp/trainval --tables-only \
        --images tests/fixtures/nuscenes_frame              # v1.0-trainval's size, tables only

``--tables-only`` writes devkit tables with v1.0-trainval's record counts (850 real scene names in
the official splits, 28,130 + 6,019 samples, ~1.17 M annotations, ~2.6 M sample_data and
ego_pose records) and no rendering: every camera record names one shared image per camera
(``--images``: a folder holding one ``*__<CHANNEL>__*.jpg`` per camera, copied in); ``--scale``
keeps that share of the scenes (see bev/data/trainval_tables.py).

A folder made with the same options is reused as it is; other options regenerate it (see
bev/data/synthetic.py for what is drawn and how).
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bev.data.synthetic import DEFAULT_IMAGE_SIZE, DEFAULT_SAMPLES_PER_SCENE, generate  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="dataroot to write (tables, samples/, splits.json)")
    p.add_argument("--scenes", type=int, help="number of scenes (rendered mode)")
    p.add_argument("--tables-only", action="store_true",
                   help="write v1.0-trainval-sized tables without rendering (bev/data/trainval_tables.py)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="with --tables-only: the share of v1.0-trainval's scenes (default %(default)s)")
    p.add_argument("--images", type=Path, help="with --tables-only: folder with one *__<CHANNEL>__*.jpg per camera")
    p.add_argument("--samples-per-scene", type=int, default=DEFAULT_SAMPLES_PER_SCENE,
                   help="key frames per scene, 0.5 s apart (default %(default)s)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("W", "H"), default=list(DEFAULT_IMAGE_SIZE),
                   help="rendered camera size (default %(default)s)")
    p.add_argument("--version", default=None,
                   help="table folder name (default v1.0-mini; with --tables-only v1.0-trainval)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-scenes", type=int, default=None,
                   help="scenes in the val split, the last ones (default max(1, scenes // 5))")
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: one per core)")
    p.add_argument("--picture", type=Path, help="also draw the first sample's cameras with boxes and BeV mask (PNG)")
    args = p.parse_args(argv)
    start = time.time()
    if args.tables_only:
        return tables_only(p, args, start)
    if args.scenes is None:
        p.error("--scenes is required (or --tables-only for v1.0-trainval-sized tables without images).")
    try:
        out = generate(args.out, args.scenes, samples_per_scene=args.samples_per_scene, image_size=args.image_size,
                       version=args.version or "v1.0-mini", seed=args.seed, val_scenes=args.val_scenes, workers=args.workers)
    except ValueError as err:
        p.error(str(err))
    print(f"{out} ({time.time() - start:.1f} s)")
    if args.picture:
        from nuscenes import NuScenes

        from bev.viz import draw_sample

        nusc = NuScenes(args.version or "v1.0-mini", str(out), verbose=False)
        print(draw_sample(nusc, nusc.sample[0]["token"], args.picture))
    return out


def tables_only(p, args, start):
    from bev.data.tables import CAMERAS
    from bev.data.trainval_tables import write_trainval_tables

    images = None
    if args.images is not None:
        images = {}
        for ch in CAMERAS:
            found = sorted(args.images.glob(f"*__{ch}__*.jpg"))
            if not found:
                p.error(f"--images {args.images} has no *__{ch}__*.jpg (expected one image per camera, as in "
                        "tests/fixtures/nuscenes_frame).")
            images[ch] = str(found[0])
    version = args.version or "v1.0-trainval"
    try:
        counts = write_trainval_tables(args.out, version=version, scale=args.scale, seed=args.seed, images=images,
                                       verbose=True)
    except ValueError as err:
        p.error(str(err))
    print(f"{args.out / version}: {counts} ({time.time() - start:.1f} s)")
    return args.out


if __name__ == "__main__":
    main()
