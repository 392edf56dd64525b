"""Low-precision copies of MAGE's transformer for decoding (bf16 or int8 on the CPU, bf16 or fp8
on GPUs).

The copy holds only what a network pass reads (embeddings, encoder, decoder, MLM head), never
the tokenizer. ``bf16``: the whole copy in bfloat16 (weights and activations; logits returned in
fp32), fast where the hardware multiplies bf16 natively (CUDA GPUs; x86 CPUs with AMX or with
AVX512-BF16, through oneDNN), slow elsewhere (see :func:`bf16_native` and docs/DECODING.md,
"Hardware: bf16 and int8"; measured speeds per CPU kind: benchmarks/RESULTS.md). Its Linear layers
quantized with torchao (PyTorch's quantization library): ``int8``: int8 weights (per output channel)
and int8 activations with dynamic per-token scales (``Int8DynamicActivationInt8WeightConfig``; fast
only with int8 hardware, see :func:`int8_native`); ``fp8``: fp8 e4m3 weights and dynamic activations
(``Float8DynamicActivationFloat8WeightConfig``, CUDA compute capability >= 8.9 only).
Copies are cached per model and rebuilt when a parameter changes in place.
"""
from __future__ import annotations

import copy
import weakref

import torch
import torch.nn as nn

from ..ops.group_norm import fuse_group_norm_silu
from ..ops.winograd import available as winograd_available, winograd_convs

QUANT_KINDS = ("none", "bf16", "int8", "fp8")
_PARTS = ("token_emb", "blocks", "norm", "decoder_embed", "decoder_blocks", "decoder_norm", "mlm_layer")
_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class PassWeights(nn.Module):
    """The network-pass parts of a MAGE (no tokenizer), with the model's attribute names."""

    def __init__(self, model: nn.Module):
        super().__init__()
        for name in _PARTS:
            setattr(self, name, copy.deepcopy(getattr(model, name)))
        self.decoder_pos_embed_learned = nn.Parameter(model.decoder_pos_embed_learned.detach().clone(),
                                                      requires_grad=False)


def _first_cpu_unit(probes) -> str | None:
    """The name of the first (name, ``torch.cpu`` probe) pair whose probe exists and says yes."""
    for name, probe in probes:
        has = getattr(torch.cpu, probe, None)
        if has is not None and has():
            return name
    return None


def cpu_bf16_units() -> str | None:
    """This CPU's bf16 matrix units as torch sees them: ``"AMX"`` (tiles, which also multiply int8),
    ``"AVX512-BF16"``, or None (bf16 runs emulated, slowly)."""
    return _first_cpu_unit((("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")))


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: CUDA; a CPU with AMX tiles (Intel
    Sapphire Rapids and later) or with AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake). Without
    either, bf16 runs *slower* than fp32 (``benchmarks/linear_precision.py`` measures it)."""
    if device.type == "cuda":
        return True
    if device.type == "cpu":
        return cpu_bf16_units() is not None
    return False


def cpu_int8_units() -> str | None:
    """This CPU's int8 matrix units as torch sees them: ``"AMX"`` (tiles) or ``"VNNI"``
    (AVX512-VNNI), or None: then ``torch._int_mm``, which torchao's int8 Linear layers call,
    runs a plain loop."""
    return _first_cpu_unit((("AMX", "_is_amx_tile_supported"), ("VNNI", "_is_vnni_supported")))


def int8_native(device: torch.device) -> bool:
    """Whether ``device`` multiplies int8 matrices in hardware: CUDA; a CPU with AMX or
    AVX512-VNNI. Without either, torchao's int8 Linear runs many times slower than fp32
    (``benchmarks/linear_precision.py`` measures it; benchmarks/RESULTS.md has the numbers per CPU kind)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_int8_units() is not None


class SlowModeWarning(UserWarning):
    """A decoding mode that runs on this device but slower than the exact fp32 pass."""


def quant_slow_reason(kind: str, device: torch.device) -> str | None:
    """Why ``kind`` runs on ``device`` but slower than fp32 (None when it is fast there, or does not
    run at all: see :func:`quant_support`)."""
    if kind == "bf16" and not bf16_native(device):
        return "runs, but slower than fp32: this CPU has neither AMX nor AVX512-BF16"
    if kind == "int8" and not int8_native(device):
        return ("runs, but many times slower than fp32 (docs/DECODING.md, 'Hardware'): this CPU has "
                "neither AMX nor AVX512-VNNI, so torch's int8 matrix product is a plain loop")
    return None


def slow_mode_message(quant: str, device: torch.device) -> str | None:
    """What a user asking for a mode with quantization ``quant`` is told on ``device`` where it
    runs slower than fp32 (None elsewhere): the reason and what to use instead."""
    slow = quant_slow_reason(quant, device)
    return slow and f"{quant} {slow}; 'exact' or an fp32 mode ('cached', 'fast') is faster here"


def import_torchao():
    """``import torchao``, without the lines its import prints with a CPU-only torch: torchao's CUDA
    extensions (``_C_mxfp8``, ``_C_cutlass_90a``) cannot load there ("Failed to load ..."), and torch
    logs a deprecation meant for torchao's developers. With a CUDA torch a failed load still shows."""
    import logging
    quiet = [] if torch.version.cuda else [logging.getLogger(n) for n in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in quiet]
    for lg in quiet:
        lg.setLevel(logging.ERROR)
    try:
        import torchao
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    return torchao


def quant_support(kind: str, device: torch.device) -> str | None:
    """None when ``kind`` runs on ``device``, else the reason it does not."""
    if kind not in QUANT_KINDS:
        return f"unknown quantization {kind!r}; choose from {QUANT_KINDS}"
    if kind in ("none", "bf16"):
        return None
    try:
        import_torchao()
    except ImportError:
        return "needs torchao (pip install 'mage_fast[quant]')"
    if kind == "fp8":
        if device.type != "cuda":
            return "fp8 needs a CUDA GPU (compute capability >= 8.9)"
        if torch.cuda.get_device_capability(device) < (8, 9):
            return f"fp8 needs compute capability >= 8.9, this GPU has {torch.cuda.get_device_capability(device)}"
    return None


def fingerprint(model: nn.Module) -> tuple:
    """What identifies a module's weights: each parameter's storage and in-place version."""
    return tuple((p.data_ptr(), p._version) for p in model.parameters())


def _cached(cache: "weakref.WeakKeyDictionary", model: nn.Module, key: tuple, build) -> nn.Module:
    """``cache[model]``'s copy when it was built for ``key``, else ``build()``, kept for ``key``."""
    hit = cache.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    made = build()
    cache[model] = (key, made)
    return made


def quantized_weights(model: nn.Module, kind: str) -> nn.Module:
    """A cached :class:`PassWeights` copy of ``model`` with its Linear layers quantized to ``kind``."""
    dev = next(model.parameters()).device
    why = quant_support(kind, dev)
    if why is not None:
        raise RuntimeError(f"quantization {kind!r} is not available: {why}")
    return _cached(_CACHE, model, (kind, fingerprint(model)), lambda: _pass_weights(model, kind))


def _pass_weights(model: nn.Module, kind: str) -> nn.Module:
    if kind == "bf16":
        return PassWeights(model).eval().to(torch.bfloat16)
    from torchao.quantization import quantize_  # imported quietly by quant_support, which ran first
    if kind == "int8":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig
        config = Int8DynamicActivationInt8WeightConfig()
    else:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig
        config = Float8DynamicActivationFloat8WeightConfig()
    weights = PassWeights(model).eval()
    with torch.no_grad():
        quantize_(weights, config, filter_fn=lambda m, fqn: isinstance(m, nn.Linear))
    return weights


_TOK_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def fast_tokenizer(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A cached copy of ``model.vqgan`` for the pixel decode of the non-exact modes and the
    training step's encode: channels-last convolutions in ``dtype`` (bf16 where the CPU multiplies it natively). In fp32 on a CPU with the compiled ops, the encoder's and decoder's 3x3 convolutions of 32
    channels or more run by Winograd's F(4x4, 3x3) (:mod:`mage_fast.ops.winograd`; the decoder's
    upsampling convolutions read the low-resolution input in place), outputs within ~1e-5 of the
    direct convolution's, and each GroupNorm + SiLU is one compiled op
    (:mod:`mage_fast.ops.group_norm`). Rebuilt when a tokenizer parameter changes in place."""
    vq = model.vqgan
    winograd = dtype == torch.float32 and next(vq.parameters()).device.type == "cpu" and winograd_available()

    def build():
        fast = copy.deepcopy(vq).eval().to(dtype=dtype, memory_format=torch.channels_last)
        for p in fast.parameters():
            p.requires_grad_(False)
        for part in ("encoder", "decoder"):
            if winograd and hasattr(fast, part):
                winograd_convs(getattr(fast, part))
                fuse_group_norm_silu(getattr(fast, part))
        return fast
    return _cached(_TOK_CACHE, model, (dtype, winograd, fingerprint(vq)), build)

