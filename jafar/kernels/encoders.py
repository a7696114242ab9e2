"""Fused Triton kernels for JAFAR's per-pixel encoders (inference and training), and a Triton
GroupNorm.

JAFAR's image, query and key encoders run at the full image resolution and are all 1x1:
``conv -> [GroupNorm -> SiLU -> conv -> GroupNorm -> SiLU -> conv (+ identity)] x 2``
(``jafar.upsamplers.jafar.make_encoder``). Eagerly, each GroupNorm reads its input twice (statistics, then
``x * a + b``), SiLU reads and writes, the convolution reads and writes, the residual add reads
two tensors: at 448x448 and 128 channels in bf16, each pass is 51 MB of memory traffic. The
matmuls themselves are tiny (128x128 weights). So the encoders are bound by memory traffic and
kernel launches, not by arithmetic.

:func:`pointwise_conv` does one "GroupNorm-apply -> SiLU -> 1x1 conv (+ residual) (-> RoPE)"
step in one pass over the pixels: each program loads a tile of ``BLOCK_P`` pixels and all input
channels, applies the per-(sample, channel) normalisation ``x * a + s`` and SiLU in float32,
multiplies by the weight with ``tl.dot`` (float32 accumulation), adds the residual, optionally
applies the 2-D RoPE (``jafar.layers.rope``) and writes the tile once. Its epilogue writes, per tile,
the group means and the sums of squared deviations from them (of the values as stored, i.e.
after rounding to the output dtype) so that the next GroupNorm needs no pass of its own:
:func:`group_norm_coefficients` merges the tiles (Chan's parallel formula, in float32, one
program per (sample, group)) into the per-channel ``a = w * rstd`` and ``s = b - mean * a``.
A ResBlock is then two kernels and two tiny merges: the input and the output each cross memory
once.

At inference the queries' RMSNorm and projection (``cross_decode``) are one more kernel,
:func:`rms_project`, reading the 3x3 convolution's NCHW output and writing the projected tokens.

Training (:class:`FusedUnit`, used by ``JAFAR(encoders="triton")`` whenever a gradient is
needed): each "GroupNorm -> SiLU -> 1x1 conv (+ residual)" is that forward kernel (RoPE then
runs in PyTorch) and saves only its input and the ``(N, C)`` coefficients; its backward is two
passes: :func:`_unit_bwd_kernel` computes ``dz = (W^T dy) silu'(z)`` (``z`` recomputed from
the saved input), the per-channel sums of ``dz`` and ``dz * xhat`` and, accumulated per
persistent program, the weight gradient; then the GroupNorm backward's elementwise ``dx``.

:func:`group_norm_stats` and :func:`group_norm_backward` are a standalone GroupNorm
(``jafar.layers.norm.GroupNorm(impl="triton")``): statistics in one pass, and the backward in two,
reading half-precision inputs and gradients in their own dtype.

Same numbers as the PyTorch path (``nn.GroupNorm`` statistics are the biased variance of the
stored values, ``eps`` inside the square root), up to float rounding: outputs and gradients are
checked against it in float64 (``jafar/kernels/checks/cases.py``: ``ENCODER_CASES``, ``GN_CASES``) in
``tests/test_encoder_kernels.py`` under Triton's interpreter, and on CUDA.
"""

from __future__ import annotations

import torch

from .attention import CONFIGS, triton
from .attention import next_pow2 as _next_pow2

if triton is not None:
    import triton.language as tl

# The launch configuration of pointwise_conv is jafar.kernels.attention.CONFIGS["encoder"] (pixels per tile,
# warps, software-pipeline stages, persistent programs per SM; on the CPU under the interpreter,
# two programs per sample), overridable with JAFAR_TRITON_CONFIG or per call.

#: widest input or output the kernel takes (the whole weight is one tile; JAFAR's qk_dim is 128)
MAX_CHANNELS = 128
#: tiles merged per loop step in :func:`group_norm_coefficients`
BLOCK_T = 512


if triton is not None:

    @triton.jit
    def _pointwise_conv_kernel(X, W, A, S, R, Y, PART, FREQS, C, CO, P, NT, IMG_W, row_step, col_step,
                               NORM: tl.constexpr, RES: tl.constexpr, ROPE: tl.constexpr, G: tl.constexpr,
                               GP: tl.constexpr, CP: tl.constexpr, COP: tl.constexpr, BLOCK_P: tl.constexpr,
                               PREC: tl.constexpr):
        # persistent: each program loads the weight (and the sample's coefficients) once and loops
        # over the pixel tiles t = pid, pid + programs, ...
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        n = tl.program_id(1).to(tl.int64)
        offs_c = tl.arange(0, CP)
        mask_c = offs_c < C
        x_base = X + n * C * P + offs_c[:, None].to(tl.int64) * P
        if NORM:  # GroupNorm's x * a + s; padded channels have a = s = 0
            a = tl.load(A + n * C + offs_c, mask=mask_c, other=0.0)
            s = tl.load(S + n * C + offs_c, mask=mask_c, other=0.0)
        if ROPE:
            # jafar.layers.rope: y * cos + rotate_half(y) * sin with rotate_half(y1, y2) = (-y2, y1) over the
            # two channel halves: the weight is used as its two halves, so each product gives one half
            HALF: tl.constexpr = COP // 2
            half = CO // 2
            offs_o = tl.arange(0, HALF)
            mask_o = offs_o < half
            w_mask = mask_o[:, None] & mask_c[None, :]
            w1 = tl.load(W + offs_o[:, None] * C + offs_c[None, :], mask=w_mask, other=0.0)
            w2 = tl.load(W + (offs_o[:, None] + half) * C + offs_c[None, :], mask=w_mask, other=0.0)
            f0a = tl.load(FREQS + offs_o, mask=mask_o, other=0.0)
            f1a = tl.load(FREQS + CO + offs_o, mask=mask_o, other=0.0)
            f0b = tl.load(FREQS + half + offs_o, mask=mask_o, other=0.0)
            f1b = tl.load(FREQS + CO + half + offs_o, mask=mask_o, other=0.0)
            rows1 = n * CO * P + offs_o[:, None].to(tl.int64) * P
            rows2 = rows1 + half.to(tl.int64) * P
        else:
            offs_o = tl.arange(0, COP)
            mask_o = offs_o < CO
            w = tl.load(W + offs_o[:, None] * C + offs_c[None, :], mask=mask_o[:, None] & mask_c[None, :], other=0.0)
            rows = n * CO * P + offs_o[:, None].to(tl.int64) * P
            if G > 0:
                cg = CO // G
                groups = tl.arange(0, GP)
                member = ((offs_o[None, :] // cg) == groups[:, None]) & mask_o[None, :]  # (GP, COP)
        for t in range(pid, NT, programs):
            offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
            mask_p = offs_p < P
            x = tl.load(x_base + offs_p[None, :], mask=mask_c[:, None] & mask_p[None, :], other=0.0)
            if NORM:  # then SiLU, in float32
                h = x.to(tl.float32) * a[:, None] + s[:, None]
                x = (h / (1.0 + tl.exp(-h))).to(W.dtype.element_ty)
            mask = mask_o[:, None] & mask_p[None, :]
            if ROPE:
                y1 = tl.dot(w1, x, input_precision=PREC)
                y2 = tl.dot(w2, x, input_precision=PREC)
                if RES:
                    y1 += tl.load(R + rows1 + offs_p[None, :], mask=mask, other=0.0).to(tl.float32)
                    y2 += tl.load(R + rows2 + offs_p[None, :], mask=mask, other=0.0).to(tl.float32)
                # the block's output as stored by the PyTorch path, and its cos / sin in that dtype
                y1 = y1.to(Y.dtype.element_ty).to(tl.float32)
                y2 = y2.to(Y.dtype.element_ty).to(tl.float32)
                row = (offs_p // IMG_W).to(tl.float32) * row_step
                col = (offs_p % IMG_W).to(tl.float32) * col_step
                angle1 = row[None, :] * f0a[:, None] + col[None, :] * f1a[:, None]
                angle2 = row[None, :] * f0b[:, None] + col[None, :] * f1b[:, None]
                cos1 = tl.cos(angle1).to(Y.dtype.element_ty).to(tl.float32)
                sin1 = tl.sin(angle1).to(Y.dtype.element_ty).to(tl.float32)
                out1 = y1 * cos1 - y2 * sin1
                cos2 = tl.cos(angle2).to(Y.dtype.element_ty).to(tl.float32)
                sin2 = tl.sin(angle2).to(Y.dtype.element_ty).to(tl.float32)
                out2 = y2 * cos2 + y1 * sin2
                tl.store(Y + rows1 + offs_p[None, :], out1.to(Y.dtype.element_ty), mask=mask)
                tl.store(Y + rows2 + offs_p[None, :], out2.to(Y.dtype.element_ty), mask=mask)
            else:
                acc = tl.dot(w, x, input_precision=PREC)  # (COP, BLOCK_P) float32
                if RES:
                    acc += tl.load(R + rows + offs_p[None, :], mask=mask, other=0.0).to(tl.float32)
                y = acc.to(Y.dtype.element_ty)
                tl.store(Y + rows + offs_p[None, :], y, mask=mask)
                if G > 0:  # per tile and group: mean and sum of squared deviations of the stored values
                    yf = tl.where(mask, y.to(tl.float32), 0.0)
                    n_valid = tl.minimum(P - t * BLOCK_P, BLOCK_P)
                    g_mean = tl.sum(tl.where(member, tl.sum(yf, axis=1)[None, :], 0.0), axis=1) / (n_valid * cg)
                    c_mean = tl.sum(tl.where(member, g_mean[:, None], 0.0), axis=0)  # each channel's group mean
                    d = tl.where(mask, yf - c_mean[:, None], 0.0)
                    g_m2 = tl.sum(tl.where(member, tl.sum(d * d, axis=1)[None, :], 0.0), axis=1)
                    base = PART + (n * NT + t) * 2 * G
                    tl.store(base + groups, g_mean, mask=groups < G)
                    tl.store(base + G + groups, g_m2, mask=groups < G)

    @triton.jit
    def _gn_coefficients_kernel(PART, WEIGHT, BIAS, A, S, MEAN, RSTD, C, P, NT, TILE, total, eps,
                                G: tl.constexpr, CGP: tl.constexpr, BLOCK_T: tl.constexpr,
                                AFFINE: tl.constexpr):
        pid = tl.program_id(0)
        n = (pid // G).to(tl.int64)
        g = pid % G
        cg = C // G
        offs = tl.arange(0, BLOCK_T)
        s1 = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(0, NT, BLOCK_T):
            t = t0 + offs
            cnt = (tl.minimum(P - t * TILE, TILE) * cg).to(tl.float32)
            m = tl.load(PART + (n * NT + t) * 2 * G + g, mask=t < NT, other=0.0)
            s1 += tl.where(t < NT, cnt * m, 0.0)
        mean = tl.sum(s1, axis=0) / total
        m2 = tl.zeros([BLOCK_T], dtype=tl.float32)
        for t0 in range(0, NT, BLOCK_T):  # Chan et al.: sum of the tiles' M2 + n_t (mean_t - mean)^2
            t = t0 + offs
            cnt = (tl.minimum(P - t * TILE, TILE) * cg).to(tl.float32)
            m = tl.load(PART + (n * NT + t) * 2 * G + g, mask=t < NT, other=0.0)
            q = tl.load(PART + (n * NT + t) * 2 * G + G + g, mask=t < NT, other=0.0)
            m2 += tl.where(t < NT, q + cnt * (m - mean) * (m - mean), 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(m2, axis=0) / total + eps)
        tl.store(MEAN + pid, mean)
        tl.store(RSTD + pid, rstd)
        ch = tl.arange(0, CGP)
        mask = ch < cg
        cidx = g * cg + ch
        if AFFINE:
            a = tl.load(WEIGHT + cidx, mask=mask, other=0.0).to(tl.float32) * rstd
            s = tl.load(BIAS + cidx, mask=mask, other=0.0).to(tl.float32) - mean * a
        else:
            a = tl.zeros([CGP], dtype=tl.float32) + rstd
            s = tl.zeros([CGP], dtype=tl.float32) - mean * rstd
        tl.store(A + n * C + cidx, a, mask=mask)
        tl.store(S + n * C + cidx, s, mask=mask)


if triton is not None:

    @triton.jit
    def _group_tile(t, ng, C, P, G: tl.constexpr, CGP: tl.constexpr, BLOCK_P: tl.constexpr):
        """Tile ``t`` of sample ``ng // G``, group ``ng % G`` in the GroupNorm kernels: the group's
        channels x the tile's pixels, as ``(mask, element offsets)``."""
        cg = C // G
        ch = tl.arange(0, CGP)
        offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = (ch < cg)[:, None] & (offs_p < P)[None, :]
        offs = ((ng // G).to(tl.int64) * C + (ng % G) * cg + ch[:, None]) * P + offs_p[None, :]
        return mask, offs

    @triton.jit
    def _gn_tile_stats_kernel(X, PART, C, P, NT, G: tl.constexpr, CGP: tl.constexpr, BLOCK_P: tl.constexpr):
        """Program (tile t, sample n * G + group g): the group's mean and sum of squared deviations
        over the tile's pixels, in float32 (the layout of :class:`Stats`)."""
        t = tl.program_id(0)
        ng = tl.program_id(1)
        n = (ng // G).to(tl.int64)
        g = ng % G
        cg = C // G
        mask, offs = _group_tile(t, ng, C, P, G, CGP, BLOCK_P)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        count = tl.minimum(P - t * BLOCK_P, BLOCK_P) * cg
        mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
        d = tl.where(mask, x - mean, 0.0)
        base = PART + (n * NT + t) * 2 * G + g
        tl.store(base, mean)
        tl.store(base + G, tl.sum(tl.sum(d * d, axis=1), axis=0))

    @triton.jit
    def _gn_bwd_reduce_kernel(DY, X, MEAN, RSTD, PART, C, P, NT, G: tl.constexpr, CGP: tl.constexpr,
                              BLOCK_P: tl.constexpr):
        """Program (tile t, n * G + g): per channel of the group, the tile's sums of dy and of
        dy * xhat, xhat = (x - mean) * rstd (no cancellation: the mean is subtracted first)."""
        t = tl.program_id(0)
        ng = tl.program_id(1)
        n = (ng // G).to(tl.int64)
        g = ng % G
        cg = C // G
        ch = tl.arange(0, CGP)
        mask, offs = _group_tile(t, ng, C, P, G, CGP, BLOCK_P)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + n * G + g)
        rstd = tl.load(RSTD + n * G + g)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        base = PART + ((n * NT + t) * 2) * C + g * cg + ch
        tl.store(base, tl.sum(dy, axis=1), mask=ch < cg)
        tl.store(base + C, tl.sum(dy * xhat, axis=1), mask=ch < cg)

    @triton.jit
    def _gn_bwd_apply_kernel(DY, X, CA, MEAN, CB, CC, DX, C, P, G: tl.constexpr, CGP: tl.constexpr,
                             BLOCK_P: tl.constexpr):
        """dx = a * dy - b * (x - mean) - c: ``a`` per (sample, channel), ``mean``, ``b``, ``c`` per
        (sample, group), float32; the mean is subtracted before scaling (no cancellation)."""
        t = tl.program_id(0)
        ng = tl.program_id(1)
        n = (ng // G).to(tl.int64)
        g = ng % G
        cg = C // G
        ch = tl.arange(0, CGP)
        mask, offs = _group_tile(t, ng, C, P, G, CGP, BLOCK_P)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        a = tl.load(CA + n * C + g * cg + ch, mask=ch < cg, other=0.0)
        mean = tl.load(MEAN + n * G + g)
        b = tl.load(CB + n * G + g)
        c = tl.load(CC + n * G + g)
        dx = a[:, None] * dy - b * (x - mean) - c
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


if triton is not None:

    @triton.jit
    def _unit_bwd_kernel(DY, X, W, A, S, MEAN, RSTD, DZ, PART, DWPART, C, CO, P, NT,
                         G: tl.constexpr, CP: tl.constexpr, COP: tl.constexpr, BLOCK_P: tl.constexpr,
                         PREC: tl.constexpr):
        """Backward of ``y = W silu(z)``, ``z = GroupNorm(x) = x * a + s``, up to ``dz`` (persistent
        over pixel tiles): ``dz = (W^T dy) * silu'(z)`` (written in x's dtype), per tile and
        channel the sums of ``dz`` and ``dz * xhat`` (for the GroupNorm backward and its affine
        gradients), and per program the weight gradient ``sum_p dy silu(z)^T`` (float32)."""
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        n = tl.program_id(1).to(tl.int64)
        offs_c = tl.arange(0, CP)
        mask_c = offs_c < C
        offs_o = tl.arange(0, COP)
        mask_o = offs_o < CO
        # the weight's transpose (CP, COP), loaded as such
        wt = tl.load(W + offs_o[None, :] * C + offs_c[:, None], mask=mask_o[None, :] & mask_c[:, None], other=0.0)
        a = tl.load(A + n * C + offs_c, mask=mask_c, other=0.0)
        s = tl.load(S + n * C + offs_c, mask=mask_c, other=0.0)
        group = offs_c // (C // G)
        mean = tl.load(MEAN + n * G + group, mask=mask_c, other=0.0)
        rstd = tl.load(RSTD + n * G + group, mask=mask_c, other=0.0)
        dw = tl.zeros((COP, CP), dtype=tl.float32)
        for t in range(pid, NT, programs):
            offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
            mask_p = offs_p < P
            x_mask = mask_c[:, None] & mask_p[None, :]
            x = tl.load(X + n * C * P + offs_c[:, None].to(tl.int64) * P + offs_p[None, :], mask=x_mask,
                        other=0.0).to(tl.float32)
            dy = tl.load(DY + n * CO * P + offs_o[:, None].to(tl.int64) * P + offs_p[None, :],
                         mask=mask_o[:, None] & mask_p[None, :], other=0.0)
            z = x * a[:, None] + s[:, None]
            sig = 1.0 / (1.0 + tl.exp(-z))
            h = tl.where(x_mask, z * sig, 0.0).to(W.dtype.element_ty)  # silu(z), as the forward fed the conv
            dh = tl.dot(wt, dy, input_precision=PREC)  # (CP, BLOCK_P)
            dz = tl.where(x_mask, dh * sig * (1.0 + z * (1.0 - sig)), 0.0)
            tl.store(DZ + n * C * P + offs_c[:, None].to(tl.int64) * P + offs_p[None, :],
                     dz.to(DZ.dtype.element_ty), mask=x_mask)
            xhat = tl.where(x_mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            base = PART + ((n * NT + t) * 2) * C + offs_c
            tl.store(base, tl.sum(dz, axis=1), mask=mask_c)
            tl.store(base + C, tl.sum(dz * xhat, axis=1), mask=mask_c)
            dw += tl.dot(dy, tl.trans(h), input_precision=PREC)  # (COP, CP)
        tl.store(DWPART + ((n * programs + pid) * CO + offs_o[:, None]) * C + offs_c[None, :], dw,
                 mask=mask_o[:, None] & mask_c[None, :])


if triton is not None:

    @triton.jit
    def _rms_project_kernel(X, NW, WT, BIAS, OUT, C, D, P, NT, eps, CP: tl.constexpr, DP: tl.constexpr,
                            BLOCK_P: tl.constexpr, PREC: tl.constexpr):
        """Per pixel of an NCHW map ``x`` (C channels): ``out = W (x rsqrt(mean_c x^2 + eps) nw) + b``,
        written as tokens ``(N, P, D)``; persistent over pixel tiles."""
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        n = tl.program_id(1).to(tl.int64)
        offs_c = tl.arange(0, CP)
        mask_c = offs_c < C
        offs_d = tl.arange(0, DP)
        mask_d = offs_d < D
        nw = tl.load(NW + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        wt = tl.load(WT + offs_c[:, None] * D + offs_d[None, :], mask=mask_c[:, None] & mask_d[None, :], other=0.0)
        bias = tl.load(BIAS + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        for t in range(pid, NT, programs):
            offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
            mask_p = offs_p < P
            x = tl.load(X + n * C * P + offs_c[:, None].to(tl.int64) * P + offs_p[None, :],
                        mask=mask_c[:, None] & mask_p[None, :], other=0.0).to(tl.float32)
            rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / C + eps)  # (BLOCK_P,)
            xn = (x * rms[None, :] * nw[:, None]).to(WT.dtype.element_ty)
            out = tl.dot(tl.trans(xn), wt, input_precision=PREC) + bias[None, :]  # (BLOCK_P, DP)
            tl.store(OUT + (n * P + offs_p[:, None].to(tl.int64)) * D + offs_d[None, :], out.to(OUT.dtype.element_ty),
                     mask=mask_p[:, None] & mask_d[None, :])


def rms_project(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                bias: torch.Tensor, out_dtype: torch.dtype, config: dict = None) -> torch.Tensor:
    """``F.linear(RMSNorm(tokens of x), weight, bias)`` for an NCHW map ``x`` ``(N, C, H, W)``, in
    one pass: ``(N, H*W, D)`` in ``out_dtype`` (the normalisation in float32, the product in
    ``out_dtype`` with float32 accumulation, as RMSNorm then ``F.linear`` under autocast)."""
    if triton is None:
        raise RuntimeError("the fused encoder kernels need the triton package (pip install triton).")
    n, c = x.shape[:2]
    d = weight.shape[0]
    if weight.shape[1] != c or max(c, d) > MAX_CHANNELS:
        raise ValueError(f"rms_project takes a (D, C) weight with C = {c} and C, D <= {MAX_CHANNELS}, got "
                         f"{tuple(weight.shape)}.")
    cfg = dict(CONFIGS["encoder"], **(config or {}))
    x = x.contiguous()
    p = x[0, 0].numel()
    block_p = _tile(p, cfg)
    nt = triton.cdiv(p, block_p)
    programs = _programs(x, n, nt, cfg)
    out = torch.empty(n, p, d, device=x.device, dtype=out_dtype)
    wt = weight.to(out_dtype).t().contiguous()
    prec = ("ieee" if out_dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32")
    _rms_project_kernel[(programs, n)](x, norm_weight.contiguous(), wt, bias.contiguous(), out, c, d, p, nt,
                                       float(eps), CP=max(16, _next_pow2(c)), DP=max(16, _next_pow2(d)),
                                       BLOCK_P=block_p, PREC=prec, num_warps=cfg["num_warps"],
                                       num_stages=cfg["num_stages"])
    return out


#: pixels per program of the GroupNorm kernels (statistics, backward)
GN_BLOCK_P = 256


def _gn_launch(x: torch.Tensor, num_groups: int):
    n, c = x.shape[:2]
    p = x[0, 0].numel()
    if c % num_groups:
        raise ValueError(f"{c} channels do not split into {num_groups} groups.")
    block_p = min(GN_BLOCK_P, max(16, _next_pow2(p)))
    cgp = max(1, _next_pow2(c // num_groups))
    if cgp * block_p > 16384:  # wide groups: fewer pixels per program
        block_p = max(16, 16384 // cgp)
    return n, c, p, block_p, triton.cdiv(p, block_p), cgp


def group_norm_stats(x: torch.Tensor, num_groups: int) -> "Stats":
    """The :class:`Stats` of ``x`` ``(N, C, ...)`` per group, in one pass over it (no float32 copy
    of a half-precision input)."""
    if triton is None:
        raise RuntimeError("the GroupNorm kernels need the triton package (pip install triton).")
    x = x.contiguous()
    n, c, p, block_p, nt, cgp = _gn_launch(x, num_groups)
    part = torch.empty(n, nt, 2, num_groups, device=x.device, dtype=torch.float32)
    _gn_tile_stats_kernel[(nt, n * num_groups)](x, part, c, p, nt, G=num_groups, CGP=cgp, BLOCK_P=block_p,
                                                num_warps=4)
    return Stats(part, block_p, p, c)


def group_norm_backward(dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight,
                        num_groups: int, need=(True, True, True)):
    """Gradients ``(dx, dweight, dbias)`` of ``GroupNorm(x)`` (``nn.GroupNorm``'s, from the float32
    ``(N, G)`` mean and reciprocal standard deviation of its forward), reading ``dy`` and ``x`` in
    their own dtype twice: per-channel sums of ``dy`` and ``dy * xhat`` (float32), then
    ``dx = rstd * (w dy - mean_g(w dy) - xhat mean_g(w dy xhat))`` in one elementwise pass.
    ``dx`` in ``x``'s dtype, ``dweight``/``dbias`` float32 (None where not needed or no weight)."""
    if triton is None:
        raise RuntimeError("the GroupNorm kernels need the triton package (pip install triton).")
    x, dy = x.contiguous(), dy.contiguous()
    n, c, p, block_p, nt, cgp = _gn_launch(x, num_groups)
    g = num_groups
    part = torch.empty(n, nt, 2, c, device=x.device, dtype=torch.float32)
    mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
    _gn_bwd_reduce_kernel[(nt, n * g)](dy, x, mean, rstd, part, c, p, nt, G=g, CGP=cgp, BLOCK_P=block_p,
                                       num_warps=4)
    return _gn_backward_from_sums(dy, x, mean, rstd, weight, g, part.sum(dim=1), need)


def _gn_backward_from_sums(dy, x, mean, rstd, weight, num_groups: int, sums, need):
    """The GroupNorm backward once the per-(sample, channel) sums ``(N, 2, C)`` of ``dy`` and
    ``dy * xhat`` are known (``dy``: the gradient of the GroupNorm's output)."""
    n, c = x.shape[:2]
    g = num_groups
    _, _, p, block_p, nt, cgp = _gn_launch(x, g)
    s_dy, s_dyx = sums[:, 0], sums[:, 1]
    dw = s_dyx.sum(0) if need[1] and weight is not None else None
    db = s_dy.sum(0) if need[2] and weight is not None else None
    dx = None
    if need[0]:
        w = weight.float().view(1, c) if weight is not None else torch.ones(1, c, device=x.device)
        count = float(p * (c // g))
        c1 = (w * s_dy).view(n, g, -1).sum(-1) / count  # mean over the group of w dy
        c2 = (w * s_dyx).view(n, g, -1).sum(-1) / count  # mean over the group of w dy xhat
        # dx = rstd (w dy - c1 - xhat c2) = (rstd w) dy - (rstd^2 c2) (x - mean) - rstd c1
        ca = (rstd.repeat_interleave(c // g, dim=1) * w).contiguous()
        cb, cc = (rstd * rstd * c2).contiguous(), (rstd * c1).contiguous()
        dx = torch.empty_like(x)
        _gn_bwd_apply_kernel[(nt, n * g)](dy, x, ca, mean, cb, cc, dx, c, p, G=g, CGP=cgp, BLOCK_P=block_p,
                                          num_warps=4)
    return dx, dw, db


def unit_backward(dy, x, weight, a, s, mean, rstd, gn_weight, num_groups: int, config: dict = None):
    """Gradients of ``y = weight @ silu(GroupNorm(x))`` per pixel (:func:`pointwise_conv` with
    coefficients ``(a, s)`` from the GroupNorm's float32 ``(N, G)`` ``mean``/``rstd``):
    ``(dx, dweight, dgn_weight, dgn_bias)``, the last three float32 (``dgn_*`` None without an
    affine). Two passes over the pixels: ``dz = (W^T dy) silu'(z)`` with the per-channel sums and
    the weight gradient (:func:`_unit_bwd_kernel`), then the GroupNorm backward's ``dx``."""
    cfg = dict(CONFIGS["encoder"], **(config or {}))
    n, c, p = x.shape
    co = weight.shape[0]
    x, dy = x.contiguous(), dy.to(x.dtype).contiguous()
    weight = weight.to(x.dtype).contiguous()
    block_p = _tile(p, cfg)
    nt = triton.cdiv(p, block_p)
    programs = _programs(x, n, nt, cfg)
    dz = torch.empty_like(x)
    part = torch.empty(n, nt, 2, c, device=x.device, dtype=torch.float32)
    dwpart = torch.empty(n * programs, co, c, device=x.device, dtype=torch.float32)
    mean, rstd = mean.float().contiguous(), rstd.float().contiguous()
    _unit_bwd_kernel[(programs, n)](
        dy, x, weight, a, s, mean, rstd, dz, part, dwpart, c, co, p, nt, G=num_groups,
        CP=max(16, _next_pow2(c)), COP=max(16, _next_pow2(co)), BLOCK_P=block_p, PREC=_prec(x.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    dx, dgw, dgb = _gn_backward_from_sums(dz, x.view(n, c, p), mean, rstd, gn_weight, num_groups, part.sum(dim=1),
                                          (True, gn_weight is not None, gn_weight is not None))
    return dx, dwpart.sum(0), dgw, dgb


class FusedUnit(torch.autograd.Function):
    """``y = conv(silu(GroupNorm(x))) (+ residual)`` for training with the fused kernels: the
    forward is :func:`pointwise_conv` (with the statistics of ``y`` for the next GroupNorm, not
    differentiable), the backward :func:`unit_backward`; only ``x`` (and the ``(N, C)``
    coefficients) are saved. ``stats_part``: the :class:`Stats` tensor of ``x``."""

    @staticmethod
    def forward(ctx, x, conv_weight, gn_weight, gn_bias, residual, stats_part, tile: int, eps: float,
                out_groups: int):
        n, c, p = x.shape
        stats = Stats(stats_part, tile, p, c)
        groups = stats.groups
        a, s, mean, rstd = group_norm_coefficients(stats, gn_weight, gn_bias, eps, return_stats=True)
        out = pointwise_conv(x, conv_weight.flatten(1), (a, s), residual=residual, stats_groups=out_groups)
        y, y_stats = out if out_groups else (out, None)
        ctx.save_for_backward(x, conv_weight, gn_weight, a, s, mean, rstd)
        ctx.groups, ctx.has_residual, ctx.has_bias = groups, residual is not None, gn_bias is not None
        part = y_stats.part if y_stats is not None else y.new_empty(0, dtype=torch.float32)
        ctx.mark_non_differentiable(part)
        ctx.tile = y_stats.tile if y_stats is not None else 0
        return y, part

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dpart):
        x, conv_weight, gn_weight, a, s, mean, rstd = ctx.saved_tensors
        dx, dw, dgw, dgb = unit_backward(dy, x, conv_weight.flatten(1), a, s, mean, rstd, gn_weight, ctx.groups)
        return (dx, dw.view_as(conv_weight).to(conv_weight.dtype),
                dgw.to(gn_weight.dtype) if dgw is not None else None,
                dgb.to(gn_weight.dtype) if dgb is not None and ctx.has_bias else None,
                dy if ctx.has_residual else None, None, None, None, None)


class Stats:
    """Per-tile group statistics of an ``(N, C, P)`` tensor: ``part`` ``(N, NT, 2, G)`` float32
    (tile means and sums of squared deviations), ``tile`` pixels per tile (the last tile may be
    shorter)."""

    def __init__(self, part: torch.Tensor, tile: int, pixels: int, channels: int):
        self.part, self.tile, self.pixels, self.channels = part, tile, pixels, channels

    @property
    def groups(self) -> int:
        return self.part.shape[-1]

    def mean_rstd(self, eps: float = 1e-5):
        """``(mean, rstd)`` float32 ``(N, G)``: the tiles merged with Chan's formula, in PyTorch on any
        device: the reference of the merge that :func:`group_norm_coefficients` does in one kernel
        (which the model uses), testable without Triton."""
        n, nt, _, g = self.part.shape
        cg = self.channels // g
        starts = torch.arange(nt, device=self.part.device) * self.tile
        counts = ((self.pixels - starts).clamp(max=self.tile) * cg).float().view(1, nt, 1)
        means, m2s = self.part[:, :, 0], self.part[:, :, 1]  # (N, NT, G)
        total = float(self.pixels * cg)
        mean = (counts * means).sum(1) / total
        m2 = m2s.sum(1) + (counts * (means - mean[:, None]) ** 2).sum(1)
        return mean, torch.rsqrt(m2 / total + eps)


def _programs(x: torch.Tensor, samples: int, tiles: int, cfg: dict) -> int:
    """Persistent programs per sample: ``programs_per_sm`` per SM over the batch on CUDA; two under
    the interpreter (so that the tile loop is exercised)."""
    if x.is_cuda:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        return max(1, min(tiles, sms * cfg["programs_per_sm"] // samples))
    return min(tiles, 2)


def _tile(pixels: int, cfg: dict) -> int:
    """Pixels per tile of :func:`pointwise_conv` and :func:`unit_backward`."""
    return min(cfg["block_p"], max(16, _next_pow2(pixels)))


def fused_unit(x: torch.Tensor, conv_weight, norm, stats: "Stats", residual=None, out_groups: int = 0):
    """:class:`FusedUnit` for a GroupNorm module ``norm`` and a 1x1 convolution's weight:
    ``(y, Stats of y or None)``."""
    y, part = FusedUnit.apply(x, conv_weight, norm.weight, norm.bias, residual, stats.part, stats.tile, norm.eps,
                              out_groups)
    p = x.shape[2]
    return y, (Stats(part, _tile(p, CONFIGS["encoder"]), p, y.shape[1]) if out_groups else None)


def _prec(dtype: torch.dtype) -> str:
    # the PyTorch path's float32 1x1 convolutions follow cuDNN's TF32 switch
    return "ieee" if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32 else "tf32"


def _check_inputs(x, weight, coefficients, residual, stats_groups, rope):
    if triton is None:
        raise RuntimeError("the fused encoder kernels need the triton package (pip install triton).")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise ValueError(f"pointwise_conv takes x (N, C, P) and weight (C_out, C), got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}.")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"pointwise_conv takes float32, bfloat16 or float16 inputs, got {x.dtype}.")
    if residual is not None and residual.shape != (x.shape[0], weight.shape[0], x.shape[2]):
        raise ValueError(f"residual must be (N, C_out, P) = {(x.shape[0], weight.shape[0], x.shape[2])}, got "
                         f"{tuple(residual.shape)}.")
    if coefficients is not None and any(t.shape != x.shape[:2] for t in coefficients):
        raise ValueError(f"the GroupNorm coefficients must be (N, C) = {tuple(x.shape[:2])}.")
    co = weight.shape[0]
    if max(x.shape[1], co) > MAX_CHANNELS:
        raise ValueError(f"pointwise_conv takes at most {MAX_CHANNELS} input and output channels, got "
                         f"{x.shape[1]} -> {co}.")
    if stats_groups and co % stats_groups:
        raise ValueError(f"{co} output channels do not split into {stats_groups} groups.")
    if rope is not None:
        if stats_groups:
            raise ValueError("pointwise_conv computes no statistics of a RoPE output.")
        freqs, img_h, img_w = rope
        if img_h * img_w != x.shape[2] or co % 4 or tuple(freqs.shape) != (2, co):
            raise ValueError(f"RoPE needs freqs (2, {co}) and H * W = {x.shape[2]} pixels, got "
                             f"{tuple(freqs.shape)} and {img_h}x{img_w}.")


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, coefficients=None, residual: torch.Tensor = None,
                   stats_groups: int = 0, rope=None, config: dict = None):
    """``y = weight @ silu(x * a + s) (+ residual)`` per pixel (``weight @ x`` when ``coefficients``
    ``(a, s)`` is None), optionally followed by RoPE (``rope = (freqs (2, C_out), H, W)``).

    ``x`` ``(N, C, P)`` (P pixels, contiguous), ``weight`` ``(C_out, C)`` (a 1x1 convolution's
    weight, cast to ``x``'s dtype), ``residual`` ``(N, C_out, P)``. Returns ``y`` in ``x``'s
    dtype and, with ``stats_groups``, the :class:`Stats` of ``y`` for the next GroupNorm."""
    _check_inputs(x, weight, coefficients, residual, int(stats_groups), rope)
    cfg = dict(CONFIGS["encoder"], **(config or {}))
    n, c, p = x.shape
    co = weight.shape[0]
    x = x.contiguous()
    weight = weight.to(x.dtype).contiguous()
    y = torch.empty(n, co, p, device=x.device, dtype=x.dtype)
    block_p = _tile(p, cfg)
    nt = triton.cdiv(p, block_p)
    g = int(stats_groups)
    part = torch.empty(n, nt, 2, g, device=x.device, dtype=torch.float32) if g else y
    a, s = coefficients if coefficients is not None else (y, y)
    if rope is not None:
        freqs, img_h, img_w = rope
        freqs = freqs.float().contiguous()
        steps = (1.0 / (img_h - 1) if img_h > 1 else 0.0, 1.0 / (img_w - 1) if img_w > 1 else 0.0)
    else:
        freqs, img_w, steps = y, 1, (0.0, 0.0)
    programs = _programs(x, n, nt, cfg)
    _pointwise_conv_kernel[(programs, n)](
        x, weight, a, s, residual if residual is not None else y, y, part, freqs, c, co, p, nt, img_w, *steps,
        NORM=coefficients is not None, RES=residual is not None, ROPE=rope is not None, G=g,
        GP=max(1, _next_pow2(g)) if g else 1, CP=max(16, _next_pow2(c)),
        COP=max(32 if rope is not None else 16, _next_pow2(co)),  # RoPE: two halves of >= 16 rows
        BLOCK_P=block_p, PREC=_prec(x.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return (y, Stats(part, block_p, p, co)) if g else y


def group_norm_coefficients(stats: Stats, weight=None, bias=None, eps: float = 1e-5, return_stats: bool = False):
    """Per-(sample, channel) ``(a, s)`` float32 ``(N, C)`` with ``GroupNorm(x) = x * a + s``, from
    :class:`Stats` (``nn.GroupNorm``'s biased variance; ``weight``/``bias`` its affine, or None);
    with ``return_stats`` also the ``(N, G)`` mean and reciprocal standard deviation."""
    part = stats.part
    n, nt, _, g = part.shape
    c = stats.channels
    a = torch.empty(n, c, device=part.device, dtype=torch.float32)
    s = torch.empty_like(a)
    mean, rstd = (torch.empty(n, g, device=part.device, dtype=torch.float32) for _ in range(2))
    affine = weight is not None
    if affine and bias is None:
        bias = torch.zeros_like(weight)
    _gn_coefficients_kernel[(n * g,)](
        part, weight if affine else a, bias if affine else a, a, s, mean, rstd, c, stats.pixels, nt, stats.tile,
        float(stats.pixels * (c // g)), float(eps),
        G=g, CGP=max(1, _next_pow2(c // g)), BLOCK_T=min(BLOCK_T, max(16, _next_pow2(nt))), AFFINE=affine,
        num_warps=4)
    return (a, s, mean, rstd) if return_stats else (a, s)
