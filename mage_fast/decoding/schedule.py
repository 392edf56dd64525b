"""Schedules of the sampling loop: how many tokens stay masked after each step, how the
confidence noise decays, and how classifier-free guidance grows.

One decoding run follows one :class:`MaskPlan`: ``masked[i]`` tokens are masked at the input of
run step ``i`` and ``masked[i + 1]`` after it. A network pass reads :attr:`MaskPlan.before` (what
it sees), a re-masking rule reads :attr:`MaskPlan.after` (what it leaves masked); they are the same
list shifted by one step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..models.checks import InputError

# Fraction of tokens still masked after a fraction r of the steps (MaskGIT's gamma functions).
SCHEDULES = {
    "cosine": lambda r: math.cos(math.pi / 2.0 * r),  # official
    "linear": lambda r: 1.0 - r,
    "arccos": lambda r: math.acos(min(1.0, r)) / (math.pi / 2.0),
    "square": lambda r: 1.0 - r * r,
    "sqrt": lambda r: 1.0 - math.sqrt(r),
    "exp": lambda r: (math.exp(-6.0 * r) - math.exp(-6.0)) / (1.0 - math.exp(-6.0)),
}
# Multiplier of the confidence-noise temperature at step ratio r.
TEMPERATURE_ANNEALING = {
    "linear": lambda r: 1.0 - r,  # official
    "constant": lambda r: 1.0,
    "cosine": lambda r: math.cos(math.pi / 2.0 * r),
    "none": lambda r: 0.0,
}
GUIDANCE_SCHEDULES = {
    "constant": lambda r: 1.0,
    "linear": lambda r: r,  # guidance grows as tokens are fixed (MUSE style)
}


def lookup(table: dict, name: str, what: str):
    """``table[name]``, or an :class:`InputError` naming the choices."""
    if name not in table:
        raise InputError(f"unknown {what} {name!r}; choose from {sorted(table)}")
    return table[name]


def mask_schedule(num_iter: int, seq_len: int = 256, schedule: str = "cosine") -> list[int]:
    """How many tokens stay masked after each step (the official cosine schedule and clamps):
    ``mask_len_t = clamp(floor(L gamma((t+1)/T)), 1, unknown_t - 1)``.

    >>> mask_schedule(20)[:4], mask_schedule(20)[-1]
    ([255, 252, 248, 243], 1)
    """
    return schedule_from(num_iter, seq_len, seq_len, schedule)[1]


def schedule_from(num_iter: int, seq_len: int, num_unknown: int, schedule: str = "cosine") -> tuple[int, list[int]]:
    """Where to start decoding when ``num_unknown`` of ``seq_len`` tokens are masked, and how many
    stay masked after each remaining step.

    The full schedule masks m_0 = L, m_{t+1} = mask_len_t tokens before each step; decoding starts
    at the last step t0 whose m_t0 >= num_unknown and runs the remaining steps with the official
    clamps. Returns (t0, [mask_len_t0, ..., mask_len_{T-1}]).
    """
    if num_iter < 1:
        raise InputError(f"num_iter must be >= 1, got {num_iter}")
    if not 1 <= num_unknown <= seq_len:
        raise InputError(f"num_unknown must be in [1, {seq_len}], got {num_unknown}")
    gamma = lookup(SCHEDULES, schedule, "mask schedule")

    def target(t):
        return math.floor(seq_len * gamma((t + 1) / num_iter))

    full, unknown = [seq_len], seq_len
    for t in range(num_iter - 1):
        unknown = max(1, min(unknown - 1, target(t)))
        full.append(unknown)
    start = max(t for t in range(num_iter) if full[t] >= num_unknown)
    out, unknown = [], num_unknown
    for t in range(start, num_iter):
        unknown = max(1, min(unknown - 1, target(t)))
        out.append(unknown)
    return start, out


def run_counts(num_unknown: int, mask_lens) -> list[int]:
    """Masked tokens at the input of each step: ``num_unknown``, then the schedule's mask_lens
    (:attr:`MaskPlan.before` of the same run)."""
    return [int(num_unknown)] + [int(m) for m in mask_lens[:-1]]


@dataclass(frozen=True)
class MaskPlan:
    """One decoding run's mask counts: the run starts at schedule step ``start`` of ``num_iter``
    and ``masked[i]`` tokens are masked at the input of its step ``i`` (``masked[-1]`` after the
    last one)."""
    num_iter: int
    start: int
    masked: tuple

    @classmethod
    def make(cls, num_iter: int, seq_len: int, num_unknown: int, schedule: str = "cosine") -> "MaskPlan":
        start, after = schedule_from(num_iter, seq_len, num_unknown, schedule)
        return cls(num_iter, start, (int(num_unknown), *after))

    @property
    def steps(self) -> range:
        """The schedule steps this run takes."""
        return range(self.start, self.num_iter)

    @property
    def before(self) -> list[int]:
        """Masked tokens at the input of each run step (what a network pass sees)."""
        return list(self.masked[:-1])

    @property
    def after(self) -> list[int]:
        """Masked tokens after each run step (what a re-masking rule leaves masked)."""
        return list(self.masked[1:])


def noise_scale(temperature: float, anneal, step: int, num_iter: int) -> float:
    """The confidence-noise scale of schedule step ``step``: the one the sampler uses, and the one
    focus modes predict it with."""
    return temperature * anneal((step + 1) / num_iter)
