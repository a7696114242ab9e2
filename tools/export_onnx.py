"""Export an upsampler to ONNX for one backbone grid and one output size (docs/export.md).

    python tools/export_onnx.py --upsampler jafar --checkpoint FILE --feature-dim 384 --grid 32 32 \
        --output-size 448 448 --out jafar.onnx [--check]

The ``key=value`` form works too (``upsampler=jafar checkpoint=FILE feature_dim=384 grid=32,32
output_size=448,448 out=jafar.onnx check=true``). ``--check`` runs the file with onnxruntime on the
CPU on random inputs and prints its max relative error against PyTorch (the ``deploy`` extra).
The graph has the output size as a constant: export one file per output size.
"""

from __future__ import annotations

import argparse
import sys
from typing import List

import torch

#: ``key=value`` keys and the flags they stand for
_KEYS = {"upsampler": "--upsampler", "checkpoint": "--checkpoint", "feature_dim": "--feature-dim", "grid": "--grid",
         "output_size": "--output-size", "image_size": "--image-size", "out": "--out", "opset": "--opset",
         "attention": "--attention", "check": "--check"}


def _flags(argv: List[str]) -> List[str]:
    """``key=value`` arguments as the equivalent flags (pairs given as ``a,b``); flags pass through."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if arg.startswith("-") or not sep:
            out.append(arg)
        elif key not in _KEYS:
            raise SystemExit(f"unknown argument {key}=; expected one of {', '.join(_KEYS)}.")
        elif key == "check":
            out += ["--check"] if value.lower() in ("1", "true", "yes") else []
        else:
            out += [_KEYS[key], *value.split(",")]
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upsampler", default="jafar", help="a registered upsampler (jafar.list_upsamplers())")
    parser.add_argument("--checkpoint", default=None, help="its weights (a file or a release); random when omitted")
    parser.add_argument("--feature-dim", type=int, default=None, help="the backbone's channel count")
    parser.add_argument("--grid", type=int, nargs=2, required=True, metavar=("H", "W"), help="the backbone's patch grid")
    parser.add_argument("--output-size", type=int, nargs=2, required=True, metavar=("H", "W"))
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="the guidance image (default: the output size)")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--attention", default="reference", choices=("reference", "sdpa"), help="JAFAR's attention path")
    parser.add_argument("--check", action="store_true", help="compare with PyTorch through onnxruntime")
    return parser.parse_args(_flags(list(sys.argv[1:] if argv is None else argv)))


def main(argv=None) -> int:
    import jafar
    from jafar.export import ExportError, check_onnx, export_onnx

    args = parse_args(argv)
    try:
        model = jafar.build_upsampler(args.upsampler, feature_dim=args.feature_dim, checkpoint=args.checkpoint).eval()
        path = export_onnx(model, args.out, tuple(args.grid), tuple(args.output_size),
                           image_size=tuple(args.image_size) if args.image_size else None,
                           feature_dim=args.feature_dim, opset=args.opset, attention=args.attention)
    except (ExportError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path} ({args.upsampler}, grid {tuple(args.grid)} -> {tuple(args.output_size)})")
    if args.check:
        torch.manual_seed(0)
        image_size = args.image_size or args.output_size
        dim = args.feature_dim or getattr(model, "v_dim", None) or model.feature_dim
        inputs = (torch.randn(1, getattr(model, "input_dim", 3), *image_size), torch.randn(1, dim, *args.grid))
        print(f"max relative error against PyTorch (onnxruntime, CPU): {check_onnx(path, model, inputs):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
