"""``generate``: MAGE sampling by iterative decoding, for every task and every decoding mode.

It checks its inputs, plans the run (:class:`.schedule.MaskPlan`), picks the re-masking rule
(:mod:`.remask`), builds the mode's network pass (:mod:`.protocol`) and runs the one loop
(:func:`.loop.decode_run`), eagerly or as a captured CUDA graph (:mod:`.graph`); the pass turns
the final ids into pixels.
"""
from __future__ import annotations

import dataclasses

import warnings
from typing import Optional

import torch

from ..models.checks import InputError, InputTypeError, check_model, check_number
from ..ops.decode_step import halton_ranks, image_keys
from .config import OFFICIAL_ONLY, SamplingConfig
from .loop import decode_run
from .modes import AUTO, MODES, SPEC_HELP, DecodeMode, auto_mode, mode_name
from .protocol import NetworkPass
from .quant import SlowModeWarning, slow_mode_message
from .remask import ConfidenceRemask, HaltonRemask, OfficialRemask
from .schedule import MaskPlan

_SAMPLING_KEYWORDS = dict(num_iter=12, temperature=4.5, seed=0, rng="official", schedule="cosine",
                          temperature_annealing="linear", guidance_scale=0.0, guidance_schedule="constant",
                          order="confidence", mode="exact", top_k=None, top_p=None)


def modes_doc(indent: str = "            ") -> str:
    """The registry's modes as the lines of a docstring."""
    return "\n".join(f"{indent}- ``{name}``: {summary}" for name, summary in MODES.table())


def build_pass(mode, model, plan: MaskPlan, keys, draws) -> NetworkPass:
    """``mode.build(model, plan.before, keys, draws)``, held to the :class:`.protocol.NetworkPass`
    contract."""
    network_pass = mode.build(model, plan.before, keys, draws)
    if not isinstance(network_pass, NetworkPass):
        raise InputTypeError(f"decoding mode {mode_name(mode)!r}: build() returned {type(network_pass).__name__}, "
                             f"not a network pass (a callable (ids, class_tokens, i) -> logits with "
                             f"decode_images(ids, chunk); see mage_fast.decoding.NetworkPass)")
    return network_pass


def _class_tokens(model, class_ids, batch_size: int, dev):
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
    return model.class_token_ids(class_ids)


def _start_state(model, init_ids, batch_size: int, dev):
    """(ids, masked tokens per row) at the start: all masked, or ``init_ids`` checked."""
    L, mask_id = model.seq_len, model.mask_token_label
    if init_ids is None:
        return torch.full((batch_size, L), mask_id, dtype=torch.long, device=dev), L
    if init_ids.shape != (batch_size, L):
        raise InputError(f"init_ids must have shape ({batch_size}, {L}), got {tuple(init_ids.shape)}")
    ids = init_ids.to(dev).long()
    per_row = (ids == mask_id).sum(1)
    n = int(per_row[0])
    if not bool((per_row == n).all()):
        raise InputError(f"every row of init_ids must have the same number of masked tokens, got {per_row.tolist()}")
    if n == 0:
        raise InputError("init_ids has no masked token to generate")
    check_known = torch.where(ids == mask_id, 0, ids)
    if int(check_known.min()) < 0 or int(check_known.max()) >= model.codebook_size:
        raise InputError(f"known tokens in init_ids must be code ids in [0, {model.codebook_size})")
    return ids, n


@torch.no_grad()
def generate(model, batch_size: int, *, num_iter: int = 12, temperature: float = 4.5, seed: int = 0,
             rng: str = "official", return_ids: bool = False, first_index: int = 0, progress: bool = False,
             autocast_dtype: Optional[torch.dtype] = None, schedule: str = "cosine",
             temperature_annealing: str = "linear", class_ids: Optional[torch.Tensor] = None,
             guidance_scale: float = 0.0, guidance_schedule: str = "constant",
             init_ids: Optional[torch.Tensor] = None, return_trace: bool = False, mode="exact",
             decode_chunk: Optional[int] = None, order: str = "confidence", cuda_graph: bool = False,
             top_k: Optional[int] = None, top_p: Optional[float] = None, config: Optional[SamplingConfig] = None):
    """MAGE generation by iterative decoding: unconditional, class-conditional, or from partly
    known tokens (inpainting, outpainting, editing).

    Args:
        model: a :class:`mage_fast.MAGE` (in eval mode for deterministic dropout-free sampling).
        batch_size: images to generate.
        num_iter: decoding steps T (README setting 20, official script default 12).
        temperature: confidence-noise temperature (README 6.0, script default 4.5).
        seed: random seed.
        rng: which sampler draws the random numbers. ``"official"`` reproduces the official
            sampler's numbers exactly (torch's global RNG for the categorical draw, NumPy's global
            RNG for the Gumbel noise; both reseeded here, as the official does); it supports only
            the official options. ``"torch"`` uses counter-based random numbers keyed per image
            from a ``torch.Generator`` on the model's device: no NumPy, no host sync in the loop,
            and image i depends only on ``seed`` and ``first_index + i``.
        return_ids: also return the (B, L) token ids.
        first_index: global index of the first image (``rng="torch"``), for batching a run.
        progress: show a progress bar over the steps.
        autocast_dtype: run the network passes under autocast (e.g. ``torch.bfloat16`` on GPU).
        schedule: mask schedule, one of :data:`mage_fast.decoding.SCHEDULES` (official: ``"cosine"``).
        temperature_annealing: how the confidence noise decays, one of
            :data:`mage_fast.decoding.TEMPERATURE_ANNEALING` (official: ``"linear"``, i.e.
            ``temperature * (1 - t/T)``).
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
        mode: the network pass: a name in :data:`mage_fast.decoding.MODES`, a
            :class:`mage_fast.decoding.DecodeMode`, any :class:`mage_fast.decoding.DecodingMode`,
            or {SPEC_HELP}. The named modes:

{MODES_DOC}

            ``"auto"``: ``fast_bf16`` where the model's device multiplies bf16 in hardware, else
            ``fast`` (never a precision slower than fp32 there); the run records the preset it chose.
            How to choose: docs/DECODING.md; measured speed and quality: benchmarks/RESULTS.md.
        decode_chunk: decode the tokens to pixels this many images at a time (``1``: every image's
            pixels are the same in any batch, as sharded and resumed runs need; default: at once).
        top_k: draw each token from its ``top_k`` most likely codes only (default: all).
        top_p: draw each token from the smallest set of most likely codes whose probability
            reaches ``top_p`` (nucleus sampling; default: all). Both filter the (guided) logits
            before the draw and its confidence; ``rng="torch"`` only. A model trained with label
            smoothing spreads that mass over every code: a filter keeps tokens from its flat tail.
        config: all the sampling settings above (num_iter, temperature, seed, rng, schedule,
            temperature_annealing, guidance_scale, guidance_schedule, order, mode, top_k, top_p) as one
            :class:`mage_fast.decoding.SamplingConfig`; those keywords are then left unset.

    Returns:
        images (B, 3, S, S), the tokenizer's decode (not clamped, as the official); then the
        ids when ``return_ids``; then the trace when ``return_trace``.

    Example:
        >>> imgs = generate(model, 8, num_iter=20, temperature=6.0, rng="torch")  # doctest: +SKIP
    """
    check_model(model)
    given = dict(num_iter=num_iter, temperature=temperature, seed=seed, rng=rng, schedule=schedule,
                 temperature_annealing=temperature_annealing, guidance_scale=guidance_scale,
                 guidance_schedule=guidance_schedule, order=order, mode=mode, top_k=top_k, top_p=top_p)
    if config is None:
        sampler = given.pop("rng")
        config = SamplingConfig(sampler=sampler, **given)
    else:
        if not isinstance(config, SamplingConfig):
            raise InputTypeError(f"config must be a mage_fast.decoding.SamplingConfig, got {type(config).__name__}")
        also = sorted(k for k, v in given.items() if not (v is _SAMPLING_KEYWORDS[k] or v == _SAMPLING_KEYWORDS[k]))
        if also:
            raise InputError(f"generate got config= and also {', '.join(also)}: give the sampling settings one way")
    if isinstance(config.mode, str) and config.mode == AUTO:  # the preset for the model's device, recorded by name
        config = dataclasses.replace(config, mode=auto_mode(next(model.parameters()).device))
    return _generate(model, batch_size, config, return_ids=return_ids, first_index=first_index, progress=progress,
                     autocast_dtype=autocast_dtype, class_ids=class_ids, init_ids=init_ids,
                     return_trace=return_trace, decode_chunk=decode_chunk, cuda_graph=cuda_graph)


generate.__doc__ = generate.__doc__.replace("{SPEC_HELP}", SPEC_HELP).replace("{MODES_DOC}", modes_doc())


def _generate(model, batch_size: int, cfg: SamplingConfig, *, return_ids, first_index, progress, autocast_dtype,
              class_ids, init_ids, return_trace, decode_chunk, cuda_graph):
    check_number(batch_size, "batch_size", lo=1, integer=True)
    check_number(first_index, "first_index", lo=0, integer=True)
    if model.training:
        warnings.warn("generate() got a model in training mode: dropout is active, so the samples differ from "
                      "eval mode's; call model.eval() first", stacklevel=3)
    dev = next(model.parameters()).device
    L, mask_id = model.seq_len, model.mask_token_label
    ids, num_unknown = _start_state(model, init_ids, batch_size, dev)
    plan = MaskPlan.make(cfg.num_iter, L, num_unknown, cfg.schedule)
    class_tokens = None
    if class_ids is not None:
        class_tokens = _class_tokens(model, class_ids, batch_size, dev)
    elif cfg.guidance_scale != 0.0:
        raise InputError("guidance_scale needs class_ids (classifier-free guidance is for conditional sampling)")
    official = cfg.sampler == "official"
    if official and (class_ids is not None or init_ids is not None):
        raise InputError(OFFICIAL_ONLY)
    if cuda_graph and (official or return_trace):
        raise InputError("cuda_graph=True needs rng='torch' (the official sampler syncs with the host every step) "
                         "and no return_trace (the loop runs as one graph)")
    steps = plan.steps
    if progress and not cuda_graph:
        from tqdm.auto import tqdm
        steps = tqdm(steps, desc="decoding", leave=False)
    keys = None
    if official:
        import numpy as np
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
    else:
        keys = image_keys(cfg.seed, torch.arange(first_index, first_index + batch_size, device=dev))
    the_mode = cfg.decoding_mode
    slow = slow_mode_message(the_mode.quant, dev) if isinstance(the_mode, DecodeMode) else None
    if slow:
        warnings.warn(f"decoding mode {mode_name(the_mode)!r}: {slow}", SlowModeWarning, stacklevel=3)

    rank = halton_ranks(model.token_grid, dev) if cfg.order == "halton" else None

    def remask_rule(keys):
        if official:
            return OfficialRemask(cfg.num_iter, cfg.temperature, mask_id, L)
        if rank is not None:
            return HaltonRemask(keys, plan.after, rank, mask_id)
        return ConfidenceRemask(keys, plan.after, cfg.temperature, cfg.anneal, cfg.num_iter, mask_id)

    remask = remask_rule(keys)
    # the sampler's (step, confidence-noise scale) per step: focus modes rank stale rows by what it will draw
    draws = remask.draws(plan.steps)
    network_pass = build_pass(the_mode, model, plan, keys, draws)
    record = [] if return_trace else None
    if cuda_graph:
        from . import graph

        def loop(ids, keys, class_tokens):  # reads and writes only static buffers
            return decode_run(model, build_pass(the_mode, model, plan, keys, draws), ids, steps, remask_rule(keys),
                              num_iter=cfg.num_iter,
                              autocast=torch.autocast(dev.type, dtype=autocast_dtype,
                                                      enabled=autocast_dtype is not None, cache_enabled=False),
                              class_tokens=class_tokens, guidance=cfg.guidance, token_filter=cfg.token_filter)
        settings = (the_mode, cfg.num_iter, plan.start, tuple(plan.after), cfg.temperature, cfg.temperature_annealing,
                    cfg.schedule, cfg.guidance_scale, cfg.guidance_schedule, cfg.order, cfg.top_k, cfg.top_p,
                    autocast_dtype)
        sampled, ids = graph.run_captured(model, settings, loop, dict(ids=ids, keys=keys, class_tokens=class_tokens),
                                          dev)
    else:
        autocast = torch.autocast(dev.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
        sampled, ids = decode_run(model, network_pass, ids, steps, remask, num_iter=cfg.num_iter, autocast=autocast,
                                  class_tokens=class_tokens, guidance=cfg.guidance, record=record,
                                  token_filter=cfg.token_filter)
    imgs = network_pass.decode_images(sampled, decode_chunk)
    out = (imgs,)
    if return_ids:
        out += (sampled,)
    if return_trace:
        start = plan.start
        tid = torch.stack([step_ids for step_ids, _ in record])  # (steps, B, L)
        known = tid != mask_id
        first = torch.where(known.any(0), known.float().argmax(0), len(record) - 1)
        fixed_at = torch.where(init_ids.to(dev) != mask_id, -1, first + start) if init_ids is not None \
            else first + start
        out += ({"ids": tid, "sampled": torch.stack([s for _, s in record]), "fixed_at": fixed_at,
                 "start_step": start},)
    return out[0] if len(out) == 1 else out
