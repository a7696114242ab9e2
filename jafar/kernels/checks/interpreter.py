"""Triton interpreter fix for bfloat16, applied by ``tests/conftest.py`` (and the kernel-case
subprocesses, ``tools/benchmark.py``) when ``TRITON_INTERPRET=1``; never by ``import jafar``."""

from __future__ import annotations

import os


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fix_interpreter_bf16() -> None:
    """Make Triton's interpreter (3.x) treat bfloat16 as the GPU does. It stores bfloat16 tiles
    as their raw uint16 bits, and

    * its ``create_dot`` multiplies those integers (``tl.dot`` of two bf16 tiles returns ~1e10):
      bf16 operands are widened to float32 first (bf16 x bf16 products are exact in float32, so
      this is what the GPU's bf16 MMA with float32 accumulation computes);
    * its float32 -> bfloat16 cast truncates (twice the GPU's rounding error, biased towards
      zero): it rounds to nearest even here, as ``.to(tl.bfloat16)`` does on the GPU and
      ``tensor.to(torch.bfloat16)`` in PyTorch.

    Interpreter only."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_dot, "_jafar_bf16", False):
        return
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def widen(x):
        if x.dtype == tl.bfloat16:
            return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
        return x

    def create_dot(self, a, b, *args, **kwargs):
        return original_dot(self, widen(a), widen(b), *args, **kwargs)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.array(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            nan = np.isnan(src.data)
            rounded[nan] = 0x7FC0
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return original_cast(self, src, dst_type)

    create_dot._jafar_bf16 = True
    builder.create_dot = create_dot
    builder.cast_impl = cast_impl
    # the lambdas bound at class creation call self.cast_impl, so they pick the new one up


def apply() -> bool:
    """Apply :func:`fix_interpreter_bf16` when the interpreter is on; whether it was applied."""
    if not interpreting():
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # triton missing: nothing to fix
        return False
    fix_interpreter_bf16()
    return True
