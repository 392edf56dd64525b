"""Parameter groups and the optimizer of the official recipe."""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float = 0.05, skip: Iterable[str] = ()) -> list:
    """Two AdamW groups: weight decay on matrices, none on 1-D tensors (norms, embeddings' biases,
    the MLM bias) and biases, as timm's ``param_groups_weight_decay``; frozen tensors are left out."""
    skip = set(skip)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
            {"params": decay, "weight_decay": weight_decay, "name": "decay"}]


def adamw(groups: list, lr: float, betas=(0.9, 0.95)) -> torch.optim.Optimizer:
    """torch AdamW (official betas 0.9/0.95). A torch optimizer keeps DeepSpeed from compiling its
    fused Adam at first use; DeepSpeed's ZeRO wraps it all the same.

    torch's fused implementation (one kernel over all tensors of a group) where every parameter is
    a floating tensor on the CPU or a GPU; the same update as the default one up to fp32 rounding."""
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("no trainable parameters")
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)
