"""Head-averaged cross-attention, the core of JAFAR.

The official JAFAR (github PaulCouairon/JAFAR @ 94d4d54, ``src/layers/attentions.py``) asks
``nn.MultiheadAttention`` for its head-averaged attention weights and multiplies them by the
raw low-resolution features; the value and output projections are computed and thrown away.
So the whole operation is::

    out = mean_h softmax(Q_h K_h^T * scale) @ F        Q_h: (Nq, d), K_h: (Nk, d), F: (Nk, C)

with ``scale = 1 / sqrt(d)`` (``d`` = per-head channels). The official code materialises the
``(heads, Nq, Nk)`` weights: 7.5 GB on a GPU for a 448x448 output from 32x32 keys.

Four interchangeable implementations, selected by ``mode``:

``"reference"``
    The official algorithm, materialising every weight; autograd through plain PyTorch ops.
    Kept for tests and benchmarks.
``"chunked"``
    Exact and memory-bounded: queries are processed in chunks sized so that the temporaries
    stay under ``memory_budget`` bytes; per chunk the heads' softmaxes (float32) are averaged
    into one probability matrix, which multiplies ``F`` once (``heads`` times fewer FLOPs than
    per-head attention). The backward pass recomputes each chunk's probabilities instead of
    storing them (flash-attention style), so training memory is bounded too.
``"sdpa"``
    Same chunking and the same backward, but each chunk's forward is a per-head fused
    ``torch.nn.functional.scaled_dot_product_attention`` with ``F`` as every head's value,
    averaged over heads.

``"triton"``
    Triton kernels (``jafar.kernels.attention``): the forward is the same two-pass algorithm fused,
    never materialising more than one ``(BLOCK_M x BLOCK_N)`` tile, and saves each head's
    log-sum-exp; the backward recomputes the probabilities tile by tile (one kernel per query
    tile for ``dQ``, one per key tile for ``dK`` and ``dF``).

``"auto"`` is ``"triton"`` on CUDA when Triton is importable, for bf16/fp16 inputs, and for
float32 inputs when TF32 matmuls are allowed (``torch.backends.cuda.matmul.allow_tf32 = True``,
or ``torch.set_float32_matmul_precision("high")``); otherwise (the CPU, float64, exact float32:
PyTorch's default) ``"chunked"``, because with exact (IEEE) float32 products the kernel is
slower than cuBLAS's float32 matmuls (``docs/benchmarks.md``). ``mode="triton"`` asks for the
kernel in any case, exact float32 included. ``"chunked"`` rather than ``"sdpa"`` because,
measured on an H100 (``docs/benchmarks.md``), it matches ``"sdpa"`` up to 448x448 outputs and
is 2x faster at 896x896 in float32 and 2.6x in bf16 at 1792x1792 (per-head SDPA multiplies
``F`` once per head, and PyTorch's flash kernels do not take a value width different from the
query width).

Dtypes: under autocast the inputs are cast to the autocast dtype; logits, softmax and their
gradients are computed in float32 (float64 for float64 inputs); the ``P @ F`` products run in the input dtype.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

MODES = ("auto", "reference", "chunked", "sdpa", "triton")

#: default extra-memory budget of the memory-bounded paths, in bytes
DEFAULT_MEMORY_BUDGET = 256 * 2**20
#: on the CPU a query chunk's temporaries stay at most this size whatever the budget: a chunk whose
#: logits and probabilities stay in the last-level cache (32 MiB on the development machine) is
#: about twice as fast as one 16 times larger at 448x448 (the sweep in docs/benchmarks.md, "JAFAR at
#: 448 on the CPU"); GPUs take the whole budget (larger chunks, fewer launches)
CPU_CHUNK_BYTES = 16 * 2**20


def resolve_mode(mode: str, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> str:
    """The implementation ``mode`` stands for on ``device`` for inputs of ``dtype`` (``"auto"``:
    see the module docstring; the kernels take any head width and count)."""
    if mode not in MODES:
        raise ValueError(f"attention mode must be one of {MODES}, got {mode!r}.")
    if mode == "auto":
        # the kernel's exact float32 products are slower than cuBLAS's (docs/benchmarks.md)
        exact_fp32 = dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32
        if device.type != "cuda" or exact_fp32 or dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return "chunked"
        from ..kernels import attention as kernels

        return "triton" if kernels.available(device) else "chunked"
    if mode == "triton":
        from ..kernels import attention as kernels

        if not kernels.available(device):
            raise RuntimeError(f"attention='triton' needs Triton and a CUDA device (or TRITON_INTERPRET=1 on the "
                               f"CPU); the input is on {device}.")
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"attention='triton' takes float32, bfloat16 or float16 inputs, got {dtype}.")
    return mode


def chunk_rows(batch: int, num_keys: int, channels: int, num_heads: int, memory_budget: int) -> int:
    """Queries per chunk so that one chunk's temporaries fit in ``memory_budget`` bytes.

    Per query row the backward pass (the larger of the two) holds, in float32, the heads'
    logits, probabilities and logit gradients (``3 * heads * Nk``), the shared probability
    gradient and the averaged probabilities (``2 * Nk``), and the per-head outputs of the
    fused path plus a few ``C``-wide rows (``(heads + 2) * C``).
    """
    per_row = 4 * batch * ((3 * num_heads + 2) * num_keys + (num_heads + 2) * channels)
    return max(1, int(memory_budget) // per_row)


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    b, n, d = x.shape
    return x.view(b, n, num_heads, d // num_heads).transpose(1, 2)  # (B, H, N, d)


def reference_attention(q: torch.Tensor, k: torch.Tensor, f: torch.Tensor, num_heads: int,
                        scale: Optional[float] = None) -> torch.Tensor:
    """The official algorithm: ``(B, H, Nq, Nk)`` weights, averaged, times ``F``."""
    qh, kh = _split_heads(q, num_heads), _split_heads(k, num_heads)
    scale = 1.0 / math.sqrt(qh.shape[-1]) if scale is None else scale
    # nn.MultiheadAttention scales the queries before the product (torch/nn/functional.py)
    weights = torch.softmax((qh * scale) @ kh.transpose(-1, -2), dim=-1).mean(dim=1)
    return weights @ f


def _chunk_probs(q_chunk: torch.Tensor, kt: torch.Tensor, scale: float) -> torch.Tensor:
    """Each head's softmax ``(B, H, n, Nk)`` for a chunk of queries (``kt``: transposed keys,
    both already in the accumulation dtype)."""
    logits = q_chunk @ kt
    return torch.softmax(logits.mul_(scale), dim=-1)


class _ChunkedAttention(torch.autograd.Function):
    """Chunked forward (averaged softmax or per-head SDPA) with a recomputing backward."""

    @staticmethod
    def forward(ctx, q, k, f, num_heads: int, scale: float, rows: int, impl: str):
        b, nq, _ = q.shape
        nk, c = f.shape[1], f.shape[2]
        qh, kh = _split_heads(q, num_heads), _split_heads(k, num_heads)
        out = f.new_empty(b, nq, c) if impl != "triton" else None
        with torch.autocast(device_type=q.device.type, enabled=False):
            lse = None
            if impl == "triton":
                from ..kernels.attention import head_averaged_attention_fwd

                out, lse = head_averaged_attention_fwd(q, k, f, num_heads, scale, return_lse=True)
            elif impl == "sdpa":
                fh = f[:, None].expand(b, num_heads, nk, c)
                for s in range(0, nq, rows):
                    o = F.scaled_dot_product_attention(qh[:, :, s:s + rows], kh, fh, scale=scale)
                    out[:, s:s + rows] = o.mean(dim=1)
            else:
                acc = torch.promote_types(q.dtype, torch.float32)
                kt = kh.to(acc).transpose(-1, -2)
                for s in range(0, nq, rows):
                    probs = _chunk_probs(qh[:, :, s:s + rows].to(acc), kt, scale)
                    avg = probs.sum(dim=1).mul_(1.0 / num_heads)
                    del probs
                    torch.matmul(avg.to(f.dtype), f, out=out[:, s:s + rows])
        ctx.save_for_backward(q, k, f, lse)
        ctx.num_heads, ctx.scale, ctx.rows = num_heads, scale, rows
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, f, lse = ctx.saved_tensors
        h, scale, rows = ctx.num_heads, ctx.scale, ctx.rows
        if lse is not None:  # the Triton forward ran: fused backward kernels
            from ..kernels.attention import head_averaged_attention_bwd

            dq, dk, df = head_averaged_attention_bwd(q, k, f, lse, grad_out, h, scale)
            need = ctx.needs_input_grad
            return (dq if need[0] else None, dk if need[1] else None, df if need[2] else None,
                    None, None, None, None)
        b, nq, _ = q.shape
        qh, kh = _split_heads(q, h), _split_heads(k, h)
        grad_out = grad_out.to(f.dtype)
        need_q, need_k, need_f = ctx.needs_input_grad[:3]
        with torch.autocast(device_type=q.device.type, enabled=False):
            acc = torch.promote_types(q.dtype, torch.float32)  # float32, or float64 for float64 inputs
            kf = kh.to(acc)
            kt = kf.transpose(-1, -2)
            dq = torch.empty(qh.shape, dtype=acc, device=q.device) if need_q else None
            dk = torch.zeros(kh.shape, dtype=acc, device=q.device) if need_k else None
            df = torch.zeros(f.shape, dtype=acc, device=q.device) if need_f else None
            ft = f.transpose(-1, -2)
            for s in range(0, nq, rows):
                qc = qh[:, :, s:s + rows].to(acc)
                go = grad_out[:, s:s + rows]
                probs = _chunk_probs(qc, kt, scale)  # (B, H, n, Nk)
                if need_f:
                    avg = probs.sum(dim=1).mul_(1.0 / h)
                    df += avg.to(f.dtype).transpose(-1, -2) @ go
                    del avg
                if need_q or need_k:
                    # every head sees the same dL/dP = dO F^T / H
                    dprobs = (go @ ft).to(acc).mul_(1.0 / h)[:, None]  # (B, 1, n, Nk)
                    rowdot = (probs * dprobs).sum(dim=-1, keepdim=True)
                    dlogits = probs.mul_(dprobs.sub(rowdot)).mul_(scale)  # reuses probs' storage
                    del dprobs, rowdot
                    if need_q:
                        dq[:, :, s:s + rows] = dlogits @ kf
                    if need_k:
                        dk += dlogits.transpose(-1, -2) @ qc
                    del dlogits
        merge = lambda x, like: x.transpose(1, 2).reshape(like.shape).to(like.dtype)  # noqa: E731
        return (merge(dq, q) if need_q else None, merge(dk, k) if need_k else None,
                df.to(f.dtype) if need_f else None, None, None, None, None)


def head_averaged_attention(q: torch.Tensor, k: torch.Tensor, f: torch.Tensor, num_heads: int,
                            scale: Optional[float] = None, mode: str = "auto",
                            memory_budget: int = DEFAULT_MEMORY_BUDGET) -> torch.Tensor:
    """``mean_h softmax(Q_h K_h^T * scale) @ F``.

    Args:
        q: ``(B, Nq, D)`` projected queries, ``D = num_heads * d``.
        k: ``(B, Nk, D)`` projected keys.
        f: ``(B, Nk, C)`` values (JAFAR: the raw low-resolution features).
        num_heads: heads whose softmax weights are averaged.
        scale: logit scale, ``1 / sqrt(d)`` by default.
        mode: ``"auto"``, ``"reference"``, ``"chunked"`` or ``"sdpa"`` (module docstring).
        memory_budget: bytes of temporaries one query chunk may use (memory-bounded modes); on the
            CPU at most :data:`CPU_CHUNK_BYTES`.

    Returns:
        ``(B, Nq, C)``.
    """
    if q.dim() != 3 or k.dim() != 3 or f.dim() != 3:
        raise ValueError(f"expected q, k, f of shape (B, N, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(f.shape)}.")
    if q.shape[0] != k.shape[0] or k.shape[:2] != f.shape[:2] or q.shape[2] != k.shape[2]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and f {tuple(f.shape)} do not "
                         "agree: expected (B, Nq, D), (B, Nk, D), (B, Nk, C).")
    if q.shape[2] % num_heads:
        raise ValueError(f"query width {q.shape[2]} is not divisible by num_heads={num_heads}.")
    scale = 1.0 / math.sqrt(q.shape[2] // num_heads) if scale is None else float(scale)
    if torch.is_autocast_enabled(q.device.type):
        dtype = torch.get_autocast_dtype(q.device.type)
    else:
        dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), f.dtype)
    mode = resolve_mode(mode, q.device, dtype)
    if mode == "reference":
        return reference_attention(q, k, f, num_heads, scale)

    q, k, f = q.to(dtype), k.to(dtype), f.to(dtype).contiguous()
    if q.device.type == "cpu":
        memory_budget = min(memory_budget, CPU_CHUNK_BYTES)
    rows = chunk_rows(q.shape[0], k.shape[1], f.shape[2], num_heads, memory_budget)
    return _ChunkedAttention.apply(q, k, f, num_heads, scale, rows, mode)
