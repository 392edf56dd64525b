"""Re-masking rules: what a decoding step does after the network pass.

Each rule is an object with one method, ``step(logits, ids, t, i) -> (sampled, ids)``: ``logits``
(B, L, C) from the network pass on ``ids`` (B, L), ``t`` the schedule step, ``i`` the run step
(``t - plan.start``). It returns the sampled ids and the next state, with the tokens it leaves
masked set to the mask id. The loop (:func:`mage_fast.decoding.loop.decode_run`) is the same for
every rule.

- :class:`ConfidenceRemask`: sample every masked token, keep the most confident ones under
  annealed noise, from counter-based random numbers (``rng="torch"``, the default order).
- :class:`HaltonRemask`: sample, and fix tokens in a fixed Halton order spread over the image.
- :class:`OfficialRemask`: the official step, with torch's and NumPy's global random generators
  (``rng="official"``).
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

import torch

from ..ops.decode_step import decode_step, halton_step
from .official import official_remask
from .schedule import noise_scale


class Remask(Protocol):
    """A re-masking rule (see the module docstring)."""

    def step(self, logits: torch.Tensor, ids: torch.Tensor, t: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def draws(self, steps: Sequence[int]) -> Optional[list]:
        """Per schedule step, ``(step, noise_scale)`` of the rule's confidence draw when it is known
        before the run (focus modes rank rows by it); None when it is not."""
        ...


class ConfidenceRemask:
    """Gumbel-max sampling and confidence re-masking on counter-based random numbers keyed per image
    (:func:`mage_fast.ops.decode_step.decode_step`): no host sync, every shape from ``mask_after``."""

    def __init__(self, keys: torch.Tensor, mask_after: Sequence[int], temperature: float, anneal, num_iter: int,
                 mask_id: int):
        self.keys, self.mask_after, self.mask_id = keys, mask_after, mask_id
        self.temperature, self.anneal, self.num_iter = temperature, anneal, num_iter

    def noise(self, t: int) -> float:
        return noise_scale(self.temperature, self.anneal, t, self.num_iter)

    def step(self, logits, ids, t, i):
        return decode_step(logits, ids, self.keys, t, self.mask_after[i], self.noise(t), self.mask_id)

    def draws(self, steps):
        return [(t, self.noise(t)) for t in steps]


class HaltonRemask:
    """Sampling as :class:`ConfidenceRemask`, fixing tokens in the order ``rank`` (L,) instead of by
    confidence (:func:`mage_fast.ops.decode_step.halton_step`)."""

    def __init__(self, keys: torch.Tensor, mask_after: Sequence[int], rank: torch.Tensor, mask_id: int):
        self.keys, self.mask_after, self.rank, self.mask_id = keys, mask_after, rank, mask_id

    def step(self, logits, ids, t, i):
        return halton_step(logits, ids, self.keys, t, self.mask_after[i], self.rank, self.mask_id)

    def draws(self, steps):
        return None


class OfficialRemask:
    """The official step (:func:`mage_fast.decoding.official.official_remask`), in fp32: its numbers
    come from torch's and NumPy's global generators, so nothing about them is known in advance."""

    def __init__(self, num_iter: int, temperature: float, mask_id: int, seq_len: int):
        self.num_iter, self.temperature, self.mask_id, self.seq_len = num_iter, temperature, mask_id, seq_len

    def step(self, logits, ids, t, i):
        return official_remask(ids, logits.float(), t, self.num_iter, self.temperature, self.mask_id, self.seq_len)

    def draws(self, steps):
        return None
