"""Ahead-of-time compilation of the Triton kernels for a CUDA architecture without a GPU
(Triton's ``ASTSource`` -> cubin path, with the ``ptxas`` shipped in the triton wheel). Catches
what the interpreter does not check: types, layouts, shared memory, register spills. Used by the
tests; ``tools/benchmark.py --tune`` measures on the GPU."""

from __future__ import annotations

import torch
import triton

from jafar.kernels import attention as ka
from jafar.kernels import encoders as ke
from jafar.kernels.attention import CONFIGS, next_pow2


def compile_attention(dtype: torch.dtype = torch.bfloat16, num_heads: int = 4, head_dim: int = 32,
                    arch: int = 90, tf32: bool = True) -> dict:
    """Compile the kernels (the forward in its three phases) for a CUDA architecture without a GPU (Triton's ahead-of-time
    path, down to the cubin with the ``ptxas`` shipped in the triton wheel), with the launch
    configurations of :data:`CONFIGS`: ``{kernel: compiled kernel}`` (``.metadata.shared``: bytes of
    shared memory per program). Catches what the interpreter does not check: types, layouts,
    shared memory. Used by the tests; ``tools/benchmark.py --tune`` measures on the GPU."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    pointers = {"Q", "K", "F", "O", "DO", "DQ", "DK", "DF"}
    out = {}
    for kernel, fn, phase in (("fwd", ka._fwd_kernel, 0), ("fwd_stats", ka._fwd_kernel, 1), ("fwd_from_lse", ka._fwd_kernel, 2),
                              ("bwd_dq", ka._bwd_dq_kernel, None), ("bwd_dkdf", ka._bwd_dkdf_kernel, None)):
        cfg = CONFIGS[kernel.split("_")[0] if phase is not None else kernel]
        consts = dict(H=num_heads, D=head_dim, HP=next_pow2(num_heads), DP=max(16, next_pow2(head_dim)),
                      BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], BLOCK_C=cfg["block_c"],
                      PREC="ieee" if dtype == torch.float32 and not tf32 else "tf32")
        if phase is not None:
            consts["PHASE"] = phase
        signature = {a: "constexpr" if a in consts else f"*{name}" if a in pointers else
                     "*fp32" if a in ("LSE", "DELTA") else "fp32" if a in ("qk_scale", "scale") else "i32"
                     for a in fn.arg_names}
        out[kernel] = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                                     target=GPUTarget("cuda", arch, 32),
                                     options=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
    return out


def compile_encoders(dtype: torch.dtype = torch.bfloat16, channels: int = 128, groups: int = 8, arch: int = 90,
                    tf32: bool = True) -> dict:
    """Compile the kernels for a CUDA architecture without a GPU (Triton's ahead-of-time path, as
    :func:`compile_attention`), in the variants JAFAR launches: ``{name: compiled}`` with
    ``conv`` (no prologue), ``block`` (GroupNorm-apply, SiLU, statistics), ``residual`` (and the
    residual), ``rope`` (and RoPE, no statistics) and ``coefficients``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    cfg = CONFIGS["encoder"]
    pad = max(16, next_pow2(channels))
    base = dict(G=groups, GP=next_pow2(groups), CP=pad, COP=pad, BLOCK_P=cfg["block_p"],
                PREC="ieee" if dtype == torch.float32 and not tf32 else "tf32")
    variants = {
        "conv": dict(base, NORM=False, RES=False, ROPE=False),
        "block": dict(base, NORM=True, RES=False, ROPE=False),
        "residual": dict(base, NORM=True, RES=True, ROPE=False),
        "rope": dict(base, NORM=True, RES=True, ROPE=True, G=0, GP=1),
    }
    target = GPUTarget("cuda", arch, 32)
    out = {}
    for variant, consts in variants.items():
        signature = {a: "constexpr" if a in consts else f"*{name}" if a in ("X", "W", "R", "Y") else
                     "*fp32" if a in ("A", "S", "PART", "FREQS") else "fp32" if a.endswith("_step") else "i32"
                     for a in ke._pointwise_conv_kernel.arg_names}
        out[variant] = triton.compile(ASTSource(fn=ke._pointwise_conv_kernel, signature=signature, constexprs=consts),
                                      target=target, options=dict(num_warps=cfg["num_warps"],
                                                                  num_stages=cfg["num_stages"]))
    consts = dict(G=groups, CGP=next_pow2(channels // groups), BLOCK_T=ke.BLOCK_T, AFFINE=True)
    pointers = {"PART", "WEIGHT", "BIAS", "A", "S", "MEAN", "RSTD"}
    signature = {a: "constexpr" if a in consts else "*fp32" if a in pointers else "fp32" if a in ("eps", "total")
                 else "i32"
                 for a in ke._gn_coefficients_kernel.arg_names}
    out["coefficients"] = triton.compile(ASTSource(fn=ke._gn_coefficients_kernel, signature=signature, constexprs=consts),
                                         target=target, options=dict(num_warps=4))
    consts = dict(G=groups, CP=pad, COP=pad, BLOCK_P=cfg["block_p"], PREC=base["PREC"])
    signature = {a: "constexpr" if a in consts else f"*{name}" if a in ("DY", "X", "W", "DZ") else
                 "*fp32" if a in ("A", "S", "MEAN", "RSTD", "PART", "DWPART") else "i32"
                 for a in ke._unit_bwd_kernel.arg_names}
    out["unit_bwd"] = triton.compile(ASTSource(fn=ke._unit_bwd_kernel, signature=signature, constexprs=consts),
                                     target=target, options=dict(num_warps=cfg["num_warps"],
                                                                 num_stages=cfg["num_stages"]))
    consts = dict(CP=pad, DP=pad, BLOCK_P=cfg["block_p"], PREC=base["PREC"])
    signature = {a: "constexpr" if a in consts else f"*{name}" if a in ("X", "WT", "OUT") else
                 "*fp32" if a in ("NW", "BIAS") else "fp32" if a == "eps" else "i32"
                 for a in ke._rms_project_kernel.arg_names}
    out["rms_project"] = triton.compile(ASTSource(fn=ke._rms_project_kernel, signature=signature, constexprs=consts),
                                        target=target, options=dict(num_warps=cfg["num_warps"],
                                                                    num_stages=cfg["num_stages"]))
    gn_consts = dict(G=groups, CGP=next_pow2(channels // groups), BLOCK_P=ke.GN_BLOCK_P)
    gn_pointers = {"X", "PART", "DY", "MEAN", "RSTD", "CA", "CB", "CC", "DX"}
    for variant, fn in (("gn_stats", ke._gn_tile_stats_kernel), ("gn_bwd_reduce", ke._gn_bwd_reduce_kernel),
                        ("gn_bwd_apply", ke._gn_bwd_apply_kernel)):
        signature = {a: "constexpr" if a in gn_consts else
                     (f"*{name}" if a in ("X", "DY", "DX") else "*fp32") if a in gn_pointers else "i32"
                     for a in fn.arg_names}
        out[variant] = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=dict(gn_consts)), target=target,
                                      options=dict(num_warps=4))
    return out
