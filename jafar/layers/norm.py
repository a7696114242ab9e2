"""GroupNorm for JAFAR's encoders: ``nn.GroupNorm``'s parameters, state-dict keys and numbers,
with statistics that use the whole GPU and an output that stays in the autocast dtype.

The implementation is a constructor argument (``GroupNorm(..., impl="auto")``), settable on a
whole model with :func:`set_group_norm`; nothing is global.
"""

from __future__ import annotations

import torch
from torch import nn

from ..utils import autocast_dtype

#: implementations of :class:`GroupNorm` (``impl``)
GROUP_NORM_IMPLS = ("auto", "var_mean", "native", "official", "triton")


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys, same numbers) whose statistics use the
    whole GPU, and whose output stays in the autocast dtype.

    PyTorch's CUDA GroupNorm reduces each (sample, group) in one thread block: at batch 1 with 8
    groups, 8 blocks on a GPU of 132 SMs, about 60 % of JAFAR's forward at 448 (the H100
    profile in docs/benchmarks.md). :func:`group_norm` takes the statistics from ``torch.var_mean`` instead, a
    reduction that spreads each row over many blocks, in float32 whatever the input dtype, and
    applies them as one fused ``x * a + b`` per channel (as PyTorch's kernel does); its backward
    is PyTorch's own GroupNorm backward (``aten.native_group_norm_backward``), so training gets
    the fast statistics too without saving more than ``nn.GroupNorm`` does (the input and the
    per-group mean and reciprocal standard deviation).

    Under autocast ``nn.GroupNorm`` returns float32 (an autocast float32 op), so the SiLU after
    it and the next 1x1 convolution's input cast each move float32 activations at full image
    resolution. Here the output is written once in the autocast dtype (bf16/fp16), from the
    float32 result: the 1x1 encoders then run in half precision end to end; the numbers are
    ``nn.GroupNorm``'s rounded to that dtype, the rounding the next convolution applied anyway.

    ``impl`` (constructor argument; :func:`set_group_norm` changes it on a whole model):
    ``"auto"`` (:func:`group_norm` on CUDA, ``F.group_norm`` elsewhere, where PyTorch's kernel is not
    the bottleneck), ``"var_mean"`` (:func:`group_norm` everywhere), ``"native"`` (``F.group_norm``, output cast to the autocast
    dtype), ``"official"`` (exactly ``nn.GroupNorm``, float32 output under autocast: the
    benchmark's rows of the official algorithm) and ``"triton"`` (statistics in one pass and the
    backward as Triton kernels, ``jafar.kernels.encoders``: no float32 copy of a half-precision
    input or gradient; CUDA, or the CPU under the interpreter).
    """

    IMPLS = GROUP_NORM_IMPLS

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 impl: str = "auto", device=None, dtype=None):
        super().__init__(num_groups, num_channels, eps, affine, device=device, dtype=dtype)
        self.impl = _check_impl(impl)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self.impl
        if impl == "official":
            return super().forward(x)
        out_dtype = autocast_dtype(x)
        if impl == "native" or (impl == "auto" and not x.is_cuda):
            return super().forward(x).to(out_dtype)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, out_dtype, impl == "triton")


def _group_norm_forward(x, num_groups, weight, bias, eps, out_dtype, use_triton=False):
    """``(y, mean, rstd)``: statistics ``(N, G)`` in float32 (float64 for float64 inputs) from
    ``torch.var_mean`` (or, ``use_triton``, from ``jafar.kernels.encoders.group_norm_stats``: one
    pass, no float32 copy of a half-precision input), then ``y = x * a + s`` per (sample,
    channel), computed in that precision and written once in ``out_dtype``."""
    n, c = x.shape[:2]
    acc = torch.promote_types(x.dtype, torch.float32)
    xg = x.reshape(n, num_groups, -1)
    if use_triton:
        from ..kernels import encoders as encoder_kernels

        stats = encoder_kernels.group_norm_stats(x, num_groups)
        mean, rstd = encoder_kernels.group_norm_coefficients(stats, eps=eps, return_stats=True)[2:]  # one merge kernel
        mean, rstd = mean.view(n, num_groups, 1), rstd.view(n, num_groups, 1)
    else:
        var, mean = torch.var_mean(xg.to(acc), dim=-1, correction=0, keepdim=True)  # (N, G, 1)
        rstd = torch.rsqrt(var + eps)
    if weight is None:
        a, shift, xs = rstd, -mean * rstd, xg
    else:  # per channel: a = w * rstd, s = b - mean * a (PyTorch's kernel folds the affine the same way)
        cg = c // num_groups
        a = (weight.to(acc).view(1, num_groups, cg) * rstd).view(n, c, 1)
        shift = -mean.expand(n, num_groups, cg).reshape(n, c, 1) * a
        if bias is not None:
            shift = shift + bias.to(acc).view(1, c, 1)
        xs = x.reshape(n, c, -1)
    y = torch.empty(xs.shape, dtype=out_dtype, device=x.device)
    torch.addcmul(shift, xs, a, out=y)
    return y.view(x.shape), mean.view(n, num_groups), rstd.view(n, num_groups)


class _GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, out_dtype, use_triton=False):
        y, mean, rstd = _group_norm_forward(x, num_groups, weight, bias, eps, out_dtype, use_triton)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.num_groups, ctx.has_bias, ctx.use_triton = num_groups, bias is not None, use_triton
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.use_triton:  # dy and x read in their own dtype, no float32 copies
            from ..kernels import encoders as encoder_kernels

            dx, dw, db = encoder_kernels.group_norm_backward(
                dy, x, mean.view(n, -1), rstd.view(n, -1), weight, ctx.num_groups,
                (need_x, need_w and weight is not None, need_b and ctx.has_bias))
            return (dx, dw.to(weight.dtype) if dw is not None else None,
                    db.to(weight.dtype) if db is not None else None, None, None, None, None)
        acc = mean.dtype
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            dy.to(acc).contiguous(), x.to(acc).contiguous(), mean, rstd,
            None if weight is None else weight.to(acc), n, c, x[0, 0].numel(), ctx.num_groups,
            [need_x, need_w and weight is not None, need_b and ctx.has_bias])
        return (dx.to(x.dtype) if need_x else None, dw.to(weight.dtype) if dw is not None else None,
                db.to(weight.dtype) if db is not None else None, None, None, None, None)


def group_norm(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5,
               out_dtype=None, use_triton: bool = False) -> torch.Tensor:
    """``F.group_norm`` with ``torch.var_mean`` statistics (float32) and PyTorch's GroupNorm
    backward, or (``use_triton``) the Triton statistics and backward of ``jafar.kernels.encoders``;
    the output in ``out_dtype`` (default: the autocast dtype under autocast, else ``x.dtype``)."""
    out_dtype = autocast_dtype(x) if out_dtype is None else out_dtype
    if use_triton:
        from ..kernels.attention import available

        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not available(x.device):
            raise RuntimeError(f"the Triton GroupNorm takes float32/bf16/fp16 tensors on CUDA (or the CPU under "
                               f"TRITON_INTERPRET=1), got {x.dtype} on {x.device}.")
    with torch.autocast(x.device.type, enabled=False):
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias))
        if not needs_grad:
            return _group_norm_forward(x, num_groups, weight, bias, eps, out_dtype, use_triton)[0]
        return _GroupNormFunction.apply(x, weight, bias, num_groups, eps, out_dtype, use_triton)




def _check_impl(impl: str) -> str:
    if impl not in GROUP_NORM_IMPLS:
        raise ValueError(f"GroupNorm impl must be one of {GROUP_NORM_IMPLS}, got {impl!r}.")
    return impl


def set_group_norm(module: nn.Module, impl: str) -> nn.Module:
    """Set the implementation of every :class:`GroupNorm` inside ``module`` (returned)."""
    _check_impl(impl)
    for m in module.modules():
        if isinstance(m, GroupNorm):
            m.impl = impl
    return module
