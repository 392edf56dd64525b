"""The sampler's earlier home, kept so ``from mage_fast.sampling import ...`` goes on working.

Everything here lives in :mod:`mage_fast.decoding` now: ``generate`` (:mod:`.decoding.generate`),
the schedules (:mod:`.decoding.schedule`), the loop (:mod:`.decoding.loop`), the re-masking rules
(:mod:`.decoding.remask`), the official sampler (:mod:`.decoding.official`) and the settings
(:class:`.decoding.SamplingConfig`). The pixel decode is the model's ``decode_tokens``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .decoding.config import ORDERS, RNG_MODES, SamplingConfig
from .decoding.generate import generate
from .decoding.loop import cfg_logits, decode_run
from .decoding.official import official_gen_image
from .decoding.remask import ConfidenceRemask, HaltonRemask, OfficialRemask
from .decoding.schedule import (GUIDANCE_SCHEDULES, SCHEDULES, TEMPERATURE_ANNEALING, mask_schedule, noise_scale,
                                schedule_from)


def decode_loop(model, net, ids: torch.Tensor, steps, *, num_iter: int, mask_lens, temperature: float, anneal,
                rng: str, keys: Optional[torch.Tensor], ac, class_tokens: Optional[torch.Tensor] = None,
                guidance=lambda r: 0.0, record: Optional[list] = None, rank: Optional[torch.Tensor] = None):
    """:func:`mage_fast.decoding.loop.decode_run` with the re-masking rule given by its settings
    (``rng``; ``rank``: the Halton order), as this function took them before the rules were
    objects. ``mask_lens``: masked tokens after each run step."""
    if rng == "official":
        remask = OfficialRemask(num_iter, temperature, model.mask_token_label, model.seq_len)
    elif rank is not None:
        remask = HaltonRemask(keys, mask_lens, rank, model.mask_token_label)
    else:
        remask = ConfidenceRemask(keys, mask_lens, temperature, anneal, num_iter, model.mask_token_label)
    return decode_run(model, net, ids, steps, remask, num_iter=num_iter, autocast=ac, class_tokens=class_tokens,
                      guidance=guidance, record=record)


__all__ = ["GUIDANCE_SCHEDULES", "ORDERS", "RNG_MODES", "SCHEDULES", "TEMPERATURE_ANNEALING", "SamplingConfig",
           "cfg_logits", "decode_loop", "generate", "mask_schedule", "noise_scale", "official_gen_image",
           "schedule_from"]
