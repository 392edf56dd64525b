"""Iterative (MaskGIT) decoding for MAGE: schedules, the official sampler, and the fast sampler."""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Optional

import numpy as np
import torch

from .decoding.modes import DecodeMode, mode_name, resolve_mode, run_counts
from .decoding.quant import SlowModeWarning, slow_mode_message
from .models.checks import InputError, InputTypeError, check_model, check_number
from .ops.decode_step import decode_step, halton_ranks, halton_step, image_keys

RNG_MODES = ("official", "torch")

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
# Which masked tokens each step fixes: the most confident (official), or a fixed Halton order.
ORDERS = ("confidence", "halton")
GUIDANCE_SCHEDULES = {
    "constant": lambda r: 1.0,
    "linear": lambda r: r,  # guidance grows as tokens are fixed (MUSE style)
}


def _lookup(table: dict, name: str, what: str):
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
    gamma = _lookup(SCHEDULES, schedule, "mask schedule")

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


def _decode_images(model, ids: torch.Tensor, chunk: Optional[int] = None, vqgan=None) -> torch.Tensor:
    """Token ids -> images through the tokenizer (``vqgan``: another copy of it, e.g. a mode's
    channels-last or bf16 one; its input follows its dtype and layout, the images come back fp32),
    ``chunk`` images per call (None: all at once). ``chunk=1`` makes each image's pixels
    independent of the batch it was drawn in (convolutions round differently at other batch sizes)."""
    g = model.token_grid
    if chunk is not None and chunk < ids.shape[0]:
        return torch.cat([_decode_images(model, part, vqgan=vqgan) for part in ids.split(chunk)])
    if vqgan is None:
        z_q = model.vqgan.quantize.get_codebook_entry(ids, shape=(ids.shape[0], g, g, model.vqgan.quantize.e_dim))
        return model.vqgan.decode(z_q)
    z_q = vqgan.quantize.get_codebook_entry(ids, shape=(ids.shape[0], g, g, vqgan.quantize.e_dim))
    w = next(vqgan.parameters())
    return vqgan.decode(z_q.to(w.dtype).contiguous(memory_format=torch.channels_last)).float().contiguous()


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


def _cfg_logits(model, ids, class_tokens, scale: float, code_logits=None):
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


def _noise_scale(temperature: float, anneal, step: int, num_iter: int) -> float:
    """The confidence-noise scale of decoding step ``step``: the one the sampler uses, and the one
    focus modes predict it with."""
    return temperature * anneal((step + 1) / num_iter)


def _build_pass(mode, model, counts, keys, choice):
    """``mode.build(model, counts, keys)``, with the sampler's ``choice`` where the mode takes it (a
    :class:`DecodeMode` does; a custom mode object may not)."""
    if choice is not None and "choice" in inspect.signature(mode.build).parameters:
        return mode.build(model, counts, keys, choice=choice)
    return mode.build(model, counts, keys)


def decode_loop(model, net, ids: torch.Tensor, steps, *, num_iter: int, mask_lens, temperature: float, anneal,
                rng: str, keys: Optional[torch.Tensor], ac, class_tokens: Optional[torch.Tensor] = None,
                guidance=lambda r: 0.0, record: Optional[list] = None, rank: Optional[torch.Tensor] = None):
    """The sampling loop of :func:`generate`: at each step the mode's network pass ``net(ids,
    class_tokens, i)`` (see :mod:`mage_fast.decoding`), then sampling and re-masking. With
    ``rng="torch"`` it holds no host sync and every shape follows from ``mask_lens``, so it traces
    as one graph. ``rank`` (L,) fixes tokens in that order instead of by confidence
    (:func:`mage_fast.ops.decode_step.halton_step`). Returns (sampled, ids); ``record`` collects
    (ids, sampled) after each step."""
    L, mask_id = model.seq_len, model.mask_token_label
    sampled = ids
    for i, step in enumerate(steps):
        r = (step + 1) / num_iter
        with ac:
            if class_tokens is None:
                logits = net(ids, None, i)
            else:
                logits = _cfg_logits(model, ids, class_tokens, guidance(r), lambda x, c, i=i: net(x, c, i))
        if rng == "official":
            sampled, ids = _official_remask(ids, logits.float(), step, num_iter, temperature, mask_id, L)
        elif rank is not None:
            sampled, ids = halton_step(logits, ids, keys, step, mask_lens[i], rank, mask_id)
        else:
            sampled, ids = decode_step(logits, ids, keys, step, mask_lens[i], _noise_scale(temperature, anneal, step, num_iter),
                                       mask_id)
        if record is not None:
            record.append((ids, sampled))
    return sampled, ids


@torch.no_grad()
def generate(model, batch_size: int, *, num_iter: int = 12, temperature: float = 4.5, seed: int = 0,
             rng: str = "official", return_ids: bool = False, first_index: int = 0, progress: bool = False,
             autocast_dtype: Optional[torch.dtype] = None, schedule: str = "cosine",
             temperature_annealing: str = "linear", class_ids: Optional[torch.Tensor] = None,
             guidance_scale: float = 0.0, guidance_schedule: str = "constant",
             init_ids: Optional[torch.Tensor] = None, return_trace: bool = False, mode="exact",
             decode_chunk: Optional[int] = None, order: str = "confidence", cuda_graph: bool = False):
    """MAGE generation by iterative decoding: unconditional, class-conditional, or from partly
    known tokens (inpainting, outpainting, editing).

    Args:
        model: a :class:`mage_fast.MAGE` (in eval mode for deterministic dropout-free sampling).
        batch_size: images to generate.
        num_iter: decoding steps T (README setting 20, official script default 12).
        temperature: confidence-noise temperature (README 6.0, script default 4.5).
        seed: random seed.
        rng: ``"official"`` reproduces the official sampler's numbers exactly (torch's global RNG
            for the categorical draw, NumPy's global RNG for the Gumbel noise; both reseeded
            here, as the official does); it supports only the official options. ``"torch"`` uses
            counter-based random numbers keyed per image from a ``torch.Generator`` on the
            model's device: no NumPy, no host sync in the loop, and image i depends only on
            ``seed`` and ``first_index + i``.
        return_ids: also return the (B, L) token ids.
        first_index: global index of the first image (``rng="torch"``), for batching a run.
        progress: show a progress bar over the steps.
        autocast_dtype: run the network passes under autocast (e.g. ``torch.bfloat16`` on GPU).
        schedule: mask schedule, one of :data:`SCHEDULES` (official: ``"cosine"``).
        temperature_annealing: how the confidence noise decays, one of
            :data:`TEMPERATURE_ANNEALING` (official: ``"linear"``, i.e. ``temperature * (1 - t/T)``).
        class_ids: (B,) class labels for class-conditional generation (the class token takes the
            fake class token's place); ``None`` = unconditional.
        guidance_scale: classifier-free guidance ``s``: logits ``l_c + s_t (l_c - l_u)``.
        guidance_schedule: ``"constant"`` (s_t = s) or ``"linear"`` (s_t = s (t+1)/T).
        order: which masked tokens a step fixes: ``"confidence"`` (official: the most confident,
            with annealed noise) or ``"halton"`` (a fixed order spread over the image,
            :func:`mage_fast.ops.decode_step.halton_ranks`; ``rng="torch"`` only).
        cuda_graph: capture the whole decoding loop as one CUDA graph and replay it
            (:mod:`mage_fast.decoding.graph`): the same ids as without it, one launch per batch
            after the first call with these settings. CUDA and ``rng="torch"`` only; no per-step
            trace or progress bar.
        init_ids: (B, L) starting ids, ``model.mask_token_label`` where tokens are to be generated
            (the same count in every row); decoding starts at the matching schedule step.
        return_trace: also return a dict with ``ids`` (steps, B, L) after each step (masked
            positions = mask id), ``sampled`` (steps, B, L), and ``fixed_at`` (B, L): the step at
            which each token was fixed (-1 for given tokens).
        mode: the network pass, a name in :data:`mage_fast.decoding.MODES` or a
            :class:`mage_fast.decoding.DecodeMode`: ``"exact"`` (default, the official pass),
            ``"drop_train"`` / ``"drop_all"`` (masked tokens dropped in the encoder), ``"cached"``
            (per-layer key/value reuse between full passes), ``"cached_focus"`` (cached, the decoder
            recomputing only the masked rows the sampler would fix first), ``"int8"``, the fast preset
            ``"fast"`` (cached_focus + the training-matched drop, full refresh every 10 steps),
            ``"fast_close"`` (the same refreshed every 4), or a spec such as
            ``"drop=all,refresh=4,focus=2,quant=int8"`` (keys drop, refresh, focus, focus_by, quant, and pixels:
            the tokenizer decode's precision, e.g. ``"refresh=2,quant=bf16,pixels=fp32"``). See
            docs/DECODING.md for speed and quality.
        decode_chunk: decode the tokens to pixels this many images at a time (``1``: every image's
            pixels are the same in any batch, as sharded and resumed runs need; default: at once).

    Returns:
        images (B, 3, S, S), the tokenizer's decode (not clamped, as the official); then the
        ids when ``return_ids``; then the trace when ``return_trace``.

    Example:
        >>> imgs = generate(model, 8, num_iter=20, temperature=6.0, rng="torch")  # doctest: +SKIP
    """
    check_model(model)
    if rng not in RNG_MODES:
        raise InputError(f"rng must be one of {RNG_MODES}, got {rng!r}")
    check_number(batch_size, "batch_size", lo=1, integer=True)
    # never rounded: seed=1.5 is refused, not taken for seed 1 (NumPy's seeds are 32-bit)
    check_number(seed, "seed", lo=0, hi=2 ** 32 - 1 if rng == "official" else None, integer=True)
    seed = int(seed)
    check_number(num_iter, "num_iter", lo=1, integer=True)
    check_number(temperature, "temperature", lo=0)
    check_number(guidance_scale, "guidance_scale", lo=0)
    check_number(first_index, "first_index", lo=0, integer=True)
    if model.training:
        warnings.warn("generate() got a model in training mode: dropout is active, so the samples differ from "
                      "eval mode's; call model.eval() first", stacklevel=2)
    anneal = _lookup(TEMPERATURE_ANNEALING, temperature_annealing, "temperature annealing")
    guide = _lookup(GUIDANCE_SCHEDULES, guidance_schedule, "guidance schedule")
    _lookup(SCHEDULES, schedule, "mask schedule")
    if order not in ORDERS:
        raise InputError(f"order must be one of {ORDERS}, got {order!r}")
    dev = next(model.parameters()).device
    L, mask_id = model.seq_len, model.mask_token_label
    if init_ids is None:
        ids = torch.full((batch_size, L), mask_id, dtype=torch.long, device=dev)
        start, mask_lens = schedule_from(num_iter, L, L, schedule)
    else:
        if init_ids.shape != (batch_size, L):
            raise InputError(f"init_ids must have shape ({batch_size}, {L}), got {tuple(init_ids.shape)}")
        ids = init_ids.to(dev).long()
        counts = (ids == mask_id).sum(1)
        n = int(counts[0])
        if not bool((counts == n).all()):
            raise InputError(f"every row of init_ids must have the same number of masked tokens, got {counts.tolist()}")
        if n == 0:
            raise InputError("init_ids has no masked token to generate")
        check_known = torch.where(ids == mask_id, 0, ids)
        if int(check_known.min()) < 0 or int(check_known.max()) >= model.codebook_size:
            raise InputError(f"known tokens in init_ids must be code ids in [0, {model.codebook_size})")
        start, mask_lens = schedule_from(num_iter, L, n, schedule)
    class_tokens = None
    if class_ids is not None:
        try:
            class_ids = torch.as_tensor(class_ids)
        except (TypeError, ValueError, RuntimeError) as e:
            raise InputTypeError(f"class_ids must be integer class labels (a tensor, list or int), got "
                                 f"{type(class_ids).__name__}") from e
        # labels are integers: tensor([1.7]) is refused, never truncated to class 1
        if class_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise InputTypeError(f"class_ids must be integer class labels, got dtype {class_ids.dtype}")
        class_ids = class_ids.to(dev).long().view(-1)
        if class_ids.numel() == 1:
            class_ids = class_ids.expand(batch_size)
        if class_ids.shape != (batch_size,):
            raise InputError(f"class_ids must be one label or {batch_size} labels, got {tuple(class_ids.shape)}")
        class_tokens = model.class_token_ids(class_ids)
    elif guidance_scale != 0.0:
        raise InputError("guidance_scale needs class_ids (classifier-free guidance is for conditional sampling)")
    official_options = (schedule == "cosine" and temperature_annealing == "linear" and class_ids is None
                        and init_ids is None)
    official_options = official_options and order == "confidence"
    if rng == "official" and not official_options:
        raise InputError("rng='official' reproduces the official unconditional sampler only; use rng='torch' for "
                         "other schedules, annealing, orders, class conditioning or partial starts")

    if cuda_graph and (rng != "torch" or return_trace):
        raise InputError("cuda_graph=True needs rng='torch' (the official sampler syncs with the host every step) "
                         "and no return_trace (the loop runs as one graph)")
    steps = range(start, num_iter)
    if progress and not cuda_graph:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="decoding", leave=False)
    ac = torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    trace_ids, trace_sampled = [], []
    if rng == "official":
        torch.manual_seed(seed)
        np.random.seed(seed)
    else:
        keys = image_keys(seed, torch.arange(first_index, first_index + batch_size, device=dev))
    the_mode = resolve_mode(mode)
    slow = slow_mode_message(the_mode.quant, dev) if isinstance(the_mode, DecodeMode) else None
    if slow:
        warnings.warn(f"decoding mode {mode_name(the_mode)!r}: {slow}", SlowModeWarning, stacklevel=2)
    counts = run_counts(L if init_ids is None else n, mask_lens)
    # the sampler's (step, confidence-noise scale) per step: focus modes rank stale rows by what it will draw
    choice = [(s, _noise_scale(temperature, anneal, s, num_iter)) for s in range(start, num_iter)] \
        if rng == "torch" and order == "confidence" else None
    net = _build_pass(the_mode, model, counts, None if rng == "official" else keys, choice)
    record = [] if return_trace else None
    rank = halton_ranks(model.token_grid, dev) if order == "halton" else None
    if cuda_graph:
        from .decoding import graph

        def loop(ids, keys, class_tokens):  # reads and writes only static buffers
            return decode_loop(model, _build_pass(the_mode, model, counts, keys, choice), ids, steps, num_iter=num_iter,
                               mask_lens=mask_lens, temperature=temperature, anneal=anneal, rng=rng, keys=keys,
                               ac=torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None,
                                                 cache_enabled=False),
                               class_tokens=class_tokens, guidance=lambda r: guidance_scale * guide(r), rank=rank)
        settings = (the_mode, num_iter, start, tuple(mask_lens), temperature, temperature_annealing, schedule,
                    guidance_scale, guidance_schedule, order, autocast_dtype)
        sampled, ids = graph.run_captured(model, settings, loop, dict(ids=ids, keys=keys, class_tokens=class_tokens),
                                          dev)
    else:
        sampled, ids = decode_loop(model, net, ids, steps, num_iter=num_iter, mask_lens=mask_lens,
                                   temperature=temperature, anneal=anneal, rng=rng,
                                   keys=None if rng == "official" else keys, ac=ac, class_tokens=class_tokens,
                                   guidance=lambda r: guidance_scale * guide(r), record=record, rank=rank)
    for step_ids, step_sampled in record or ():
        trace_ids.append(step_ids)
        trace_sampled.append(step_sampled)
    decode = getattr(net, "decode_images", None)  # a mode's own pixel decode (custom modes: the exact one)
    imgs = decode(sampled, decode_chunk) if decode is not None else _decode_images(model, sampled, decode_chunk)
    out = (imgs,)
    if return_ids:
        out += (sampled,)
    if return_trace:
        tid = torch.stack(trace_ids)  # (steps, B, L)
        known = tid != mask_id
        first = torch.where(known.any(0), known.float().argmax(0), len(trace_ids) - 1)
        fixed_at = torch.where(init_ids.to(dev) != mask_id, -1, first + start) if init_ids is not None \
            else first + start
        out += ({"ids": tid, "sampled": torch.stack(trace_sampled), "fixed_at": fixed_at, "start_step": start},)
    return out[0] if len(out) == 1 else out
