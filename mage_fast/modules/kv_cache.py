"""The key/value cache of a stack of attention layers, used by every cached pass in the project.

A :class:`KVCache` holds one key tensor and one value tensor per layer, ``(B, H, S, d)`` each: B
sequences, H heads, S slots, head width d. Rows are written in two ways:

- ``write(layer, slots, k, v)``: F fresh rows per sequence at explicit slots ``(B, F)`` int64, in
  place (a scatter along the slot axis). MAGE's cached decoding passes write this way: a row that
  changed replaces its slot, wherever it is.
- ``write_range(layer, start, k, v)``: the rows at slots ``start .. start+F-1`` of every sequence
  (a slice copy; the same result as ``write`` with those slots). ``append(layer, k, v)`` is
  ``write_range`` at ``length``: VIM's autoregressive steps write this way.

``length`` counts the slots in use, from slot 0; a query of a cached pass attends to slots
``0 .. length-1`` (and to the slots its own pass appends). A pass that appends advances
``length`` once, after every layer has written (:meth:`KVCache.advance`). ``key_mask`` (B, S) bool,
when set, hides the slots that are False from every query (slots reserved for rows not computed
yet); it is shared by the layers and updated once per pass (:meth:`KVCache.reveal`). Hidden
slots must still hold finite numbers (a masked NaN key still makes the softmax NaN):
:meth:`KVCache.at_slots` and :meth:`KVCache.grow` fill them with zeros, whereas a preallocated
cache's unwritten slots hold whatever ``torch.empty`` left, so such a cache is filled by appends
and never reads past ``length``.

The cache only stores. The attention that reads it is the attention module's own
(:meth:`mage_fast.modules.transformer.Attention.attend_cached`), and a block runs its attention,
norms and MLP around it (:meth:`mage_fast.modules.transformer.Block.forward_cached`,
``mage_fast.models.vim.CausalBlock``).

Shapes are checked on the host (no device sync), so a cached pass still traces as one graph and
records into a CUDA graph; slot *values* are not checked, and one out of range is torch's own
index error from the scatter.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch


class KVCacheError(ValueError):
    """A key/value cache write that does not fit the cache: wrong shape, or past its last slot."""


class KVCache:
    """Per-layer keys and values ``k[l]``, ``v[l]`` of shape (B, H, S, d) (see the module docstring).

    ``KVCache(depth, batch_size, num_heads, max_len, head_dim, device, dtype)`` preallocates an
    empty cache (``torch.empty``, ``length`` 0) to be filled by appends;
    :meth:`from_layers` wraps keys and values a full pass computed (every slot in use), and
    :meth:`at_slots` places them at chosen slots of a larger cache.

    Example:
        >>> cache = KVCache(depth=2, batch_size=1, num_heads=2, max_len=8, head_dim=4)
        >>> cache.append(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4))
        3
        >>> cache.k[0].shape, cache.length
        (torch.Size([1, 2, 8, 4]), 0)
    """

    def __init__(self, depth: int, batch_size: int, num_heads: int, max_len: int, head_dim: int,
                 device=None, dtype: torch.dtype = torch.float32):
        if depth < 1 or min(batch_size, num_heads, max_len, head_dim) < 0:
            raise KVCacheError(f"a cache needs depth >= 1 and batch size, heads, slots and head width >= 0; got "
                               f"{depth}, {batch_size}, {num_heads}, {max_len}, {head_dim}")
        shape = (batch_size, num_heads, max_len, head_dim)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(depth)]
        self.length = 0
        self.key_mask: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_layers(cls, ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
                    key_mask: Optional[torch.Tensor] = None) -> "KVCache":
        """A cache holding these per-layer keys and values (B, H, S, d) as they are (not copied),
        every slot in use (``length`` = S)."""
        if not ks or len(ks) != len(vs):
            raise KVCacheError(f"need the same number (>= 1) of key and value tensors, got {len(ks)} and {len(vs)}")
        cache = cls.__new__(cls)
        cache.k, cache.v = list(ks), list(vs)
        shape = tuple(cache.k[0].shape)
        for name, ts in (("key", cache.k), ("value", cache.v)):
            for i, t in enumerate(ts):
                if t.dim() != 4 or tuple(t.shape) != shape:
                    raise KVCacheError(f"layer {i}'s {name}s have shape {tuple(t.shape)}; every layer's keys "
                                       f"and values must be (B, H, S, d) = {shape}")
        cache.length = shape[2]
        cache.key_mask = None
        if key_mask is not None:
            cache._check_mask(key_mask)
            cache.key_mask = key_mask
        return cache

    @classmethod
    def at_slots(cls, ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], index: torch.Tensor, num_slots: int,
                 key_mask: Optional[torch.Tensor] = None) -> "KVCache":
        """A cache of ``num_slots`` slots holding the keys/values (B, H, K, d) of rows at positions
        ``index`` (B, K) at those slots, zeros elsewhere (hide the zeros with ``key_mask``)."""
        def place(c):
            B, H, K, d = c.shape
            return c.new_zeros(B, H, num_slots, d).scatter(2, index.view(B, 1, K, 1).expand(B, H, K, d), c)

        return cls.from_layers([place(c) for c in ks], [place(c) for c in vs], key_mask)

    # ------------------------------------------------------------------ facts
    @property
    def depth(self) -> int:
        return len(self.k)

    @property
    def max_len(self) -> int:
        """S, the number of slots."""
        return self.k[0].shape[2]

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    # ------------------------------------------------------------------ writes
    def _check_rows(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        B, H, _, d = self.k[layer].shape
        for name, t in (("keys", k), ("values", v)):
            if t.dim() != 4 or t.shape[0] != B or t.shape[1] != H or t.shape[3] != d:
                raise KVCacheError(f"{name} to write must be (B, H, F, d) = ({B}, {H}, F, {d}) for this cache, "
                                   f"got {tuple(t.shape)}")
        if k.shape[2] != v.shape[2]:
            raise KVCacheError(f"keys and values to write differ in rows: {k.shape[2]} and {v.shape[2]}")
        return k.shape[2]

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write F rows of keys and values (B, H, F, d) of ``layer`` at ``slots`` (B, F) int64, in place
        (converted to the cache's dtype). Slots are not checked against ``length``."""
        F = self._check_rows(layer, k, v)
        B, H, _, d = k.shape
        if slots.dim() != 2 or tuple(slots.shape) != (B, F):
            raise KVCacheError(f"slots must be (B, F) = ({B}, {F}) for {F} rows, got {tuple(slots.shape)}")
        idx = slots.view(B, 1, F, 1).expand(B, H, F, d)
        self.k[layer].scatter_(2, idx, k.to(self.dtype))
        self.v[layer].scatter_(2, idx, v.to(self.dtype))

    def write_range(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Write F rows of keys and values (B, H, F, d) of ``layer`` at slots ``start .. start+F-1``
        (converted to the cache's dtype); returns ``start + F``."""
        F = self._check_rows(layer, k, v)
        end = start + F
        if start < 0 or end > self.max_len:
            raise KVCacheError(f"cache holds {self.max_len} positions, {end} requested (rows {start}..{end - 1})")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return end

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """:meth:`write_range` at ``length``: the rows go after the slots in use. ``length`` does not
        move until :meth:`advance` (every layer of a pass appends at the same slots). Returns the
        end of the written slots."""
        return self.write_range(layer, self.length, k, v)

    def advance(self, n: int) -> None:
        """Count ``n`` more slots as in use (after a pass appended ``n`` rows to every layer)."""
        if n < 0 or self.length + n > self.max_len:
            raise KVCacheError(f"cache holds {self.max_len} positions, {self.length + n} requested")
        self.length += n

    def grow(self, n: int) -> None:
        """Add ``n`` zero slots at the end of every layer (new tensors) and count them as in use;
        with a ``key_mask``, they start hidden."""
        self.k = [torch.cat([c, c.new_zeros(*c.shape[:2], n, c.shape[3])], 2) for c in self.k]
        self.v = [torch.cat([c, c.new_zeros(*c.shape[:2], n, c.shape[3])], 2) for c in self.v]
        if self.key_mask is not None:
            self.key_mask = torch.cat([self.key_mask, self.key_mask.new_zeros(self.key_mask.shape[0], n)], 1)
        self.length += n

    # ------------------------------------------------------------------ the key mask
    def _check_mask(self, mask: torch.Tensor) -> None:
        B, S = self.k[0].shape[0], self.max_len
        if mask.dtype != torch.bool or tuple(mask.shape) != (B, S):
            raise KVCacheError(f"key_mask must be (B, S) = ({B}, {S}) bool, got {tuple(mask.shape)} {mask.dtype}")

    def reveal(self, slots: torch.Tensor) -> torch.Tensor:
        """Make ``slots`` (B, F) visible to the queries from now on (a new ``key_mask`` tensor, the
        old one is not changed); returns the new mask. Needs a cache with a key mask."""
        if self.key_mask is None:
            raise KVCacheError("this cache has no key mask: every slot is already visible")
        self.key_mask = self.key_mask.scatter(1, slots, True)
        return self.key_mask

    # ------------------------------------------------------------------ reads
    def visible(self, layer: int, end: Optional[int] = None):
        """``(k, v, key_mask)`` of ``layer`` over slots ``0 .. end-1`` (default ``length``): the
        cache's own tensors when that is every slot, else views; ``key_mask`` None when unset."""
        end = self.length if end is None else end
        k, v, mask = self.k[layer], self.v[layer], self.key_mask
        if end != self.max_len:
            k, v = k[:, :, :end], v[:, :, :end]
            mask = None if mask is None else mask[:, :end]
        return k, v, mask
