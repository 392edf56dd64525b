"""Truncating the distribution a token is drawn from: top-k and top-p (nucleus) filtering.

MAGE's iterative decoding (``generate(top_k=, top_p=)``, the CLI's ``--top-k`` / ``--top-p``) and
VIM's autoregressive sampler (:mod:`mage_fast.vim_sampling`) filter the logits with the same
function before the Gumbel-max draw. A model trained with label smoothing spreads its smoothing mass
over every code, so without a filter a share of the drawn tokens come from that flat tail.
"""
from __future__ import annotations

from typing import Optional

import torch


def checked_settings(top_k, top_p) -> tuple[Optional[int], Optional[float]]:
    """``(top_k, top_p)`` checked and normalised: ``top_k`` an integer >= 1, ``top_p`` a number in
    (0, 1], each or both None; anything else raises :class:`~mage_fast.models.checks.InputError`
    naming it (a float is never rounded into ``top_k``)."""
    import numbers

    from ..models.checks import InputError, check_number
    if top_k is not None:
        check_number(top_k, "top_k", lo=1, integer=True)
        top_k = int(top_k)
    if top_p is not None:
        if not (isinstance(top_p, numbers.Real) and not isinstance(top_p, bool) and 0 < top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {top_p!r}")
        top_p = float(top_p)
    return top_k, top_p


def filter_logits(logits: torch.Tensor, top_k: Optional[int] = None, top_p: Optional[float] = None) -> torch.Tensor:
    """Top-k then top-p (nucleus) filtering: excluded entries become ``-inf``.

    Args:
        logits: (..., K) float.
        top_k: keep the ``top_k`` largest logits per row (entries tied with the k-th are kept);
            ``None`` keeps all.
        top_p: keep the smallest set of largest-probability entries whose mass reaches ``top_p``
            (the most likely entry always stays); ``None`` or 1.0 keeps all.

    Returns:
        (..., K) logits with the excluded entries at ``-inf``.

    Example:
        >>> filter_logits(torch.tensor([[3.0, 1.0, 2.0]]), top_k=2)
        tensor([[3., -inf, 2.]])
    """
    K = logits.shape[-1]
    if top_k is not None and top_k < K:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # (..., K) mass of the entries ranked above
        drop = torch.zeros_like(mass_before, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def token_filter(top_k: Optional[int], top_p: Optional[float]):
    """``logits -> filtered fp32 logits`` for :func:`filter_logits` with these settings, or None when
    they keep every entry."""
    if top_k is None and (top_p is None or top_p >= 1.0):
        return None

    def apply(logits: torch.Tensor) -> torch.Tensor:
        return filter_logits(logits.float(), top_k, top_p)  # precision raised: filtering in fp32
    return apply
