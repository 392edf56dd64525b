"""The official sampler, step for step: the baseline of the benchmarks and the parity tests, and
the re-masking rule of ``generate(rng="official")``."""
from __future__ import annotations

import math

import numpy as np
import torch


def official_remask(ids_known: torch.Tensor, logits: torch.Tensor, step: int, num_iter: int, temperature: float,
                    mask_id: int, seq_len: int):
    """The official step after the network pass, random-number order included:
    a categorical sample from torch's global RNG, then float64 Gumbel noise from NumPy's.
    Returns (sampled, ids with the least confident tokens masked again)."""
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
        sampled, ids = official_remask(ids, logits, step, num_iter, choice_temperature, mask_id, L)
    return model.decode_tokens(sampled)
