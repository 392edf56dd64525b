"""The MAGE pre-training objective around an unchanged :class:`mage_fast.MAGE`.

``MAGEObjective`` runs the official training forward (same random draws in the same order, so the
same loss as ``MAGE.forward`` under the same seed) from images or from cached token ids, with
optional activation checkpointing of the transformer blocks and the optional MAGE-C contrastive
loss on the encoder's pooled output over two augmented views.
"""
from __future__ import annotations

import copy
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..decoding.quant import fast_tokenizer
from ..models.checks import check_images
from ..models.mage import MAGE


class ContrastiveHead(nn.Module):
    """MLP projection (Linear-BN-ReLU-Linear) of the pooled encoder output for MAGE-C."""

    def __init__(self, dim: int, hidden: int = 512, out: int = 128):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.Linear(hidden, out)

    def forward(self, x):
        h, bn = self.fc1(x), self.bn
        if h.dtype == bn.weight.dtype == bn.running_mean.dtype:
            h = bn(h)
        else:  # low-precision training casts parameters, not buffers: normalise in fp32
            if bn.training:
                bn.num_batches_tracked.add_(1)
            h = F.batch_norm(h.float(), bn.running_mean, bn.running_var, bn.weight.float(), bn.bias.float(),
                             bn.training, bn.momentum, bn.eps)
        return self.fc2(F.relu(h).to(self.fc2.weight.dtype))


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
    tokenizer); with MAGE-C one more dimension of size 2 after B. ``labels`` (B,) make the step
    class-conditional (``MAGE.class_dropout_prob`` of them fall back to the fake class token).
    """

    def __init__(self, model: MAGE, activation_checkpointing: bool = False, contrastive_weight: float = 0.0,
                 temperature: float = 0.2):
        super().__init__()
        self.model = model
        self.activation_checkpointing = activation_checkpointing
        self.contrastive_weight = contrastive_weight
        self.temperature = temperature
        self.head = ContrastiveHead(model.token_emb.word_embeddings.embedding_dim) if contrastive_weight > 0 else None

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Images -> ids with the frozen tokenizer; ids pass through.

        The ids come from :meth:`fp32_tokenizer`, the tokenizer's fp32 weights in a channels-last copy
        (on the CPU with Winograd convolutions and fused GroupNorm + SiLU), also when a bf16 engine
        has cast the model's own copy: bf16 convolutions would pick other codes. Under ZeRO-3 the
        engine's own (partitioned) tokenizer runs, in the engine's precision."""
        if not x.is_floating_point():
            return x.long()
        if any(hasattr(p, "ds_status") for p in self.model.vqgan.parameters()):
            # ZeRO-3 partitions the tokenizer too and gathers it in hooks around its own forward: a copy
            # would hold empty shards. It runs in the engine's precision there.
            return self.model.tokenize(x.to(self.model.token_emb.word_embeddings.weight.dtype))
        check_images(x, self.model.img_size, check_range=False)  # the tokenizer checks the range
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            _, _, (_, _, idx) = self.fp32_tokenizer().encode(x.float())
        return idx.view(x.shape[0], -1).long()

    def fp32_tokenizer(self) -> nn.Module:
        """The frozen tokenizer in fp32 for :meth:`tokens`: :func:`~mage_fast.decoding.quant.fast_tokenizer`
        of the model, or, when an engine has cast the model to bf16/fp16, a copy built once from the
        fp32 weights :func:`~mage_fast.training.engine.keep_frozen_fp32` kept."""
        vq = self.model.vqgan
        if next(vq.parameters()).dtype == torch.float32:
            return fast_tokenizer(self.model, torch.float32)
        made = self.__dict__.get("_fp32_tokenizer")
        if made is None:
            frozen = self.__dict__.get("_frozen_fp32") or self.model.__dict__.get("_frozen_fp32")
            if frozen is None:
                raise RuntimeError("the tokenizer was cast to a low precision and its fp32 weights were not kept "
                                   "(call mage_fast.training.engine.keep_frozen_fp32 before the cast)")
            prefix = "model.vqgan." if "_frozen_fp32" in self.__dict__ else "vqgan."
            holder = nn.Module()  # fast_tokenizer reads holder.vqgan and caches per holder
            holder.vqgan = copy.deepcopy(vq).float()
            holder.vqgan.load_state_dict({k[len(prefix):]: v for k, v in frozen.items() if k.startswith(prefix)})
            made = self.__dict__["_fp32_tokenizer"] = fast_tokenizer(holder, torch.float32)
            self.__dict__["_fp32_holder"] = holder
        return made

    def mlm(self, ids: torch.Tensor, labels: Optional[torch.Tensor] = None):
        """Official masked-token loss for ids (B, L) (class-conditional with ``labels``); returns
        (loss, pooled encoder output (B, D))."""
        self.model.activation_checkpointing = self.activation_checkpointing
        loss, h, _ = self.model.training_loss(ids, labels=labels)
        return loss, h[:, 1:].mean(dim=1)

    def forward(self, batch: torch.Tensor, labels: Optional[torch.Tensor] = None):
        if self.head is None:
            loss, _ = self.mlm(self.tokens(batch), labels)
            return loss, {"loss": loss.detach(), "mlm_loss": loss.detach()}
        if batch.dim() < 3 or batch.shape[1] != 2:
            raise ValueError(f"MAGE-C needs two views per sample, (B, 2, ...); got {tuple(batch.shape)}")
        B = batch.shape[0]
        ids = self.tokens(batch.flatten(0, 1)).view(B, 2, -1)
        l1, p1 = self.mlm(ids[:, 0], labels)
        l2, p2 = self.mlm(ids[:, 1], labels)
        mlm = (l1 + l2) / 2
        con = info_nce(self.head(p1), self.head(p2), self.temperature)
        loss = mlm + self.contrastive_weight * con
        return loss, {"loss": loss.detach(), "mlm_loss": mlm.detach(), "contrastive_loss": con.detach()}
