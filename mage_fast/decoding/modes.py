"""Decoding modes: strategies for the network pass of the one sampling loop.

A mode decides what each step's network pass computes; the loop (sampling, confidence,
re-masking) is :func:`.loop.decode_run` for every mode. Every shape a mode uses follows from
the mask schedule alone (how many tokens are masked at each step), never from the data, so a
mode runs without host syncs and traces as one graph.

- ``drop``: which masked tokens the encoder skips. ``"none"`` (official generation: the encoder
  sees all L+1 tokens), ``"train"`` (as MAGE trained: ``ceil(mask_ratio_min * L)`` masked tokens
  dropped, or all of them when fewer are masked; which ones is drawn per image and step), ``"all"``
  (the encoder sees the class slot and the known tokens only). The decoder overwrites every
  masked position with the class-slot vector in all cases, as the official decoder does. With a
  cache, ``"train"`` keeps every position at its own encoder-cache slot (the dropped ones hidden
  from the queries by a key mask); a newly fixed token replaces its masked slot or fills its
  dropped one.
- ``refresh_every``: 0 = no cache. k >= 1 = a full pass at steps 0, k, 2k, ... keeping every
  layer's keys/values; between them a cached pass recomputes only the rows whose input changed
  or whose output is needed (encoder: the class slot and the tokens fixed at the previous step;
  decoder: the class slot and the tokens masked at the previous step) and writes their fresh
  keys/values into the caches; every other row's keys/values are reused from when it was last
  computed.
- ``focus`` (cached passes only): 0 = the decoder recomputes every masked row. f >= 1 = it
  recomputes only f * n masked rows, n being how many tokens this step fixes, and the other
  masked rows keep their last logits; the last step recomputes every masked row. Which rows:
  ``focus_by="sampler"`` (default) the f * n rows the step's sampler would fix first given their
  last logits: the sampler's own confidence (log p of its Gumbel-max draw plus its annealed
  confidence noise), from the same counter-based random numbers it will use
  (:func:`mage_fast.ops.decode_step.sample_confidence`); ``"max"``, or where the sampler's numbers
  are not known in advance (``rng="official"``, the Halton order), the rows whose largest
  log-probability was highest.
- ``quant``: ``"bf16"`` (the whole pass in bfloat16), ``"int8"`` / ``"fp8"`` Linear layers
  through torchao (see :mod:`.quant`).
- ``pixels``: the precision of the tokenizer's pixel decode after the last step. ``"auto"`` (bf16
  with ``quant='bf16'``, else fp32), ``"fp32"`` or ``"bf16"``; every non-exact mode decodes
  through a channels-last copy of the tokenizer (:func:`.quant.fast_tokenizer`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..ops.decode_step import counter_uniform, sample_confidence
from ..models.mage import encode_kept
from ..modules.kv_cache import KVCache
from ..ops.token_drop import keep_index
from .protocol import DecodingMode, NetworkPass
from .quant import QUANT_KINDS, bf16_native, fast_tokenizer, quantized_weights
from .registry import FactoryMode, ModeRegistry
from .schedule import run_counts
from .stack import gather_rows, scatter_rows, stack_full, stack_partial

DROP_KINDS = ("none", "train", "all")
FOCUS_KINDS = ("sampler", "max")
PIXEL_KINDS = ("auto", "fp32", "bf16")
_STREAM_DROP = 0x2545F491


@dataclass(frozen=True)
class DecodeMode:
    """One decoding mode (see the module docstring). ``DecodeMode()`` is the exact official pass."""
    drop: str = "none"
    refresh_every: int = 0
    quant: str = "none"
    focus: int = 0
    pixels: str = "auto"
    focus_by: str = "sampler"

    def __post_init__(self):
        if self.drop not in DROP_KINDS:
            raise ValueError(f"drop must be one of {DROP_KINDS}, got {self.drop!r}")
        if self.quant not in QUANT_KINDS:
            raise ValueError(f"quant must be one of {QUANT_KINDS}, got {self.quant!r}")
        if self.focus_by not in FOCUS_KINDS:
            raise ValueError(f"focus_by must be one of {FOCUS_KINDS}, got {self.focus_by!r}")
        if self.pixels not in PIXEL_KINDS:
            raise ValueError(f"pixels must be one of {PIXEL_KINDS}, got {self.pixels!r}")
        if not isinstance(self.refresh_every, int) or self.refresh_every < 0:
            raise ValueError(f"refresh_every must be an int >= 0 (0 = no cache), got {self.refresh_every!r}")
        if not isinstance(self.focus, int) or self.focus < 0 or (self.focus and not self.refresh_every):
            raise ValueError(f"focus must be an int >= 0, and > 0 only with a cache (refresh_every > 0); got {self.focus!r}")

    @property
    def is_exact(self) -> bool:
        return self == DecodeMode()

    @property
    def pixel_dtype(self) -> torch.dtype:
        """The dtype of the pixel decode (``pixels``, with ``"auto"`` resolved)."""
        kind = ("bf16" if self.quant == "bf16" else "fp32") if self.pixels == "auto" else self.pixels
        return torch.bfloat16 if kind == "bf16" else torch.float32

    def describe(self) -> str:
        parts = [f"drop={self.drop}"]
        parts.append(f"cache: full pass every {self.refresh_every} steps" if self.refresh_every else "no cache")
        if self.focus:
            which = "the sampler would fix first" if self.focus_by == "sampler" else "most confident"
            parts.append(f"decoder recomputes the {self.focus}x masked rows {which}")
        parts.append(f"quant={self.quant}")
        parts.append(f"pixel decode in {'bf16' if self.pixel_dtype == torch.bfloat16 else 'fp32'}")
        return ", ".join(parts)

    def build(self, model, masked_before: Sequence[int], keys: Optional[torch.Tensor] = None,
              draws: Optional[Sequence[tuple]] = None, *, choice: Optional[Sequence[tuple]] = None) -> "ModePass":
        """The network pass for one decoding run (see :class:`ModePass`); ``choice``: ``draws``
        under its earlier name (benchmarks pass it by keyword)."""
        return ModePass(model, self, masked_before, keys, draws if choice is None else choice)


# The named modes: `generate(mode=...)`, the CLI's --mode (its help), `info`, the generate docstring and
# the README's table are all made from this registry. How to choose: docs/DECODING.md; measured speed and
# quality: benchmarks/RESULTS.md.
MODES = ModeRegistry()
MODES.register("exact", DecodeMode(), "the official pass (the default)")
MODES.register("drop_train", DecodeMode(drop="train"), "the encoder drops masked tokens as MAGE trained")
MODES.register("drop_all", DecodeMode(drop="all"), "the encoder drops every masked token")
MODES.register("cached", DecodeMode(refresh_every=4), "per-layer key/value reuse, a full pass every 4 steps")
MODES.register("int8", DecodeMode(quant="int8"),
               "int8 Linear layers (fast on GPUs and on CPUs with AMX or AVX512-VNNI)")
MODES.register("cached_int8", DecodeMode(refresh_every=4, quant="int8"), "cached, with int8 Linear layers")
MODES.register("cached_focus", DecodeMode(refresh_every=4, focus=2),
               "cached, the decoder recomputing only the masked rows the sampler would fix first")
MODES.register("fast", DecodeMode(drop="train", refresh_every=4, focus=2),
               "the fast preset: cached_focus with the training-matched encoder drop")
MODES.register("fast_close", DecodeMode(drop="train", refresh_every=2, focus=2),
               "fast refreshed every 2 steps: closer to exact, slower")
MODES.register("fast_all", DecodeMode(drop="all", refresh_every=4, focus=2),
               "fast dropping every masked token")
MODES.register("bf16", DecodeMode(quant="bf16"),
               "the whole pass in bfloat16 (fast on GPUs and on CPUs with AMX or AVX512-BF16)")
MODES.register("cached_bf16", DecodeMode(refresh_every=4, quant="bf16"), "cached, in bfloat16")
MODES.register("cached_focus_bf16", DecodeMode(refresh_every=4, focus=2, quant="bf16"), "cached_focus, in bfloat16")
MODES.register("fast_bf16", DecodeMode(drop="train", refresh_every=4, focus=2, quant="bf16"), "fast, in bfloat16")
MODES.register("fast_all_bf16", DecodeMode(drop="all", refresh_every=4, focus=2, quant="bf16"), "fast_all, in bfloat16")

SPEC_HELP = ("a spec such as drop=all,refresh=4,focus=2,quant=int8 or refresh=2,quant=bf16,pixels=fp32 (keys drop, "
             "refresh, focus, focus_by, quant, and pixels: the tokenizer decode's precision)")


AUTO = "auto"


def auto_mode(device=None) -> str:
    """The preset ``mode="auto"`` stands for on ``device`` (default: the CPU): ``fast_bf16`` where the
    device multiplies bf16 in hardware (CUDA; CPUs with AMX or AVX512-BF16), else ``fast`` (fp32), so
    it is never a precision the device runs slower than fp32. Both compute less than ``exact``; their
    quality cost is in benchmarks/RESULTS.md (explained in docs/DECODING.md)."""
    dev = torch.device("cpu") if device is None else torch.device(device)
    return "fast_bf16" if bf16_native(dev) else "fast"


def resolve_mode(mode, device=None) -> DecodingMode:
    """A mode from a name in :data:`MODES`, ``"auto"`` (:func:`auto_mode` for ``device``), a spec
    ``"drop=all,refresh=4,quant=int8"`` (any subset of the keys drop, refresh, focus, focus_by,
    quant, pixels), a :class:`DecodeMode`, or any :class:`.protocol.DecodingMode` (an object with
    ``build``)."""
    if isinstance(mode, str) and mode == AUTO:
        return MODES[auto_mode(device)]
    if isinstance(mode, DecodeMode) or (not isinstance(mode, str) and callable(getattr(mode, "build", None))):
        return mode
    if isinstance(mode, str) and mode in MODES:
        return MODES[mode]
    if isinstance(mode, str) and "=" in mode:
        fields = {"drop": "drop", "refresh": "refresh_every", "quant": "quant", "focus": "focus", "pixels": "pixels",
                  "focus_by": "focus_by"}
        kw = {}
        for part in mode.split(","):
            key, _, value = part.partition("=")
            if key.strip() not in fields:
                raise ValueError(f"unknown key {key.strip()!r} in mode spec {mode!r}; use {sorted(fields)}")
            kw[fields[key.strip()]] = int(value) if key.strip() in ("refresh", "focus") else value.strip()
        return DecodeMode(**kw)
    raise ValueError(f"unknown decoding mode {mode!r}; choose from {sorted(MODES)}, a spec such as "
                     f"'drop=all,refresh=4,quant=int8', or pass a DecodeMode")


def mode_name(mode) -> str:
    """The name of ``mode`` in :data:`MODES`, else its spec string (a DecodeMode) or its type's name."""
    for name, m in MODES.items():
        if m is mode or (type(m) is type(mode) and m == mode):
            return name
    if not isinstance(mode, DecodeMode):
        inner = mode.factory if isinstance(mode, FactoryMode) else type(mode)
        return getattr(inner, "__name__", type(inner).__name__)
    return (f"drop={mode.drop},refresh={mode.refresh_every},quant={mode.quant}" + (f",focus={mode.focus}" if mode.focus else "")
            + (f",focus_by={mode.focus_by}" if mode.focus_by != "sampler" else "")
            + (f",pixels={mode.pixels}" if mode.pixels != "auto" else ""))


def first_true(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Positions of the first ``n`` True entries of each row of mask (B, N), ascending -> (B, n)
    int64. Every row must hold at least n True entries (the schedule guarantees it)."""
    return keep_index(~mask, n)


def drop_mask_for(masked: torch.Tensor, num_drop: int, keys: torch.Tensor, step: int) -> torch.Tensor:
    """Which image tokens the encoder drops: ``num_drop`` of the masked ones per row, uniformly at
    random from counter-based random numbers keyed by (key, step, position).
    masked: (B, L) bool; keys: (B,) int64 -> (B, L) bool, a subset of ``masked``."""
    B, L = masked.shape
    if num_drop == 0:
        return torch.zeros_like(masked)
    pos = torch.arange(L, device=masked.device).view(1, L)
    u = counter_uniform(keys.view(B, 1), _STREAM_DROP, torch.full_like(pos, step), pos)  # (B, L) in (0, 1)
    score = torch.where(masked, u, 2.0)
    chosen = torch.sort(score, dim=1, stable=True).indices[:, :num_drop]
    return torch.zeros_like(masked).scatter(1, chosen, True)


def encode_dropped(weights, full: torch.Tensor, drop: torch.Tensor, num_keep: int, keep_kv: bool = False):
    """The model's token-dropping encoder (:func:`mage_fast.models.mage.encode_kept`) on ``weights``
    (the model or its weight copy), its blocks run by :func:`.stack.stack_full` so that each layer's
    keys/values can be kept. Returns (latent (B, num_keep, D) after the final norm, keep
    (B, num_keep), ks, vs): ks, vs the per-layer keys and values (B, H, num_keep, d) of the kept
    rows with ``keep_kv`` (a :class:`~mage_fast.modules.kv_cache.KVCache`'s ``k`` and ``v``), else empty lists."""
    kv = []

    def run_blocks(blocks, x):
        h, cache = stack_full(blocks, x, keep_kv)
        kv.append(cache)
        return h

    latent, keep = encode_kept(weights, full, drop, num_keep, run_blocks)
    return latent, keep, (kv[0].k if keep_kv else []), (kv[0].v if keep_kv else [])


class _State:
    __slots__ = ("batch", "E", "enc", "dec", "prev_masked", "logits", "conf")
    # enc, dec: the encoder's and decoder's KVCache (None without a cache). The encoder cache's
    # slots: sequence positions (drop='none'; drop='train', dropped slots hidden by its key_mask),
    # or the class slot and the known tokens in keep order, new tokens appended (drop='all').


class ModePass:
    """The :class:`.protocol.NetworkPass` of a :class:`DecodeMode` for one decoding run:
    ``pass_(ids, class_tokens, i)`` -> (B, L, C) code logits.

    Args:
        model: the :class:`mage_fast.MAGE`.
        mode: a :class:`DecodeMode`.
        masked_before: masked tokens at the input of each step of the run (from the schedule).
        keys: (B,) per-image keys for the random choice of dropped tokens (default: row index).
        draws: per step of the run, ``(step, noise_scale)`` of the sampler's confidence draw
            (``rng="torch"``, confidence order): with ``focus_by="sampler"`` the focus rows are the
            ones the sampler would fix first (see the module docstring); None = rank by the largest
            log-probability.

    Rows of known positions in the returned logits are zeros (sampling ignores them).
    """

    def __init__(self, model, mode: DecodeMode, masked_before: Sequence[int], keys: Optional[torch.Tensor] = None,
                 draws: Optional[Sequence[tuple]] = None):
        self.model, self.mode, self.masked_before = model, mode, [int(c) for c in masked_before]
        # the weights the pass multiplies with: the model's, or a quantized copy of them
        self.weights = model if mode.quant == "none" else quantized_weights(model, mode.quant)
        self.keys = keys
        self.draws = None if draws is None or keys is None or mode.focus_by != "sampler" else list(draws)
        self.focus_rows: Optional[torch.Tensor] = None  # the last cached pass's focus rows (B, r), image positions
        self.state: Optional[_State] = None

    @property
    def choice(self) -> Optional[list]:
        """:attr:`draws` under its earlier name."""
        return self.draws

    def __call__(self, ids: torch.Tensor, class_tokens: Optional[torch.Tensor], i: int) -> torch.Tensor:
        model, mode = self.model, self.mode
        if mode.is_exact:
            return model.code_logits(ids, class_tokens, check=False)  # the sampler's own states
        B, L = ids.shape
        full = model._with_class_slot(ids, model.fake_class_label if class_tokens is None else class_tokens)
        masked = ids == model.mask_token_label  # (B, L)
        k = mode.refresh_every
        st = self.state
        full_pass = not k or i % k == 0 or st is None or st.batch != B
        if full_pass:
            st = self.state = _State()
            st.batch = B
            self._encode_full(st, full, masked, i)
            logits = self._decode_full(st, masked, i)
        else:
            self._encode_cached(st, full, masked, i)
            logits = self._decode_cached(st, masked, i)
        st.prev_masked = masked
        return logits.float()

    def decode_images(self, ids: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        """Token ids (B, L) -> images (B, 3, S, S) in fp32. The exact mode decodes as the official
        code; the others through :func:`.quant.fast_tokenizer` (channels-last, in the mode's
        ``pixel_dtype``), ``chunk`` images per call."""
        if self.mode.is_exact:
            return self.model.decode_tokens(ids, chunk)
        return self.model.decode_tokens(ids, chunk, tokenizer=fast_tokenizer(self.model, self.mode.pixel_dtype))

    # ------------------------------------------------------------------ encoder
    def _row_keys(self, B: int, device) -> torch.Tensor:
        if self.keys is None:
            return torch.arange(B, device=device)
        n = self.keys.shape[0]
        return self.keys.repeat(B // n) if B != n else self.keys  # classifier-free guidance doubles the batch

    def _encode_full(self, st: _State, full, masked, i: int):
        net, mode, L = self.weights, self.mode, masked.shape[1]
        cache = mode.refresh_every > 0
        m = self.masked_before[i]
        num_drop = {"none": 0, "all": m, "train": min(m, math.ceil(self.model.mask_ratio_min * L))}[mode.drop]
        if num_drop == 0:
            h, st.enc = stack_full(net.blocks, net.token_emb(full), cache)
            st.E = net.decoder_embed(net.norm(h))  # (B, L+1, Dd)
            if cache and mode.drop == "train":  # every slot seen, kept as a mask the cached passes update
                st.enc.key_mask = torch.ones_like(full, dtype=torch.bool)
        else:
            drop = drop_mask_for(masked, num_drop, self._row_keys(masked.shape[0], masked.device), i)
            drop = torch.cat([torch.zeros_like(drop[:, :1]), drop], 1)  # the class slot is never dropped
            h, keep, ks, vs = encode_dropped(net, full, drop, L + 1 - num_drop, cache)
            e = net.decoder_embed(h)  # (B, K, Dd)
            st.E = scatter_rows(e.new_zeros(e.shape[0], L + 1, e.shape[2]), keep, e)
            if cache and mode.drop == "train":  # slot = position, the dropped slots hidden from the queries
                st.enc = KVCache.at_slots(ks, vs, keep, L + 1, key_mask=~drop)
            elif cache:  # drop='all': class slot + known tokens, in keep order
                st.enc = KVCache.from_layers(ks, vs)
            else:
                st.enc = None

    def _encode_cached(self, st: _State, full, masked, i: int):
        net = self.weights
        B = masked.shape[0]
        n_new = self.masked_before[i - 1] - self.masked_before[i]
        new = first_true(st.prev_masked & ~masked, n_new) + 1  # (B, n_new) sequence positions fixed last step
        pos = torch.cat([torch.zeros_like(new[:, :1]), new], 1)  # (B, 1 + n_new): class slot + new
        if self.mode.drop == "none":
            slots = pos
        elif self.mode.drop == "train":  # a new token replaces its masked slot or fills its dropped one
            slots = pos
            st.enc.reveal(pos)
        else:  # drop='all': the new tokens join the cache at its end
            S = st.enc.length
            st.enc.grow(n_new)
            slots = torch.cat([torch.zeros_like(new[:, :1]), S + torch.arange(n_new, device=new.device).expand(B, -1)], 1)
        x = net.token_emb(torch.gather(full, 1, pos), positions=pos)
        h = stack_partial(net.blocks, x, slots, st.enc)
        st.E = scatter_rows(st.E, pos, net.decoder_embed(net.norm(h)))

    # ------------------------------------------------------------------ decoder
    def _head(self, st: _State, h: torch.Tensor, rows: torch.Tensor, img_pos: torch.Tensor, B: int, L: int):
        """MLM head on rows (B, m) of h -> (B, L, C) logits at img_pos (B, m); the other rows are
        zeros, or with ``focus`` the rows' last logits (and ``st.conf`` their max log-probability)."""
        model = self.model
        we = self.weights.token_emb.word_embeddings.weight.detach()
        lm = self.weights.mlm_layer(gather_rows(h, rows), we, num_outputs=model.codebook_size)  # (B, m, C)
        if not self.mode.focus:
            return scatter_rows(lm.new_zeros(B, L, lm.shape[-1]), img_pos, lm)
        if getattr(st, "logits", None) is None:
            st.logits = lm.new_zeros(B, L, lm.shape[-1])
            if self.draws is None:
                st.conf = lm.new_full((B, L), -float("inf"), dtype=torch.float32)
        st.logits = scatter_rows(st.logits, img_pos, lm)
        if self.draws is None:  # rank by the largest log-probability (else the sampler's, from st.logits)
            st.conf = st.conf.scatter(1, img_pos, torch.log_softmax(lm.float(), -1).amax(-1))
        return st.logits

    def _decode_full(self, st: _State, masked, i: int) -> torch.Tensor:
        net = self.weights
        B, L = masked.shape
        allm = torch.cat([torch.zeros_like(masked[:, :1]), masked], 1)  # (B, L+1)
        x = torch.where(allm.unsqueeze(-1), st.E[:, :1], st.E) + net.decoder_pos_embed_learned
        h, st.dec = stack_full(net.decoder_blocks, x, self.mode.refresh_every > 0)
        h = net.decoder_norm(h)
        rows = first_true(masked, self.masked_before[i])  # (B, m) image positions still masked
        if self.mode.focus:
            st.logits = None
        return self._head(st, h, rows + 1, rows, B, L)

    def _decode_cached(self, st: _State, masked, i: int) -> torch.Tensor:
        net = self.weights
        B, L = masked.shape
        m = self.masked_before[i]
        last = i == len(self.masked_before) - 1
        if self.mode.focus and not last:
            n_new = self.masked_before[i - 1] - m
            n_fix = m - self.masked_before[i + 1]  # tokens this step fixes
            r = min(m, self.mode.focus * max(1, n_fix))
            new = first_true(st.prev_masked & ~masked, n_new)  # (B, n_new)
            if self.draws is not None:  # the sampler's confidence on the last logits: +inf at known rows
                step, noise = self.draws[i]
                conf = sample_confidence(st.logits, masked, self._row_keys(B, masked.device), step, noise)[1]
            else:
                conf = st.conf
            score = torch.where(masked, conf, -float("inf"))
            top = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :r]  # (B, r) masked rows
            self.focus_rows = top
            fresh = torch.cat([new, top], 1) + 1
        else:
            fresh = first_true(st.prev_masked, self.masked_before[i - 1]) + 1  # (B, F) masked at the previous step
        pos = torch.cat([torch.zeros_like(fresh[:, :1]), fresh], 1)  # (B, 1 + F) with the class slot
        allm = torch.cat([torch.zeros_like(masked[:, :1]), masked], 1)
        now_masked = torch.gather(allm, 1, pos)  # (B, 1 + F)
        e = gather_rows(st.E, pos)
        pe = net.decoder_pos_embed_learned[0][pos]  # (B, 1 + F, Dd)
        x = torch.where(now_masked.unsqueeze(-1), st.E[:, :1], e) + pe
        h = net.decoder_norm(stack_partial(net.decoder_blocks, x, pos, st.dec))
        n_out = r if self.mode.focus and not last else m
        sel = first_true(now_masked, n_out)  # (B, n_out) rows of h still masked
        return self._head(st, h, sel, torch.gather(pos, 1, sel) - 1, B, L)


__all__ = ["AUTO", "DROP_KINDS", "MODES", "SPEC_HELP", "DecodeMode", "ModePass", "NetworkPass", "encode_dropped",
           "auto_mode", "mode_name", "resolve_mode", "run_counts"]
