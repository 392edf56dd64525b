"""The MAGE pre-training objective around an unchanged :class:`mage_fast.MAGE`.

``MAGEObjective`` runs the official training forward (same random draws in the same order, so the
same loss as ``MAGE.forward`` under the same seed) from images or from cached token ids, with
optional activation checkpointing of the transformer blocks and the optional MAGE-C contrastive
loss on the encoder's pooled output over two augmented views.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..models.mage import MAGE
from ..ops.mlm_loss import masked_ce
from ..ops.token_drop import keep_index, scatter_tokens


class ContrastiveHead(nn.Module):
    """MLP projection (Linear-BN-ReLU-Linear) of the pooled encoder output for MAGE-C."""

    def __init__(self, dim: int, hidden: int = 512, out: int = 128):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, out)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE (SimCLR NT-Xent) between paired rows of a and b (B, D); negatives are the
    other 2B-2 embeddings of this rank's batch."""
    z = F.normalize(torch.cat([a, b]).float(), dim=1)  # (2B, D)
    n = a.shape[0]
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


class MAGEObjective(nn.Module):
    """``forward(batch) -> (loss, stats)`` for pre-training.

    Args:
        model: the MAGE (its VQGAN frozen).
        activation_checkpointing: recompute transformer blocks in the backward pass.
        contrastive_weight: > 0 enables MAGE-C: batches then hold two views (B, 2, ...), the MLM
            loss is averaged over both and ``contrastive_weight * InfoNCE`` of the pooled encoder
            outputs is added.
        temperature: InfoNCE temperature.

    Batches are images (B, 3, S, S) in [0, 1] or token ids (B, L) from a token cache (ids skip the
    tokenizer); with MAGE-C one more dimension of size 2 after B.
    """

    def __init__(self, model: MAGE, activation_checkpointing: bool = False, contrastive_weight: float = 0.0,
                 temperature: float = 0.2):
        super().__init__()
        self.model = model
        self.activation_checkpointing = activation_checkpointing
        self.contrastive_weight = contrastive_weight
        self.temperature = temperature
        self.head = ContrastiveHead(model.token_emb.word_embeddings.embedding_dim) if contrastive_weight > 0 else None

    def _blocks(self, blocks, h):
        for blk in blocks:
            if self.activation_checkpointing and self.training:
                h = checkpoint(blk, h, use_reentrant=False)
            else:
                h = blk(h)
        return h

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> ids with the frozen tokenizer; ids pass through."""
        if x.is_floating_point():
            w = self.model.token_emb.word_embeddings.weight
            return self.model.tokenize(x.to(w.dtype))
        return x.long()

    def mlm(self, ids: torch.Tensor):
        """Official masked-token loss for ids (B, L); returns (loss, pooled encoder output (B, D))."""
        m = self.model
        B, L = ids.shape
        drop, allm = m.sample_masks(B, ids.device)
        inp = m._with_class_slot(torch.where(allm, m.mask_token_label, ids), m.fake_class_label)
        drop, allm = m._with_class_slot(drop, False), m._with_class_slot(allm, False)
        keep = keep_index(drop, L + 1 - math.ceil(L * m.mask_ratio_min))  # (B, K)
        h = m.token_emb(torch.gather(inp, 1, keep), positions=keep)
        h = m.norm(self._blocks(m.blocks, h))  # (B, K, D)
        x = scatter_tokens(m.decoder_embed(h), keep, allm, m.decoder_pos_embed_learned)  # (B, L+1, Dd)
        x = m.decoder_norm(self._blocks(m.decoder_blocks, x))
        # only the code columns at the image positions: all the loss reads (the official model
        # also computes the 1000 legacy-class and [MASK] columns and the class slot, then drops them)
        logits = m.mlm_layer(x[:, 1:], m.token_emb.word_embeddings.weight.detach(), num_outputs=m.codebook_size)
        loss = masked_ce(logits, ids, allm[:, 1:].float(), m.label_smoothing)
        return loss, h[:, 1:].mean(dim=1)

    def forward(self, batch: torch.Tensor):
        if self.head is None:
            loss, _ = self.mlm(self.tokens(batch))
            return loss, {"loss": loss.detach(), "mlm_loss": loss.detach()}
        if batch.dim() < 3 or batch.shape[1] != 2:
            raise ValueError(f"MAGE-C needs two views per sample, (B, 2, ...); got {tuple(batch.shape)}")
        B = batch.shape[0]
        ids = self.tokens(batch.flatten(0, 1)).view(B, 2, -1)
        l1, p1 = self.mlm(ids[:, 0])
        l2, p2 = self.mlm(ids[:, 1])
        mlm = (l1 + l2) / 2
        con = info_nce(self.head(p1), self.head(p2), self.temperature)
        loss = mlm + self.contrastive_weight * con
        return loss, {"loss": loss.detach(), "mlm_loss": mlm.detach(), "contrastive_loss": con.detach()}
