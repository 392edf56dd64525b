"""Pre-norm ViT block with the official parameter names (norm1, attn.qkv, attn.proj, norm2, mlp.fc1/fc2).

Besides ``forward``, a block runs the cached passes of :mod:`mage_fast.modules.kv_cache`:
``forward_kv`` (every row, returning this layer's keys and values for a cache) and
``forward_cached`` (fresh rows only, written into a :class:`~mage_fast.modules.kv_cache.KVCache`
and attending to it). The attention module owns the attend-against-cache arithmetic
(:meth:`Attention.attend_cached`); nothing outside it splits the qkv projection.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.attention import attention
from ..ops.dropout import Dropout
from ..ops.linear import linear


def apply_linear(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)``; a plain ``nn.Linear`` without hooks goes through :func:`mage_fast.ops.linear.linear`
    (MKL's packed product at inference on a CPU, the same numbers). Any other layer (a quantized
    replacement, one with hooks) is called as it is."""
    if type(layer) is nn.Linear and not (layer._forward_hooks or layer._forward_pre_hooks):
        return linear(x, layer.weight, layer.bias)
    return layer(x)


class Attention(nn.Module):
    causal = False  # CausalSelfAttention (VIM) sets it: its cached passes append, one query per step

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = Dropout(proj_drop)

    def _qkv(self, x):
        B, N, C = x.shape
        qkv = apply_linear(self.qkv, x).view(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)  # 3 x (B, H, N, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        p = self.attn_drop.p if self.training else 0.0
        o = attention(q, k, v, dropout_p=p, scale=self.scale)  # (B, H, N, d)
        return self.proj_drop(apply_linear(self.proj, o.transpose(1, 2).reshape(B, N, C)))

    def forward_kv(self, x: torch.Tensor):
        """x (B, N, C) -> (out (B, N, C), k, v (B, H, N, d)): the output of ``forward`` in eval, with
        the keys and values kept for a :class:`~mage_fast.modules.kv_cache.KVCache`. No dropout,
        whatever the module's mode (the cached decoding passes are inference)."""
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        o = attention(q, k, v, dropout_p=0.0, scale=self.scale)  # (B, H, N, d)
        # the cached passes call proj as a module (F.linear for a plain Linear), here and in
        # attend_cached; forward's apply_linear may take MKL's packed product (equal where it runs)
        return self.proj(o.transpose(1, 2).reshape(B, N, C)), k, v

    def attend_cached(self, x: torch.Tensor, cache, layer: int, slots: Optional[torch.Tensor] = None,
                      dropout: bool = False) -> torch.Tensor:
        """Fresh rows x (B, N, C) of a cached pass -> (B, N, C): their keys and values are written
        into ``cache`` (a :class:`~mage_fast.modules.kv_cache.KVCache`) for ``layer``, and their
        queries attend to the cache's slots in use.

        ``slots`` (B, N) int64: write at these slots (they must be in use, below ``cache.length``);
        None: append after the slots in use (``cache.append``; the caller advances ``cache.length``
        once the pass is done), and the queries also attend to the appended rows. A causal module
        appends only, and several rows (a causal prefill) only on an empty cache.

        The cache's ``key_mask``, when set, hides its False slots: the product then runs as torch's
        ``scaled_dot_product_attention`` with that mask; without one, through
        :func:`mage_fast.ops.attention` (non-causal, or causal for a prefill).
        ``dropout``: apply the module's attention and output dropout when it is training (VIM's
        cached steps do, as its ``forward``); off, the pass is the eval arithmetic in any mode
        (MAGE's cached decoding passes)."""
        B, N, C = x.shape
        causal = False
        if self.causal:
            if slots is not None:
                raise ValueError("a causal attention's cached pass appends; it takes no slots")
            if N > 1 and cache.length:
                raise ValueError("a cached pass takes one new position, or several only on an empty cache")
            causal = N > 1
        q, k, v = self._qkv(x)  # 3 x (B, H, N, d)
        if slots is None:
            end = cache.append(layer, k, v)
        else:
            cache.write(layer, slots, k, v)
            end = cache.length
        kk, vv, key_mask = cache.visible(layer, end)  # (B, H, S, d), (B, S) bool or None
        p = self.attn_drop.p if dropout and self.training else 0.0
        if key_mask is None:
            o = attention(q, kk, vv, dropout_p=p, causal=causal, scale=self.scale)  # (B, H, N, d)
        else:  # False = a slot no query may see (reserved for a row not computed yet)
            o = F.scaled_dot_product_attention(q, kk, vv, attn_mask=key_mask[:, None, None, :], dropout_p=p,
                                               scale=self.scale)
        o = self.proj(o.transpose(1, 2).reshape(B, N, C))
        return self.proj_drop(o) if dropout else o

    def attention_weights(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, N, N) softmax weights, as the official ``return_attention`` gives them."""
        q, k, _ = self._qkv(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            s = (q.float() @ k.float().transpose(-2, -1)) * self.scale
        return s.softmax(dim=-1)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = Dropout(drop)

    def forward(self, x):
        return self.drop(apply_linear(self.fc2, self.drop(self.act(apply_linear(self.fc1, x)))))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, attn_drop: float = 0.0, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> torch.Tensor:
        if return_attention:
            return self.attn.attention_weights(self.norm1(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_kv(self, x: torch.Tensor):
        """x (B, N, C) -> (x', k, v): ``forward`` in eval, keeping this layer's keys and values
        (B, H, N, d) for a :class:`~mage_fast.modules.kv_cache.KVCache`."""
        a, k, v = self.attn.forward_kv(self.norm1(x))
        x = x + a
        return x + self.mlp(self.norm2(x)), k, v

    def forward_cached(self, x: torch.Tensor, cache, layer: int, slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fresh rows x (B, F, C) at ``slots`` (B, F) of ``cache`` (layer ``layer``): their keys and
        values replace those slots and their queries attend to the cache (eval arithmetic, see
        :meth:`Attention.attend_cached`). With caches from ``forward_kv`` on the same input, the
        rows equal ``forward_kv``'s up to rounding."""
        x = x + self.attn.attend_cached(self.norm1(x), cache, layer, slots)
        return x + self.mlp(self.norm2(x))


def init_linear_and_layernorm(module: nn.Module, skip_prefix: str = "") -> None:
    """The ViT/MAE initialisation: xavier-uniform Linear weights, zero biases, unit LayerNorms;
    submodules whose name starts with ``skip_prefix`` (e.g. a frozen tokenizer) are left alone."""
    for name, m in module.named_modules():
        if skip_prefix and name.startswith(skip_prefix):
            continue
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
