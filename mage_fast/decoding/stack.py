"""Transformer-stack passes with a key/value cache, on the model's own ``Block`` modules.

``stack_full`` runs a stack on every row and can return its :class:`~mage_fast.modules.kv_cache.KVCache`
(every layer's keys and values); ``stack_partial`` runs only some rows (the fresh ones): each block
writes their keys/values into the cache at ``slots`` and their queries attend to the cache
(:meth:`mage_fast.modules.transformer.Block.forward_cached`). With a cache taken from the same
input, ``stack_partial`` on any rows gives ``stack_full``'s rows up to rounding.

The arithmetic is the block's own (``Block.forward_kv`` is ``Block.forward`` in eval), so a
quantized copy of the model (int8 Linear layers) runs through the same functions.
"""
from __future__ import annotations

import torch

from ..modules.kv_cache import KVCache


def stack_full(blocks, x: torch.Tensor, keep_kv: bool):
    """Run every block on x (B, N, C). Returns (out, cache): a :class:`KVCache` of N slots holding
    each layer's keys and values (B, H, N, d), or None when ``keep_kv`` is False."""
    ks, vs = [], []
    for blk in blocks:
        x, k, v = blk.forward_kv(x)
        if keep_kv:
            ks.append(k.contiguous())
            vs.append(v.contiguous())
    return x, (KVCache.from_layers(ks, vs) if keep_kv else None)


def stack_partial(blocks, x: torch.Tensor, slots: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run every block on the fresh rows x (B, F, C) at ``slots`` (B, F) of ``cache`` (their queries
    see only the slots where the cache's ``key_mask`` is True, when it has one)."""
    for layer, blk in enumerate(blocks):
        x = blk.forward_cached(x, cache, layer, slots)
    return x


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), index (B, F) -> (B, F, C)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_rows(x: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Out of place: x (B, N, C) with rows (B, F, C) written at index (B, F)."""
    return x.scatter(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]), rows)


__all__ = ["gather_rows", "scatter_rows", "stack_full", "stack_partial"]
