"""Learning-rate rule and schedule of the official MAGE recipe."""
from __future__ import annotations

import math


def scaled_lr(blr: float, total_batch: int) -> float:
    """Absolute learning rate ``blr * total_batch / 256`` (official: blr 1.5e-4, batch 4096 -> 2.4e-3)."""
    if total_batch <= 0:
        raise ValueError(f"total batch must be positive, got {total_batch}")
    return blr * total_batch / 256


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then a half-cycle cosine down to
    ``min_lr`` at ``total_steps``, evaluated per iteration (the official schedule uses fractional
    epochs, which is the same curve).

    Example:
        >>> lr_at(0, 1.0, 10, 110), lr_at(10, 1.0, 10, 110), round(lr_at(60, 1.0, 10, 110), 6)
        (0.0, 1.0, 0.5)
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * t))
