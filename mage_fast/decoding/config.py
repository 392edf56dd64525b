"""The settings of one sampling run, checked once: :class:`SamplingConfig`.

``generate``, ``inpaint`` / ``outpaint`` / ``edit``, the command line and the run manifest
(``run.json``) all take their sampling settings from one of these.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ..models.checks import InputError, check_number
from .modes import mode_name, resolve_mode
from .schedule import GUIDANCE_SCHEDULES, SCHEDULES, TEMPERATURE_ANNEALING, lookup

# The sampler's random numbers, which decide how a step samples and re-masks (generate's ``rng=``,
# the CLI's --rng): "official" = the official code's global generators, "torch" = counter-based.
SAMPLERS = ("official", "torch")
RNG_MODES = SAMPLERS
# Which masked tokens each step fixes: the most confident (official), or a fixed Halton order.
ORDERS = ("confidence", "halton")
OFFICIAL_ONLY = ("rng='official' reproduces the official unconditional sampler only; use rng='torch' for "
                 "other schedules, annealing, orders, top-k / top-p, class conditioning or partial starts")
# The run manifest's names for the settings (as the CLI's flags; run.json of earlier runs uses them).
_MANIFEST_NAMES = {"num_iter": "num_iter", "temperature": "temperature", "seed": "seed", "sampler": "rng",
                   "schedule": "schedule", "temperature_annealing": "temperature_annealing",
                   "guidance_scale": "guidance", "guidance_schedule": "guidance_schedule", "mode": "mode",
                   "order": "order", "top_k": "top_k", "top_p": "top_p"}
# Recorded only when set, so the manifests of runs without a token filter read as before.
_MANIFEST_WHEN_SET = ("top_k", "top_p")


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample: checked when made (an :class:`mage_fast.InputError` naming the setting), so
    whoever holds one holds valid settings. The defaults are the official script's.

    Attributes:
        num_iter: decoding steps T.
        temperature: confidence-noise temperature, >= 0.
        seed: random seed (< 2**32 with the official sampler, whose NumPy seeds are 32-bit).
        sampler: ``"official"`` (the official code's numbers exactly) or ``"torch"`` (counter-based,
            image i depends only on the seed and i): ``generate``'s ``rng=``, the CLI's ``--rng``.
        schedule: mask schedule, a key of :data:`.schedule.SCHEDULES`.
        temperature_annealing: a key of :data:`.schedule.TEMPERATURE_ANNEALING`.
        guidance_scale: classifier-free guidance ``s`` >= 0 (needs class labels when > 0).
        guidance_schedule: a key of :data:`.schedule.GUIDANCE_SCHEDULES`.
        order: ``"confidence"`` or ``"halton"`` (``sampler="torch"`` only).
        mode: the network pass: a name in :data:`mage_fast.decoding.MODES`, a spec, or a
            :class:`.protocol.DecodingMode`.
        top_k: draw each token from the ``top_k`` most likely codes only (``None``: all).
        top_p: draw each token from the smallest set of most likely codes whose probability reaches
            ``top_p`` (nucleus; ``None`` or 1.0: all). Both filter the logits after guidance, before
            the draw and the confidence (:mod:`.token_filter`); ``sampler="torch"`` only.
    """
    num_iter: int = 12
    temperature: float = 4.5
    seed: int = 0
    sampler: str = "official"
    schedule: str = "cosine"
    temperature_annealing: str = "linear"
    guidance_scale: float = 0.0
    guidance_schedule: str = "constant"
    order: str = "confidence"
    mode: Any = "exact"
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise InputError(f"rng must be one of {SAMPLERS}, got {self.sampler!r}")
        # never rounded: seed=1.5 is refused, not taken for seed 1 (NumPy's seeds are 32-bit)
        check_number(self.seed, "seed", lo=0, hi=2 ** 32 - 1 if self.sampler == "official" else None, integer=True)
        check_number(self.num_iter, "num_iter", lo=1, integer=True)
        check_number(self.temperature, "temperature", lo=0)
        check_number(self.guidance_scale, "guidance_scale", lo=0)
        object.__setattr__(self, "seed", int(self.seed))
        object.__setattr__(self, "num_iter", int(self.num_iter))
        from .token_filter import checked_settings
        top_k, top_p = checked_settings(self.top_k, self.top_p)
        object.__setattr__(self, "top_k", top_k)
        object.__setattr__(self, "top_p", top_p)
        lookup(TEMPERATURE_ANNEALING, self.temperature_annealing, "temperature annealing")
        lookup(GUIDANCE_SCHEDULES, self.guidance_schedule, "guidance schedule")
        lookup(SCHEDULES, self.schedule, "mask schedule")
        if self.order not in ORDERS:
            raise InputError(f"order must be one of {ORDERS}, got {self.order!r}")
        if self.sampler == "official" and not self.official_options:
            raise InputError(OFFICIAL_ONLY)
        object.__setattr__(self, "_mode", resolve_mode(self.mode))

    @property
    def official_options(self) -> bool:
        """Whether the settings are the official sampler's (the only ones ``sampler="official"`` runs)."""
        return (self.schedule == "cosine" and self.temperature_annealing == "linear" and self.order == "confidence"
                and self.token_filter is None)

    @property
    def token_filter(self):
        """``logits -> logits`` applying ``top_k`` / ``top_p``, or None when they keep every code."""
        from .token_filter import token_filter
        return token_filter(self.top_k, self.top_p)

    @property
    def decoding_mode(self):
        """``mode`` resolved to a :class:`.protocol.DecodingMode`."""
        return self._mode

    @property
    def anneal(self):
        return TEMPERATURE_ANNEALING[self.temperature_annealing]

    def guidance(self, r: float) -> float:
        """The guidance scale at step ratio ``r`` = (t+1)/T."""
        return self.guidance_scale * GUIDANCE_SCHEDULES[self.guidance_schedule](r)

    def replace(self, **changes) -> "SamplingConfig":
        """A copy with ``changes``, checked as a new one."""
        return dataclasses.replace(self, **changes)

    def manifest_settings(self, names=None) -> dict:
        """The settings as the run manifest records them (the CLI's names: ``rng``, ``guidance``);
        ``names``: only these (manifest names)."""
        out = {}
        for field, key in _MANIFEST_NAMES.items():
            value = getattr(self, field)
            if field == "mode" and not isinstance(value, str):
                value = mode_name(self._mode)
            if field in _MANIFEST_WHEN_SET and value is None:
                continue
            if names is None or key in names:
                out[key] = value
        return out
