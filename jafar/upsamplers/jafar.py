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
  raw features (``jafar.layers.attention``).

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
``encoders="triton"`` runs their ResBlocks as fused Triton kernels (``jafar.kernels.encoders``).

Ablations of the paper (section 4.4, Table 5; appendix D.2, Table 11), as constructor options whose
defaults are the official architecture above (``docs/ablations.md``). Of these the official code
has ``num_heads`` only (``config/model/jafar.yaml``: 4); it always builds and applies ``sft_key`` and
``rope`` (``src/upsampler/jafar.py`` @ 94d4d54). How the keys ``K`` of the
attention are made from the pooled key encoding ``K~`` (the paper's "preliminary keys") and the
low-resolution features ``F_lr`` (``key_mode``):

* ``"sft"`` (default, "w/ SFT"): ``K = gamma(E) * GroupNorm(K~) + beta(E)``, ``E`` =
  ``key_features_encoder(normalize(F_lr))`` (paper eq. 2; official ``upsample``);
* ``"concat"`` ("Concatenation"): ``K = W [K~; E]``: ``K~`` and the same encoded features ``E`` that
  SFT reads, concatenated along the channels (``2 * qk_dim``) and brought back to ``qk_dim`` by a
  bias-free 1x1 convolution ``key_concat`` (the paper says neither which features nor how the
  concatenation reaches the key width; with ``E``, only the fusion differs from SFT: additive
  instead of multiplicative);
* ``"linear"`` ("Linear Projection"): ``K = W normalize(F_lr)``, a bias-free 1x1 convolution
  ``key_linear`` from ``v_dim`` to ``qk_dim``; the keys do not see the image (no ``key_encoder``).
  ``normalize`` is the per-pixel L2 normalisation the official key branch applies to ``F_lr``;
  the attention's RMSNorm on the keys makes the keys independent of that per-pixel scale anyway;
* ``"none"`` ("w/o SFT"): ``K = K~``, no semantic injection into the keys (no
  ``key_features_encoder``, no ``sft_key``).

``rope=False`` ("w/o RoPE"): the encoded image goes to the query and key encoders without the 2-D
RoPE (no ``rope.freqs``); ``num_heads`` (Table 5, "Attention Heads") was already an option. A
module that a mode does not use is not built, so the state dict says which mode it belongs to
(:func:`infer_config`) and every parameter gets a gradient (DDP).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import hub
from ..layers import tiled
from ..layers.attention import DEFAULT_MEMORY_BUDGET, MODES, head_averaged_attention
from ..layers.norm import GROUP_NORM_IMPLS, GroupNorm, set_group_norm
from ..layers.rope import RoPE
from ..utils import atomic_path, autocast_dtype
from .base import Upsampler, check_output_size, register_upsampler

PathLike = Union[str, os.PathLike]

#: implementations of the encoders (``JAFAR(encoders=...)``)
ENCODERS = ("torch", "triton")
#: how the keys are made (``JAFAR(key_mode=...)``; the paper's Table 5 key strategies, module docstring)
KEY_MODES = ("sft", "concat", "linear", "none")
#: the architecture options that the official model fixes, at their official values: left out of
#: :attr:`JAFAR.config` (and so of checkpoints' metadata) at these values, so the official config
#: keeps its five keys
OPTION_DEFAULTS = {"key_mode": "sft", "rope": True}
#: what :meth:`JAFAR.describe` says of a non-default key mode
_KEY_MODE_WORDS = {"concat": "keys = projection of [K~; encoded F_lr] (Table 5 'Concatenation')",
                   "linear": "keys = linear projection of F_lr (Table 5 'Linear Projection')",
                   "none": "keys without SFT (Table 5 'w/o SFT')"}


def _conv(in_dim: int, out_dim: int, kernel_size: int, pad_mode: str = "reflect") -> nn.Conv2d:
    # Reflect padding of width 0 (kernel 1) is the identity but still launches a copy.
    return nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2,
                     padding_mode=pad_mode if kernel_size > 1 else "zeros", bias=False)


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, plus the identity (official ``ResBlock`` with
    ``in_channels == out_channels``, so it has no shortcut convolution)."""

    def __init__(self, channels: int, kernel_size: int = 1, num_groups: int = 8, group_norm: str = "auto"):
        super().__init__()
        self.norm1 = GroupNorm(num_groups, channels, impl=group_norm)
        self.conv1 = _conv(channels, channels, kernel_size)
        self.norm2 = GroupNorm(num_groups, channels, impl=group_norm)
        self.conv2 = _conv(channels, channels, kernel_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(F.silu(self.norm1(x)))
        y = self.conv2(F.silu(self.norm2(y)))
        return x + y


def make_encoder(in_dim: int, out_dim: int, kernel_size: int = 1, num_layers: int = 2,
                 group_norm: str = "auto") -> nn.Sequential:
    """Official ``make_encoder``: a (reflect-padded) conv then ``num_layers`` 1x1 ResBlocks."""
    return nn.Sequential(_conv(in_dim, out_dim, kernel_size),
                         *[ResBlock(out_dim, group_norm=group_norm) for _ in range(num_layers)])


class SFTModulation(nn.Module):
    """Spatial feature transform: ``gamma(features) * GroupNorm(image) + beta(features)``."""

    def __init__(self, in_channels: int, out_channels: int, group_norm: str = "auto"):
        super().__init__()
        self.gamma = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.beta = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.norm = GroupNorm(8, in_channels, affine=False, impl=group_norm)

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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # nn.MultiheadAttention packs q, k and v into one (3E, E) ``in_proj_weight`` when
        # kdim == vdim == embed_dim (``_qkv_same_embed_dim``): an official checkpoint whose features
        # are qk_dim wide (128) stores that and no q/k/v_proj_weight. Unpacked here, in its row order.
        packed = state_dict.pop(prefix + "in_proj_weight", None)
        if packed is not None:
            if packed.shape != (3 * self.embed_dim, self.embed_dim) or self.v_proj_weight.shape[1] != self.embed_dim:
                raise ValueError(f"a packed in_proj_weight {tuple(packed.shape)} fits only features of width "
                                 f"qk_dim={self.embed_dim}; this model has v_dim={self.v_proj_weight.shape[1]}.")
            for i, name in enumerate(("q_proj_weight", "k_proj_weight", "v_proj_weight")):
                state_dict.setdefault(prefix + name, packed[i * self.embed_dim:(i + 1) * self.embed_dim])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

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

    def forward(self, query, key, value, mode="auto", memory_budget=DEFAULT_MEMORY_BUDGET):
        """``query``, ``key``: tokens ``(B, N, C)``; ``value``: ``(B, Nk, v_dim)``."""
        # RMSNorm in the weights' dtype (float32 under autocast, where the convs give bf16/fp16)
        dtype = self.norm_q.weight.dtype
        return self.attention(self.norm_q(query.to(dtype)), self.norm_k(key.to(dtype)), value, mode, memory_budget)

    def forward_fused(self, query, key, value, mode="auto", memory_budget=DEFAULT_MEMORY_BUDGET):
        """:meth:`forward` with ``query`` the NCHW map, its RMSNorm and projection one Triton kernel
        (``jafar.kernels.encoders.rms_project``; inference, ``JAFAR(encoders="triton")``)."""
        from ..kernels import encoders as ek

        dtype = self.norm_q.weight.dtype
        attn, e = self.attention, self.attention.embed_dim
        eps = self.norm_q.eps if self.norm_q.eps is not None else torch.finfo(dtype).eps
        q = ek.rms_project(query, self.norm_q.weight, eps, attn.q_proj_weight, attn.in_proj_bias[:e],
                           autocast_dtype(query.to(dtype)))
        return attn(None, self.norm_k(key.to(dtype)), value, mode, memory_budget, projected_query=q)


class CrossAttentionBlock(nn.Module):
    """3x3 conv on the queries, then head-averaged cross-attention on flattened tokens."""

    def __init__(self, query_dim: int, value_dim: int, num_heads: int):
        super().__init__()
        self.cross_attn = CrossAttention(query_dim, value_dim, num_heads)
        self.conv2d = nn.Conv2d(query_dim, query_dim, kernel_size=3, stride=1, padding=1, bias=False)

    def forward(self, q, k, v, mode="auto", memory_budget=DEFAULT_MEMORY_BUDGET, fused: bool = False) -> torch.Tensor:
        """``fused``: the queries' RMSNorm and projection as one Triton kernel on the conv's NCHW
        output (:meth:`CrossAttention.forward_fused`)."""
        if q.device.type == "cpu" and q.is_contiguous(memory_format=torch.channels_last) and not q.is_contiguous():
            # channels-last queries (JAFAR.encode_tiled): oneDNN's NHWC convolution, with the weight in the
            # same layout (1.8x faster than NCHW at 448x448 on the development CPU); tokens out, no copy
            weight = self.conv2d.weight.contiguous(memory_format=torch.channels_last)
            q = F.conv2d(q, weight, padding=1)
        else:
            q = self.conv2d(q)
        k = k.flatten(2).transpose(1, 2)
        v = v.flatten(2).transpose(1, 2)
        if fused:
            return self.cross_attn.forward_fused(q, k, v, mode, memory_budget)
        return self.cross_attn(q.flatten(2).transpose(1, 2), k, v, mode, memory_budget)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _available_memory() -> Optional[int]:
    """Bytes of memory available to a new allocation on this machine (Linux ``MemAvailable``), or
    None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _check_cpu_memory(batch: int, v_dim: int, qk_dim: int, size: Tuple[int, int]) -> None:
    """Refuse, before allocating, an output whose tensors cannot fit in the available memory: the
    output (``v_dim`` channels) and the full-resolution query maps (``qk_dim`` channels, about
    three alive at once), in float32."""
    need = 4 * batch * size[0] * size[1] * (v_dim + 3 * qk_dim)
    if need < 2**30:  # the per-camera hot path: no file read for outputs that fit in any machine
        return
    free = _available_memory()
    if free is not None and need > free:
        raise MemoryError(f"an output of {batch} x {v_dim} x {size[0]} x {size[1]} needs about {need / 2**30:.1f} GiB "
                          f"on the CPU, more than the {free / 2**30:.1f} GiB available: ask for a smaller output_size "
                          f"or a smaller batch.")


class JAFAR(Upsampler):
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
            weights); see ``jafar.layers.attention``.
        memory_budget_mb: extra memory one attention chunk may take, in MiB.
        compile: ``False`` (default), ``True`` or a dict of ``torch.compile`` arguments: compile
            :meth:`encode` (the per-pixel encoders, pooling, GroupNorms and SFT; the attention
            keeps its own kernels). The first call per output size pays the compilation.
            Changes no parameter, state-dict key or result beyond float rounding.
        encoders: ``"torch"`` (default) or ``"triton"``: run the full-resolution encoders'
            ResBlocks as fused Triton kernels (``jafar.kernels.encoders``). At inference one
            pass over the pixels per 1x1 convolution (GroupNorm statistics from the previous
            kernel's epilogue, RoPE fused); in training each GroupNorm -> SiLU -> conv is one
            forward kernel and two backward kernels that save only its input. Needs CUDA (or
            Triton's interpreter). Same results up to float rounding; not with ``compile``.
        group_norm: the GroupNorms' implementation (``jafar.layers.norm.GroupNorm``: ``"auto"``,
            ``"var_mean"``, ``"native"``, ``"official"``, ``"triton"``); same parameters and
            numbers up to float rounding. :meth:`set_group_norm` changes it later.
        check_finite: refuse NaN or infinite values in the image or the features, in one sentence
            naming the input (a reduction over both per call, so off by default: the hot path of
            a BeV network pays nothing). ``None`` (default): on when the environment variable
            ``JAFAR_CHECK_FINITE=1`` is set.
        key_mode: how the keys are made (the paper's Table 5): ``"sft"`` (default, official),
            ``"concat"``, ``"linear"`` or ``"none"``; see the module docstring.
        rope: ``True`` (default, official) or ``False``: the 2-D RoPE on the encoded image (the
            paper's Table 11).

    Call: ``model(image, features, output_size) -> (B, v_dim, H_out, W_out)``, where ``image``
    is the normalised guidance image (B, input_dim, H, W), ``features`` the backbone's patch
    grid and ``output_size`` any pair of positive ints.
    """

    def __init__(self, input_dim: int = 3, qk_dim: int = 128, v_dim: int = 384, num_heads: int = 4,
                 kernel_size: int = 1, attention: str = "auto", memory_budget_mb: float = 256,
                 compile=False, encoders: str = "torch", group_norm: str = "auto", check_finite: Optional[bool] = None,
                 key_mode: str = "sft", rope: bool = True):
        super().__init__()
        for key, value in (("input_dim", input_dim), ("qk_dim", qk_dim), ("v_dim", v_dim), ("num_heads", num_heads),
                           ("kernel_size", kernel_size)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}.")
        if qk_dim % num_heads:
            raise ValueError(f"qk_dim={qk_dim} is not divisible by num_heads={num_heads}.")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (the official encoder pads by kernel_size // 2), got {kernel_size}.")
        if not isinstance(memory_budget_mb, (int, float)) or isinstance(memory_budget_mb, bool) or not memory_budget_mb > 0:
            raise ValueError(f"memory_budget_mb must be a positive number of MiB, got {memory_budget_mb!r}.")
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
        if group_norm not in GROUP_NORM_IMPLS:
            raise ValueError(f"group_norm must be one of {GROUP_NORM_IMPLS}, got {group_norm!r}.")
        if not isinstance(key_mode, str) or key_mode not in KEY_MODES:
            raise ValueError(f"key_mode must be one of {KEY_MODES} (the paper's Table 5 key strategies), got {key_mode!r}.")
        if not isinstance(rope, bool):
            raise ValueError(f"rope must be True or False, got {rope!r}.")
        self.config = dict(input_dim=input_dim, qk_dim=qk_dim, v_dim=v_dim, num_heads=num_heads,
                           kernel_size=kernel_size)
        # the ablation options only when they depart from the official model (OPTION_DEFAULTS)
        self.config.update({k: v for k, v in (("key_mode", key_mode), ("rope", rope)) if v != OPTION_DEFAULTS[k]})
        self.key_mode = key_mode
        self.input_dim, self.qk_dim, self.v_dim = input_dim, qk_dim, v_dim
        if not isinstance(compile, (bool, dict)):
            raise ValueError(f"compile must be True, False or a dict of torch.compile arguments, got {compile!r}.")
        self.attention = attention
        self.memory_budget = max(1, int(memory_budget_mb * 2**20))
        self.compile = compile
        self.encoders = encoders
        self._compiled_encode = None  # built on first use; not state, not copied
        self.weights_source = "random init"
        if check_finite is None:
            check_finite = os.environ.get("JAFAR_CHECK_FINITE", "").strip().lower() in ("1", "true", "yes", "on")
        self.check_finite = bool(check_finite)

        gn = group_norm
        # the official modules in the official order; the ones a key_mode does not use are not built
        self.image_encoder = make_encoder(input_dim, qk_dim, kernel_size, group_norm=gn)
        if key_mode != "linear":  # the preliminary keys K~
            self.key_encoder = make_encoder(qk_dim, qk_dim, group_norm=gn)
        self.query_encoder = make_encoder(qk_dim, qk_dim, group_norm=gn)
        self.norm = GroupNorm(8, qk_dim, affine=False, impl=gn)
        if key_mode in ("sft", "concat"):  # the encoded low-resolution features E
            self.key_features_encoder = make_encoder(v_dim, qk_dim, group_norm=gn)
        self.cross_decode = CrossAttentionBlock(qk_dim, v_dim, num_heads)
        if key_mode == "sft":
            self.sft_key = SFTModulation(qk_dim, qk_dim, group_norm=gn)
        elif key_mode == "concat":
            self.key_concat = nn.Conv2d(2 * qk_dim, qk_dim, 1, bias=False)
        elif key_mode == "linear":
            self.key_linear = nn.Conv2d(v_dim, qk_dim, 1, bias=False)
        self.rope = RoPE(qk_dim) if rope else None

    @property
    def group_norm(self) -> str:
        """The GroupNorms' implementation (:meth:`set_group_norm` changes it)."""
        return self.norm.impl

    def set_group_norm(self, impl: str) -> "JAFAR":
        """Switch every GroupNorm to ``impl`` (same parameters; see ``jafar.layers.norm``)."""
        set_group_norm(self, impl)
        return self

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
        if image.shape[0] == 0:
            raise ValueError("image and features hold no sample (batch size 0).")
        if min(image.shape[-2:]) < 1 or min(features.shape[-2:]) < 1:
            raise ValueError(f"image and features must have a non-empty grid, got image "
                             f"{tuple(image.shape[-2:])} and features {tuple(features.shape[-2:])}.")
        if image.device != features.device:
            raise ValueError(f"image is on {image.device} but features are on {features.device}.")
        param = self.image_encoder[0].weight
        for name, x in (("image", image), ("features", features)):
            if not x.is_floating_point():
                raise ValueError(f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64), got "
                                 f"{x.dtype}; e.g. image.float() / 255 for uint8 pixels.")
            if x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
                raise ValueError(f"{name} is {x.dtype} but JAFAR's parameters are {param.dtype}: convert one to the "
                                 f"other (model.to({x.dtype}) or {name}.to({param.dtype})), or run under torch.autocast.")
        if self.check_finite:
            for name, x in (("image", image), ("features", features)):
                if not bool(torch.isfinite(x).all()):
                    bad = int((~torch.isfinite(x)).sum())
                    raise ValueError(f"{name} holds {bad} NaN or infinite values (of {x.numel()}); JAFAR's output "
                                     f"would be NaN.")
        size = check_output_size(output_size)
        if image.device.type == "cpu":
            _check_cpu_memory(image.shape[0], self.v_dim, self.qk_dim, size)
        return size

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        encoded = self.image_encoder(image)
        return encoded if self.rope is None else self.rope(encoded)

    def make_keys(self, preliminary: Optional[torch.Tensor], features: torch.Tensor) -> torch.Tensor:
        """The keys ``(B, qk_dim, h, w)`` from the preliminary keys ``K~`` (the key encoding pooled
        to the feature grid; None for ``key_mode="linear"``, which does not use them) and the
        low-resolution features, as ``key_mode`` says (module docstring)."""
        if self.key_mode == "none":
            return preliminary
        features = F.normalize(features, dim=1)  # official upsample: the key branch reads F_lr L2-normalised
        if self.key_mode == "linear":
            return self.key_linear(features)
        encoded = self.key_features_encoder(features)
        if self.key_mode == "concat":
            return self.key_concat(torch.cat([preliminary, encoded.to(preliminary.dtype)], dim=1))
        return self.sft_key(preliminary, encoded)

    def encode(self, image: torch.Tensor, features: torch.Tensor, output_size: Tuple[int, int]):
        """Everything before the cross-attention block: queries ``(B, qk_dim, H_out, W_out)`` and
        keys ``(B, qk_dim, h, w)``."""
        encoded = self.encode_image(image)
        queries = F.adaptive_avg_pool2d(self.query_encoder(encoded), output_size)
        queries = self.norm(queries)
        keys = None
        if self.key_mode != "linear":
            keys = F.adaptive_avg_pool2d(self.key_encoder(encoded), features.shape[-2:])
        return queries, self.make_keys(keys, features)

    def needs_grad(self, image: torch.Tensor, features: torch.Tensor) -> bool:
        """Whether this call builds a graph (grad mode on and an input or parameter requires it)."""
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

    def encode_fused(self, image: torch.Tensor, features: torch.Tensor, output_size, train: Optional[bool] = None):
        """:meth:`encode` with the full-resolution encoders' ResBlocks as the fused Triton kernels of
        :mod:`jafar.kernels.encoders` (the execution plan of ``encoders="triton"``; the kernels know
        no model). At inference each 1x1 convolution is one kernel
        (the previous GroupNorm and SiLU in its prologue; residual, RoPE and the next GroupNorm's
        statistics in its epilogue); with gradients each GroupNorm -> SiLU -> conv is a
        :class:`FusedUnit` (saving only its input) and the first convolution, RoPE and the query norm
        are PyTorch's.
        ``train``: whether gradients are needed (found from the inputs and parameters if None)."""
        from ..kernels.attention import available
        from ..kernels.encoders import fused_unit, group_norm_coefficients, group_norm_stats, pointwise_conv

        if not available(image.device):
            raise RuntimeError(f"encoders='triton' needs a CUDA device (or TRITON_INTERPRET=1 on the CPU); the "
                               f"inputs are on {image.device}.")
        n, _, h, w = image.shape
        dtype = autocast_dtype(image)
        train = self.needs_grad(image, features) if train is None else train

        def run(encoder: nn.Sequential, x: torch.Tensor, rope=None, last_stats: bool = True):
            conv0, blocks = encoder[0], list(encoder)[1:]
            groups = blocks[0].norm1.num_groups if blocks else 0
            if conv0.kernel_size == (1, 1) and not train:
                y = pointwise_conv(x.reshape(n, x.shape[1], -1), conv0.weight.flatten(1), stats_groups=groups)
            else:  # cuDNN (a k x k reflect-padded conv, or training), then the statistics in one pass
                y = conv0(x.view(n, -1, h, w)).to(dtype).flatten(2)
                y = (y, group_norm_stats(y.detach(), groups)) if groups else y
            y, stats = y if groups else (y, None)
            for i, block in enumerate(blocks):
                out_groups = 0 if i == len(blocks) - 1 and not last_stats else groups
                if train:
                    t, t_stats = fused_unit(y, block.conv1.weight, block.norm1, stats,
                                               out_groups=block.norm2.num_groups)
                    y, stats = fused_unit(t, block.conv2.weight, block.norm2, t_stats, residual=y,
                                             out_groups=out_groups)
                    continue
                coef = group_norm_coefficients(stats, block.norm1.weight, block.norm1.bias, block.norm1.eps)
                t, t_stats = pointwise_conv(y, block.conv1.weight.flatten(1), coef,
                                               stats_groups=block.norm2.num_groups)
                coef = group_norm_coefficients(t_stats, block.norm2.weight, block.norm2.bias, block.norm2.eps)
                out = pointwise_conv(t, block.conv2.weight.flatten(1), coef, residual=y,
                                        stats_groups=out_groups, rope=rope if i == len(blocks) - 1 else None)
                y, stats = out if isinstance(out, tuple) else (out, None)
            if rope is not None and (train or not blocks):
                y = self.rope(y.view(n, -1, h, w)).flatten(2)
            return y, stats

        rope = None if self.rope is None else (self.rope.freqs, h, w)
        encoded, _ = run(self.image_encoder, image.to(dtype), rope=rope, last_stats=False)
        same_size = tuple(output_size) == (h, w)
        queries, stats = run(self.query_encoder, encoded, last_stats=same_size and not train)
        queries = queries.view(n, -1, h, w)
        if not same_size:
            queries = F.adaptive_avg_pool2d(queries, output_size)
        if train:
            queries = self.norm(queries)
        else:
            if not same_size:
                stats = group_norm_stats(queries, self.norm.num_groups)
            a, s = group_norm_coefficients(stats, eps=self.norm.eps)
            with torch.autocast(image.device.type, enabled=False):
                queries = torch.addcmul(s[..., None, None], queries, a[..., None, None],
                                        out=torch.empty_like(queries, memory_format=torch.contiguous_format))
        keys = None
        if self.key_mode != "linear":
            keys, _ = run(self.key_encoder, encoded, last_stats=False)
            keys = F.adaptive_avg_pool2d(keys.view(n, -1, h, w), features.shape[-2:])
        return queries, self.make_keys(keys, features)

    def tiled_encoders(self, image: torch.Tensor, features: torch.Tensor) -> bool:
        """Whether this call runs :meth:`encode_tiled`: PyTorch encoders (``encoders="torch"``, not
        compiled) on the CPU, float32 or float64 without autocast, no gradient, 1x1 image convolution, and
        not under a tracer (the ONNX export: the tile loop and its statistics are Python values)."""
        return (self.encoders == "torch" and not self.compile and image.device.type == "cpu" and not torch.jit.is_tracing()
                and image.dtype in (torch.float32, torch.float64) and not torch.is_autocast_enabled("cpu")
                and self.image_encoder[0].kernel_size == (1, 1) and not self.needs_grad(image, features))

    def encode_tiled(self, image: torch.Tensor, features: torch.Tensor, output_size):
        """:meth:`encode` at inference on the CPU, the 1x1 encoders tile by tile in token layout
        (:mod:`jafar.layers.tiled`): same arithmetic, one read and one write of a full-resolution map
        per ResBlock half; the query and key encoders' first convolutions run in the pass that makes
        the encoded image (no pass of their own over it). Queries come back as a channels-last map."""
        n, _, h, w = image.shape
        x = image.permute(0, 2, 3, 1).reshape(n, h * w, -1)
        (y, stats), = tiled.conv_pass(x, [self.image_encoder[0].weight.flatten(1)], [None])
        scratch = torch.empty_like(y)  # every ResBlock's middle map: four full-resolution maps in all
        heads = [self.query_encoder[0].weight.flatten(1)]
        if self.key_mode != "linear":
            heads.append(self.key_encoder[0].weight.flatten(1))
        outs = tiled.resblocks(y, stats, list(self.image_encoder)[1:], scratch, last_stats=False, rope=self.rope,
                               hw=(h, w), heads=heads)
        q0, k0 = outs[1], (outs[2] if len(outs) > 2 else None)
        del outs
        same_size = tuple(output_size) == (h, w)
        (q, q_stats), = tiled.resblocks(*q0, list(self.query_encoder)[1:], scratch, last_stats=same_size)
        if same_size:  # the GroupNorm (no affine) in place, from the statistics of the last pass
            a, s = tiled.norm_coefficients(q_stats, self.norm, q.dtype)
            queries = tiled.tokens_to_map(q.mul_(a[:, None]).add_(s[:, None]), h, w)
        else:
            queries = self.norm(F.adaptive_avg_pool2d(tiled.tokens_to_map(q, h, w), output_size))
        del q, q0
        keys = None
        if k0 is not None:
            (k, _), = tiled.resblocks(*k0, list(self.key_encoder)[1:], scratch, last_stats=False)
            keys = F.adaptive_avg_pool2d(tiled.tokens_to_map(k, h, w), features.shape[-2:]).contiguous()
        return queries, self.make_keys(keys, features)

    def forward(self, image: torch.Tensor, features: torch.Tensor, output_size) -> torch.Tensor:
        out_h, out_w = self.check_inputs(image, features, output_size)
        b, c = features.shape[:2]
        if self.encoders == "triton":  # whether gradients are needed, found once per call
            fused = not self.needs_grad(image, features)
            queries, keys = self.encode_fused(image, features, (out_h, out_w), train=not fused)
        elif self.tiled_encoders(image, features):
            fused = False
            queries, keys = self.encode_tiled(image, features, (out_h, out_w))
        else:
            fused = False
            queries, keys = self._encoder()(image, features, (out_h, out_w))
        out = self.cross_decode(queries, keys, features, self.attention, self.memory_budget, fused)  # (B, Nq, C)
        return out.view(b, out_h, out_w, c).permute(0, 3, 1, 2)

    def options(self) -> list:
        """The architecture options that depart from the official model, in words (the paper's
        Tables 5 and 11); empty for the official architecture."""
        words = [_KEY_MODE_WORDS[self.key_mode]] if self.key_mode != "sft" else []
        heads = self.config["num_heads"]
        words += [f"{heads} attention head{'s' if heads > 1 else ''} (Table 5)"] if heads != 4 else []
        return words + (["no RoPE (Table 11 'w/o RoPE')"] if self.rope is None else [])

    def describe(self) -> str:
        options = self.options()
        return f"JAFAR{' (' + '; '.join(options) + ')' if options else ''}, weights: {self.weights_source}."

    def extra_repr(self) -> str:
        extra = f", attention={self.attention!r}" + (f", compile={self.compile!r}" if self.compile else "")
        extra += f", encoders={self.encoders!r}" if self.encoders != "torch" else ""
        extra += f", group_norm={self.group_norm!r}" if self.group_norm != "auto" else ""
        return ", ".join(f"{k}={v}" for k, v in self.config.items()) + extra


# ---------------------------------------------------------------------------------------------
# Releases and checkpoints. Two formats:
#
# * official ``.pth`` files of github PaulCouairon/JAFAR (release ``Weights``): ``{"jafar":
#   state_dict, "optimizer_jafar": ..., "epoch": ..., "cfg": <pickled OmegaConf>}``, read without
#   running pickled code (``jafar.hub.safe_torch_load``). They carry a few stray
#   ``query_features_encoder.*`` keys from an older version of the model, dropped with a warning.
# * ours: one ``.safetensors`` file whose metadata holds the constructor config
#   (``{"format": "jafar", "config": "<json>"}``); no pickle at all. Our pretraining's Lightning
#   ``.ckpt`` files (``state_dict`` with an ``upsampler.`` prefix) load too.
# ---------------------------------------------------------------------------------------------

_RELEASE_URL = "https://github.com/PaulCouairon/JAFAR/releases/download/Weights/{}"

@dataclass(frozen=True)
class Release:
    """An official JAFAR checkpoint and the frozen timm backbone it was trained for."""

    filename: str
    backbone: str  #: exact timm model name
    feature_dim: int  #: the backbone's width, i.e. the checkpoint's ``v_dim``
    label: str  #: the official README's label

    @property
    def url(self) -> str:
        return _RELEASE_URL.format(self.filename)


#: The official releases: the seven of June 2025 (README of github PaulCouairon/JAFAR @ 94d4d54,
#: "Available Models") and the DINOv3 and RADIO v2.5 files added later under the same release URL
#: (the official ``hubconf.py``, ``WEIGHTS_URLS``; widths from its ``hydra_plugins/resolvers.py``,
#: ``get_feature``). The README labels ``vit_base_patch16_224.dino.pth`` "ViT-B-16" and
#: ``vit_base_patch16_224.pth`` "ViT-B-16-DINO"; the file names are timm model names (the official
#: training config takes ``backbone.name`` from timm), so the first is DINO ViT-B/16 and the second
#: the supervised ViT-B/16: the labels are swapped and we key the table by the files' backbones.
#: RADIO's backbones are not timm models: their key is the RADIO version (``jafar.backbones.RADIO_BACKBONES``).
OFFICIAL_RELEASES: Dict[str, Release] = {
    r.backbone: r
    for r in (
        Release("vit_small_patch14_dinov2.lvd142m.pth", "vit_small_patch14_dinov2.lvd142m", 384, "ViT-S-14-DINOv2"),
        Release("vit_base_patch14_dinov2.lvd142m.pth", "vit_base_patch14_dinov2.lvd142m", 768, "ViT-B-14-DINOv2"),
        Release("vit_small_patch14_reg4_dinov2.pth", "vit_small_patch14_reg4_dinov2.lvd142m", 384,
                "ViT-S-Reg4-14-DINOv2"),
        Release("vit_base_patch16_224.dino.pth", "vit_base_patch16_224.dino", 768, "ViT-B-16 (DINO; label swapped)"),
        Release("vit_base_patch16_224.pth", "vit_base_patch16_224.augreg2_in21k_ft_in1k", 768,
                "ViT-B-16-DINO (supervised; label swapped)"),
        Release("vit_base_patch16_clip_384.pth", "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k", 768,
                "ViT-B-16-CLIP"),
        Release("vit_base_patch16_siglip_512.v2_webli.pth", "vit_base_patch16_siglip_512.v2_webli", 768,
                "ViT-B-16-SigLIP2"),
        Release("vit_small_patch16_dinov3.lvd1689m.pth", "vit_small_patch16_dinov3.lvd1689m", 384, "DINOv3-S"),
        Release("vit_small_plus_patch16_dinov3.lvd1689m.pth", "vit_small_plus_patch16_dinov3.lvd1689m", 384,
                "DINOv3-S+"),
        Release("vit_base_patch16_dinov3.lvd1689m.pth", "vit_base_patch16_dinov3.lvd1689m", 768, "DINOv3-B"),
        Release("vit_large_patch16_dinov3.lvd1689m.pth", "vit_large_patch16_dinov3.lvd1689m", 1024, "DINOv3-L"),
        Release("radio_v2.5-b.pth", "radio_v2.5-b", 768, "RADIO v2.5-B"),
        Release("radio_v2.5-l.pth", "radio_v2.5-l", 1024, "RADIO v2.5-L"),
        Release("radio_v2.5-h.pth", "radio_v2.5-h", 1280, "RADIO v2.5-H"),
    )
}

#: The official hub's short names (its ``hubconf.py``, ``load``'s name mapping) -> our release key.
HUB_NAMES: Dict[str, str] = {
    "dinov2_s": "vit_small_patch14_dinov2.lvd142m",
    "dinov2_b": "vit_base_patch14_dinov2.lvd142m",
    "dinov2_reg4_s": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov3_s": "vit_small_patch16_dinov3.lvd1689m",
    "dinov3_s_plus": "vit_small_plus_patch16_dinov3.lvd1689m",
    "dinov3_b": "vit_base_patch16_dinov3.lvd1689m",
    "dinov3_l": "vit_large_patch16_dinov3.lvd1689m",
    "dino_b": "vit_base_patch16_224.dino",
    "clip_b": "vit_base_patch16_clip_384.laion2b_ft_in12k_in1k",
    "siglip2_b": "vit_base_patch16_siglip_512.v2_webli",
    "vit_b": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
    "radio_b": "radio_v2.5-b",
    "radio_l": "radio_v2.5-l",
    "radio_h": "radio_v2.5-h",
}


_STRAY_PREFIXES = ("query_features_encoder.",)


def infer_config(state_dict: Dict[str, torch.Tensor], num_heads: int = 4) -> dict:
    """JAFAR constructor arguments implied by the keys and shapes of a state dict: ``key_mode`` by
    the key modules it holds (``sft_key``, ``key_concat``, ``key_linear``, or ``key_encoder`` alone),
    ``rope`` by ``rope.freqs``. The number of heads does not show in any shape: ``num_heads``
    (every official release uses 4; our pretraining's checkpoints record theirs, :func:`read_state_dict`)."""
    if "sft_key.gamma.weight" in state_dict or "key_concat.weight" in state_dict:
        key_mode, width_key = ("sft" if "sft_key.gamma.weight" in state_dict else "concat"), "key_features_encoder.0.weight"
    elif "key_linear.weight" in state_dict:
        key_mode, width_key = "linear", "key_linear.weight"
    elif "key_encoder.0.weight" in state_dict:  # the v_dim-wide value RMSNorm is kept in every mode
        key_mode, width_key = "none", "cross_decode.cross_attn.norm_v.weight"
    else:
        key_mode, width_key = "sft", "key_features_encoder.0.weight"  # the official layout, for the message below
    try:
        first = state_dict["image_encoder.0.weight"]
        width = state_dict[width_key]
    except KeyError as exc:
        raise ValueError(f"not a JAFAR state dict: key {exc.args[0]!r} is missing.") from None
    config = dict(input_dim=first.shape[1], qk_dim=first.shape[0], v_dim=width.shape[0 if width.dim() == 1 else 1],
                  num_heads=int(num_heads), kernel_size=first.shape[-1])
    options = dict(key_mode=key_mode, rope="rope.freqs" in state_dict)
    config.update({k: v for k, v in options.items() if v != OPTION_DEFAULTS[k]})
    return config


def _recorded_heads(content) -> int:
    """The number of heads of a Lightning checkpoint of our pretraining, from the run configuration
    it carries (``run_config``, :mod:`jafar.runs`: ``upsampler.num_heads``); 4 (official) otherwise."""
    record = content.get("run_config") if isinstance(content, dict) else None
    upsampler = record.get("upsampler") if isinstance(record, dict) else None
    heads = upsampler.get("num_heads") if isinstance(upsampler, dict) else None
    return heads if _is_int(heads) and heads > 0 else 4


def _clean_state_dict(state_dict: Dict[str, torch.Tensor], source: str) -> Dict[str, torch.Tensor]:
    if all(k.startswith("module.") for k in state_dict):  # saved from DDP
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    stray = [k for k in state_dict if k.startswith(_STRAY_PREFIXES)]
    if stray:
        warnings.warn(f"{source}: ignoring {len(stray)} stray keys of an older JAFAR version "
                      f"({', '.join(sorted(stray)[:3])}{', ...' if len(stray) > 3 else ''}).", stacklevel=3)
        state_dict = {k: v for k, v in state_dict.items() if k not in stray}
    return state_dict


def read_state_dict(path: PathLike) -> Tuple[Dict[str, torch.Tensor], dict]:
    """A JAFAR state dict and its constructor config from any of the formats above (the checkpoint
    adapter of this upsampler)."""
    content, meta = hub.read_weights(path)
    if Path(path).suffix == ".safetensors":
        if meta.get("format") != "jafar" or "config" not in meta:
            raise ValueError(f"{str(path)!r} is a safetensors file without JAFAR metadata "
                             "(expected one written by jafar.save_checkpoint).")
        return content, json.loads(meta["config"])
    try:
        state_dict = hub.unwrap_state_dict(content, str(path), nested=("jafar", "state_dict"))
    except ValueError:
        keys = list(content)[:5] if isinstance(content, dict) else type(content).__name__
        raise ValueError(f"{str(path)!r} holds no JAFAR state dict (expected a 'jafar' entry or a flat "
                         f"state dict, found {keys}).") from None
    if state_dict and all(k.startswith("upsampler.") for k in state_dict if not k.startswith("backbone.")):
        # our pretraining's Lightning checkpoint (jafar.train.module.JafarPretraining)
        state_dict = {k[len("upsampler."):]: v for k, v in state_dict.items() if k.startswith("upsampler.")}
    state_dict = _clean_state_dict(state_dict, str(path))
    return state_dict, infer_config(state_dict, num_heads=_recorded_heads(content))


def load_checkpoint(path: PathLike, feature_dim: Optional[int] = None, map_location="cpu",
                    **model_kwargs) -> JAFAR:
    """Build a :class:`JAFAR` from an official ``.pth`` or one of our ``.safetensors`` files.

    Args:
        path: the checkpoint.
        feature_dim: the backbone's channel count; a checkpoint for another width is refused.
        map_location: device for the returned model.
        model_kwargs: runtime options of :class:`JAFAR` (``attention``, ``memory_budget_mb``,
            ``compile``, ``encoders``). Architecture arguments (``qk_dim``, ``num_heads``,
            ``key_mode``, ``rope``, ...) may be given too; they must agree with the checkpoint.
    """
    state_dict, config = read_state_dict(path)
    if feature_dim is not None and int(feature_dim) != config["v_dim"]:
        raise ValueError(f"checkpoint {str(path)!r} upsamples {config['v_dim']}-channel features but the "
                         f"backbone gives {feature_dim} channels: use the checkpoint trained for this backbone.")
    full = {**OPTION_DEFAULTS, **config}  # a checkpoint of the official architecture has key_mode="sft", rope=True
    for key in set(model_kwargs) & set(full):
        if model_kwargs[key] != full[key]:
            raise ValueError(f"checkpoint {str(path)!r} has {key}={full[key]} but {key}={model_kwargs[key]} was asked "
                             f"for: ask for {key}={full[key]} (in the tools' configs, the upsampler's {key}) or leave "
                             f"{key} out.")
        del model_kwargs[key]
    model = JAFAR(**config, **model_kwargs)
    hub.load_into(model, state_dict, path, f"JAFAR({config})")
    model.weights_source = str(path)
    return model.to(map_location)


def save_checkpoint(model: JAFAR, path: PathLike, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``model`` as one ``.safetensors`` file with its constructor config, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_checkpoint writes .safetensors files, got {str(path)!r}.")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update(format="jafar", config=json.dumps(model.config))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def find_release(name: str) -> Optional[Release]:
    """The release for ``name``: the official hub's short name (:data:`HUB_NAMES`, e.g.
    ``dinov3_l``), a backbone's timm name or short alias (``jafar.backbones``'s table, e.g.
    ``dinov2_vits14``), a RADIO version, or the release file's name with or without ``.pth``
    (the official ``WEIGHTS_URLS`` keys); None if none."""
    from ..backbones import resolve_name

    key = HUB_NAMES.get(name) or resolve_name(name)
    if key in OFFICIAL_RELEASES:
        return OFFICIAL_RELEASES[key]
    return next((r for r in OFFICIAL_RELEASES.values() if r.filename in (name, f"{name}.pth")), None)


def resolve_release(name: str) -> Release:
    release = find_release(name)
    if release is None:
        raise ValueError(f"no official JAFAR release named {name!r}; known: {', '.join(HUB_NAMES)} (the official "
                         f"hub's names), or {', '.join(sorted(OFFICIAL_RELEASES))} (their backbones), or the file "
                         f"names.")
    return release


def release_path(name: str, cache_dir: Optional[PathLike] = None) -> Path:
    """Where :func:`from_pretrained` keeps (or looks for) a release's file."""
    return hub.cache_path(resolve_release(name).filename, cache_dir=cache_dir)


def from_pretrained(name: str, feature_dim: Optional[int] = None, cache_dir: Optional[PathLike] = None,
                    map_location="cpu", **model_kwargs) -> JAFAR:
    """Load a named official release, downloading it into the hub cache if needed.

    ``name`` is the backbone's timm name (``vit_small_patch14_dinov2.lvd142m``) or an alias
    (``dinov2_vits14``) or the file's name; see :data:`OFFICIAL_RELEASES`.
    """
    release = resolve_release(name)
    path = hub.download(release.url, release.filename, cache_dir=cache_dir,
                        what=f"the JAFAR release {release.filename!r}",
                        local_hint=f"load it with jafar.load_checkpoint('/path/to/{release.filename}')")
    model = load_checkpoint(path, feature_dim=feature_dim, map_location=map_location, **model_kwargs)
    model.weights_source = f"official release {release.filename}"
    if model.v_dim != release.feature_dim:
        warnings.warn(f"{release.filename} upsamples {model.v_dim}-channel features, not the "
                      f"{release.feature_dim} channels of {release.backbone} listed for it.", stacklevel=2)
    return model


@register_upsampler("jafar", summary="JAFAR (attention, any ratio)")
def jafar(feature_dim=None, checkpoint=None, backbone=None, **options) -> JAFAR:
    """``checkpoint``: an official release name (downloaded when online; :data:`OFFICIAL_RELEASES`)
    or a file (``.pth`` official, ``.safetensors`` ours, ``.ckpt`` our pretraining's); random
    initialisation when omitted. ``options``: constructor arguments of :class:`JAFAR`, the
    ablation options ``key_mode`` and ``rope`` included (with a checkpoint, its runtime options:
    ``attention``, ``memory_budget_mb``, ``compile``, ``encoders``, ``group_norm``; architecture
    arguments must then agree with the checkpoint's). ``feature_dim`` is the backbone's width (``v_dim``)."""
    if checkpoint is None:
        if feature_dim is not None:
            options.setdefault("v_dim", feature_dim)
            if options["v_dim"] != feature_dim:
                raise ValueError(f"v_dim={options['v_dim']} does not match feature_dim={feature_dim}.")
        return JAFAR(**options)
    if find_release(str(checkpoint)) is not None and not Path(str(checkpoint)).is_file():
        return from_pretrained(str(checkpoint), feature_dim=feature_dim, **options)
    return load_checkpoint(checkpoint, feature_dim=feature_dim, **options)
