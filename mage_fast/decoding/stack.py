"""Transformer-stack passes with per-layer key/value caches, on the model's own ``Block`` modules.

``stack_full`` runs a stack on every row and returns each layer's keys and values;
``stack_partial`` runs only some rows (the fresh ones): their keys/values are written into the
caches at ``slots`` and their queries attend to the whole cache. With caches taken from the same
input, ``stack_partial`` on any rows gives ``stack_full``'s rows up to rounding.

The arithmetic is the block's own (same modules, same order as ``Block.forward`` in eval), so a
quantized copy of the model (int8 Linear layers) runs through the same functions.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops.attention import attention


def _attend(blk, x: torch.Tensor, q, k, v, key_mask=None) -> torch.Tensor:
    B, N, C = x.shape
    if key_mask is None:
        o = attention(q, k, v, dropout_p=0.0, scale=blk.attn.scale)  # (B, H, N, d)
    else:  # (B, S) bool, False = an empty cache slot no query may see
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :], scale=blk.attn.scale)
    return blk.attn.proj(o.transpose(1, 2).reshape(B, N, C))


def block_full(blk, x: torch.Tensor):
    """x (B, N, C) -> (x', k, v) with k, v (B, H, N, d): ``Block.forward`` in eval, keeping k/v."""
    q, k, v = blk.attn._qkv(blk.norm1(x))
    x = x + _attend(blk, x, q, k, v)
    return x + blk.mlp(blk.norm2(x)), k, v


def block_partial(blk, x: torch.Tensor, slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  key_mask=None):
    """Fresh rows x (B, F, C) at cache slots (B, F) int64; caches (B, H, S, d) are updated in place.
    ``key_mask`` (B, S) bool: the slots the queries attend to (default: all)."""
    q, k, v = blk.attn._qkv(blk.norm1(x))  # (B, H, F, d)
    B, H, F, d = k.shape
    idx = slots.view(B, 1, F, 1).expand(B, H, F, d)
    k_cache.scatter_(2, idx, k)
    v_cache.scatter_(2, idx, v)
    x = x + _attend(blk, x, q, k_cache, v_cache, key_mask)
    return x + blk.mlp(blk.norm2(x))


def stack_full(blocks, x: torch.Tensor, keep_kv: bool):
    """Run every block on x (B, N, C). Returns (out, ks, vs); ks/vs are lists of (B, H, N, d), or
    empty when ``keep_kv`` is False."""
    ks, vs = [], []
    for blk in blocks:
        x, k, v = block_full(blk, x)
        if keep_kv:
            ks.append(k.contiguous())
            vs.append(v.contiguous())
    return x, ks, vs


def stack_partial(blocks, x: torch.Tensor, slots: torch.Tensor, ks: list, vs: list, key_mask=None) -> torch.Tensor:
    """Run every block on the fresh rows x (B, F, C) at ``slots`` (B, F), against the caches
    (only the slots where ``key_mask`` (B, S) is True, when given)."""
    for blk, k_cache, v_cache in zip(blocks, ks, vs):
        x = block_partial(blk, x, slots, k_cache, v_cache, key_mask)
    return x


def to_slots(c: torch.Tensor, index: torch.Tensor, num_slots: int) -> torch.Tensor:
    """Keys or values c (B, H, K, d) of rows at positions index (B, K) -> a cache (B, H, num_slots, d)
    holding them at those slots and zeros elsewhere."""
    B, H, K, d = c.shape
    return c.new_zeros(B, H, num_slots, d).scatter(2, index.view(B, 1, K, 1).expand(B, H, K, d), c)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), index (B, F) -> (B, F, C)."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_rows(x: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Out of place: x (B, N, C) with rows (B, F, C) written at index (B, F)."""
    return x.scatter(1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]), rows)
