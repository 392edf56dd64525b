"""The contract between the sampling loop and a decoding mode.

A decoding mode (:class:`DecodingMode`) builds, once per decoding run, a :class:`NetworkPass`: the
callable the loop runs at every step to get code logits, which also turns the final ids into
pixels. :class:`mage_fast.decoding.DecodeMode` is the built-in mode; any object with the same
``build`` is one too, and so is a factory (a class or a function) called as ``build`` would be,
once it is registered (:data:`mage_fast.decoding.MODES`).
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class NetworkPass(Protocol):
    """One decoding run's network pass.

    ``pass_(ids, class_tokens, i)``: ids (B, L) with the mask id where unknown, class_tokens (B,)
    vocabulary ids of the class slot or None (the fake class), ``i`` the run step -> (B, L, C)
    code logits (rows of known positions are ignored). Every shape it uses should follow from the
    mask counts it was built with, so the loop holds no host sync.

    ``pass_.decode_images(ids, chunk)``: the final ids (B, L) -> images (B, 3, S, S) fp32,
    ``chunk`` images per tokenizer call (None: all at once); the exact one is
    ``model.decode_tokens(ids, chunk)``.
    """

    def __call__(self, ids: torch.Tensor, class_tokens: Optional[torch.Tensor], i: int) -> torch.Tensor:
        ...

    def decode_images(self, ids: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        ...


@runtime_checkable
class DecodingMode(Protocol):
    """A strategy for the network pass: ``build(model, masked_before, keys, draws)`` -> a
    :class:`NetworkPass` for one run.

    - ``masked_before``: masked tokens at the input of each run step (from the schedule).
    - ``keys``: (B,) per-image random keys (``rng="torch"``), else None.
    - ``draws``: per run step, ``(schedule step, noise scale)`` of the sampler's confidence draw
      where it is known in advance (``rng="torch"``, confidence order), else None.
    """

    def build(self, model, masked_before: Sequence[int], keys: Optional[torch.Tensor] = None,
              draws: Optional[Sequence[tuple]] = None) -> NetworkPass:
        ...
