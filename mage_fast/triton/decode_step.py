"""Fused iterative-decoding step: Gumbel-max sampling, confidence, exact-k re-masking.

Two kernels, no sort and no host synchronisation:

1. ``_sample_kernel``, one program per (image, block of positions): the counter-based hash of
   :mod:`mage_fast.ops.decode_step` (``mix32``, in wrapping uint32 arithmetic, so every number
   matches the reference bit for bit), Gumbel-max over the codes, log-softmax of the sample and
   the confidence ``log p + noise_scale * gumbel`` (+inf at known positions).
2. ``_remask_kernel``, one program per image: each position's rank in the row (how many
   confidences are smaller, or equal at a lower position) -- the order of a stable sort without
   sorting -- and re-masks the positions whose rank is below ``mask_len``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..ops.decode_step import _STREAM_CONF, _STREAM_SAMPLE
from ._utils import INTERPRET, lib_name, mix32 as _mix32, next_pow2


@triton.jit
def _log(x, LIBDEVICE: tl.constexpr):
    # On a GPU tl.log may lower to a fast approximation; libdevice's logf is the one torch's CUDA
    # kernels use, so the Gumbel draws match the reference bit for bit. (No libdevice in the interpreter,
    # where tl.log is NumPy's correctly rounded log.)
    if LIBDEVICE:
        y = libdevice.log(x)
    else:
        y = tl.log(x)
    return y


@triton.jit
def _exp(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _gumbel(h, LIBDEVICE: tl.constexpr):  # h: uint32 hash -> -log(-log(u)), u in (0, 1) from the top 24 bits
    u = tl.minimum(((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0), 0.99999994039535522)  # < 1, as the reference
    return -_log(-_log(u, LIBDEVICE), LIBDEVICE)


@triton.jit
def _sample_kernel(
    logits_ptr,  # (B, N, C) any strides
    ids_ptr,  # (B, N) int64 contiguous
    key_ptr,  # (B,) int64 contiguous
    sampled_ptr,  # (B, N) int64 out
    conf_ptr,  # (B, N) fp32 out
    N, C, step, noise_scale, mask_id,
    stride_lb, stride_ln, stride_lc,
    STREAM_SAMPLE: tl.constexpr, STREAM_CONF: tl.constexpr, LIBDEVICE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    c = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    n_ok = n < N
    ok = n_ok[:, None] & (c[None, :] < C)
    x = tl.load(logits_ptr + b.to(tl.int64) * stride_lb + n[:, None].to(tl.int64) * stride_ln + c[None, :] * stride_lc,
                mask=ok, other=float("-inf")).to(tl.float32)  # (BLOCK_N, BLOCK_C), precision raised
    key = tl.load(key_ptr + b).to(tl.uint32)
    row = (step * N + n.to(tl.int64)).to(tl.uint32)  # (BLOCK_N,) counter, mod 2^32
    h = _mix32(_mix32(key ^ STREAM_SAMPLE) + row)
    g = _gumbel(_mix32(h[:, None] + c[None, :].to(tl.uint32)), LIBDEVICE)  # (BLOCK_N, BLOCK_C)
    y = tl.where(ok, x + g, float("-inf"))
    y_max = tl.max(y, axis=1)
    sample = tl.min(tl.where(y == y_max[:, None], c[None, :], BLOCK_C), axis=1)  # first maximum, as argmax
    sample = tl.where(n_ok, sample, 0)
    x_max = tl.where(n_ok, tl.max(x, axis=1), 0.0)  # padded rows are all -inf
    lse = x_max + _log(tl.where(n_ok, tl.sum(_exp(x - x_max[:, None], LIBDEVICE), axis=1), 1.0), LIBDEVICE)
    logp = tl.sum(tl.where(ok & (c[None, :] == sample[:, None]), x, 0.0), axis=1) - lse
    g2 = _gumbel(_mix32(_mix32(_mix32(key ^ STREAM_CONF) + row) + 0), LIBDEVICE)
    ids = tl.load(ids_ptr + b.to(tl.int64) * N + n, mask=n_ok, other=0)
    unknown = ids == mask_id
    conf = tl.where(unknown, logp + noise_scale * g2, float("inf"))  # product rounded first: no fp fusion
    tl.store(sampled_ptr + b.to(tl.int64) * N + n, tl.where(unknown, sample.to(tl.int64), ids), mask=n_ok)
    tl.store(conf_ptr + b.to(tl.int64) * N + n, conf, mask=n_ok)


@triton.jit
def _remask_kernel(
    conf_ptr,  # (B, N) fp32
    sampled_ptr,  # (B, N) int64
    next_ptr,  # (B, N) int64 out
    N, mask_len, mask_id,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, BLOCK_N)  # (BLOCK_N,) every position of the row
    i_ok = i < N
    ci = tl.load(conf_ptr + b * N + i, mask=i_ok, other=float("inf"))
    rank = tl.zeros((BLOCK_N,), tl.int32)
    for j0 in range(0, N, BLOCK_J):
        j = j0 + tl.arange(0, BLOCK_J)  # (BLOCK_J,)
        cj = tl.load(conf_ptr + b * N + j, mask=j < N, other=float("inf"))
        before = (cj[None, :] < ci[:, None]) | ((cj[None, :] == ci[:, None]) & (j[None, :] < i[:, None]))
        rank += tl.sum((before & (j[None, :] < N)).to(tl.int32), axis=1)
    s = tl.load(sampled_ptr + b * N + i, mask=i_ok, other=0)
    tl.store(next_ptr + b * N + i, tl.where(rank < mask_len, mask_id, s), mask=i_ok)


# Compile options of both kernels. No fp fusion: ``a + b * c`` must round the product first, as torch,
# the C++ op (-ffp-contract=off) and CUDA (--fmad=false) do, or the re-masked set depends on the backend
# at ties (Triton 3.9 contracts to fma.rn.f32 by default). compile_check and the tests compile with these.
LAUNCH_OPTIONS = dict(enable_fp_fusion=False)


def sample_blocks(N: int, C: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_C, num_warps) of the sampling kernel: whole rows of codes, about 4096 logits a program."""
    block_c = next_pow2(C)
    block_n = max(1, min(next_pow2(N), (16384 if INTERPRET else 4096) // block_c))
    return block_n, block_c, 4 if block_n * block_c <= 4096 else 8


def remask_blocks(N: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_J, num_warps) of the re-masking kernel: the whole row against BLOCK_J positions a step."""
    block_all = next_pow2(N)
    block_j = max(1, min(block_all, (16384 if INTERPRET else 8192) // block_all))
    return block_all, block_j, 4 if block_all <= 256 else 8


def decode_step_triton(logits, ids, key, step: int, mask_len: int, noise_scale: float, mask_id: int):
    B, N, C = logits.shape
    ids, key = ids.contiguous(), key.contiguous()  # the kernels index both as dense rows
    sampled = torch.empty((B, N), dtype=torch.int64, device=logits.device)
    next_ids = torch.empty((B, N), dtype=torch.int64, device=logits.device)
    conf = torch.empty((B, N), dtype=torch.float32, device=logits.device)
    if B * N == 0:
        return sampled, next_ids
    block_n, block_c, warps = sample_blocks(N, C)
    _sample_kernel[(B, triton.cdiv(N, block_n))](
        logits, ids, key, sampled, conf, N, C, int(step), float(noise_scale), int(mask_id),
        *logits.stride(), STREAM_SAMPLE=_STREAM_SAMPLE, STREAM_CONF=_STREAM_CONF, LIBDEVICE=not INTERPRET,
        BLOCK_N=block_n, BLOCK_C=block_c, num_warps=warps, **LAUNCH_OPTIONS)
    block_all, block_j, warps = remask_blocks(N)
    _remask_kernel[(B,)](conf, sampled, next_ids, N, int(mask_len), int(mask_id),
                         BLOCK_N=block_all, BLOCK_J=block_j, num_warps=warps, **LAUNCH_OPTIONS)
    return sampled, next_ids


@torch.library.custom_op(lib_name("decode_step"), mutates_args=())
def decode_step_custom(logits: torch.Tensor, ids: torch.Tensor, key: torch.Tensor, step: int, mask_len: int,
                       noise_scale: float, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return decode_step_triton(logits, ids, key, step, mask_len, noise_scale, mask_id)


@decode_step_custom.register_fake
def _(logits, ids, key, step, mask_len, noise_scale, mask_id):
    B, N, _ = logits.shape
    return logits.new_empty((B, N), dtype=torch.int64), logits.new_empty((B, N), dtype=torch.int64)


def decode_step(logits, ids, key, step: int, mask_len: int, noise_scale: float, mask_id: int):
    """Triton backend of :func:`mage_fast.ops.decode_step`: returns ``(sampled, next_ids)``."""
    return decode_step_custom(logits, ids, key, int(step), int(mask_len), float(noise_scale), int(mask_id))
