"""Test-side helpers of the Triton kernels: seeded correctness cases (``cases``), the
interpreter's bfloat16 fix (``interpreter``) and ahead-of-time compilation for a GPU
(``compile``). Used by the tests and ``tools/benchmark.py``; not part of the package."""
