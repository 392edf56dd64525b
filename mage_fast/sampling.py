"""Iterative (MaskGIT) decoding for MAGE: schedules, the official sampler, and the fast sampler."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .ops.decode_step import decode_step, image_keys

RNG_MODES = ("official", "torch")


def mask_schedule(num_iter: int, seq_len: int = 256) -> list[int]:
    """How many tokens stay masked after each step (the official cosine schedule and clamps):
    ``mask_len_t = clamp(floor(L cos(pi/2 (t+1)/T)), 1, unknown_t - 1)``.

    >>> mask_schedule(20)[:4], mask_schedule(20)[-1]
    ([255, 252, 248, 243], 1)
    """
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    unknown, out = seq_len, []
    for t in range(num_iter):
        m = math.floor(seq_len * math.cos(math.pi / 2.0 * (t + 1) / num_iter))
        unknown = max(1, min(unknown - 1, m))
        out.append(unknown)
    return out


def _decode_images(model, ids: torch.Tensor) -> torch.Tensor:
    g = model.token_grid
    z_q = model.vqgan.quantize.get_codebook_entry(ids, shape=(ids.shape[0], g, g, model.vqgan.quantize.e_dim))
    return model.vqgan.decode(z_q)


def _official_remask(ids_known: torch.Tensor, logits: torch.Tensor, step: int, num_iter: int, temperature: float,
                     mask_id: int, seq_len: int):
    """The official step after the network pass, random-number order included:
    a categorical sample from torch's global RNG, then float64 Gumbel noise from NumPy's."""
    sampled = torch.distributions.Categorical(logits=logits).sample()
    unknown = ids_known == mask_id
    sampled = torch.where(unknown, sampled, ids_known)
    ratio = (step + 1) / num_iter
    mask_ratio = np.cos(math.pi / 2.0 * ratio)
    probs = torch.softmax(logits, dim=-1)
    selected = torch.gather(probs, -1, sampled.unsqueeze(-1)).squeeze(-1)
    selected = torch.where(unknown, selected.double(), math.inf).float()
    mask_len = torch.tensor([np.floor(seq_len * mask_ratio)], dtype=torch.float32, device=logits.device)
    mask_len = torch.maximum(torch.ones(1, device=logits.device),
                             torch.minimum(unknown.sum(-1, keepdim=True) - 1, mask_len))
    n = int(mask_len[0].squeeze().long())
    noise = torch.tensor(temperature * (1 - ratio) * np.random.gumbel(size=selected.shape),
                         dtype=torch.float32, device=logits.device)
    confidence = torch.log(selected) + noise
    cutoff = torch.sort(confidence, dim=-1).values[:, n - 1:n]
    return sampled, torch.where(confidence <= cutoff, mask_id, sampled)


@torch.no_grad()
def official_gen_image(model, bsz: int, seed: int, num_iter: int = 12, choice_temperature: float = 4.5):
    """The official ``gen_img_uncond.gen_image`` loop, step for step, without its hard-coded
    ``.cuda()``: the full 257-token encoder pass through ``token_emb``/``blocks``/``norm``, the
    public ``forward_decoder`` with all 2025 logits, then the official re-masking. This is the
    "official-equivalent" baseline of the benchmarks and the parity tests."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = next(model.parameters()).device
    L, mask_id = model.seq_len, model.mask_token_label
    ids = torch.full((bsz, L), mask_id, dtype=torch.long, device=dev)
    sampled = ids
    for step in range(num_iter):
        full = torch.cat([torch.full((bsz, 1), model.fake_class_label, dtype=torch.long, device=dev), ids], 1)
        all_mask = full == mask_id
        x = model.token_emb(full)
        for blk in model.blocks:
            x = blk(x)
        x = model.norm(x)
        logits = model.forward_decoder(x, torch.zeros_like(full), all_mask)[:, 1:, : model.codebook_size]
        sampled, ids = _official_remask(ids, logits, step, num_iter, choice_temperature, mask_id, L)
    return _decode_images(model, sampled)


@torch.no_grad()
def generate(model, batch_size: int, *, num_iter: int = 12, temperature: float = 4.5, seed: int = 0,
             rng: str = "official", return_ids: bool = False, first_index: int = 0, progress: bool = False,
             autocast_dtype: Optional[torch.dtype] = None):
    """Unconditional MAGE generation by iterative decoding.

    Args:
        model: a :class:`mage_fast.MAGE` (in eval mode for deterministic dropout-free sampling).
        batch_size: images to generate.
        num_iter: decoding steps T (README setting 20, official script default 12).
        temperature: confidence-noise temperature (README 6.0, script default 4.5).
        seed: random seed.
        rng: ``"official"`` reproduces the official sampler's numbers exactly (torch's global RNG
            for the categorical draw, NumPy's global RNG for the Gumbel noise; both reseeded
            here, as the official does). ``"torch"`` uses counter-based random numbers keyed
            per image from a ``torch.Generator`` on the model's device: no NumPy, no host sync
            in the loop, and image i depends only on ``seed`` and ``first_index + i``.
        return_ids: also return the (B, L) token ids.
        first_index: global index of the first image (``rng="torch"`` only), for batching a run.
        progress: show a progress bar over the steps.
        autocast_dtype: run the network passes under autocast (e.g. ``torch.bfloat16`` on GPU).

    Returns:
        images (B, 3, S, S), the tokenizer's decode (not clamped, as the official), and the ids
        when ``return_ids``.

    Example:
        >>> imgs = generate(model, 8, num_iter=20, temperature=6.0, rng="torch")  # doctest: +SKIP
    """
    if rng not in RNG_MODES:
        raise ValueError(f"rng must be one of {RNG_MODES}, got {rng!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = next(model.parameters()).device
    L, mask_id = model.seq_len, model.mask_token_label
    ids = torch.full((batch_size, L), mask_id, dtype=torch.long, device=dev)
    steps = range(num_iter)
    if progress:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="decoding", leave=False)
    ac = torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    if rng == "official":
        torch.manual_seed(seed)
        np.random.seed(seed)
        for step in steps:
            with ac:
                logits = model.code_logits(ids).float()
            sampled, ids = _official_remask(ids, logits, step, num_iter, temperature, mask_id, L)
    else:
        keys = image_keys(seed, torch.arange(first_index, first_index + batch_size, device=dev))
        schedule = mask_schedule(num_iter, L)
        for step in steps:
            with ac:
                logits = model.code_logits(ids)
            scale = temperature * (1.0 - (step + 1) / num_iter)
            sampled, ids = decode_step(logits, ids, keys, step, schedule[step], scale, mask_id)
    imgs = _decode_images(model, sampled)
    return (imgs, sampled) if return_ids else imgs
