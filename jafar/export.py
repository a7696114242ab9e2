"""ONNX export of an upsampler for one backbone grid and one output size (``docs/export.md``).

:func:`export_onnx` writes an ONNX graph ``(image, features) -> upsampled features`` of any
:class:`jafar.upsamplers.Upsampler` that the TorchScript-based exporter of ``torch.onnx`` can trace;
:func:`check_onnx` runs the file with onnxruntime on the CPU and returns its largest error against
PyTorch. Both need the ``deploy`` extra (``pip install -e ".[deploy]"``: onnx and onnxruntime); the
export itself needs only torch.

**One model per output size.** The output size is not an input of the graph: JAFAR pools its
query map to the output size (``adaptive_avg_pool2d``, whose ONNX form needs a constant output
size), and the tokens of its attention are reshaped to that size, so the traced graph holds the
size as constants. Export one file per output size (and per image size, feature grid and batch,
which are fixed the same way: a dynamic axis makes the exporter refuse the pooling, whose ONNX
form needs the input size too).

What the export changes, on a copy of the upsampler (the caller's module is never modified):

* JAFAR runs its ``attention="reference"`` path (the official softmax, materialising the
  ``(B, heads, H_out * W_out, h * w)`` weights; ``attention="sdpa"`` is accepted too), its
  PyTorch encoders (``encoders="torch"``, no ``torch.compile``) and ``nn.GroupNorm``
  (``group_norm="native"``), in float32 on the CPU;
* ``F.rms_norm`` (JAFAR's RMSNorm), which opset 17 lacks, is traced as its formula
  ``x / sqrt(mean(x^2) + eps) * weight``;
* ``F.adaptive_avg_pool2d`` is traced as the identity (same size), an ``avg_pool2d`` (a size that
  divides the input) or, for a size that does not divide the input (which the exporter refuses),
  two matrix products with the pooling matrices: the same averages.

Upsamplers that run the backbone again (``large_image``, ``strided``) are refused: their graph
would contain the backbone, whose input size changes with the image (export the backbone itself).
"""

from __future__ import annotations

import copy
import math
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .upsamplers.base import check_output_size

PathLike = Union[str, os.PathLike]

#: JAFAR attention paths that the exporter can trace (``jafar.layers.attention``)
EXPORTABLE_ATTENTION = ("reference", "sdpa")
#: upsamplers refused by class name, and why (one sentence each)
NOT_EXPORTABLE = {
    "LargeImage": "it runs the backbone again on an enlarged image, so its graph would be the backbone's; export the "
                  "backbone instead",
    "Strided": "it runs the backbone again at a reduced patch stride, so its graph would be the backbone's; export the "
               "backbone instead",
}


class ExportError(ValueError):
    """An upsampler that cannot be exported, or an export that was asked for wrongly (one sentence)."""


def _pool_matrix(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """``(size_out, size_in)`` matrix of adaptive average pooling along one axis (PyTorch's bins:
    ``[floor(i * n / m), ceil((i + 1) * n / m))``)."""
    m = torch.zeros(size_out, size_in, dtype=like.dtype)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, math.ceil((i + 1) * size_in / size_out)
        m[i, start:end] = 1.0 / (end - start)
    return m.to(like.device)


class _ExportableOps(TorchFunctionMode):
    """While tracing: ``F.rms_norm`` as its formula (no RMSNormalization before opset 23) and
    ``F.adaptive_avg_pool2d`` as the identity, an ``avg_pool2d`` (equal bins) or matrix products
    (unequal bins, which the exporter refuses), with the sizes read here and not from the graph.
    Scoped to the export call; the modules are untouched."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.rms_norm:
            return _rms_norm(*args, **kwargs)
        if func is F.adaptive_avg_pool2d:
            x, size = args[0], kwargs.get("output_size", args[1] if len(args) > 1 else None)
            size = (size, size) if isinstance(size, int) else tuple(size)
            h, w = int(x.shape[-2]), int(x.shape[-1])
            size = tuple(int(s) if s is not None else d for s, d in zip(size, (h, w)))
            if (h, w) == size:
                return x
            if h % size[0] == 0 and w % size[1] == 0:  # equal bins: a plain AvgPool, no shape lookup in the graph
                return F.avg_pool2d(x, (h // size[0], w // size[1]))
            return _pool_matrix(h, size[0], x) @ x @ _pool_matrix(w, size[1], x).t()
        return func(*args, **kwargs)


def _rms_norm(x, normalized_shape, weight=None, eps=None):
    dims = tuple(range(-len(normalized_shape), 0))
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    y = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
    return y * weight if weight is not None else y


class _Graph(nn.Module):
    """``(image, features) -> upsampler(image, features, output_size)`` with the size fixed."""

    def __init__(self, upsampler: nn.Module, output_size: Tuple[int, int]):
        super().__init__()
        self.upsampler, self.output_size = upsampler, output_size

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.upsampler(image, features, self.output_size)


def _pair(name: str, value) -> Tuple[int, int]:
    try:
        return check_output_size(value)
    except ValueError:
        raise ExportError(f"{name} must be a pair of positive ints, got {value!r}.") from None


def _feature_dim(upsampler: nn.Module, feature_dim: Optional[int]) -> int:
    known = getattr(upsampler, "v_dim", None) or getattr(upsampler, "feature_dim", None)
    if feature_dim is None and known is None:
        raise ExportError(f"{type(upsampler).__name__} does not say how many channels its features have: pass "
                          f"feature_dim=<the backbone's width>.")
    if feature_dim is not None and known is not None and int(feature_dim) != int(known):
        raise ExportError(f"feature_dim={feature_dim} does not match the {type(upsampler).__name__}'s {known} channels.")
    return int(feature_dim if feature_dim is not None else known)


def _export_copy(upsampler: nn.Module, attention: str) -> nn.Module:
    """A float32 CPU copy in eval mode, with JAFAR switched to paths the exporter traces."""
    from .upsamplers.jafar import JAFAR

    model = copy.deepcopy(upsampler).cpu().float().eval()
    if isinstance(model, JAFAR):
        if attention not in EXPORTABLE_ATTENTION:
            raise ExportError(f"attention must be one of {EXPORTABLE_ATTENTION} for the export, got {attention!r}.")
        model.attention, model.encoders, model.compile, model._compiled_encode = attention, "torch", False, None
        model.check_finite = False  # a data-dependent check: the graph has no branch for it
        model.set_group_norm("native")
    return model


def export_onnx(upsampler: nn.Module, path: PathLike, feature_grid: Sequence[int], output_size: Sequence[int],
                image_size: Optional[Sequence[int]] = None, feature_dim: Optional[int] = None, opset: int = 17,
                attention: str = "reference", batch: int = 1) -> Path:
    """Write ``upsampler`` as an ONNX model ``(image, features) -> out`` and return the path.

    One model per output size: the graph takes ``image`` ``(B, 3, *image_size)`` and ``features``
    ``(B, feature_dim, *feature_grid)`` and returns ``out`` ``(B, feature_dim, *output_size)``;
    every size, the batch ``B`` included, is a constant of the graph (JAFAR pools its queries to
    the output size and reshapes its attention tokens to it). Export again for another size.

    Args:
        upsampler: any registered upsampler (``jafar.build_upsampler``) but the ones that run the
            backbone again (``large_image``, ``strided``); it is copied, never modified.
        path: the ``.onnx`` file to write (folders are created).
        feature_grid: the backbone's patch grid ``(h, w)``.
        output_size: ``(H_out, W_out)``.
        image_size: ``(H, W)`` of the guidance image; default: ``output_size``.
        feature_dim: the features' channel count; default: the upsampler's own (JAFAR's ``v_dim``,
            a learned peer's ``feature_dim``), required for training-free upsamplers.
        opset: the ONNX opset (17 by default).
        attention: JAFAR's attention path in the graph, ``"reference"`` (default) or ``"sdpa"``.
        batch: the batch size ``B`` of the graph (1 by default).

    Raises:
        ExportError: in one sentence, for an upsampler that cannot be exported (which, and why) or
            wrong arguments.
    """
    if not isinstance(upsampler, nn.Module) or not callable(getattr(upsampler, "forward", None)):
        raise ExportError(f"upsampler must be an nn.Module called as upsampler(image, features, output_size), got "
                          f"{type(upsampler).__name__}.")
    name = type(upsampler).__name__
    if name in NOT_EXPORTABLE:
        raise ExportError(f"the {name} upsampler cannot be exported to ONNX: {NOT_EXPORTABLE[name]}.")
    grid, size = _pair("feature_grid", feature_grid), _pair("output_size", output_size)
    image_hw = _pair("image_size", image_size) if image_size is not None else size
    dim = _feature_dim(upsampler, feature_dim)
    in_dim = getattr(upsampler, "input_dim", 3)
    model = _Graph(_export_copy(upsampler, attention), size)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ExportError(f"batch must be a positive int, got {batch!r}.")
    image, features = torch.randn(batch, in_dim, *image_hw), torch.randn(batch, dim, *grid)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), _ExportableOps(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values becoming constants
            torch.onnx.export(model, (image, features), str(path), opset_version=opset, dynamo=False,
                              input_names=["image", "features"], output_names=["out"])
    except ExportError:
        raise
    except Exception as exc:
        # the exporter's first line, without its request for a pull request
        reason = str(exc).strip().splitlines()[0].split(" Please feel free")[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"the {name} upsampler cannot be exported to ONNX: {reason.rstrip('.')}.") from exc
    _write_metadata(path, name, grid, size, image_hw, dim)
    return path


def _write_metadata(path: Path, name: str, grid, size, image_hw, dim) -> None:
    """The sizes the graph was made for, as the model's metadata (when the onnx package is present)."""
    try:
        import onnx
    except ImportError:
        return
    proto = onnx.load(str(path))
    for key, value in (("upsampler", name), ("feature_grid", grid), ("output_size", size), ("image_size", image_hw),
                       ("feature_dim", dim)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(list(value) if isinstance(value, tuple) else value)
    onnx.save(proto, str(path))


def check_onnx(path: PathLike, upsampler: nn.Module, inputs) -> float:
    """Run the ONNX model at ``path`` with onnxruntime on the CPU on ``inputs`` ``(image, features)``
    and return its max relative error against ``upsampler`` in PyTorch: ``max |onnx - torch| /
    max |torch|`` (float32; the output size is the graph's own)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ImportError("check_onnx needs onnxruntime: pip install -e \".[deploy]\".") from exc
    image, features = inputs[0], inputs[1]
    runner = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # an input the graph does not read (the image, for interpolation) is pruned from it by the exporter
    given = {"image": image, "features": features}
    feeds = {i.name: given[i.name].detach().float().cpu().numpy() for i in runner.get_inputs()}
    out = torch.from_numpy(runner.run(None, feeds)[0])
    param = next(upsampler.parameters(), None)
    device = param.device if param is not None else image.device
    with torch.no_grad():
        ref = upsampler(image.to(device), features.to(device), tuple(out.shape[-2:])).float().cpu()
    if ref.shape != out.shape:
        raise ValueError(f"the ONNX model gives {tuple(out.shape)} but the upsampler {tuple(ref.shape)}.")
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12))


__all__ = ["export_onnx", "check_onnx", "ExportError", "EXPORTABLE_ATTENTION"]
