"""Fused token embedding: two row lookups, their sum and a LayerNorm, forward and backward.

Forward: each program embeds ``BLOCK_M`` tokens (whole rows), saving fp32 mean and rstd.
Backward: ``G`` programs walk row ranges, recompute the summed embedding, form the LayerNorm input
gradient and add it with fp32 atomics into the word and position embedding gradients (many tokens
share an id, the [MASK] id above all, so the order of those sums is not fixed); LayerNorm weight
and bias gradients are per-program partials summed by torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, lib_name, next_pow2
from .layer_norm import _num_sms, ln_rows, ln_rows_backward


@triton.jit
def _embed_fwd_kernel(
    ids_ptr, pos_ptr,  # (M,) int64
    w_ptr, p_ptr,  # (V, D), (P, D) contiguous
    lnw_ptr, lnb_ptr,  # (D,)
    y_ptr,  # (M, D)
    mean_ptr, rstd_ptr,  # (M,) fp32
    M, D, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    r_ok = rows < M
    ok = r_ok[:, None] & (cols[None, :] < D)
    ids = tl.load(ids_ptr + rows, mask=r_ok, other=0)
    pos = tl.load(pos_ptr + rows, mask=r_ok, other=0)
    x = (tl.load(w_ptr + ids[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
         + tl.load(p_ptr + pos[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32))  # fp32
    y, mean, rstd = ln_rows(x, ok, lnw_ptr, lnb_ptr, cols, D, eps)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + rows, mean, mask=r_ok)
    tl.store(rstd_ptr + rows, rstd, mask=r_ok)


@triton.jit
def _embed_bwd_kernel(
    dy_ptr,  # (M, D)
    ids_ptr, pos_ptr,  # (M,) int64
    w_ptr, p_ptr,  # (V, D), (P, D)
    lnw_ptr,  # (D,)
    mean_ptr, rstd_ptr,  # (M,) fp32
    dw_ptr, dp_ptr,  # (V, D), (P, D) fp32, zero-filled, atomically accumulated
    dlnw_ptr, dlnb_ptr,  # (G, D) fp32 partials
    M, D, rows_per_program,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    g = tl.load(lnw_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)
    dg = tl.zeros((BLOCK_D,), tl.float32)
    db = tl.zeros((BLOCK_D,), tl.float32)
    row0 = pid * rows_per_program
    for r0 in range(row0, tl.minimum(row0 + rows_per_program, M), BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        r_ok = (rows < M) & (rows < row0 + rows_per_program)
        ok = r_ok[:, None] & c_ok[None, :]
        ids = tl.load(ids_ptr + rows, mask=r_ok, other=0)
        pos = tl.load(pos_ptr + rows, mask=r_ok, other=0)
        x = (tl.load(w_ptr + ids[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
             + tl.load(p_ptr + pos[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32))
        dy = tl.load(dy_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=r_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=r_ok, other=0.0)
        dx, xhat = ln_rows_backward(x, dy, mean, rstd, g, ok, D)
        tl.atomic_add(dw_ptr + ids[:, None] * D + cols[None, :], dx, mask=ok)
        tl.atomic_add(dp_ptr + pos[:, None] * D + cols[None, :], dx, mask=ok)
        dg += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(dlnw_ptr + pid * D + cols, dg, mask=c_ok)
    tl.store(dlnb_ptr + pid * D + cols, db, mask=c_ok)


def _block_m(D: int, M: int) -> int:
    return max(1, min(next_pow2(M), 64 if INTERPRET else 16, (65536 if INTERPRET else 4096) // next_pow2(D)))


@torch.library.custom_op(lib_name("token_embed_fwd"), mutates_args=())
def token_embed_fwd(ids: torch.Tensor, positions: torch.Tensor, word_weight: torch.Tensor, pos_weight: torch.Tensor,
                    ln_weight: torch.Tensor, ln_bias: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids2, pos2 = ids.reshape(-1).contiguous(), positions.reshape(-1).contiguous()
    M, D = ids2.shape[0], word_weight.shape[1]
    y = torch.empty((M, D), dtype=word_weight.dtype, device=ids.device)
    mean = torch.empty(M, dtype=torch.float32, device=ids.device)
    rstd = torch.empty(M, dtype=torch.float32, device=ids.device)
    if M:
        bm = _block_m(D, M)
        _embed_fwd_kernel[(triton.cdiv(M, bm),)](ids2, pos2, word_weight.contiguous(), pos_weight.contiguous(),
                                                 ln_weight.contiguous(), ln_bias.contiguous(), y, mean, rstd, M, D,
                                                 float(eps), BLOCK_M=bm, BLOCK_D=next_pow2(D),
                                                 num_warps=4 if D <= 1024 else 8)
    return y.view(*ids.shape, D), mean, rstd


@token_embed_fwd.register_fake
def _(ids, positions, word_weight, pos_weight, ln_weight, ln_bias, eps):
    M = ids.numel()
    return (word_weight.new_empty((*ids.shape, word_weight.shape[1])), ids.new_empty(M, dtype=torch.float32),
            ids.new_empty(M, dtype=torch.float32))


@torch.library.custom_op(lib_name("token_embed_bwd"), mutates_args=())
def token_embed_bwd(dy: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, word_weight: torch.Tensor,
                    pos_weight: torch.Tensor, ln_weight: torch.Tensor, mean: torch.Tensor,
                    rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ids2, pos2 = ids.reshape(-1).contiguous(), positions.reshape(-1).contiguous()
    M, D = ids2.shape[0], word_weight.shape[1]
    dy2 = dy.reshape(M, D).contiguous()
    dw = torch.zeros(word_weight.shape, dtype=torch.float32, device=dy.device)
    dp = torch.zeros(pos_weight.shape, dtype=torch.float32, device=dy.device)
    G = max(1, min(M, 4 * _num_sms(dy.device)))
    rows_per = triton.cdiv(max(M, 1), G)
    G = triton.cdiv(max(M, 1), rows_per)
    dlnw = torch.zeros((G, D), dtype=torch.float32, device=dy.device)
    dlnb = torch.zeros((G, D), dtype=torch.float32, device=dy.device)
    if M:
        _embed_bwd_kernel[(G,)](dy2, ids2, pos2, word_weight.contiguous(), pos_weight.contiguous(),
                                ln_weight.contiguous(), mean, rstd, dw, dp, dlnw, dlnb, M, D, rows_per,
                                BLOCK_M=_block_m(D, rows_per), BLOCK_D=next_pow2(D), num_warps=4 if D <= 1024 else 8)
    return (dw.to(word_weight.dtype), dp.to(pos_weight.dtype), dlnw.sum(0).to(ln_weight.dtype),
            dlnb.sum(0).to(ln_weight.dtype))


@token_embed_bwd.register_fake
def _(dy, ids, positions, word_weight, pos_weight, ln_weight, mean, rstd):
    return (word_weight.new_empty(word_weight.shape), pos_weight.new_empty(pos_weight.shape),
            ln_weight.new_empty(ln_weight.shape), ln_weight.new_empty(ln_weight.shape))


class TokenEmbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, positions, word_weight, pos_weight, ln_weight, ln_bias, eps):
        y, mean, rstd = token_embed_fwd(ids, positions, word_weight, pos_weight, ln_weight, ln_bias, eps)
        ctx.save_for_backward(ids, positions, word_weight, pos_weight, ln_weight, mean, rstd)
        ctx.bias_dtype = ln_bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        ids, positions, word_weight, pos_weight, ln_weight, mean, rstd = ctx.saved_tensors
        dw, dp, dlnw, dlnb = token_embed_bwd(dy, ids, positions, word_weight, pos_weight, ln_weight, mean, rstd)
        return None, None, dw, dp, dlnw, dlnb.to(ctx.bias_dtype), None


def token_embed(ids, positions, word_weight, pos_weight, ln_weight, ln_bias, eps: float = 1e-6) -> torch.Tensor:
    """Triton backend of :func:`mage_fast.ops.token_embed.token_embed`."""
    if positions is None:
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    return TokenEmbed.apply(ids, positions, word_weight, pos_weight, ln_weight, ln_bias, float(eps))
