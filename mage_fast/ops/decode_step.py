"""One step of MaskGIT/MAGE iterative decoding with counter-based random numbers.

For every position still masked: draw a code from softmax(logits) by Gumbel-max, take
log p(code), add ``noise_scale`` times a second Gumbel draw (the annealed confidence noise);
known positions get +inf. The ``mask_len`` lowest-confidence positions of each row (ties broken
by position) are masked again.

Random numbers are a pure function of (per-image key, step, position, code), a 32-bit
integer hash, so every backend (torch, Triton, C++, CUDA) draws the same numbers, an image never
depends on the batch it is in, and no generator state lives inside the decoding loop.
"""
from __future__ import annotations

import torch

from .dispatch import Op

_M32 = 0xFFFFFFFF
_STREAM_SAMPLE = 0x9E3779B9
_STREAM_CONF = 0x7F4A7C15


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche hash on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _signed32(v: int) -> int:
    return v - (1 << 32) if v >= 1 << 31 else v


_C1, _C2 = _signed32(0x7FEB352D), _signed32(0x846CA68B)


def _mix32_i32(x: torch.Tensor) -> torch.Tensor:
    """:func:`mix32` on int32 tensors holding the same 32 bits (two's complement wrap-around on
    multiply and add; logical shifts by masking): a third of the int64 version's memory traffic."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _C1
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * _C2
    return x ^ ((x >> 16) & 0xFFFF)


def _as_i32(v: torch.Tensor) -> torch.Tensor:
    return (v.to(torch.int64) & _M32).to(torch.int32)  # keeps the low 32 bits


# the largest fp32 below 1 (1 - 2^-24): the bound of every counter-based uniform, in every backend
UNIFORM_MAX = 1.0 - 2.0 ** -24


def counter_uniform(key: torch.Tensor, stream: int, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1), fp32, from 32-bit keys and counters (integer tensors, broadcast together).

    h = mix(mix(mix(key ^ stream) + row) + col) (all mod 2^32); u = min(((h >> 8) + 0.5) / 2^24, 1 - 2^-24).
    The fp32 add rounds to nearest even, so the largest hash, 2^24 - 1 + 0.5, would round to 2^24 and
    give u = 1 exactly (an infinite Gumbel draw); the bound keeps every u below 1 and changes no other.
    """
    h = _mix32_i32(_as_i32(key) ^ _signed32(stream))
    h = _mix32_i32(h + _as_i32(row))
    h = _mix32_i32(h + _as_i32(col))
    u = (((h >> 8) & 0xFFFFFF).to(torch.float32) + 0.5) * (1.0 / 16777216.0)
    return u.clamp_(max=UNIFORM_MAX)


def gumbel_from_uniform(u: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(u))


def decode_step_ref(logits: torch.Tensor, ids: torch.Tensor, key: torch.Tensor, step: int,
                    mask_len: int, noise_scale: float, mask_id: int):
    """Plain-torch decode step.

    logits: (B, N, C) float (any strides); ids: (B, N) int64, ``mask_id`` where unknown;
    key: (B,) int64 in [0, 2^32), one per image. Returns (sampled (B, N), next_ids (B, N)):
    ``sampled`` has every position filled, ``next_ids`` has ``mask_len`` of them re-masked.
    """
    unknown = ids == mask_id
    sample, conf = sample_confidence(logits, unknown, key, step, noise_scale)
    sampled = torch.where(unknown, sample, ids)
    order = torch.sort(conf, dim=1, stable=True).indices[:, :mask_len]  # (B, mask_len)
    remask = torch.zeros_like(unknown).scatter(1, order, True)
    next_ids = torch.where(remask, torch.full_like(ids, mask_id), sampled)
    return sampled, next_ids


def sample_confidence(logits: torch.Tensor, unknown: torch.Tensor, key: torch.Tensor, step: int,
                      noise_scale: float):
    """What a decode step draws, before it re-masks: logits (B, N, C), unknown (B, N) bool ->
    (sample (B, N): a code at every position, conf (B, N): log p(sample) plus the annealed
    confidence noise where unknown, +inf elsewhere). The same random numbers for the same
    (key, step, position), so a caller can predict which positions a step will fix from any logits
    (the cached decoding modes rank stale rows by it, :mod:`mage_fast.decoding`)."""
    B, N, C = logits.shape
    dev = logits.device
    logits = logits.float()  # precision raised: sampling and log-softmax in fp32
    row = (step * N + torch.arange(N, device=dev)).view(1, N, 1)
    sample = _gumbel_sample(logits, key, row)
    logp = logits.gather(-1, sample.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    g2 = gumbel_from_uniform(counter_uniform(key.view(B, 1), _STREAM_CONF, row.view(1, N), torch.zeros(1, 1, dtype=torch.long, device=dev)))
    return sample, torch.where(unknown, logp + noise_scale * g2, torch.full_like(logp, float("inf")))


def _gumbel_sample(logits: torch.Tensor, key: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """Gumbel-max samples (B, N) of every position from counter-based noise keyed by (key, row, code)."""
    B, N, C = logits.shape
    col = torch.arange(C, device=logits.device).view(1, 1, C)
    g = gumbel_from_uniform(counter_uniform(key.view(B, 1, 1), _STREAM_SAMPLE, row, col))  # (B, N, C)
    return torch.argmax(logits + g, dim=-1)


def _sample_codes(logits: torch.Tensor, ids: torch.Tensor, key: torch.Tensor, row: torch.Tensor, mask_id: int):
    """-> (sample (B, N), unknown (B, N) bool, sampled = sample at unknown positions, ids elsewhere)."""
    sample = _gumbel_sample(logits, key, row)
    unknown = ids == mask_id
    return sample, unknown, torch.where(unknown, sample, ids)


decode_step_op = Op("decode_step", decode_step_ref)


def decode_step(logits: torch.Tensor, ids: torch.Tensor, key: torch.Tensor, step: int, mask_len: int,
                noise_scale: float, mask_id: int):
    """Fused sampling + confidence + re-masking for one iterative-decoding step.

    Args:
        logits: (B, N, C) code logits at the N image positions (a strided view is fine).
        ids: (B, N) int64 current ids, ``mask_id`` at unknown positions.
        key: (B,) int64 per-image random key in [0, 2^32) (see :func:`image_keys`).
        step: step number, part of the random-number counter.
        mask_len: how many positions to mask again (0 <= mask_len < number unknown).
        noise_scale: multiplier of the confidence Gumbel noise (``temperature * (1 - ratio)``).
        mask_id: the [MASK] token id.

    Returns:
        ``(sampled, next_ids)``, both (B, N) int64.

    Example:
        >>> ids = torch.full((1, 4), 9); key = torch.tensor([7])
        >>> s, n = decode_step(torch.randn(1, 4, 3), ids, key, 0, 2, 1.0, 9)
        >>> int((n == 9).sum())
        2
    """
    if logits.dim() != 3 or ids.shape != logits.shape[:2] or key.shape != (logits.shape[0],):
        raise ValueError(f"decode_step expects logits (B, N, C), ids (B, N), key (B,); got "
                         f"{tuple(logits.shape)}, {tuple(ids.shape)}, {tuple(key.shape)}")
    if not 0 <= mask_len < logits.shape[1]:
        raise ValueError(f"mask_len must be in [0, {logits.shape[1]}), got {mask_len}")
    return decode_step_op(logits, ids, key, step, mask_len, noise_scale, mask_id)


def image_keys(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Per-image 32-bit keys from a seed and global image indices (B,) int64.

    Each key is drawn from a ``torch.Generator`` seeded by (seed, index), on the indices' device,
    so image i of seed s is the same whatever batch it is generated in.
    """
    keys = []
    for i in index.tolist():
        g = torch.Generator(device=index.device)
        g.manual_seed((int(seed) * 0x9E3779B97F4A7C15 + int(i)) % (2**63))
        keys.append(torch.randint(0, 2**32, (1,), generator=g, device=index.device))
    return torch.cat(keys)


def halton_ranks(grid: int, device=None) -> torch.Tensor:
    """The order in which a Halton-ordered decoder fixes the ``grid x grid`` token positions:
    (grid * grid,) int64, ``rank[p]`` = when position p (row-major) comes. The points of the 2-D
    Halton sequence (bases 2 and 3) are mapped to grid cells, each cell taking the rank of the
    first point that lands in it: a fixed, image-independent order that spreads every step's
    tokens over the whole image (Besnier et al., "Halton Scheduler for Masked Generative Image
    Transformer", 2025)."""
    def radical_inverse(i: int, base: int) -> float:
        f, r = 1.0, 0.0
        while i > 0:
            f /= base
            r += f * (i % base)
            i //= base
        return r

    n = grid * grid
    rank = [-1] * n
    k, i = 0, 1
    while k < n:
        x, y = int(radical_inverse(i, 2) * grid), int(radical_inverse(i, 3) * grid)
        p = y * grid + x
        if rank[p] < 0:
            rank[p] = k
            k += 1
        i += 1
    return torch.tensor(rank, dtype=torch.long, device=device)


def halton_step(logits: torch.Tensor, ids: torch.Tensor, key: torch.Tensor, step: int, mask_len: int,
                rank: torch.Tensor, mask_id: int):
    """One decoding step in a fixed order (:func:`halton_ranks`): every unknown position is
    sampled with the same random numbers as :func:`decode_step`, and the ``mask_len`` unknown
    positions latest in ``rank`` (N,) are masked again, whatever their confidence."""
    B, N, C = logits.shape
    if not 0 <= mask_len < N:
        raise ValueError(f"mask_len must be in [0, {N}), got {mask_len}")
    dev = logits.device
    row = (step * N + torch.arange(N, device=dev)).view(1, N, 1)
    _, unknown, sampled = _sample_codes(logits.float(), ids, key, row, mask_id)
    late = torch.where(unknown, -rank.view(1, N).to(dev), torch.full_like(ids, N))  # latest first
    order = torch.sort(late, dim=1, stable=True).indices[:, :mask_len]
    remask = torch.zeros_like(unknown).scatter(1, order, True)
    return sampled, torch.where(remask, torch.full_like(ids, mask_id), sampled)

