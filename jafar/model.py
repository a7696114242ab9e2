"""JAFAR: an attention-based feature upsampler (Couairon, Chambon et al., 2025).

Architecture and parameter names follow the official release (github PaulCouairon/JAFAR @
94d4d54, ``src/upsampler/jafar.py`` and ``src/layers/``), so an official state dict loads as
it is:

* ``image_encoder``: conv(``input_dim`` -> ``qk_dim``, ``kernel_size``, reflect padding) and
  two residual blocks (GroupNorm(8) -> SiLU -> 1x1 conv, twice, plus identity), then 2-D RoPE;
* ``query_encoder`` / ``key_encoder``: the same stack (1x1) on the encoded image; queries are
  adaptive-average-pooled to the output size and GroupNorm'ed (``norm``, no affine), keys to
  the feature grid;
* ``key_features_encoder``: the same stack on the L2-normalised low-resolution features; it
  modulates the keys through ``sft_key`` (``gamma(f) * GroupNorm(keys) + beta(f)``);
* ``cross_decode``: a 3x3 conv on the queries, RMSNorm on queries and keys, the query and key
  projections of a 4-head attention, and the head-averaged softmax weights applied to the
  raw features (``jafar.attention``).

The value and output projections (``attention.v_proj_weight``, ``attention.out_proj.*``) and
``norm_v`` exist in the official model but never reach its output. They are kept, so that the
state dict and the parameter count (628,480 at ``v_dim=384``) match, and frozen
(``requires_grad=False``), so that optimisers skip them and DDP does not wait for their
gradients. The ``v`` third of ``in_proj_bias`` is likewise unused.

Departures that do not change the numbers: 1x1 convolutions use zero padding mode (reflect
padding of width 0 only costs a copy; no pad op is launched), RoPE works on NCHW with float32
angles, GroupNorm takes its statistics from ``torch.var_mean`` on CUDA (PyTorch's kernel runs
batch x groups thread blocks) and under autocast writes its output in the autocast dtype, so
the per-pixel 1x1 encoders run in bf16/fp16 end to end (:class:`GroupNorm`), and the attention
never materialises the ``(heads, queries, keys)`` weights unless asked to
(``attention="reference"``). ``compile=True`` compiles the encoders with ``torch.compile``;
``encoders="triton"`` runs their ResBlocks as fused Triton kernels (``jafar.encoder_kernels``).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .attention import DEFAULT_MEMORY_BUDGET, MODES, head_averaged_attention
from .rope import RoPE

#: implementations of the encoders (``JAFAR(encoders=...)``)
ENCODERS = ("torch", "triton")


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys, same numbers) whose statistics use the
    whole GPU, and whose output stays in the autocast dtype.

    PyTorch's CUDA GroupNorm reduces each (sample, group) in one thread block: at batch 1 with 8
    groups, 8 blocks on a GPU of 132 SMs, about 60 % of JAFAR's forward at 448 (issue #5's
    profile). :func:`group_norm` takes the statistics from ``torch.var_mean`` instead, a
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

    ``impl`` (class attribute, or per instance): ``"auto"`` (:func:`group_norm` on CUDA,
    ``F.group_norm`` elsewhere, where PyTorch's kernel is not the bottleneck), ``"var_mean"``
    (:func:`group_norm` everywhere), ``"native"`` (``F.group_norm``, output cast to the autocast
    dtype), ``"official"`` (exactly ``nn.GroupNorm``, float32 output under autocast: the
    benchmark's rows of the official algorithm) and ``"triton"`` (statistics in one pass and the
    backward as Triton kernels, ``jafar.encoder_kernels``: no float32 copy of a half-precision
    input or gradient; CUDA, or the CPU under the interpreter).
    """

    IMPLS = ("auto", "var_mean", "native", "official", "triton")
    impl = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        impl = self.impl
        if impl not in self.IMPLS:
            raise ValueError(f"GroupNorm.impl must be one of {self.IMPLS}, got {impl!r}.")
        if impl == "official":
            return super().forward(x)
        out_dtype = _autocast_dtype(x)
        if impl == "native" or (impl == "auto" and not x.is_cuda):
            return super().forward(x).to(out_dtype)
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, out_dtype, impl == "triton")


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype autocast gives a half-precision op's output on ``x``'s device (``x.dtype`` when
    autocast is off or ``x`` is not a float32/bf16/fp16 tensor)."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _group_norm_forward(x, num_groups, weight, bias, eps, out_dtype, use_triton=False):
    """``(y, mean, rstd)``: statistics ``(N, G)`` in float32 (float64 for float64 inputs) from
    ``torch.var_mean`` (or, ``use_triton``, from ``jafar.encoder_kernels.group_norm_stats``: one
    pass, no float32 copy of a half-precision input), then ``y = x * a + s`` per (sample,
    channel), computed in that precision and written once in ``out_dtype``."""
    n, c = x.shape[:2]
    acc = torch.promote_types(x.dtype, torch.float32)
    xg = x.reshape(n, num_groups, -1)
    if use_triton:
        from . import encoder_kernels

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
            from . import encoder_kernels

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
    backward, or (``use_triton``) the Triton statistics and backward of ``jafar.encoder_kernels``;
    the output in ``out_dtype`` (default: the autocast dtype under autocast, else ``x.dtype``)."""
    out_dtype = _autocast_dtype(x) if out_dtype is None else out_dtype
    if use_triton:
        from . import encoder_kernels

        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not encoder_kernels.available(x.device):
            raise RuntimeError(f"the Triton GroupNorm takes float32/bf16/fp16 tensors on CUDA (or the CPU under "
                               f"TRITON_INTERPRET=1), got {x.dtype} on {x.device}.")
    with torch.autocast(x.device.type, enabled=False):
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias))
        if not needs_grad:
            return _group_norm_forward(x, num_groups, weight, bias, eps, out_dtype, use_triton)[0]
        return _GroupNormFunction.apply(x, weight, bias, num_groups, eps, out_dtype, use_triton)


def _conv(in_dim: int, out_dim: int, kernel_size: int, pad_mode: str = "reflect") -> nn.Conv2d:
    # Reflect padding of width 0 (kernel 1) is the identity but still launches a copy.
    return nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2,
                     padding_mode=pad_mode if kernel_size > 1 else "zeros", bias=False)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus the identity (official ``ResBlock`` with
    ``in_channels == out_channels``, so it has no shortcut convolution)."""

    def __init__(self, channels: int, kernel_size: int = 1, num_groups: int = 8):
        super().__init__()
        self.norm1 = GroupNorm(num_groups, channels)
        self.conv1 = _conv(channels, channels, kernel_size)
        self.norm2 = GroupNorm(num_groups, channels)
        self.conv2 = _conv(channels, channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.silu(self.norm1(x)))
        y = self.conv2(F.silu(self.norm2(y)))
        return x + y


def make_encoder(in_dim: int, out_dim: int, kernel_size: int = 1, num_layers: int = 2) -> nn.Sequential:
    """Official ``make_encoder``: a (reflect-padded) conv then ``num_layers`` 1x1 ResBlocks."""
    return nn.Sequential(_conv(in_dim, out_dim, kernel_size), *[ResBlock(out_dim) for _ in range(num_layers)])


class SFTModulation(nn.Module):
    """Spatial feature transform: ``gamma(features) * GroupNorm(image) + beta(features)``."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.gamma = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.beta = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = GroupNorm(8, in_channels, affine=False)

    def forward(self, image: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.gamma(features) * self.norm(image) + self.beta(features)


class HeadAveragedAttention(nn.Module):
    """The parameters of the official ``nn.MultiheadAttention(embed_dim, num_heads,
    vdim=v_dim)``, under the same names, and the part of its forward that JAFAR uses: the
    query/key projections and the head-averaged softmax weights times the values."""

    def __init__(self, embed_dim: int, value_dim: int, num_heads: int):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"qk_dim={embed_dim} is not divisible by num_heads={num_heads}.")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim))
        self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim))
        self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, value_dim), requires_grad=False)
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.out_proj.requires_grad_(False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # nn.MultiheadAttention._reset_parameters
        for w in (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            nn.init.xavier_uniform_(w)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                mode: str = "auto", memory_budget: int = DEFAULT_MEMORY_BUDGET,
                projected_query: torch.Tensor = None) -> torch.Tensor:
        """``projected_query``: the query projection, computed elsewhere (``query`` then unused)."""
        e = self.embed_dim
        q = F.linear(query, self.q_proj_weight, self.in_proj_bias[:e]) if projected_query is None else projected_query
        k = F.linear(key, self.k_proj_weight, self.in_proj_bias[e:2 * e])
        return head_averaged_attention(q, k, value, self.num_heads, 1.0 / math.sqrt(e // self.num_heads),
                                       mode=mode, memory_budget=memory_budget)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, value_dim: int, num_heads: int):
        super().__init__()
        self.norm_q = nn.RMSNorm(query_dim)
        self.norm_k = nn.RMSNorm(query_dim)
        self.norm_v = nn.RMSNorm(value_dim)  # official, never reaches the output
        self.norm_v.requires_grad_(False)
        self.attention = HeadAveragedAttention(query_dim, value_dim, num_heads)

    def forward(self, query, key, value, mode="auto", memory_budget=DEFAULT_MEMORY_BUDGET, fused: bool = False):
        """``query``, ``key``: tokens ``(B, N, C)``; with ``fused`` (inference, Triton) ``query`` is
        the NCHW map and its RMSNorm and projection run as one kernel
        (``jafar.encoder_kernels.rms_project``)."""
        # RMSNorm in the weights' dtype (float32 under autocast, where the convs give bf16/fp16)
        dtype = self.norm_q.weight.dtype
        if fused:
            from . import encoder_kernels as ek

            attn, e = self.attention, self.attention.embed_dim
            eps = self.norm_q.eps if self.norm_q.eps is not None else torch.finfo(dtype).eps
            q = ek.rms_project(query, self.norm_q.weight, eps, attn.q_proj_weight, attn.in_proj_bias[:e],
                               _autocast_dtype(query.to(dtype)))
            return attn(None, self.norm_k(key.to(dtype)), value, mode, memory_budget, projected_query=q)
        return self.attention(self.norm_q(query.to(dtype)), self.norm_k(key.to(dtype)), value, mode, memory_budget)


class CrossAttentionBlock(nn.Module):
    """3x3 conv on the queries, then head-averaged cross-attention on flattened tokens."""

    def __init__(self, query_dim: int, value_dim: int, num_heads: int):
        super().__init__()
        self.cross_attn = CrossAttention(query_dim, value_dim, num_heads)
        self.conv2d = nn.Conv2d(query_dim, query_dim, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, q, k, v, mode="auto", memory_budget=DEFAULT_MEMORY_BUDGET, fused: bool = False) -> torch.Tensor:
        """``fused``: the queries' RMSNorm and projection as one Triton kernel on the conv's NCHW
        output (inference; ``JAFAR(encoders="triton")``)."""
        q = self.conv2d(q)
        q = q if fused else q.flatten(2).transpose(1, 2)
        k = k.flatten(2).transpose(1, 2)
        v = v.flatten(2).transpose(1, 2)
        return self.cross_attn(q, k, v, mode, memory_budget, fused=fused)


def _check_output_size(output_size) -> Tuple[int, int]:
    ok = isinstance(output_size, (Sequence, torch.Size)) and len(output_size) == 2 and all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in output_size)
    if not ok:
        raise ValueError(f"output_size must be a pair of positive ints (H_out, W_out), got {output_size!r}.")
    return int(output_size[0]), int(output_size[1])


class JAFAR(nn.Module):
    """Upsample ``features`` (B, v_dim, h, w) to ``output_size`` under the guidance of ``image``.

    Args:
        input_dim: channels of the guidance image.
        qk_dim: width of the query/key encoders and the attention.
        v_dim: channel count of the backbone features to upsample.
        num_heads: attention heads whose softmax weights are averaged.
        kernel_size: kernel of the first image-encoder convolution.
        attention: ``"auto"`` (the Triton kernels on CUDA in bf16/fp16, and in float32 when TF32
            matmuls are allowed; ``"chunked"`` otherwise), ``"chunked"``, ``"triton"``,
            ``"sdpa"`` or ``"reference"`` (the official algorithm, materialising the attention
            weights); see ``jafar.attention``.
        memory_budget_mb: extra memory one attention chunk may take, in MiB.
        compile: ``False`` (default), ``True`` or a dict of ``torch.compile`` arguments: compile
            :meth:`encode` (the per-pixel encoders, pooling, GroupNorms and SFT; the attention
            keeps its own kernels). The first call per output size pays the compilation.
            Changes no parameter, state-dict key or result beyond float rounding.
        encoders: ``"torch"`` (default) or ``"triton"``: run the full-resolution encoders'
            ResBlocks as fused Triton kernels (``jafar.encoder_kernels``). At inference one
            pass over the pixels per 1x1 convolution (GroupNorm statistics from the previous
            kernel's epilogue, RoPE fused); in training each GroupNorm -> SiLU -> conv is one
            forward kernel and two backward kernels that save only its input. Needs CUDA (or
            Triton's interpreter). Same results up to float rounding; not with ``compile``.

    Call: ``model(image, features, output_size) -> (B, v_dim, H_out, W_out)``, where ``image``
    is the normalised guidance image (B, input_dim, H, W), ``features`` the backbone's patch
    grid and ``output_size`` any pair of positive ints.
    """

    def __init__(self, input_dim: int = 3, qk_dim: int = 128, v_dim: int = 384, num_heads: int = 4,
                 kernel_size: int = 1, attention: str = "auto", memory_budget_mb: float = 256,
                 compile=False, encoders: str = "torch"):
        super().__init__()
        if encoders not in ENCODERS:
            raise ValueError(f"encoders must be one of {ENCODERS}, got {encoders!r}.")
        if encoders == "triton" and compile:
            raise ValueError("encoders='triton' and compile cannot be combined: the fused kernels replace what "
                             "torch.compile would fuse.")
        if encoders == "triton" and qk_dim > 128:
            raise ValueError(f"encoders='triton' takes qk_dim up to 128 (the kernel holds the whole weight), got "
                             f"{qk_dim}; use encoders='torch'.")
        if qk_dim % 8:
            raise ValueError(f"qk_dim must be divisible by 8 (GroupNorm groups) and 4 (RoPE), got {qk_dim}.")
        if attention not in MODES:
            raise ValueError(f"attention must be one of {MODES}, got {attention!r}.")
        self.config = dict(input_dim=input_dim, qk_dim=qk_dim, v_dim=v_dim, num_heads=num_heads,
                           kernel_size=kernel_size)
        self.input_dim, self.qk_dim, self.v_dim = input_dim, qk_dim, v_dim
        if not isinstance(compile, (bool, dict)):
            raise ValueError(f"compile must be True, False or a dict of torch.compile arguments, got {compile!r}.")
        self.attention = attention
        self.memory_budget = int(memory_budget_mb * 2**20)
        self.compile = compile
        self.encoders = encoders
        self._compiled_encode = None  # built on first use; not state, not copied

        self.image_encoder = make_encoder(input_dim, qk_dim, kernel_size)
        self.key_encoder = make_encoder(qk_dim, qk_dim)
        self.query_encoder = make_encoder(qk_dim, qk_dim)
        self.norm = GroupNorm(8, qk_dim, affine=False)
        self.key_features_encoder = make_encoder(v_dim, qk_dim)
        self.cross_decode = CrossAttentionBlock(qk_dim, v_dim, num_heads)
        self.sft_key = SFTModulation(qk_dim, qk_dim)
        self.rope = RoPE(qk_dim)

    def check_inputs(self, image: torch.Tensor, features: torch.Tensor, output_size) -> Tuple[int, int]:
        """One clear sentence for a wrong input, before any work starts."""
        if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[1] != self.input_dim:
            raise ValueError(f"image must be a (B, {self.input_dim}, H, W) tensor, got "
                             f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}.")
        if not isinstance(features, torch.Tensor) or features.dim() != 4 or features.shape[1] != self.v_dim:
            got = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a (B, {self.v_dim}, h, w) tensor (this JAFAR has v_dim="
                             f"{self.v_dim}), got {got}.")
        if image.shape[0] != features.shape[0]:
            raise ValueError(f"image and features must have the same batch size, got {image.shape[0]} "
                             f"and {features.shape[0]}.")
        if image.device != features.device:
            raise ValueError(f"image is on {image.device} but features are on {features.device}.")
        return _check_output_size(output_size)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.rope(self.image_encoder(image))

    def encode(self, image: torch.Tensor, features: torch.Tensor, output_size: Tuple[int, int]):
        """Everything before the cross-attention block: queries ``(B, qk_dim, H_out, W_out)`` and
        keys ``(B, qk_dim, h, w)``."""
        encoded = self.encode_image(image)
        queries = F.adaptive_avg_pool2d(self.query_encoder(encoded), output_size)
        queries = self.norm(queries)
        keys = F.adaptive_avg_pool2d(self.key_encoder(encoded), features.shape[-2:])
        keys = self.sft_key(keys, self.key_features_encoder(F.normalize(features, dim=1)))
        return queries, keys

    def _encode_triton(self, image: torch.Tensor, features: torch.Tensor, output_size: Tuple[int, int],
                       train: bool = None):
        """:meth:`encode` with the full-resolution encoders' ResBlocks as fused Triton kernels. At
        inference each 1x1 convolution is one kernel (the previous GroupNorm and SiLU in its
        prologue; residual, RoPE and the next GroupNorm's statistics in its epilogue); with
        gradients each GroupNorm -> SiLU -> conv is a :class:`jafar.encoder_kernels.FusedUnit`
        (saving only its input) and the first convolution, RoPE and the query norm are PyTorch's.
        ``train``: whether gradients are needed (found from the inputs and parameters if None)."""
        from . import encoder_kernels as ek

        if not ek.available(image.device):
            raise RuntimeError(f"encoders='triton' needs a CUDA device (or TRITON_INTERPRET=1 on the CPU); the "
                               f"inputs are on {image.device}.")
        n, _, h, w = image.shape
        dtype = _autocast_dtype(image)
        train = self._needs_grad(image, features) if train is None else train

        def run(encoder: nn.Sequential, x: torch.Tensor, rope=None, last_stats: bool = True):
            conv0, blocks = encoder[0], list(encoder)[1:]
            groups = blocks[0].norm1.num_groups if blocks else 0
            if conv0.kernel_size == (1, 1) and not train:
                y = ek.pointwise_conv(x.reshape(n, x.shape[1], -1), conv0.weight.flatten(1), stats_groups=groups)
            else:  # cuDNN (a k x k reflect-padded conv, or training), then the statistics in one pass
                y = conv0(x.view(n, -1, h, w)).to(dtype).flatten(2)
                y = (y, ek.group_norm_stats(y.detach(), groups)) if groups else y
            y, stats = y if groups else (y, None)
            for i, block in enumerate(blocks):
                out_groups = 0 if i == len(blocks) - 1 and not last_stats else groups
                if train:
                    t, t_stats = ek.fused_unit(y, block.conv1.weight, block.norm1, stats,
                                               out_groups=block.norm2.num_groups)
                    y, stats = ek.fused_unit(t, block.conv2.weight, block.norm2, t_stats, residual=y,
                                             out_groups=out_groups)
                    continue
                coef = ek.group_norm_coefficients(stats, block.norm1.weight, block.norm1.bias, block.norm1.eps)
                t, t_stats = ek.pointwise_conv(y, block.conv1.weight.flatten(1), coef,
                                               stats_groups=block.norm2.num_groups)
                coef = ek.group_norm_coefficients(t_stats, block.norm2.weight, block.norm2.bias, block.norm2.eps)
                out = ek.pointwise_conv(t, block.conv2.weight.flatten(1), coef, residual=y,
                                        stats_groups=out_groups, rope=rope if i == len(blocks) - 1 else None)
                y, stats = out if isinstance(out, tuple) else (out, None)
            if rope is not None and (train or not blocks):
                y = self.rope(y.view(n, -1, h, w)).flatten(2)
            return y, stats

        encoded, _ = run(self.image_encoder, image.to(dtype), rope=(self.rope.freqs, h, w), last_stats=False)
        same_size = tuple(output_size) == (h, w)
        queries, stats = run(self.query_encoder, encoded, last_stats=same_size and not train)
        queries = queries.view(n, -1, h, w)
        if not same_size:
            queries = F.adaptive_avg_pool2d(queries, output_size)
        if train:
            queries = self.norm(queries)
        else:
            if not same_size:
                stats = ek.group_norm_stats(queries, self.norm.num_groups)
            a, s = ek.group_norm_coefficients(stats, eps=self.norm.eps)
            with torch.autocast(image.device.type, enabled=False):
                queries = torch.addcmul(s[..., None, None], queries, a[..., None, None],
                                        out=torch.empty_like(queries, memory_format=torch.contiguous_format))
        keys, _ = run(self.key_encoder, encoded, last_stats=False)
        keys = F.adaptive_avg_pool2d(keys.view(n, -1, h, w), features.shape[-2:])
        keys = self.sft_key(keys, self.key_features_encoder(F.normalize(features, dim=1)))
        return queries, keys

    def _needs_grad(self, image: torch.Tensor, features: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (image.requires_grad or features.requires_grad or any(
            p.requires_grad for p in self.parameters()))

    def _encoder(self):
        if not self.compile:
            return self.encode
        if self._compiled_encode is None:
            self._compiled_encode = torch.compile(self.encode, **(self.compile if isinstance(self.compile, dict) else {}))
        return self._compiled_encode

    def __getstate__(self):  # deepcopy / pickle: the compiled function is bound to this instance
        state = dict(super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__)
        state["_compiled_encode"] = None
        return state

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        out_h, out_w = self.check_inputs(image, features, output_size)
        b, c = features.shape[:2]
        if self.encoders == "triton":  # whether gradients are needed, found once per call
            fused = not self._needs_grad(image, features)
            queries, keys = self._encode_triton(image, features, (out_h, out_w), train=not fused)
        else:
            fused = False
            queries, keys = self._encoder()(image, features, (out_h, out_w))
        out = self.cross_decode(queries, keys, features, self.attention, self.memory_budget, fused)  # (B, Nq, C)
        return out.view(b, out_h, out_w, c).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        extra = f", attention={self.attention!r}" + (f", compile={self.compile!r}" if self.compile else "")
        extra += f", encoders={self.encoders!r}" if self.encoders != "torch" else ""
        return ", ".join(f"{k}={v}" for k, v in self.config.items()) + extra
