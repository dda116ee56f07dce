"""Fused GPU kernels (Triton) with PyTorch fallbacks, and the dispatch that picks between them.

The floor of the project: imports nothing else of ours.
"""

from kernels.attention import attention
from kernels.dispatch import resolve_backend, triton_available, use_backend, xformers_available
from kernels.groupnorm import GroupNormSiLU, group_norm

__all__ = ["attention", "group_norm", "GroupNormSiLU", "use_backend", "resolve_backend",
           "triton_available", "xformers_available"]
