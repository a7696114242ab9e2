"""Verification of the Triton kernels, shared by the tests, ``tools/benchmark.py --check`` and
``tools/gpu_report.py``: seeded correctness cases against the reference path in float64
(``cases``; ``python -m jafar.kernels.checks.cases``), the Triton interpreter's bfloat16 fix
(``interpreter``, applied only under ``TRITON_INTERPRET=1``) and ahead-of-time compilation for a
CUDA architecture without a GPU (``compile``). Nothing here is imported by ``import jafar``."""
