"""Backend ``"triton"``: the Triton kernels of :mod:`mage_fast.triton`.

Importing this module is cheap: it registers a ``supports`` check and a thin launcher on each op
and imports neither ``triton`` nor the kernel files; the first call that selects Triton does.
Triton runs CUDA tensors. CPU tensors are declined (Triton's interpreter is a test tool, one
program at a time) unless ``MAGE_FAST_TRITON_INTERPRET_DISPATCH=1`` and ``TRITON_INTERPRET=1``
are set, which is how the tests route the public ops through the kernels.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Optional

import torch

from ..ops.attention import attention_op
from ..ops.codebook import codebook_nn_op
from ..ops.decode_step import decode_step_op
from ..ops.layer_norm import layer_norm_op
from ..ops.mlm_head_loss import mlm_head_loss_op
from ..ops.mlm_loss import masked_ce_op
from ..ops.token_drop import gather_tokens_op, scatter_tokens_op
from ..ops.token_embed import token_embed_op

NAME = "triton"
_FLOAT = (torch.float32, torch.float16, torch.bfloat16)


_TRITON_FOUND = importlib.util.find_spec("triton") is not None  # looks for it, imports nothing
_KERNEL_FILES = ("attention", "codebook", "decode_step", "layer_norm", "mlm_head_loss", "token_drop", "token_embed")
_loaded: dict = {}


def _triton_reason() -> Optional[str]:
    return None if _TRITON_FOUND else "triton is not installed (pip install triton)"


def _kernels(name: str):
    """The kernel file ``mage_fast.triton.<name>``, imported on first use."""
    mod = _loaded.get(name)
    if mod is None:
        mod = _loaded[name] = importlib.import_module(f"mage_fast.triton.{name}")
    return mod


def load_kernels() -> None:
    """Import every kernel file now (before ``torch.compile(fullgraph=True)``, which cannot trace imports)."""
    for name in _KERNEL_FILES:
        _kernels(name)


def _interpret_dispatch() -> bool:
    return (os.environ.get("MAGE_FAST_TRITON_INTERPRET_DISPATCH") == "1"
            and os.environ.get("TRITON_INTERPRET") == "1")


def _device_reason(*tensors: torch.Tensor) -> Optional[str]:
    if (r := _triton_reason()) is not None:
        return r
    devs = {t.device for t in tensors}
    if len(devs) > 1:
        return f"tensors on different devices ({', '.join(sorted(map(str, devs)))})"
    dev = tensors[0].device
    if dev.type == "cuda":
        return None
    if dev.type == "cpu":
        if _interpret_dispatch():
            return None
        return ("tensors on the CPU (Triton needs CUDA; the interpreter is used only with "
                "MAGE_FAST_TRITON_INTERPRET_DISPATCH=1 and TRITON_INTERPRET=1)")
    return f"device {dev.type} not supported"


def _dtype_reason(*tensors: torch.Tensor) -> Optional[str]:
    bad = [t.dtype for t in tensors if t.dtype not in _FLOAT]
    return f"dtype {bad[0]} not supported (float32, float16, bfloat16)" if bad else None


# ---------------------------------------------------------------- codebook nearest neighbour
def _codebook_nn_supports(z, codebook, metric="l2") -> Optional[str]:
    if (r := _device_reason(z, codebook) or _dtype_reason(z, codebook)) is not None:
        return r
    if metric not in ("l2", "cosine"):
        return f"metric {metric!r} not supported"
    if codebook.shape[0] == 0:
        return "empty codebook"
    if z.shape[1] > 256:
        return f"code dim {z.shape[1]} > 256 (input rows are held in registers)"
    return None


def _codebook_nn(z, codebook, metric="l2"):
    return _kernels("codebook").codebook_nn(z, codebook, metric)


codebook_nn_op.register(NAME, _codebook_nn, _codebook_nn_supports)


# ---------------------------------------------------------------- decode step
def _decode_step_supports(logits, ids, key, step, mask_len, noise_scale, mask_id) -> Optional[str]:
    if (r := _device_reason(logits, ids, key) or _dtype_reason(logits)) is not None:
        return r
    if ids.dtype != torch.int64 or key.dtype != torch.int64:
        return f"ids/key dtype {ids.dtype}/{key.dtype} not supported (int64)"
    if logits.shape[2] > 8192:
        return f"{logits.shape[2]} codes > 8192 (a row of logits is held in registers)"
    if logits.shape[1] > 4096:
        return f"{logits.shape[1]} positions > 4096 (the rank of each position is found pairwise)"
    return None


def _decode_step(logits, ids, key, step, mask_len, noise_scale, mask_id):
    return _kernels("decode_step").decode_step(logits, ids, key, step, mask_len, noise_scale, mask_id)


decode_step_op.register(NAME, _decode_step, _decode_step_supports)


# ---------------------------------------------------------------- token dropping and restoring
def _index_reason(x, index) -> Optional[str]:
    if index.dtype != torch.int64:
        return f"index dtype {index.dtype} not supported (int64)"
    if x.dim() != 3 or index.dim() != 2 or index.shape[0] != x.shape[0]:
        return f"shapes {tuple(x.shape)} / {tuple(index.shape)} are not (B, *, D) / (B, K)"
    return None


def _gather_tokens_supports(x, index) -> Optional[str]:
    return _device_reason(x, index) or _dtype_reason(x) or _index_reason(x, index)


def _gather_tokens(x, index):
    return _kernels("token_drop").gather_tokens(x, index)


def _scatter_tokens_supports(x, index, all_mask, pos_embed) -> Optional[str]:
    if (r := _device_reason(x, index, all_mask, pos_embed) or _dtype_reason(x, pos_embed)
            or _index_reason(x, index)) is not None:
        return r
    if pos_embed.numel() != all_mask.shape[1] * x.shape[2]:
        return f"pos_embed {tuple(pos_embed.shape)} is not (1, L, D) for L={all_mask.shape[1]}, D={x.shape[2]}"
    return None


def _scatter_tokens(x, index, all_mask, pos_embed):
    return _kernels("token_drop").scatter_tokens(x, index, all_mask, pos_embed)


gather_tokens_op.register(NAME, _gather_tokens, _gather_tokens_supports)
scatter_tokens_op.register(NAME, _scatter_tokens, _scatter_tokens_supports)


# ---------------------------------------------------------------- flash attention
def _attention_supports(q, k, v, dropout_p=0.0, causal=False, scale=None) -> Optional[str]:
    if (r := _device_reason(q, k, v) or _dtype_reason(q, k, v)) is not None:
        return r
    if not (q.dtype == k.dtype == v.dtype):
        return f"mixed dtypes {q.dtype}/{k.dtype}/{v.dtype}"
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return f"shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} are not (B, H, N, d) with matching k/v"
    if q.shape[3] > 256:
        return f"head dim {q.shape[3]} > 256"
    if causal and q.shape[2] != k.shape[2]:
        return "causal attention needs as many queries as keys"
    if not 0.0 <= dropout_p < 1.0:
        return f"dropout_p {dropout_p} outside [0, 1)"
    return None


def _attention(q, k, v, dropout_p=0.0, causal=False, scale=None):
    return _kernels("attention").attention(q, k, v, dropout_p=dropout_p, causal=causal, scale=scale)


# Tiles (BLOCK_M, BLOCK_N) of the forward autotune configs (mage_fast.triton.attention._fwd_configs).
_ATTENTION_TILES = ((128, 64), (64, 64), (128, 32), (64, 32))
ATTENTION_PAD_LIMIT = 1.15


def attention_padding(n_q: int, n_k: int, d: int) -> float:
    """Cost model of the Triton attention: the work its best-fitting forward tile does (lengths padded
    to tile multiples, the head dim to a power of two) over the ideal ``n_q * n_k * d``."""
    dp = max(16, 1 << (max(d, 1) - 1).bit_length())
    tiles = min(-(-n_q // bm) * bm * -(-n_k // bn) * bn for bm, bn in _ATTENTION_TILES)
    return tiles * dp / (max(n_q, 1) * max(n_k, 1) * max(d, 1))


def _attention_defer(q, k, v, dropout_p=0.0, causal=False, scale=None) -> Optional[str]:
    """On CUDA, leave the call to the next backend (SDPA) unless the cost model says the Triton tiles do
    close to the ideal work: no measurement on a GPU shows these kernels faster than SDPA yet.
    MAGE_FAST_BACKEND_ATTENTION=triton forces them."""
    if q.device.type != "cuda":
        return None
    pad = attention_padding(q.shape[2], k.shape[2], q.shape[3])
    if pad > ATTENTION_PAD_LIMIT:
        return (f"cost model: padded work {pad:.2f}x the ideal at N={q.shape[2]}/{k.shape[2]}, d={q.shape[3]} "
                f"(> {ATTENTION_PAD_LIMIT}); unmeasured against SDPA")
    return None


attention_op.register(NAME, _attention, _attention_supports, defer=_attention_defer)


# Library kernels, when installed, rank above Triton for half-precision CUDA calls: each is a
# tuned CUDA implementation. All take (B, N, H, d); ours is (B, H, N, d), hence the transposes.
def _library_supports(module: str, dropout: bool):
    top = module.split(".")[0]
    found = importlib.util.find_spec(top) is not None  # the top-level package, nothing imported
    import_error: list = []

    def importable() -> Optional[str]:
        if not import_error:  # first CUDA call: import the module for real, once
            try:
                importlib.import_module(module)
                import_error.append(None)
            except Exception as e:  # a library built for another torch/CUDA must not break the op
                import_error.append(f"{module} failed to import ({type(e).__name__}: {e})")
        return import_error[0]

    def supports(q, k, v, dropout_p=0.0, causal=False, scale=None) -> Optional[str]:
        if not found:
            return f"{top} is not installed"
        if q.device.type != "cuda":
            return f"tensors on {q.device.type} (CUDA only)"
        if q.dtype not in (torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
            return f"dtype {q.dtype}/{k.dtype}/{v.dtype} not supported (float16 or bfloat16, all the same)"
        if q.dim() != 4 or q.shape[3] % 8 or q.shape[3] > 256:
            return f"head dim {q.shape[-1]} not supported (a multiple of 8, at most 256)"
        if dropout_p > 0 and not dropout:
            return "no attention dropout"
        if causal and q.shape[2] != k.shape[2]:
            return "causal attention needs as many queries as keys"
        return importable()
    return supports


def _flash_attn(q, k, v, dropout_p=0.0, causal=False, scale=None):
    from flash_attn import flash_attn_func
    o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p,
                        softmax_scale=scale, causal=causal)
    return o.transpose(1, 2)


def _flash_attn_4(q, k, v, dropout_p=0.0, causal=False, scale=None):
    from flash_attn.cute import flash_attn_func
    o = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale, causal=causal)
    o = o[0] if isinstance(o, tuple) else o  # some versions also return the log-sum-exp
    return o.transpose(1, 2)


def _xformers(q, k, v, dropout_p=0.0, causal=False, scale=None):
    import xformers.ops as xops
    bias = xops.LowerTriangularMask() if causal else None
    o = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias,
                                        p=dropout_p, scale=scale)
    return o.transpose(1, 2)


attention_op.register("xformers", _xformers, _library_supports("xformers", dropout=True))
attention_op.register("flash_attn", _flash_attn, _library_supports("flash_attn.flash_attn_interface", dropout=True))
attention_op.register("flash_attn_4", _flash_attn_4, _library_supports("flash_attn.cute", dropout=False))


# ---------------------------------------------------------------- LayerNorm
def _layer_norm_supports(x, weight, bias, eps=1e-5) -> Optional[str]:
    if weight is None or bias is None:
        return "needs both weight and bias (elementwise_affine=True)"
    if (r := _device_reason(x, weight, bias) or _dtype_reason(x, weight, bias)) is not None:
        return r
    if x.shape[-1] > 16384:
        return f"row length {x.shape[-1]} > 16384 (a row is held in registers)"
    return None


def _layer_norm(x, weight, bias, eps=1e-5):
    return _kernels("layer_norm").layer_norm(x, weight, bias, eps)


layer_norm_op.register(NAME, _layer_norm, _layer_norm_supports)


# ---------------------------------------------------------------- MLM head + masked cross entropy
def _mlm_head_loss_supports(x, fc_weight, fc_bias, ln_weight, ln_bias, word_embeddings, bias, target, mask,
                            num_codes, smoothing=0.1, ln_eps=1e-5) -> Optional[str]:
    floats = (x, fc_weight, fc_bias, ln_weight, ln_bias, word_embeddings, bias)
    if (r := _device_reason(*floats, target, mask) or _dtype_reason(*floats)) is not None:
        return r
    if target.dtype != torch.int64:
        return f"target dtype {target.dtype} not supported (int64)"
    if num_codes > 16384:
        return f"{num_codes} codes > 16384 (a row of logits is held in registers)"
    return None


def _mlm_head_loss(x, fc_weight, fc_bias, ln_weight, ln_bias, word_embeddings, bias, target, mask, num_codes,
                   smoothing=0.1, ln_eps=1e-5):
    return _kernels("mlm_head_loss").mlm_head_loss(x, fc_weight, fc_bias, ln_weight, ln_bias, word_embeddings, bias,
                                                   target, mask, num_codes, smoothing, ln_eps)


mlm_head_loss_op.register(NAME, _mlm_head_loss, _mlm_head_loss_supports)


def _masked_ce_supports(logits, target, mask, smoothing=0.1) -> Optional[str]:
    if (r := _device_reason(logits, target, mask) or _dtype_reason(logits)) is not None:
        return r
    if target.dtype != torch.int64:
        return f"target dtype {target.dtype} not supported (int64)"
    if logits.shape[-1] > 16384:
        return f"{logits.shape[-1]} classes > 16384 (a row of logits is held in registers)"
    return None


def _masked_ce(logits, target, mask, smoothing=0.1):
    return _kernels("mlm_head_loss").masked_ce(logits, target, mask, smoothing)


masked_ce_op.register(NAME, _masked_ce, _masked_ce_supports)


# ---------------------------------------------------------------- token embedding + LayerNorm
def _token_embed_supports(ids, positions, word_weight, pos_weight, ln_weight, ln_bias, eps=1e-6) -> Optional[str]:
    tensors = [ids, word_weight, pos_weight, ln_weight, ln_bias] + ([positions] if positions is not None else [])
    if (r := _device_reason(*tensors) or _dtype_reason(word_weight, pos_weight, ln_weight, ln_bias)) is not None:
        return r
    if ids.dtype != torch.int64 or (positions is not None and positions.dtype != torch.int64):
        return "ids/positions must be int64"
    if word_weight.shape[1] > 16384:
        return f"embedding dim {word_weight.shape[1]} > 16384 (a row is held in registers)"
    return None


def _token_embed(ids, positions, word_weight, pos_weight, ln_weight, ln_bias, eps=1e-6):
    return _kernels("token_embed").token_embed(ids, positions, word_weight, pos_weight, ln_weight, ln_bias, eps)


token_embed_op.register(NAME, _token_embed, _token_embed_supports)
