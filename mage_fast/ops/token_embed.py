"""Token embedding of the kept tokens: word embedding + position embedding -> LayerNorm.

What MAGE's ``BertEmbeddings`` computes before its dropout, on the tokens the encoder keeps: the
caller gathers the kept ids and passes their positions. Faster backends fuse the two lookups, the
sum and the LayerNorm (:data:`token_embed_op`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .dispatch import Op


def token_embed_ref(ids: torch.Tensor, positions: Optional[torch.Tensor], word_weight: torch.Tensor,
                    pos_weight: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, eps: float = 1e-6,
                    upcast: bool = True) -> torch.Tensor:
    """ids, positions: (B, K) int64 (positions None = 0..K-1); word_weight: (V, D); pos_weight: (P, D);
    ln_weight, ln_bias: (D,) -> (B, K, D) in word_weight's dtype."""
    dtype = word_weight.dtype
    if positions is None:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    x = F.embedding(ids, word_weight) + F.embedding(positions, pos_weight)
    if upcast:  # precision raised: LayerNorm in fp32
        x, ln_weight, ln_bias = x.float(), ln_weight.float(), ln_bias.float()
    return F.layer_norm(x, x.shape[-1:], ln_weight, ln_bias, eps).to(dtype)


token_embed_op = Op("token_embed", token_embed_ref)


def token_embed(ids: torch.Tensor, positions: Optional[torch.Tensor], word_weight: torch.Tensor,
                pos_weight: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm(word_weight[ids] + pos_weight[positions]), differentiable in every float input.

    Args:
        ids: (B, K) int64 token ids (MAGE: the kept tokens' ids, gathered with the keep-list).
        positions: (B, K) int64 positions of those tokens (the keep-list), or None for 0..K-1.
        word_weight: (V, D) word embedding; pos_weight: (P, D) position embedding.
        ln_weight, ln_bias: (D,) LayerNorm affine; eps: its eps (MAGE: 1e-6).

    Returns:
        (B, K, D) in word_weight's dtype (apply the embedding dropout after).

    Example:
        >>> emb = token_embed(torch.tensor([[3, 1]]), torch.tensor([[0, 5]]), torch.randn(8, 4),
        ...                   torch.randn(6, 4), torch.ones(4), torch.zeros(4))
        >>> emb.shape
        torch.Size([1, 2, 4])
    """
    if ids.dim() != 2 or (positions is not None and positions.shape != ids.shape):
        raise ValueError(f"token_embed expects ids (B, K) and positions (B, K) or None; got {tuple(ids.shape)}, "
                         f"{None if positions is None else tuple(positions.shape)}")
    return token_embed_op(ids, positions, word_weight, pos_weight, ln_weight, ln_bias, eps)
