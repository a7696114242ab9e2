"""Triton kernels: the head-averaged attention (``attention``) and JAFAR's fused per-pixel
encoders and GroupNorm (``encoders``). Imported lazily by the layers that use them; ``triton``
is optional (the PyTorch paths need none)."""
