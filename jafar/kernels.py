"""Triton forward kernel of the head-averaged attention (``out = mean_h softmax(Q_h K_h^T s) @ F``).

Two passes over the keys for each tile of queries, never materialising the ``(queries x keys)``
weights: pass 1 computes each head's row maximum and normaliser (online softmax); pass 2
recomputes the logits block by block, averages the heads' probabilities into one block and
multiplies it by the features (one ``P @ F`` for all heads). Logits, statistics and
accumulation are float32; ``P`` is cast to the features' dtype for the product, as in the
PyTorch ``chunked`` path. The feature channels are tiled over the grid's third axis.

The backward pass (:func:`head_averaged_attention_bwd`) reuses each head's log-sum-exp saved
by the forward: per query tile, pass 1 computes ``delta_h = rowsum(P_h * dP)`` with the shared
``dP = dO F^T / H`` and pass 2 accumulates ``dQ``; per key tile, ``dF = A^T dO`` (one channel
tile per program) and ``dK`` (channel tile 0), with ``dS_h = P_h * (dP - delta_h)``.

Used by ``jafar.attention`` (``mode="triton"``, and ``"auto"`` on CUDA in half precision).
Runs on the CPU under Triton's interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""

from __future__ import annotations

import math

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing or broken
    triton = None


def available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device`` (CUDA with Triton, or Triton's interpreter)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    import os

    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _fwd_kernel(Q, K, F, O, LSE, stride_qb, stride_qn, stride_kb, stride_kn, stride_fb, stride_fn,
                    stride_ob, stride_on, NQ, NK, C, qk_scale,
                    H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_C: tl.constexpr, IEEE: tl.constexpr):
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
        pid_c = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_m = offs_m < NQ
        mask_c = offs_c < C
        q_base = Q + b * stride_qb + offs_m[:, None] * stride_qn + offs_d[None, :]
        k_base = K + b * stride_kb + offs_d[:, None]  # transposed tile: (D, BLOCK_N)
        heads = tl.arange(0, H)[None, :]

        # pass 1: per-head running max and normaliser, in base 2 (qk_scale includes log2(e))
        m_all = tl.full((BLOCK_M, H), float("-inf"), tl.float32)
        l_all = tl.zeros((BLOCK_M, H), tl.float32)
        for h in tl.static_range(H):
            q = tl.load(q_base + h * D, mask=mask_m[:, None], other=0.0)
            m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
            l_i = tl.zeros((BLOCK_M,), tl.float32)
            for start in range(0, NK, BLOCK_N):
                kn = start + offs_n
                k = tl.load(k_base + h * D + kn[None, :] * stride_kn, mask=kn[None, :] < NK, other=0.0)
                if IEEE:
                    s = tl.dot(q, k, input_precision="ieee")
                else:
                    s = tl.dot(q, k)
                s = tl.where(kn[None, :] < NK, s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
                m_i = m_new
            m_all = tl.where(heads == h, m_i[:, None], m_all)
            l_all = tl.where(heads == h, l_i[:, None], l_all)
            if pid_c == 0:  # base-2 log-sum-exp of the scaled logits, for the backward pass
                tl.store(LSE + (b * H + h) * NQ + offs_m, m_i + tl.log2(l_i), mask=mask_m)

        # pass 2: averaged probabilities times the features
        inv_l = 1.0 / (l_all * H)  # the 1/H of the head average folded into each normaliser
        acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
        for start in range(0, NK, BLOCK_N):
            kn = start + offs_n
            p = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for h in tl.static_range(H):
                q = tl.load(q_base + h * D, mask=mask_m[:, None], other=0.0)
                k = tl.load(k_base + h * D + kn[None, :] * stride_kn, mask=kn[None, :] < NK, other=0.0)
                if IEEE:
                    s = tl.dot(q, k, input_precision="ieee")
                else:
                    s = tl.dot(q, k)
                m_h = tl.sum(tl.where(heads == h, m_all, 0.0), 1)
                w_h = tl.sum(tl.where(heads == h, inv_l, 0.0), 1)
                e = tl.exp2(s * qk_scale - m_h[:, None]) * w_h[:, None]
                p += tl.where(kn[None, :] < NK, e, 0.0)
            f = tl.load(F + b * stride_fb + kn[:, None] * stride_fn + offs_c[None, :],
                        mask=(kn[:, None] < NK) & mask_c[None, :], other=0.0)
            if IEEE:
                acc += tl.dot(p.to(f.dtype), f, input_precision="ieee")
            else:
                acc += tl.dot(p.to(f.dtype), f)
        o_ptr = O + b * stride_ob + offs_m[:, None] * stride_on + offs_c[None, :]
        tl.store(o_ptr, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


if triton is not None:

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _bwd_dq_kernel(Q, K, F, DO, LSE, DELTA, DQ, stride_qb, stride_qn, stride_kb, stride_kn, stride_fb,
                       stride_fn, stride_ob, stride_on, NQ, NK, C, qk_scale, scale,
                       H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_C: tl.constexpr, IEEE: tl.constexpr):
        """Per query tile: delta_h = rowsum(P_h * dP) (pass 1), then dQ (pass 2)."""
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        offs_c = tl.arange(0, BLOCK_C)
        offs_hd = tl.arange(0, H * D)
        mask_m = offs_m < NQ
        heads = tl.arange(0, H)[None, :]
        lse_all = tl.zeros((BLOCK_M, H), tl.float32)
        for h in tl.static_range(H):
            lse_h = tl.load(LSE + (b * H + h) * NQ + offs_m, mask=mask_m, other=0.0)
            lse_all = tl.where(heads == h, lse_h[:, None], lse_all)
        q_base = Q + b * stride_qb + offs_m[:, None] * stride_qn + offs_d[None, :]
        k_base = K + b * stride_kb + offs_d[:, None]
        delta_all = tl.zeros((BLOCK_M, H), tl.float32)
        dq = tl.zeros((BLOCK_M, H * D), tl.float32)
        for second in tl.static_range(2):
            for start in range(0, NK, BLOCK_N):
                kn = start + offs_n
                mask_n = kn < NK
                dp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    cc = c0 + offs_c
                    do = tl.load(DO + b * stride_ob + offs_m[:, None] * stride_on + cc[None, :],
                                 mask=mask_m[:, None] & (cc[None, :] < C), other=0.0)
                    ft = tl.load(F + b * stride_fb + kn[None, :] * stride_fn + cc[:, None],
                                 mask=mask_n[None, :] & (cc[:, None] < C), other=0.0)
                    dp += _dot(do, ft, IEEE)
                dp = dp / H
                for h in tl.static_range(H):
                    q = tl.load(q_base + h * D, mask=mask_m[:, None], other=0.0)
                    k = tl.load(k_base + h * D + kn[None, :] * stride_kn, mask=mask_n[None, :], other=0.0)
                    lse_h = tl.sum(tl.where(heads == h, lse_all, 0.0), 1)
                    p = tl.exp2(_dot(q, k, IEEE) * qk_scale - lse_h[:, None])
                    p = tl.where(mask_n[None, :], p, 0.0)
                    if second == 0:
                        delta_all += tl.where(heads == h, tl.sum(p * dp, 1)[:, None], 0.0)
                    else:
                        delta_h = tl.sum(tl.where(heads == h, delta_all, 0.0), 1)
                        ds = p * (dp - delta_h[:, None]) * scale
                        # K tile of every head, zero outside head h: dq lands in head h's columns
                        kh = tl.load(K + b * stride_kb + kn[:, None] * stride_kn + offs_hd[None, :],
                                     mask=mask_n[:, None] & (offs_hd[None, :] // D == h), other=0.0)
                        dq += _dot(ds.to(kh.dtype), kh, IEEE)
        for h in tl.static_range(H):
            tl.store(DELTA + (b * H + h) * NQ + offs_m, tl.sum(tl.where(heads == h, delta_all, 0.0), 1),
                     mask=mask_m)
        tl.store(DQ + b * stride_qb + offs_m[:, None] * stride_qn + offs_hd[None, :], dq.to(DQ.dtype.element_ty),
                 mask=mask_m[:, None])

    @triton.jit
    def _bwd_dkdf_kernel(Q, K, F, DO, LSE, DELTA, DK, DF, stride_qb, stride_qn, stride_kb, stride_kn, stride_fb,
                         stride_fn, stride_ob, stride_on, NQ, NK, C, qk_scale, scale,
                         H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_C: tl.constexpr, IEEE: tl.constexpr):
        """Per key tile: dF = A^T dO for one channel tile; dK (channel tile 0 only)."""
        pid_n = tl.program_id(0)
        b = tl.program_id(1)
        pid_c = tl.program_id(2)
        kn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = kn < NK
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D)
        offs_c = tl.arange(0, BLOCK_C)
        offs_hd = tl.arange(0, H * D)
        ct = pid_c * BLOCK_C + offs_c
        df = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
        dk = tl.zeros((BLOCK_N, H * D), tl.float32)
        for start in range(0, NQ, BLOCK_M):
            qm = start + offs_m
            mask_m = qm < NQ
            a = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            dp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            if pid_c == 0:
                for c0 in range(0, C, BLOCK_C):
                    cc = c0 + offs_c
                    do = tl.load(DO + b * stride_ob + qm[:, None] * stride_on + cc[None, :],
                                 mask=mask_m[:, None] & (cc[None, :] < C), other=0.0)
                    ft = tl.load(F + b * stride_fb + kn[None, :] * stride_fn + cc[:, None],
                                 mask=mask_n[None, :] & (cc[:, None] < C), other=0.0)
                    dp += _dot(do, ft, IEEE)
                dp = dp / H
            for h in tl.static_range(H):
                q = tl.load(Q + b * stride_qb + qm[:, None] * stride_qn + h * D + offs_d[None, :],
                            mask=mask_m[:, None], other=0.0)
                k = tl.load(K + b * stride_kb + kn[None, :] * stride_kn + h * D + offs_d[:, None],
                            mask=mask_n[None, :], other=0.0)
                lse_h = tl.load(LSE + (b * H + h) * NQ + qm, mask=mask_m, other=0.0)
                p = tl.exp2(_dot(q, k, IEEE) * qk_scale - lse_h[:, None])
                p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
                a += p
                if pid_c == 0:
                    delta_h = tl.load(DELTA + (b * H + h) * NQ + qm, mask=mask_m, other=0.0)
                    ds = p * (dp - delta_h[:, None]) * scale
                    qh = tl.load(Q + b * stride_qb + qm[:, None] * stride_qn + offs_hd[None, :],
                                 mask=mask_m[:, None] & (offs_hd[None, :] // D == h), other=0.0)
                    dk += _dot(tl.trans(ds.to(qh.dtype)), qh, IEEE)
            do_t = tl.load(DO + b * stride_ob + qm[:, None] * stride_on + ct[None, :],
                           mask=mask_m[:, None] & (ct[None, :] < C), other=0.0)
            df += _dot(tl.trans((a / H).to(do_t.dtype)), do_t, IEEE)
        tl.store(DF + b * stride_fb + kn[:, None] * stride_fn + ct[None, :], df.to(DF.dtype.element_ty),
                 mask=mask_n[:, None] & (ct[None, :] < C))
        if pid_c == 0:
            tl.store(DK + b * stride_kb + kn[:, None] * stride_kn + offs_hd[None, :], dk.to(DK.dtype.element_ty),
                     mask=mask_n[:, None])


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def head_averaged_attention_fwd(q: torch.Tensor, k: torch.Tensor, f: torch.Tensor, num_heads: int,
                                scale: float, block_m: int = 64, block_n: int = 64,
                                block_c: int = 128, return_lse: bool = False):
    """``(B, Nq, H*d)``, ``(B, Nk, H*d)``, ``(B, Nk, C)`` -> ``(B, Nq, C)`` in ``f``'s dtype."""
    if triton is None:
        raise RuntimeError("the Triton kernel needs the triton package (pip install triton).")
    b, nq, dim = q.shape
    nk, c = f.shape[1], f.shape[2]
    d = dim // num_heads
    if d < 16 or d & (d - 1) or num_heads & (num_heads - 1):
        raise ValueError(f"the Triton kernel needs a power-of-two head width >= 16 and head count, got "
                         f"d={d}, heads={num_heads}.")
    q, k, f = q.contiguous(), k.contiguous(), f.contiguous()
    out = torch.empty(b, nq, c, device=f.device, dtype=f.dtype)
    lse = torch.empty(b, num_heads, nq, device=f.device, dtype=torch.float32)
    block_c = min(block_c, max(16, _next_pow2(c)))
    block_n = min(block_n, max(16, _next_pow2(nk)))
    ieee = q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    grid = (triton.cdiv(nq, block_m), b, triton.cdiv(c, block_c))
    _fwd_kernel[grid](q, k, f, out, lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1), f.stride(0),
                      f.stride(1), out.stride(0), out.stride(1), nq, nk, c, float(scale) * math.log2(math.e),
                      H=num_heads, D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, IEEE=ieee,
                      num_warps=4, num_stages=2)
    return (out, lse) if return_lse else out


def head_averaged_attention_bwd(q, k, f, lse, grad_out, num_heads: int, scale: float, block_m: int = 64,
                                block_n: int = 64, block_c: int = 64):
    """Gradients ``(dq, dk, df)`` of :func:`head_averaged_attention_fwd` (``lse`` from its forward)."""
    b, nq, dim = q.shape
    nk, c = f.shape[1], f.shape[2]
    d = dim // num_heads
    q, k, f = q.contiguous(), k.contiguous(), f.contiguous()
    grad_out = grad_out.to(f.dtype).contiguous()
    dq, dk, df = torch.empty_like(q), torch.empty_like(k), torch.empty_like(f)
    delta = torch.empty_like(lse)
    block_c = min(block_c, max(16, _next_pow2(c)))
    block_n = min(block_n, max(16, _next_pow2(nk)))
    block_m = min(block_m, max(16, _next_pow2(nq)))
    ieee = q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
    common = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), f.stride(0), f.stride(1), grad_out.stride(0),
              grad_out.stride(1), nq, nk, c, float(scale) * math.log2(math.e), float(scale))
    meta = dict(H=num_heads, D=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, IEEE=ieee, num_warps=4,
                num_stages=2)
    _bwd_dq_kernel[(triton.cdiv(nq, block_m), b)](q, k, f, grad_out, lse, delta, dq, *common, **meta)
    _bwd_dkdf_kernel[(triton.cdiv(nk, block_n), b, triton.cdiv(c, block_c))](
        q, k, f, grad_out, lse, delta, dk, df, *common, **meta)
    return dq, dk, df
