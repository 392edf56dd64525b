"""Autoregressive sampling for VIM: one token per network pass, with or without a key/value cache.

Random numbers are counter-based (the hash of :mod:`mage_fast.ops.decode_step`): the Gumbel noise
for image i, step t and code c is a pure function of (key_i, t, c), where key_i comes from
:func:`mage_fast.ops.image_keys` (seed, global image index). So an image does not depend on the
batch it is in, no generator state lives in the loop, and the cached and uncached samplers draw
the very same numbers: with equal logits they choose equal tokens.

A token is drawn by the Gumbel-max trick on the filtered, temperature-scaled logits:
``argmax(filter(logits / T) + g)``, which samples from ``softmax(filter(logits / T))``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .decoding.token_filter import filter_logits
from .ops.decode_step import counter_uniform, gumbel_from_uniform, image_keys

_STREAM_VIM = 0x3C6EF372


def sample_next(logits: torch.Tensor, keys: torch.Tensor, step: int, temperature: float = 1.0,
                top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """One autoregressive draw per row.

    Args:
        logits: (B, K) next-token logits (any float dtype; computed in fp32).
        keys: (B,) int64 per-image random keys in [0, 2^32).
        step: the position being sampled; part of the random-number counter.
        temperature: > 0 scales the logits; 0 takes the argmax (greedy).
        top_k, top_p: see :func:`filter_logits`.

    Returns:
        (B,) int64 token ids.

    Example:
        >>> sample_next(torch.tensor([[0.0, 9.0]]), torch.tensor([3]), 0, temperature=0.0)
        tensor([1])
    """
    B, K = logits.shape
    x = logits.float()  # precision raised: filtering and sampling in fp32
    if temperature == 0:
        return filter_logits(x, top_k, top_p).argmax(dim=-1)
    x = filter_logits(x / temperature, top_k, top_p)
    col = torch.arange(K, device=x.device).view(1, K)
    row = torch.full((1, 1), step, dtype=torch.long, device=x.device)
    g = gumbel_from_uniform(counter_uniform(keys.view(B, 1), _STREAM_VIM, row, col))  # (B, K)
    return torch.argmax(x + g, dim=-1)


def _check_options(temperature, top_k, top_p):
    """InputError (a ValueError) naming the setting, as MAGE's ``SamplingConfig`` does."""
    from .decoding.token_filter import checked_settings
    from .models.checks import check_number
    check_number(temperature, "temperature", lo=0)
    return checked_settings(top_k, top_p)


@torch.no_grad()
def sample_tokens(model, batch_size: int, *, labels: Optional[torch.Tensor] = None, temperature: float = 1.0,
                  top_k: Optional[int] = None, top_p: Optional[float] = None, seed: int = 0, first_index: int = 0,
                  use_cache: bool = True, autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Sample image tokens from a :class:`mage_fast.models.vim.VIM`, one position per network pass.

    Args:
        model: a VIM (put it in eval mode: dropout would make passes random).
        batch_size: images B, sampled together.
        labels: (B,) class labels, one label for all, -1 entries for "no class", or ``None``
            (unconditional: the ``uncond_id`` prefix).
        temperature: logit temperature (0 = greedy); default 1.0.
        top_k, top_p: filtering, see :func:`filter_logits`; default none.
        seed, first_index: image i uses the key of ``(seed, first_index + i)``.
        use_cache: ``True``: L passes of one position each against a key/value cache
            preallocated to the full length. ``False``: L full causal passes over the growing
            prefix (the reference; same random numbers).
        autocast_dtype: run the passes under autocast in this dtype (the cache is kept in it).

    Returns:
        (B, L) int64 token ids.

    Example:
        >>> ids = sample_tokens(vim.eval(), 4, labels=torch.tensor([0, 1, 2, 3]), top_k=100)  # doctest: +SKIP
    """
    top_k, top_p = _check_options(temperature, top_k, top_p)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = model.head.weight.device
    L = model.seq_len
    keys = image_keys(seed, torch.arange(first_index, first_index + batch_size, device=dev))
    ids = torch.zeros(batch_size, L, dtype=torch.long, device=dev)  # [class, t_0 .. t_{L-2}]
    ids[:, 0] = model.class_ids(labels, batch_size, dev)
    out = torch.zeros(batch_size, L, dtype=torch.long, device=dev)
    ac = torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with ac:
        if use_cache:
            cache = model.new_cache(batch_size, dtype=autocast_dtype)
            logits = model.step(ids[:, :1], cache)
        for t in range(L):
            if not use_cache:
                logits = model.logits(ids[:, :t + 1])[:, -1]
            out[:, t] = sample_next(logits, keys, t, temperature, top_k, top_p)
            if t + 1 < L:
                ids[:, t + 1] = out[:, t]
                if use_cache:
                    logits = model.step(ids[:, t + 1:t + 2], cache)
    return out


@torch.no_grad()
def generate(model, batch_size: int, *, return_ids: bool = False, **kwargs):
    """Sample tokens (:func:`sample_tokens`, same keyword arguments) and decode them to images
    with the model's tokenizer: (B, C, S, S), not clamped; then the (B, L) ids if ``return_ids``.

    Example:
        >>> imgs = generate(vim.eval(), 8, temperature=1.0, top_k=512)  # doctest: +SKIP
    """
    ids = sample_tokens(model, batch_size, **kwargs)
    imgs = model.decode_tokens(ids)
    return (imgs, ids) if return_ids else imgs
