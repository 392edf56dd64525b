"""Multi-head attention core: softmax(q k^T * scale) v, non-causal or causal, with dropout.

Two plain-torch paths: ``attention_official`` reproduces the official MAGE arithmetic (q.k in
fp32 with autocast off, max subtracted, softmax, dropout, product with v); ``attention_sdpa``
calls ``torch.nn.functional.scaled_dot_product_attention``, which picks flash / memory-efficient
/ math kernels itself and accumulates the softmax in fp32 for half inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import Op


def attention_official(q, k, v, dropout_p: float = 0.0, causal: bool = False, scale: Optional[float] = None):
    """q, k, v: (B, H, N, d) -> (B, H, N, d). The official MAGE computation, fp32 scores."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(device_type=q.device.type, enabled=False):
        attn = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, N, N) fp32
    if causal:
        n = q.shape[-2]
        attn = attn.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    attn = attn - attn.amax(dim=-1, keepdim=True)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    if not torch.is_autocast_enabled(q.device.type):
        attn = attn.to(v.dtype)  # fp64 / low-precision inputs outside autocast: weights in v's dtype
    return attn @ v  # under autocast this product runs in the autocast dtype, as the official one


def attention_sdpa(q, k, v, dropout_p: float = 0.0, causal: bool = False, scale: Optional[float] = None):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)


attention_op = Op("attention", attention_official)
attention_op.register("sdpa", attention_sdpa, lambda *a, **k: None)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
              causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """Scaled dot-product attention.

    Args:
        q, k, v: (B, H, N, d) tensors of one float dtype. Softmax is accumulated in fp32.
        dropout_p: dropout on the attention weights (pass 0 in eval).
        causal: mask future keys (autoregressive baselines).
        scale: defaults to ``d ** -0.5``.

    Returns:
        (B, H, N, d) in the input dtype.

    Example:
        >>> q = k = v = torch.randn(1, 2, 5, 8)
        >>> attention(q, k, v).shape
        torch.Size([1, 2, 5, 8])
    """
    return attention_op(q, k, v, dropout_p=dropout_p, causal=causal, scale=scale)
