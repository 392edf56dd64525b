"""Dropout for the training step.

The reference is torch's ``F.dropout`` (what the official model's ``nn.Dropout`` layers call). The
``hashed`` backend (CPU, fp32 / bf16, the compiled extension) draws its keep decisions from a
counter-based hash of (seed, element index), the one of ``csrc/common/rng.h``: one int64 seed per
call from torch's random generator (so ``torch.manual_seed`` and a saved RNG state reproduce it),
no mask stored for the backward (it recomputes the same decisions), and about an integer multiply
per element instead of torch's mt19937 draw. Both keep each element with probability 1 - p and
scale kept ones by 1 / (1 - p); they draw different random numbers.

:func:`dropout_hashed_ref` is the hash in plain torch, the backend's test oracle.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _ext
from .decode_step import mix32
from .dispatch import Op

_M32 = 0xFFFFFFFF
_STREAM_DROPOUT = 0x2545F491


def new_seed(generator: Optional[torch.Generator] = None) -> int:
    """A 62-bit seed for one hashed-dropout call, from torch's (global) CPU generator."""
    return int(torch.randint(0, 2 ** 62, (), generator=generator))


def dropout_threshold(p: float) -> int:
    return min(int(p * 2 ** 32 + 0.5), _M32)


def dropout_hashed_ref(x: torch.Tensor, p: float, seed: int, offset: int = 0) -> torch.Tensor:
    """The hashed dropout in plain torch: element i (of x flattened) is kept when
    ``mix32(mix32(key + hi32(offset + i)) + lo32(offset + i)) >= round(p 2^32)``."""
    key = (int(mix32(torch.tensor((seed & _M32) ^ _STREAM_DROPOUT))) +
           int(mix32(torch.tensor((seed >> 32) & _M32)))) & _M32
    idx = torch.arange(x.numel(), dtype=torch.int64) + offset
    row = mix32((key + (idx >> 32)) & _M32)
    keep = mix32((row + (idx & _M32)) & _M32) >= dropout_threshold(p)
    scale = 1.0 / (1.0 - p)
    return torch.where(keep.view(x.shape).to(x.device), x.float() * scale, 0.0).to(x.dtype)


class _HashedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float, seed: int):
        ctx.p, ctx.seed = p, seed
        return torch.ops.mage_fast.dropout(x, p, seed, 0)

    @staticmethod
    def backward(ctx, g):
        return torch.ops.mage_fast.dropout(g.contiguous(), ctx.p, ctx.seed, 0), None, None


def dropout_torch(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    return F.dropout(x, p, training)


def dropout_hashed(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    if not training or p == 0:
        return x
    return _HashedDropout.apply(x, p, new_seed())


def _hashed_supports(x: torch.Tensor, p: float, training: bool = True) -> Optional[str]:
    if x.device.type != "cpu":
        return "not on the CPU"
    if x.dtype not in (torch.float32, torch.bfloat16):
        return f"needs fp32 or bf16, got {x.dtype}"
    if not 0 <= p < 1:
        return "needs 0 <= p < 1"
    if not _ext.has_op("dropout"):
        return f"compiled ops unavailable ({_ext.status})"
    return None


dropout_op = Op("dropout", dropout_torch)
dropout_op.register("hashed", dropout_hashed, _hashed_supports)


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """Dropout with probability ``p`` when ``training`` (identity otherwise), through the dispatcher."""
    if not training or p == 0:
        return x
    return dropout_op(x, p, training)


class Dropout(nn.Dropout):
    """``nn.Dropout`` through :func:`dropout` (no parameters: state dicts are unchanged)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
