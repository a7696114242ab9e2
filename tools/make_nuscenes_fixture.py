#!/usr/bin/env python
"""Write nuScenes devkit tables for the real key frame of ``tests/fixtures/nuscenes_frame``.

    python tools/make_nuscenes_fixture.py --out /tmp/nuscenes_frame
    python -c "from nuscenes import NuScenes; NuScenes('v1.0-mini', '/tmp/nuscenes_frame')"
    python tools/make_nuscenes_fixture.py --out /tmp/nuscenes_frame --picture frame.png
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bev.data.from_mmdet3d import write_tables  # noqa: E402

DEFAULT_INFO = ROOT / "tests" / "fixtures" / "nuscenes_frame" / "n015-2018-07-24-11-22-45+0800.pkl"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--info", type=Path, default=DEFAULT_INFO, help="mmdetection3d info pickle (v1.1)")
    p.add_argument("--out", type=Path, required=True, help="dataroot to write (tables + samples/)")
    p.add_argument("--version", default="v1.0-mini")
    p.add_argument("--picture", type=Path, help="also draw the six cameras with boxes and the BeV mask (PNG)")
    args = p.parse_args(argv)
    if not args.info.is_file():
        p.error(f"--info {args.info} does not exist")
    print(write_tables(args.info, args.out, args.version))
    if args.picture:
        from nuscenes import NuScenes

        from bev.viz import draw_sample

        nusc = NuScenes(args.version, str(args.out), verbose=False)
        print(draw_sample(nusc, nusc.sample[0]["token"], args.picture))


if __name__ == "__main__":
    main()
