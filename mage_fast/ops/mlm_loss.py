"""Label-smoothed cross entropy over the code logits at masked positions (MAGE's training loss)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import Op


def masked_ce_ref(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, smoothing: float = 0.1,
                  upcast: bool = True) -> torch.Tensor:
    """logits: (B, N, C), target: (B, N) in [0, C), mask: (B, N) float/bool -> scalar.

    Per position ``(1 - s) * nll + s * mean_c(-log p_c)``, averaged over masked positions.
    """
    if upcast:
        logits = logits.float()
    logp = F.log_softmax(logits, dim=-1)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    loss = (1.0 - smoothing) * nll + smoothing * (-logp.mean(dim=-1))  # (B, N)
    mask = mask.to(loss.dtype)
    return (loss * mask).sum() / mask.sum()


masked_ce_op = Op("masked_ce", masked_ce_ref)


def masked_ce(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Mean label-smoothed cross entropy at masked positions.

    Args:
        logits: (B, N, C) logits over the C codes (a strided view of wider logits is fine).
        target: (B, N) int64 code ids.
        mask: (B, N), nonzero where the loss counts.
        smoothing: label smoothing (MAGE: 0.1).

    Example:
        >>> l = masked_ce(torch.zeros(1, 2, 4), torch.tensor([[0, 1]]), torch.ones(1, 2))
        >>> round(float(l), 4)  # log 4
        1.3863
    """
    return masked_ce_op(logits, target, mask, smoothing)
