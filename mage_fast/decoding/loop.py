"""The one sampling loop: at each step the mode's network pass, then the re-masking rule.

Modes (:mod:`.modes`) decide what the pass computes, re-masking rules (:mod:`.remask`) what a step
keeps; the loop is the same for every pair and holds no host sync of its own, so with a rule that
holds none (``rng="torch"``) the whole loop traces as one graph.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch

from .protocol import NetworkPass
from .remask import Remask


def cfg_logits(model, ids, class_tokens, scale: float, code_logits=None):
    """Classifier-free guidance: one batched pass over (conditional, unconditional);
    returns ``l_c + scale * (l_c - l_u)`` (scale 0 = plain conditional). ``code_logits(ids,
    class_tokens)`` is the network pass (default ``model.code_logits``)."""
    code_logits = code_logits or model.code_logits
    if scale == 0.0:
        return code_logits(ids, class_tokens)
    fake = torch.full_like(class_tokens, model.fake_class_label)
    both = code_logits(torch.cat([ids, ids]), torch.cat([class_tokens, fake]))
    cond, uncond = both.float().chunk(2)
    return cond + scale * (cond - uncond)


def decode_run(model, network_pass: NetworkPass, ids: torch.Tensor, steps: Iterable[int], remask: Remask, *,
               num_iter: int, autocast, class_tokens: Optional[torch.Tensor] = None,
               guidance: Callable[[float], float] = lambda r: 0.0, record: Optional[list] = None,
               token_filter: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """Decode from ``ids`` (B, L) over the schedule ``steps``: at run step i (schedule step t) the
    pass ``network_pass(ids, class_tokens, i)`` under ``autocast`` (with classifier-free guidance
    ``guidance((t+1)/T)`` when ``class_tokens`` is given), then ``token_filter`` (top-k / top-p,
    :mod:`.token_filter`) when given, then ``remask.step``. Returns (sampled, ids); ``record``
    collects (ids, sampled) after each step."""
    sampled = ids
    for i, t in enumerate(steps):
        with autocast:
            if class_tokens is None:
                logits = network_pass(ids, None, i)
            else:
                logits = cfg_logits(model, ids, class_tokens, guidance((t + 1) / num_iter),
                                    lambda x, c, i=i: network_pass(x, c, i))
        if token_filter is not None:
            logits = token_filter(logits)
        sampled, ids = remask.step(logits, ids, t, i)
        if record is not None:
            record.append((ids, sampled))
    return sampled, ids
