"""JAFAR's layers: the head-averaged attention (dispatch over its implementations and the chunked
autograd), the GroupNorm whose implementation is a constructor argument, and the 2-D RoPE."""

from .attention import DEFAULT_MEMORY_BUDGET, MODES, head_averaged_attention, reference_attention
from .norm import GROUP_NORM_IMPLS, GroupNorm, set_group_norm
from .rope import RoPE

__all__ = ["DEFAULT_MEMORY_BUDGET", "MODES", "head_averaged_attention", "reference_attention", "GROUP_NORM_IMPLS",
           "GroupNorm", "set_group_norm", "RoPE"]
