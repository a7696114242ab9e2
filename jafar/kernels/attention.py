"""Triton kernels of the head-averaged attention ``out = mean_h softmax(Q_h K_h^T s) @ F``.

Forward (:func:`head_averaged_attention_fwd`): two passes over the keys for each tile of
queries, never materialising the ``(queries x keys)`` weights. Pass 1 computes each head's row
maximum and normaliser (online softmax); pass 2 recomputes the logits block by block, averages
the heads' probabilities into one block and multiplies it by the features (one ``P @ F`` for
all heads). Logits, statistics and accumulation are float32 whatever the input dtype (so fp16
logits beyond 65504 do not overflow); ``P`` is cast to the features' dtype for the product, as
in the PyTorch ``chunked`` path. The feature channels are tiled over the grid's third axis; when
there is more than one channel tile, pass 1 runs once per query tile in a launch of its own
(``PHASE=1``, writing each head's log-sum-exp) and each channel tile's pass 2 starts from it
(``PHASE=2``), instead of every channel tile redoing pass 1 (at 384 channels in tiles of 128: 4
instead of 6 evaluations of every logit).

Backward (:func:`head_averaged_attention_bwd`), from each head's log-sum-exp saved by the
forward: per query tile, pass 1 computes ``delta_h = rowsum(P_h * dP)`` with the shared
``dP = dO F^T / H`` and pass 2 accumulates ``dQ``; per key tile, ``dF = A^T dO`` (one channel
tile per program) and ``dK`` (channel tile 0), with ``dS_h = P_h * (dP - delta_h)``.

Coverage: float32 (exact IEEE products, or TF32 when ``torch.backends.cuda.matmul.allow_tf32``
is on), bfloat16 and float16 inputs; any number of keys and queries (masked tiles; row offsets
in 64-bit, so ``queries x channels`` may exceed 2**31, e.g. a 1792x1792 output of 1536
channels); any feature width (channel tiles are masked); any head width and head count (heads
and head channels are padded to powers of two inside the kernel, ``tl.dot`` needing tiles of
at least 16).

Used by ``jafar.layers.attention`` (``mode="triton"``, and ``"auto"`` on CUDA). Runs on the CPU
under Triton's interpreter (``TRITON_INTERPRET=1``), which the tests use (``jafar/kernels/checks/``:
seeded cases, the interpreter's bfloat16 fix, ahead-of-time compilation for sm_90).
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - triton missing or broken
    triton = None

#: launch configuration of each kernel: tiles of queries, keys and feature channels, warps and
#: software-pipeline stages. The defaults were measured on an H100
#: (docs/benchmarks.md, "Triton kernels on the H100"). Compiled for sm_90 offline (Triton 3.8, bf16, 4 heads of 32), they
#: spill registers: the forward 24 bytes a thread, the backward kernels 2.0 and 2.6 KB;
#: ``tools/benchmark.py --tune`` times candidates on the GPU. ``"encoder"``: the fused encoder
#: kernel of ``jafar.kernels.encoders`` (pixels per tile, warps, stages, persistent programs per
#: SM). Override per process with ``JAFAR_TRITON_CONFIG='{"bwd_dq": {"num_warps": 8}}'`` (JSON,
#: merged into these) or per call.
CONFIGS = {
    "fwd": dict(block_m=64, block_n=64, block_c=128, num_warps=4, num_stages=2),
    "bwd_dq": dict(block_m=64, block_n=64, block_c=64, num_warps=4, num_stages=2),
    "bwd_dkdf": dict(block_m=64, block_n=64, block_c=64, num_warps=4, num_stages=2),
    # compiled offline for sm_90 (bf16, 128 channels): 32-pixel tiles with 8 warps take 168-249
    # registers and spill nothing (32 bytes with RoPE); 64- and 128-pixel tiles spill
    "encoder": dict(block_p=32, num_warps=8, num_stages=2, programs_per_sm=2),
}


def _merge_env_config() -> None:
    text = os.environ.get("JAFAR_TRITON_CONFIG")
    if not text:
        return
    import json

    try:
        extra = json.loads(text)
        for name, cfg in extra.items():
            if name not in CONFIGS or set(cfg) - set(CONFIGS[name]):
                raise ValueError
            CONFIGS[name].update({k: int(v) for k, v in cfg.items()})
    except (ValueError, TypeError, AttributeError) as e:
        keys = "; ".join(f"{name}: {', '.join(cfg)}" for name, cfg in CONFIGS.items())
        raise ValueError(f"JAFAR_TRITON_CONFIG must be JSON like {{\"fwd\": {{\"num_warps\": 8}}}} with kernels and "
                         f"keys among ({keys}), got {text!r}.") from e


_merge_env_config()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the kernel can run on ``device`` (CUDA with Triton, or Triton's interpreter)."""
    if triton is None:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


if triton is not None:

    @triton.jit
    def _fwd_kernel(Q, K, F, O, LSE, stride_qb, stride_qn, stride_kb, stride_kn, stride_fb, stride_fn,
                    stride_ob, stride_on, NQ, NK, C, qk_scale,
                    H: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr,
                    PHASE: tl.constexpr = 0):
        # PHASE 0: both passes (one program per query tile and channel tile); 1: pass 1 only
        # (writes the log-sum-exp); 2: pass 2 only, from the log-sum-exp of a PHASE 1 launch, so that
        # several channel tiles do not each redo pass 1
        pid_m = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        pid_c = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        offs_d = tl.arange(0, DP)
        offs_n = tl.arange(0, BLOCK_N)
        offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_m = offs_m < NQ
        mask_d = offs_d < D
        mask_c = offs_c < C
        q_base = Q + b * stride_qb + rows[:, None] * stride_qn + offs_d[None, :]
        q_mask = mask_m[:, None] & mask_d[None, :]
        k_base = K + b * stride_kb + offs_d[:, None]  # transposed tile: (DP, BLOCK_N)
        heads = tl.arange(0, HP)[None, :]

        # pass 1: per-head running max and normaliser, in base 2 (qk_scale includes log2(e))
        m_all = tl.zeros((BLOCK_M, HP), tl.float32)
        l_all = tl.full((BLOCK_M, HP), 1.0, tl.float32)
        for h in tl.static_range(H):
            if PHASE == 2:  # p = exp2(s - lse): the log-sum-exp as the maximum, a normaliser of 1
                lse_h = tl.load(LSE + (b * H + h) * NQ + rows, mask=mask_m, other=0.0)
                m_all = tl.where(heads == h, lse_h[:, None], m_all)
            else:
                q = tl.load(q_base + h * D, mask=q_mask, other=0.0)
                m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
                l_i = tl.zeros((BLOCK_M,), tl.float32)
                for start in range(0, NK, BLOCK_N):
                    kn = start + offs_n
                    mask_n = kn < NK
                    k = tl.load(k_base + h * D + kn.to(tl.int64)[None, :] * stride_kn,
                                mask=mask_n[None, :] & mask_d[:, None], other=0.0)
                    s = tl.where(mask_n[None, :], tl.dot(q, k, input_precision=PREC) * qk_scale, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, 1))
                    l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
                    m_i = m_new
                m_all = tl.where(heads == h, m_i[:, None], m_all)
                l_all = tl.where(heads == h, l_i[:, None], l_all)
                if pid_c == 0:  # base-2 log-sum-exp of the scaled logits, for the backward pass
                    tl.store(LSE + (b * H + h) * NQ + rows, m_i + tl.log2(l_i), mask=mask_m)
        if PHASE == 1:
            return

        # pass 2: averaged probabilities times the features
        inv_l = 1.0 / (l_all * H)  # the 1/H of the head average folded into each normaliser
        acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
        for start in range(0, NK, BLOCK_N):
            kn = start + offs_n
            mask_n = kn < NK
            kn64 = kn.to(tl.int64)
            p = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for h in tl.static_range(H):
                q = tl.load(q_base + h * D, mask=q_mask, other=0.0)
                k = tl.load(k_base + h * D + kn64[None, :] * stride_kn, mask=mask_n[None, :] & mask_d[:, None],
                            other=0.0)
                m_h = tl.sum(tl.where(heads == h, m_all, 0.0), 1)
                w_h = tl.sum(tl.where(heads == h, inv_l, 0.0), 1)
                e = tl.exp2(tl.dot(q, k, input_precision=PREC) * qk_scale - m_h[:, None]) * w_h[:, None]
                p += tl.where(mask_n[None, :], e, 0.0)
            f = tl.load(F + b * stride_fb + kn64[:, None] * stride_fn + offs_c[None, :],
                        mask=mask_n[:, None] & mask_c[None, :], other=0.0)
            acc += tl.dot(p.to(f.dtype), f, input_precision=PREC)
        o_ptr = O + b * stride_ob + rows[:, None] * stride_on + offs_c[None, :]
        tl.store(o_ptr, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])

    @triton.jit
    def _bwd_dq_kernel(Q, K, F, DO, LSE, DELTA, DQ, stride_qb, stride_qn, stride_kb, stride_kn, stride_fb,
                       stride_fn, stride_ob, stride_on, NQ, NK, C, qk_scale, scale,
                       H: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
        """Per query tile: delta_h = rowsum(P_h * dP) (pass 1), then dQ (pass 2)."""
        pid_m = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        offs_d = tl.arange(0, DP)
        offs_n = tl.arange(0, BLOCK_N)
        offs_c = tl.arange(0, BLOCK_C)
        # the (HP * DP) columns of dQ: head j // DP, channel j % DP, address head * D + channel
        offs_hd = tl.arange(0, HP * DP)
        head_of = offs_hd // DP
        col_hd = head_of * D + offs_hd % DP
        valid_hd = (head_of < H) & (offs_hd % DP < D)
        mask_m = offs_m < NQ
        mask_d = offs_d < D
        q_mask = mask_m[:, None] & mask_d[None, :]
        heads = tl.arange(0, HP)[None, :]
        lse_all = tl.zeros((BLOCK_M, HP), tl.float32)
        for h in tl.static_range(H):
            lse_h = tl.load(LSE + (b * H + h) * NQ + rows, mask=mask_m, other=0.0)
            lse_all = tl.where(heads == h, lse_h[:, None], lse_all)
        q_base = Q + b * stride_qb + rows[:, None] * stride_qn + offs_d[None, :]
        k_base = K + b * stride_kb + offs_d[:, None]
        delta_all = tl.zeros((BLOCK_M, HP), tl.float32)
        dq = tl.zeros((BLOCK_M, HP * DP), tl.float32)
        for second in tl.static_range(2):
            for start in range(0, NK, BLOCK_N):
                kn = start + offs_n
                mask_n = kn < NK
                kn64 = kn.to(tl.int64)
                dp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    cc = c0 + offs_c
                    do = tl.load(DO + b * stride_ob + rows[:, None] * stride_on + cc[None, :],
                                 mask=mask_m[:, None] & (cc[None, :] < C), other=0.0)
                    ft = tl.load(F + b * stride_fb + kn64[None, :] * stride_fn + cc[:, None],
                                 mask=mask_n[None, :] & (cc[:, None] < C), other=0.0)
                    dp += tl.dot(do, ft, input_precision=PREC)
                dp = dp / H
                for h in tl.static_range(H):
                    q = tl.load(q_base + h * D, mask=q_mask, other=0.0)
                    k = tl.load(k_base + h * D + kn64[None, :] * stride_kn, mask=mask_n[None, :] & mask_d[:, None],
                                other=0.0)
                    lse_h = tl.sum(tl.where(heads == h, lse_all, 0.0), 1)
                    p = tl.exp2(tl.dot(q, k, input_precision=PREC) * qk_scale - lse_h[:, None])
                    p = tl.where(mask_n[None, :], p, 0.0)
                    if second == 0:
                        delta_all += tl.where(heads == h, tl.sum(p * dp, 1)[:, None], 0.0)
                    else:
                        delta_h = tl.sum(tl.where(heads == h, delta_all, 0.0), 1)
                        ds = p * (dp - delta_h[:, None]) * scale
                        # K tile of every head, zero outside head h: dq lands in head h's columns
                        kh = tl.load(K + b * stride_kb + kn64[:, None] * stride_kn + col_hd[None, :],
                                     mask=mask_n[:, None] & (head_of[None, :] == h) & valid_hd[None, :], other=0.0)
                        dq += tl.dot(ds.to(kh.dtype), kh, input_precision=PREC)
        for h in tl.static_range(H):
            tl.store(DELTA + (b * H + h) * NQ + rows, tl.sum(tl.where(heads == h, delta_all, 0.0), 1), mask=mask_m)
        tl.store(DQ + b * stride_qb + rows[:, None] * stride_qn + col_hd[None, :], dq.to(DQ.dtype.element_ty),
                 mask=mask_m[:, None] & valid_hd[None, :])

    @triton.jit
    def _bwd_dkdf_kernel(Q, K, F, DO, LSE, DELTA, DK, DF, stride_qb, stride_qn, stride_kb, stride_kn, stride_fb,
                         stride_fn, stride_ob, stride_on, NQ, NK, C, qk_scale, scale,
                         H: tl.constexpr, D: tl.constexpr, HP: tl.constexpr, DP: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, PREC: tl.constexpr):
        """Per key tile: dF = A^T dO for one channel tile; dK (channel tile 0 only)."""
        pid_n = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        pid_c = tl.program_id(2)
        kn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kn64 = kn.to(tl.int64)
        mask_n = kn < NK
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, DP)
        offs_c = tl.arange(0, BLOCK_C)
        offs_hd = tl.arange(0, HP * DP)
        head_of = offs_hd // DP
        col_hd = head_of * D + offs_hd % DP
        valid_hd = (head_of < H) & (offs_hd % DP < D)
        mask_d = offs_d < D
        ct = pid_c * BLOCK_C + offs_c
        df = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
        dk = tl.zeros((BLOCK_N, HP * DP), tl.float32)
        for start in range(0, NQ, BLOCK_M):
            qm = start + offs_m
            mask_m = qm < NQ
            qm64 = qm.to(tl.int64)
            a = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            dp = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            if pid_c == 0:
                for c0 in range(0, C, BLOCK_C):
                    cc = c0 + offs_c
                    do = tl.load(DO + b * stride_ob + qm64[:, None] * stride_on + cc[None, :],
                                 mask=mask_m[:, None] & (cc[None, :] < C), other=0.0)
                    ft = tl.load(F + b * stride_fb + kn64[None, :] * stride_fn + cc[:, None],
                                 mask=mask_n[None, :] & (cc[:, None] < C), other=0.0)
                    dp += tl.dot(do, ft, input_precision=PREC)
                dp = dp / H
            for h in tl.static_range(H):
                q = tl.load(Q + b * stride_qb + qm64[:, None] * stride_qn + h * D + offs_d[None, :],
                            mask=mask_m[:, None] & mask_d[None, :], other=0.0)
                k = tl.load(K + b * stride_kb + kn64[None, :] * stride_kn + h * D + offs_d[:, None],
                            mask=mask_n[None, :] & mask_d[:, None], other=0.0)
                lse_h = tl.load(LSE + (b * H + h) * NQ + qm64, mask=mask_m, other=0.0)
                p = tl.exp2(tl.dot(q, k, input_precision=PREC) * qk_scale - lse_h[:, None])
                p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
                a += p
                if pid_c == 0:
                    delta_h = tl.load(DELTA + (b * H + h) * NQ + qm64, mask=mask_m, other=0.0)
                    ds = p * (dp - delta_h[:, None]) * scale
                    qh = tl.load(Q + b * stride_qb + qm64[:, None] * stride_qn + col_hd[None, :],
                                 mask=mask_m[:, None] & (head_of[None, :] == h) & valid_hd[None, :], other=0.0)
                    dk += tl.dot(tl.trans(ds.to(qh.dtype)), qh, input_precision=PREC)
            do_t = tl.load(DO + b * stride_ob + qm64[:, None] * stride_on + ct[None, :],
                           mask=mask_m[:, None] & (ct[None, :] < C), other=0.0)
            df += tl.dot(tl.trans((a / H).to(do_t.dtype)), do_t, input_precision=PREC)
        tl.store(DF + b * stride_fb + kn64[:, None] * stride_fn + ct[None, :], df.to(DF.dtype.element_ty),
                 mask=mask_n[:, None] & (ct[None, :] < C))
        if pid_c == 0:
            tl.store(DK + b * stride_kb + kn64[:, None] * stride_kn + col_hd[None, :], dk.to(DK.dtype.element_ty),
                     mask=mask_n[:, None] & valid_hd[None, :])


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _check(q, k, f, num_heads):
    if triton is None:
        raise RuntimeError("the Triton kernels need the triton package (pip install triton).")
    if q.dtype not in (torch.float32, torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == f.dtype):
        raise ValueError(f"the Triton kernels take float32, bfloat16 or float16 inputs of one dtype, got "
                         f"{q.dtype}, {k.dtype}, {f.dtype}.")
    if q.shape[2] % num_heads:
        raise ValueError(f"query width {q.shape[2]} is not divisible by num_heads={num_heads}.")
    if k.shape[1] < 1:
        raise ValueError("the attention needs at least one key.")


def _meta(q, f, num_heads, cfg):
    """Tile sizes (powers of two, at least 16 for ``tl.dot``, at most the padded problem) and the
    constexprs and launch options of one call."""
    nq, dim = q.shape[1], q.shape[2]
    nk, c = f.shape[1], f.shape[2]
    d = dim // num_heads
    return dict(H=num_heads, D=d, HP=next_pow2(num_heads), DP=max(16, next_pow2(d)),
                BLOCK_M=min(cfg["block_m"], max(16, next_pow2(nq))),
                BLOCK_N=min(cfg["block_n"], max(16, next_pow2(nk))),
                BLOCK_C=min(cfg["block_c"], max(16, next_pow2(c))),
                # exact float32 products unless TF32 matmuls are allowed; Triton's default otherwise
                PREC="ieee" if q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32",
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def _config(name, override=None, **blocks):
    cfg = dict(CONFIGS[name])
    cfg.update(override or {})
    cfg.update({k: v for k, v in blocks.items() if v is not None})
    return cfg


def head_averaged_attention_fwd(q: torch.Tensor, k: torch.Tensor, f: torch.Tensor, num_heads: int,
                                scale: float, block_m: int = None, block_n: int = None, block_c: int = None,
                                return_lse: bool = False, config: dict = None):
    """``(B, Nq, H*d)``, ``(B, Nk, H*d)``, ``(B, Nk, C)`` -> ``(B, Nq, C)`` in ``f``'s dtype (and the
    per-head base-2 log-sum-exp ``(B, H, Nq)`` of the scaled logits with ``return_lse``). Launch
    configuration: ``CONFIGS["fwd"]``, updated by ``config`` and the ``block_*`` arguments."""
    _check(q, k, f, num_heads)
    b, nq, _ = q.shape
    nk, c = f.shape[1], f.shape[2]
    q, k, f = q.contiguous(), k.contiguous(), f.contiguous()
    out = torch.empty(b, nq, c, device=f.device, dtype=f.dtype)
    lse = torch.empty(b, num_heads, nq, device=f.device, dtype=torch.float32)
    meta = _meta(q, f, num_heads, _config("fwd", config, block_m=block_m, block_n=block_n, block_c=block_c))
    m_tiles, c_tiles = triton.cdiv(nq, meta["BLOCK_M"]), triton.cdiv(c, meta["BLOCK_C"])
    args = (q, k, f, out, lse, q.stride(0), q.stride(1), k.stride(0), k.stride(1), f.stride(0), f.stride(1),
            out.stride(0), out.stride(1), nq, nk, c, float(scale) * math.log2(math.e))
    if c_tiles == 1:
        _fwd_kernel[(m_tiles, b, 1)](*args, **meta)
    else:  # pass 1 once per query tile, then pass 2 per channel tile from its log-sum-exp
        _fwd_kernel[(m_tiles, b, 1)](*args, PHASE=1, **meta)
        _fwd_kernel[(m_tiles, b, c_tiles)](*args, PHASE=2, **meta)
    return (out, lse) if return_lse else out


def head_averaged_attention_bwd(q, k, f, lse, grad_out, num_heads: int, scale: float, block_m: int = None,
                                block_n: int = None, block_c: int = None, dq_config: dict = None,
                                dkdf_config: dict = None):
    """Gradients ``(dq, dk, df)`` of :func:`head_averaged_attention_fwd` (``lse`` from its forward).
    Launch configurations: ``CONFIGS["bwd_dq"]`` and ``CONFIGS["bwd_dkdf"]``, updated by
    ``dq_config``, ``dkdf_config`` and (both) the ``block_*`` arguments."""
    _check(q, k, f, num_heads)
    b, nq, _ = q.shape
    nk, c = f.shape[1], f.shape[2]
    q, k, f = q.contiguous(), k.contiguous(), f.contiguous()
    grad_out = grad_out.to(f.dtype).contiguous()
    dq, dk, df = torch.empty_like(q), torch.empty_like(k), torch.empty_like(f)
    delta = torch.empty_like(lse)
    blocks = dict(block_m=block_m, block_n=block_n, block_c=block_c)
    common = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), f.stride(0), f.stride(1), grad_out.stride(0),
              grad_out.stride(1), nq, nk, c, float(scale) * math.log2(math.e), float(scale))
    meta = _meta(q, f, num_heads, _config("bwd_dq", dq_config, **blocks))
    _bwd_dq_kernel[(triton.cdiv(nq, meta["BLOCK_M"]), b)](
        q, k, f, grad_out, lse, delta, dq, *common, **meta)
    meta = _meta(q, f, num_heads, _config("bwd_dkdf", dkdf_config, **blocks))
    _bwd_dkdf_kernel[(triton.cdiv(nk, meta["BLOCK_N"]), b, triton.cdiv(c, meta["BLOCK_C"]))](
        q, k, f, grad_out, lse, delta, dk, df, *common, **meta)
    return dq, dk, df
