"""GroupNorm with an optional fused SiLU, and an optional per-(batch, channel) shift added first.

``y = silu(group_norm(x + shift[:, :, None, None]))``, the ResBlock's "add the timestep embedding,
normalize, activate" in one op. Works on NCHW and channels_last tensors, any number of spatial
dims. Chain: Triton kernels -> launchers -> ``GroupNormFunction`` -> ``group_norm()`` and the
``GroupNormSiLU`` module, whose state dict is ``nn.GroupNorm``'s.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.dispatch import resolve_backend


def check_group_norm_inputs(x, num_groups, weight, bias, shift) -> None:
    """Raise a ValueError that names the problem when a call cannot work."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"group_norm: x must be a tensor of shape (B, C, ...), got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"group_norm: x must be floating point, got {x.dtype}")
    C = x.shape[1]
    if not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"group_norm: channels C={C} of x {tuple(x.shape)} are not divisible "
                         f"by num_groups={num_groups}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.shape != (C,):
            raise ValueError(f"group_norm: {name} must have shape ({C},), got {tuple(p.shape)}")
        if not p.is_floating_point():
            raise ValueError(f"group_norm: {name} must be floating point, got {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"group_norm: {name} is on {p.device}, x on {x.device}")
    if shift is not None:
        if shift.shape != (x.shape[0], C):
            raise ValueError(f"group_norm: shift must have shape ({x.shape[0]}, {C}), got {tuple(shift.shape)}")
        if shift.device != x.device:
            raise ValueError(f"group_norm: shift is on {shift.device}, x on {x.device}")


def _group_norm_torch(x, num_groups, weight, bias, eps, silu, shift):
    if shift is not None:
        x = x + shift.view(*shift.shape, *([1] * (x.dim() - 2)))
    y = F.group_norm(x, num_groups, weight, bias, eps)
    return F.silu(y) if silu else y


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, silu: bool = False, *,
               shift: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """GroupNorm over (C/G, *spatial) per group, then an optional SiLU. x (B, C, ...) -> same shape.

    ``shift`` (B, C) is added to x before the statistics are taken. Differentiable in x,
    weight, bias and shift.
    """
    check_group_norm_inputs(x, num_groups, weight, bias, shift)
    which = resolve_backend("groupnorm", backend, x)
    if which == "triton":
        raise NotImplementedError("group_norm: the Triton kernel lands with its own issue")
    # xformers has no GroupNorm: its backend uses PyTorch's.
    return _group_norm_torch(x, num_groups, weight, bias, eps, silu, shift)


class GroupNormSiLU(nn.Module):
    """``nn.GroupNorm`` (+ SiLU when ``silu``): same arguments, same state dict (weight, bias)."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 silu: bool = True, device=None, dtype=None):
        super().__init__()
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNormSiLU: num_channels={num_channels} is not divisible by "
                             f"num_groups={num_groups}")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.affine, self.silu = affine, silu
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, self.silu, shift=shift)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, silu={self.silu}"
