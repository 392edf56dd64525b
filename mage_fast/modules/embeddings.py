"""Token embedding and MLM head with the official parameter names."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.dropout import Dropout
from ..ops.layer_norm import layer_norm
from ..ops.token_embed import token_embed


class BertEmbeddings(nn.Module):
    """word embedding + learned position embedding -> LayerNorm(eps 1e-6) -> dropout."""

    def __init__(self, vocab_size: int, hidden_size: int, max_position_embeddings: int, dropout: float = 0.1):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, hidden_size)
        self.position_embeddings = nn.Embedding(max_position_embeddings, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.dropout = Dropout(dropout)
        self.register_buffer("position_ids", torch.arange(max_position_embeddings).expand((1, -1)))
        nn.init.normal_(self.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.position_embeddings.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids: (B, L) int64 -> (B, L, D). ``positions`` (B, L) embeds a gathered subset of
        positions (token dropping before the embedding instead of after: same rows, less work)."""
        if positions is None:
            positions = self.position_ids[:, : input_ids.shape[1]].expand_as(input_ids)
        ln = self.LayerNorm
        return self.dropout(token_embed(input_ids, positions, self.word_embeddings.weight,
                                        self.position_embeddings.weight, ln.weight, ln.bias, ln.eps))


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` (same parameters, same state dict) computed through the dispatched
    :func:`mage_fast.ops.layer_norm` (fused kernels where available, fp32 statistics)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        return layer_norm(x, self.weight, self.bias, self.eps)


def fast_norm_layer(norm_layer):
    """Map ``nn.LayerNorm`` (or a ``functools.partial`` of it) to :class:`LayerNorm`; leave any
    other norm factory as given."""
    import functools
    if norm_layer is nn.LayerNorm:
        return LayerNorm
    if isinstance(norm_layer, functools.partial) and norm_layer.func is nn.LayerNorm:
        return functools.partial(LayerNorm, *norm_layer.args, **norm_layer.keywords)
    return norm_layer


class MlmLayer(nn.Module):
    """fc -> GELU -> LayerNorm(eps 1e-5) -> product with the tied word embedding + bias."""

    def __init__(self, feat_emb_dim: int, word_emb_dim: int, vocab_size: int):
        super().__init__()
        self.fc = nn.Linear(feat_emb_dim, word_emb_dim)
        self.gelu = nn.GELU()
        self.ln = LayerNorm(word_emb_dim)
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab_size))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.gelu(self.fc(x)))

    def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor, num_outputs: Optional[int] = None) -> torch.Tensor:
        """x: (B, L, Dd), word_embeddings: (V, D) -> logits (B, L, V), or only the first
        ``num_outputs`` columns (the codes) when given, which is all that sampling reads."""
        h = self.hidden(x)
        if num_outputs is None:
            return h @ word_embeddings.t() + self.bias
        return F.linear(h, word_embeddings[:num_outputs], self.bias[0, 0, :num_outputs])

    def loss(self, x: torch.Tensor, word_embeddings: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
             num_codes: int, smoothing: float) -> torch.Tensor:
        """Head + label-smoothed masked cross entropy over the first ``num_codes`` logits, fused
        (:func:`mage_fast.ops.mlm_head_loss`): no full-size logits. x: (B, N, Dd) -> scalar."""
        from ..ops.mlm_head_loss import mlm_head_loss
        return mlm_head_loss(x, self.fc.weight, self.fc.bias, self.ln.weight, self.ln.bias, word_embeddings,
                             self.bias, target, mask, num_codes, smoothing, self.ln.eps)
