"""Training utilities: the official recipe's schedule and parameter groups, DeepSpeed plumbing,
the shared training loop, the MAGE / MAGE-C and VQGAN objectives, and metric logging."""
from .optim import adamw, param_groups
from .schedule import lr_at, scaled_lr

__all__ = ["adamw", "param_groups", "lr_at", "scaled_lr"]
