"""LayerNorm over the last dimension (what apex's fused LayerNorm gave the official model).

Reference: ``torch.nn.functional.layer_norm``, by default in fp32 whatever the input dtype
(``upcast``), the result cast back to the input dtype. Faster backends register on
:data:`layer_norm_op`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import Op


def layer_norm_ref(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float = 1e-5,
                   upcast: bool = True) -> torch.Tensor:
    """Plain-torch LayerNorm. x: (..., D), weight/bias: (D,) or None -> (..., D) in x's dtype."""
    dtype = x.dtype
    if upcast:  # precision raised: statistics and affine in fp32
        x = x.float()
        weight = weight.float() if weight is not None else None
        bias = bias.float() if bias is not None else None
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps).to(dtype)


layer_norm_op = Op("layer_norm", layer_norm_ref)


def layer_norm(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension, differentiable in ``x``, ``weight`` and ``bias``.

    Args:
        x: (..., D) float tensor (fp32, fp16 or bf16); statistics are computed in fp32.
        weight, bias: (D,) affine parameters (any float dtype), or None.
        eps: added to the variance (``nn.LayerNorm``'s default 1e-5; MAGE's blocks use 1e-6).

    Returns:
        (..., D) in x's dtype.

    Example:
        >>> ln = torch.nn.LayerNorm(8)
        >>> y = layer_norm(torch.randn(2, 3, 8), ln.weight, ln.bias, ln.eps)
        >>> y.shape
        torch.Size([2, 3, 8])
    """
    if weight is not None and weight.shape != x.shape[-1:]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match the last dim of x {tuple(x.shape)}")
    if bias is not None and bias.shape != x.shape[-1:]:
        raise ValueError(f"bias {tuple(bias.shape)} does not match the last dim of x {tuple(x.shape)}")
    return layer_norm_op(x, weight, bias, eps)
