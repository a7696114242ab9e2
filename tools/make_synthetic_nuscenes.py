#!/usr/bin/env python
"""Write (or reuse) a synthetic nuScenes: devkit tables, six rendered cameras, splits.json.

    python tools/make_synthetic_nuscenes.py --out data/synthetic_nuscenes --scenes 30
    python -c "from nuscenes import NuScenes; NuScenes('v1.0-mini', 'data/synthetic_nuscenes')"
    python tools/make_synthetic_nuscenes.py --out /tmp/syn --scenes 2 --picture syn.png

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
    p.add_argument("--scenes", type=int, required=True, help="number of scenes")
    p.add_argument("--samples-per-scene", type=int, default=DEFAULT_SAMPLES_PER_SCENE,
                   help="key frames per scene, 0.5 s apart (default %(default)s)")
    p.add_argument("--image-size", type=int, nargs=2, metavar=("W", "H"), default=list(DEFAULT_IMAGE_SIZE),
                   help="rendered camera size (default %(default)s)")
    p.add_argument("--version", default="v1.0-mini", help="table folder name (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-scenes", type=int, default=None,
                   help="scenes in the val split, the last ones (default max(1, scenes // 5))")
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: one per core)")
    p.add_argument("--picture", type=Path, help="also draw the first sample's cameras with boxes and BeV mask (PNG)")
    args = p.parse_args(argv)
    start = time.time()
    try:
        out = generate(args.out, args.scenes, samples_per_scene=args.samples_per_scene, image_size=args.image_size,
                       version=args.version, seed=args.seed, val_scenes=args.val_scenes, workers=args.workers)
    except ValueError as err:
        p.error(str(err))
    print(f"{out} ({time.time() - start:.1f} s)")
    if args.picture:
        from nuscenes import NuScenes

        from bev.viz import draw_sample

        nusc = NuScenes(args.version, str(out), verbose=False)
        print(draw_sample(nusc, nusc.sample[0]["token"], args.picture))
    return out


if __name__ == "__main__":
    main()
