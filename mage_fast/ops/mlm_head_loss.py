"""MAGE's MLM head fused with its training loss.

``fc -> GELU -> LayerNorm -> product with the tied word embedding + bias``, then label-smoothed
cross entropy over the first ``num_codes`` logits, averaged over masked positions. Only those
``num_codes`` columns enter the loss, so only they are computed; the fast backend computes them a
chunk of rows at a time and never holds full-size fp32 logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import Op
from .mlm_loss import masked_ce_ref


def mlm_head_loss_ref(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor, ln_weight: torch.Tensor,
                      ln_bias: torch.Tensor, word_embeddings: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                      mask: torch.Tensor, num_codes: int, smoothing: float = 0.1, ln_eps: float = 1e-5,
                      upcast: bool = True) -> torch.Tensor:
    """Plain-torch head + loss (materialises the (B, N, num_codes) logits; fp32 with ``upcast``).

    x: (B, N, Dd); fc_weight: (D, Dd); fc_bias, ln_weight, ln_bias: (D,); word_embeddings: (V, D);
    bias: (V,) (or (1, 1, V)); target: (B, N) in [0, num_codes); mask: (B, N) -> scalar.
    """
    if upcast:  # precision raised: the whole head in fp32
        x, fc_weight, fc_bias, ln_weight, ln_bias, word_embeddings, bias = (
            t.float() for t in (x, fc_weight, fc_bias, ln_weight, ln_bias, word_embeddings, bias))
    h = F.layer_norm(F.gelu(F.linear(x, fc_weight, fc_bias)), ln_weight.shape, ln_weight, ln_bias, ln_eps)
    logits = F.linear(h, word_embeddings[:num_codes], bias.reshape(-1)[:num_codes])  # (B, N, C)
    return masked_ce_ref(logits, target, mask, smoothing, upcast=upcast)


mlm_head_loss_op = Op("mlm_head_loss", mlm_head_loss_ref)


def mlm_head_loss(x: torch.Tensor, fc_weight: torch.Tensor, fc_bias: torch.Tensor, ln_weight: torch.Tensor,
                  ln_bias: torch.Tensor, word_embeddings: torch.Tensor, bias: torch.Tensor, target: torch.Tensor,
                  mask: torch.Tensor, num_codes: int, smoothing: float = 0.1, ln_eps: float = 1e-5) -> torch.Tensor:
    """MLM head + label-smoothed masked cross entropy, differentiable in every float input.

    Args:
        x: (B, N, Dd) decoder features at the image positions (the class slot already removed).
        fc_weight, fc_bias: the head's ``fc`` Linear, (D, Dd) and (D,).
        ln_weight, ln_bias: the head's LayerNorm, (D,) each; ``ln_eps`` its eps (MAGE: 1e-5).
        word_embeddings: (V, D) tied token embedding (MAGE passes it detached).
        bias: (V,) or (1, 1, V) output bias.
        target: (B, N) int64 code ids in ``[0, num_codes)``.
        mask: (B, N), nonzero where the loss counts.
        num_codes: C, the number of leading vocabulary entries that are codes (MAGE: 1024).
        smoothing: label smoothing (MAGE: 0.1).

    Returns:
        Scalar fp32 loss: the mean over masked positions.

    Example:
        >>> B, N, Dd, D, V = 2, 3, 8, 6, 10
        >>> loss = mlm_head_loss(torch.randn(B, N, Dd), torch.randn(D, Dd), torch.zeros(D), torch.ones(D),
        ...                      torch.zeros(D), torch.randn(V, D), torch.zeros(V),
        ...                      torch.randint(0, 7, (B, N)), torch.ones(B, N), num_codes=7)
        >>> loss.shape
        torch.Size([])
    """
    if x.dim() != 3 or target.shape != x.shape[:2] or mask.shape != x.shape[:2]:
        raise ValueError(f"mlm_head_loss expects x (B, N, Dd), target and mask (B, N); got {tuple(x.shape)}, "
                         f"{tuple(target.shape)}, {tuple(mask.shape)}")
    if not 0 < num_codes <= word_embeddings.shape[0]:
        raise ValueError(f"num_codes must be in (0, {word_embeddings.shape[0]}], got {num_codes}")
    return mlm_head_loss_op(x, fc_weight, fc_bias, ln_weight, ln_bias, word_embeddings, bias, target, mask,
                            num_codes, smoothing, ln_eps)
