"""Token dropping (encoder side) and restoring (decoder side), MAE-style with index lists.

MAGE drops a fixed number of tokens per sample, so the kept positions fit a dense (B, K) index
tensor. ``keep_index`` turns the official float masks into that tensor without a host sync.
"""
from __future__ import annotations

import torch

from .dispatch import Op


def keep_index(token_drop_mask: torch.Tensor, num_keep: int) -> torch.Tensor:
    """Positions not dropped, ascending. token_drop_mask: (B, L), 1 = dropped -> (B, num_keep) int64.

    A stable sort puts the kept (0) positions first in their original order; no ``nonzero``.
    """
    order = torch.sort(token_drop_mask.to(torch.uint8), dim=1, stable=True).indices  # (B, L)
    return order[:, :num_keep]


def gather_tokens_ref(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, L, D), index: (B, K) -> (B, K, D) rows of x at index."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens_ref(x: torch.Tensor, index: torch.Tensor, all_mask: torch.Tensor,
                       pos_embed: torch.Tensor) -> torch.Tensor:
    """Decoder input from the kept tokens.

    x: (B, K, D) kept tokens, x[:, 0] the class slot; index: (B, K) their positions;
    all_mask: (B, L) bool, True where masked (dropped or not); pos_embed: (1, L, D).
    Returns (B, L, D): the kept tokens at their positions, the class-slot vector at every masked
    or dropped position, plus ``pos_embed``.
    """
    B, K, D = x.shape
    L = all_mask.shape[1]
    fill = x[:, :1].expand(B, L, D)
    out = fill.scatter(1, index.unsqueeze(-1).expand(B, K, D), x)
    out = torch.where(all_mask.unsqueeze(-1), fill, out)
    return out + pos_embed


gather_tokens_op = Op("gather_tokens", gather_tokens_ref)
scatter_tokens_op = Op("scatter_tokens", scatter_tokens_ref)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select the kept tokens: x (B, L, D), index (B, K) int64 -> (B, K, D). Differentiable."""
    return gather_tokens_op(x, index)


def scatter_tokens(x: torch.Tensor, index: torch.Tensor, all_mask: torch.Tensor,
                   pos_embed: torch.Tensor) -> torch.Tensor:
    """Restore the full sequence for the MAGE decoder (see :func:`scatter_tokens_ref`).

    Example:
        >>> x = torch.randn(2, 3, 4); idx = torch.tensor([[0, 2, 4], [0, 1, 3]])
        >>> m = torch.zeros(2, 5, dtype=torch.bool); pos = torch.zeros(1, 5, 4)
        >>> scatter_tokens(x, idx, m, pos).shape
        torch.Size([2, 5, 4])
    """
    return scatter_tokens_op(x, index, all_mask, pos_embed)
