"""GroupNorm followed by SiLU in one compiled op, for the pixel decode on a CPU.

The VQGAN decoder normalises and applies SiLU before every convolution. torch does that in five
passes over memory (group_norm reads twice and writes, silu reads and writes) with a scalar-ish
SiLU on some builds; ``torch.ops.mage_fast.group_norm_silu`` (``csrc/cpu/group_norm.cpp``) does it
in two over channels-last fp32: per-channel sums in double, then one normalise-and-SiLU pass with a
vectorised exp (within 3e-7 relative of exp). Its output is checked against a float64 reference
(bounds in ``tests/ops/tolerances.py``).

:func:`group_norm_silu` goes through the dispatcher (:data:`group_norm_silu_op`): the ``cpp``
backend (``mage_fast.backends.cpp``) takes 4-D fp32 CPU input outside autograd and says why it
declines anything else; the plain-torch reference (``F.silu(F.group_norm(...))``) takes the rest.
:class:`GroupNormSiLU` holds the GroupNorm's own parameters and calls it. A module that calls a
norm and then SiLU asks :func:`norm_silu`, which skips its own SiLU when the norm applies it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dispatch import Op


def available() -> bool:
    """Whether the compiled op is loaded (``mage_fast._C``)."""
    from .. import _ext
    return _ext.has_op("group_norm_silu")


def group_norm_silu_ref(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float) -> torch.Tensor:
    """The plain-torch reference."""
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


group_norm_silu_op = Op("group_norm_silu", group_norm_silu_ref)


def group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor,
                    eps: float) -> torch.Tensor:
    """``silu(group_norm(x))`` through the dispatcher.

    Args:
        x: (N, C, H, W) float tensor (any layout; the compiled op writes channels-last).
        groups: number of groups; divides C.
        weight, bias: (C,) affine parameters.
        eps: added to each group's variance.

    Returns:
        (N, C, H, W) in x's dtype.

    Example:
        >>> y = group_norm_silu(torch.randn(2, 8, 5, 5), 4, torch.ones(8), torch.zeros(8), 1e-6)
        >>> y.shape
        torch.Size([2, 8, 5, 5])
    """
    return group_norm_silu_op(x, groups, weight, bias, eps)


class GroupNormSiLU(nn.Module):
    """``silu(norm(x))`` for an affine ``nn.GroupNorm`` ``norm`` (its parameters, shared), computed by
    :func:`group_norm_silu` (the compiled op for 4-D fp32 CPU input, else the reference)."""

    applies_silu = True  # callers going through norm_silu() do not apply SiLU again

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        if type(norm) is not nn.GroupNorm or not norm.affine:
            raise ValueError(f"GroupNormSiLU wraps an affine nn.GroupNorm, got {norm}")
        self.num_groups, self.eps = norm.num_groups, norm.eps
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm_silu(x, self.num_groups, self.weight, self.bias, self.eps)


def norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``silu(norm(x))``, through ``norm`` alone when it applies the SiLU itself (:class:`GroupNormSiLU`)."""
    return norm(x) if getattr(norm, "applies_silu", False) else F.silu(norm(x))


def fuse_group_norm_silu(module: nn.Module, names=("norm1", "norm2", "norm_out")) -> int:
    """Replace, in place, each ``nn.GroupNorm`` child called one of ``names`` anywhere in ``module`` by a
    :class:`GroupNormSiLU`. Only for modules whose forward sends those norms through :func:`norm_silu`
    (the VQGAN's ResnetBlock, Encoder and Decoder). Returns how many were replaced."""
    n = 0
    for name, child in list(module.named_children()):
        if name in names and type(child) is nn.GroupNorm and child.affine:
            setattr(module, name, GroupNormSiLU(child))
            n += 1
        else:
            n += fuse_group_norm_silu(child, names)
    return n
