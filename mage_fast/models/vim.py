"""VIM stage 2 (Yu et al. 2022): a decoder-only causal transformer over image tokens.

The input sequence is ``[class, t_0, ..., t_{L-2}]`` (the class prefix token, then the image
tokens shifted right) with learned position embeddings; the output at position i predicts
``t_i``, trained by next-token cross-entropy. Class ids live after the codes in the input
vocabulary, and one more id, ``uncond_id``, means "no class" (unconditional sampling, and
the label-dropout target for classifier-free use).

Attention goes through :func:`mage_fast.ops.attention` (``causal=True`` for full sequences;
one query against a key/value cache for sampling, where no mask is needed). The cache is the
project's one :class:`~mage_fast.modules.kv_cache.KVCache` (MAGE's cached decoding passes use the
same class), appended to one position per step. Sampling lives in :mod:`mage_fast.vim_sampling`.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules.kv_cache import KVCache
from ..modules.transformer import Attention, Mlp, init_linear_and_layernorm
from ..ops.attention import attention
from .checks import check_token_ids
from .vit_vqgan import count_parameters


class CausalSelfAttention(Attention):
    """Multi-head self-attention, causal; parameter names as :class:`Attention` (qkv, proj)."""

    causal = True

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        """x: (B, N, C) -> (B, N, C). Without ``cache``: causal over the N positions. With
        ``cache`` (a :class:`~mage_fast.modules.kv_cache.KVCache`): the N new positions are
        appended at ``cache.length`` onwards and attend to every written position
        (:meth:`Attention.attend_cached`); N > 1 only when the cache is empty (a prefill)."""
        if cache is not None:
            return self.attend_cached(x, cache, layer, dropout=True)
        B, N, C = x.shape
        q, k, v = self._qkv(x)  # 3 x (B, H, N, d)
        p = self.attn_drop.p if self.training else 0.0
        o = attention(q, k, v, dropout_p=p, causal=True, scale=self.scale)
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(B, N, C)))


class CausalBlock(nn.Module):
    """Pre-norm transformer block with causal attention (norm1, attn.qkv/proj, norm2, mlp.fc1/fc2)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = CausalSelfAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=drop, proj_drop=drop)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


class VIM(nn.Module):
    """Decoder-only, class-conditional autoregressive transformer over VQ tokens.

    Args:
        seq_len: L, image tokens per image (e.g. 256 for a 16x16 grid). Derived from
            ``tokenizer`` and ``img_size`` when a tokenizer is given.
        codebook_size: K, code ids ``[0, K)``. Derived from ``tokenizer`` when given.
        num_classes: class labels ``[0, num_classes)``; input ids ``K + label``; ``uncond_id``
            ``K + num_classes`` means no class. Default 1000.
        embed_dim, depth, num_heads, mlp_ratio: the transformer (default ViT-B sized).
        dropout: residual and attention dropout in training; default 0.1.
        class_dropout_prob: probability that a training label is replaced by ``uncond_id``
            (so one model samples both ways); default 0.1.
        label_smoothing: cross-entropy label smoothing; default 0.0.
        tokenizer: optional frozen tokenizer with the ``VQModel`` interface (e.g. a ViT-VQGAN),
            stored as ``tokenizer`` for :meth:`tokenize` and image decoding.
        img_size: image side for the tokenizer (default ``tokenizer.resolution``).

    Example:
        >>> m = VIM(seq_len=16, codebook_size=64, num_classes=10, embed_dim=32, depth=2, num_heads=2)
        >>> loss, logits = m(torch.randint(0, 64, (3, 16)), torch.tensor([1, 2, 3]))
        >>> logits.shape
        torch.Size([3, 16, 64])
    """

    def __init__(self, seq_len: Optional[int] = None, codebook_size: Optional[int] = None, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 dropout: float = 0.1, class_dropout_prob: float = 0.1, label_smoothing: float = 0.0,
                 tokenizer: Optional[nn.Module] = None, img_size: Optional[int] = None):
        super().__init__()
        if tokenizer is not None:
            img_size = img_size or tokenizer.resolution
            grid = img_size // tokenizer.downsample
            derived = dict(seq_len=grid * grid, codebook_size=tokenizer.n_embed)
            for name, given in (("seq_len", seq_len), ("codebook_size", codebook_size)):
                if given is not None and given != derived[name]:
                    raise ValueError(f"{name}={given} contradicts the tokenizer's {derived[name]}")
            seq_len, codebook_size = derived["seq_len"], derived["codebook_size"]
            for p in tokenizer.parameters():
                p.requires_grad = False
            self.token_grid = grid
        elif seq_len is None or codebook_size is None:
            raise ValueError("give seq_len and codebook_size, or a tokenizer to derive them from")
        else:
            side = int(round(seq_len ** 0.5))
            self.token_grid = side if side * side == seq_len else None
        if seq_len < 1 or codebook_size < 1 or num_classes < 0:
            raise ValueError(f"need seq_len >= 1, codebook_size >= 1, num_classes >= 0; got {seq_len}, "
                             f"{codebook_size}, {num_classes}")
        self.tokenizer = tokenizer
        self.img_size = img_size
        self.seq_len, self.codebook_size, self.num_classes = seq_len, codebook_size, num_classes
        self.uncond_id = codebook_size + num_classes
        self.vocab_size = self.uncond_id + 1
        self.embed_dim, self.depth, self.num_heads = embed_dim, depth, num_heads
        self.class_dropout_prob, self.label_smoothing = class_dropout_prob, label_smoothing
        self.config = dict(seq_len=seq_len, codebook_size=codebook_size, num_classes=num_classes,
                           embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                           dropout=dropout, class_dropout_prob=class_dropout_prob, label_smoothing=label_smoothing)

        self.tok_emb = nn.Embedding(self.vocab_size, embed_dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, seq_len, embed_dim))
        self.drop = nn.Dropout(dropout)
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList([CausalBlock(embed_dim, num_heads, mlp_ratio, drop=dropout, norm_layer=norm)
                                     for _ in range(depth)])
        self.norm = norm(embed_dim)
        self.head = nn.Linear(embed_dim, codebook_size)
        self._init_weights()

    def _init_weights(self):
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.02)
        init_linear_and_layernorm(self, skip_prefix="tokenizer")

    def num_parameters(self, trainable_only: bool = False, include_tokenizer: bool = False) -> int:
        """Parameter count of the stage-2 model (``include_tokenizer`` adds the frozen tokenizer's)."""
        n = count_parameters(self, trainable_only)
        if self.tokenizer is not None and not include_tokenizer and not trainable_only:
            n -= count_parameters(self.tokenizer)
        return n

    # ------------------------------------------------------------------ ids
    def class_ids(self, labels: Optional[torch.Tensor], batch_size: int, device) -> torch.Tensor:
        """Labels (B,) in ``[0, num_classes)`` (or -1 for "no class"), or ``None`` -> prefix ids (B,)."""
        if labels is None:
            return torch.full((batch_size,), self.uncond_id, dtype=torch.long, device=device)
        labels = torch.as_tensor(labels, device=device).long().view(-1)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.shape != (batch_size,):
            raise ValueError(f"expected {batch_size} labels, got shape {tuple(labels.shape)}")
        if labels.numel() and (int(labels.min()) < -1 or int(labels.max()) >= self.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.num_classes}) or be -1 (no class), got values "
                             f"in [{int(labels.min())}, {int(labels.max())}]")
        return torch.where(labels < 0, self.uncond_id, self.codebook_size + labels)

    @torch.no_grad()
    def tokenize(self, imgs: torch.Tensor) -> torch.Tensor:
        """Images (B, C, S, S) in [0, 1] -> code ids (B, L) int64 with the stored tokenizer."""
        if self.tokenizer is None:
            raise RuntimeError("this VIM has no tokenizer; build it with tokenizer=...")
        _, _, (_, _, idx) = self.tokenizer.encode(imgs)
        return idx.view(imgs.shape[0], -1).long()

    @torch.no_grad()
    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Code ids (B, L) -> images with the stored tokenizer (not clamped)."""
        if self.tokenizer is None or self.token_grid is None:
            raise RuntimeError("this VIM has no tokenizer; build it with tokenizer=...")
        g, B = self.token_grid, tokens.shape[0]
        q = self.tokenizer.quantize
        return self.tokenizer.decode(q.get_codebook_entry(tokens.reshape(-1), (B, g, g, q.e_dim)))

    # ------------------------------------------------------------------ network
    def _embed(self, ids: torch.Tensor, start: int = 0) -> torch.Tensor:
        n = ids.shape[1]
        return self.drop(self.tok_emb(ids) + self.pos_emb[:, start:start + n])

    def hidden_states(self, ids: torch.Tensor, num_layers: Optional[int] = None) -> torch.Tensor:
        """Input ids (B, N <= L) (prefix first) -> features (B, N, D) after ``num_layers`` blocks
        (default all, then the final norm)."""
        h = self._embed(ids)
        for blk in self.blocks[:num_layers]:
            h = blk(h)
        return self.norm(h) if num_layers is None else h

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Input ids (B, N <= L) -> next-token code logits (B, N, K), full causal pass, no cache."""
        if ids.shape[1] > self.seq_len:
            raise ValueError(f"at most {self.seq_len} input positions, got {ids.shape[1]}")
        return self.head(self.hidden_states(ids))

    def new_cache(self, batch_size: int, device=None, dtype: Optional[torch.dtype] = None) -> KVCache:
        """An empty :class:`~mage_fast.modules.kv_cache.KVCache` for ``batch_size`` sequences of the
        full length L: per-layer (B, H, L, d) keys and values, ``torch.empty``, ``length`` 0."""
        w = self.head.weight
        return KVCache(self.depth, batch_size, self.num_heads, self.seq_len, self.embed_dim // self.num_heads,
                       device=w.device if device is None else device, dtype=dtype or w.dtype)

    def step(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Cached pass: ids (B, N) at positions ``cache.length ...`` (N > 1 only on an empty cache)
        -> code logits (B, K) at the last new position; advances ``cache.length`` by N."""
        start, n = cache.length, ids.shape[1]
        if start + n > self.seq_len:
            raise ValueError(f"sequence would exceed {self.seq_len} positions")
        h = self._embed(ids, start)
        for i, blk in enumerate(self.blocks):
            h = blk(h, cache, i)
        cache.advance(n)
        return self.head(self.norm(h[:, -1]))

    def inputs(self, tokens: torch.Tensor, labels: Optional[torch.Tensor]) -> torch.Tensor:
        """Image tokens (B, L) and labels -> the input sequence ``[class, t_0 .. t_{L-2}]`` (B, L)."""
        return torch.cat([self.class_ids(labels, tokens.shape[0], tokens.device).view(-1, 1), tokens[:, :-1]], 1)

    def forward(self, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None):
        """Teacher-forced training pass.

        Args:
            tokens: (B, L) int64 code ids in ``[0, codebook_size)``.
            labels: (B,) class labels in ``[0, num_classes)``, -1 entries for "no class", or
                ``None`` (all unconditional). In training mode each label is replaced by "no
                class" with probability ``class_dropout_prob``.

        Returns:
            (loss, logits): the mean next-token cross-entropy (fp32) and logits (B, L, K).
        """
        if tokens.dim() != 2 or tokens.shape[1] != self.seq_len:
            raise ValueError(f"expected tokens (B, {self.seq_len}), got {tuple(tokens.shape)}")
        check_token_ids(tokens, self.codebook_size, "image tokens")
        ids = self.inputs(tokens, labels)
        if self.training and self.class_dropout_prob > 0 and labels is not None:
            drop = torch.rand(ids.shape[0], device=ids.device) < self.class_dropout_prob
            ids[:, 0] = torch.where(drop, self.uncond_id, ids[:, 0])
        logits = self.logits(ids)
        loss = F.cross_entropy(logits.float().reshape(-1, self.codebook_size), tokens.reshape(-1),
                               label_smoothing=self.label_smoothing)
        return loss, logits

    @torch.no_grad()
    def probe_features(self, tokens: torch.Tensor, layer: int, labels: Optional[torch.Tensor] = None,
                       norm: bool = True) -> torch.Tensor:
        """VIM linear-probe features: the token features after block ``layer`` (1..depth), averaged
        over the image-token positions (the L-1 inputs after the prefix), then a LayerNorm without
        affine parameters if ``norm``.

        Args:
            tokens: (B, L) code ids. labels: prefix labels (default ``None``: the "no class" id, as
                for features of unlabelled images).

        Returns:
            (B, embed_dim) features.

        Example:
            >>> feats = vim.probe_features(vim.tokenize(imgs), layer=vim.depth // 2)  # doctest: +SKIP
        """
        if not 1 <= layer <= self.depth:
            raise ValueError(f"layer must be in [1, {self.depth}], got {layer}")
        check_token_ids(tokens, self.codebook_size, "image tokens")
        h = self.hidden_states(self.inputs(tokens, labels), num_layers=layer)[:, 1:]
        if h.shape[1] == 0:
            raise ValueError("probe features need seq_len >= 2")
        f = h.float().mean(dim=1)
        return F.layer_norm(f, f.shape[-1:], eps=1e-6) if norm else f


def vim_tiny(**kwargs) -> VIM:
    """CPU-sized VIM: width 64, 4 blocks, 4 heads (the width of ``mage_vit_tiny``'s encoder and its
    encoder + decoder block count)."""
    cfg = dict(embed_dim=64, depth=4, num_heads=4)
    cfg.update(kwargs)
    return VIM(**cfg)


def vim_base(**kwargs) -> VIM:
    """ViT-B-sized VIM: width 768, 20 blocks, 12 heads (MAGE ViT-B's 12 encoder + 8 decoder blocks
    at width 768, so the two stage-2 models match in size)."""
    cfg = dict(embed_dim=768, depth=20, num_heads=12)
    cfg.update(kwargs)
    return VIM(**cfg)

