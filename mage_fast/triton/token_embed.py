"""Fused token embedding: two row lookups, their sum and a LayerNorm, forward and backward.

Rows are held as the LayerNorm kernels hold them: two power-of-two pieces (768 = 512 + 256).
Forward: each program embeds ``BLOCK_M`` tokens (whole rows), saving fp32 mean and rstd.
Backward: ``G`` programs walk row ranges, recompute the summed embedding, form the LayerNorm input
gradient and add it with fp32 atomics into the word and position embedding gradients. The most
frequent id (the [MASK] id: half or more of the tokens) is found first (a count on the device);
each program sums that id's rows in registers and adds them with one atomic per column at the end,
instead of one per token, so the hot row sees G adds instead of thousands. The order of those sums
is not fixed; LayerNorm weight and bias gradients are per-program partials summed by torch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import lib_name
from .layer_norm import _num_sms, blocks, dx_piece, ln_piece, row_stats, xhat_and_g


@triton.jit
def _embed_fwd_kernel(
    ids_ptr, pos_ptr,  # (M,) int64
    w_ptr, p_ptr,  # (V, D), (P, D) contiguous
    lnw_ptr, lnb_ptr,  # (D,)
    y_ptr,  # (M, D)
    mean_ptr, rstd_ptr,  # (M,) fp32
    M, D, eps,
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    r_ok = rows < M
    oka = r_ok[:, None] & (ca[None, :] < D)
    okb = r_ok[:, None] & (cb[None, :] < D)
    wrow = tl.load(ids_ptr + rows, mask=r_ok, other=0)[:, None] * D  # (BLOCK_M, 1)
    prow = tl.load(pos_ptr + rows, mask=r_ok, other=0)[:, None] * D
    xa = (tl.load(w_ptr + wrow + ca[None, :], mask=oka, other=0.0).to(tl.float32)
          + tl.load(p_ptr + prow + ca[None, :], mask=oka, other=0.0).to(tl.float32))  # fp32
    xb = (tl.load(w_ptr + wrow + cb[None, :], mask=okb, other=0.0).to(tl.float32)
          + tl.load(p_ptr + prow + cb[None, :], mask=okb, other=0.0).to(tl.float32))
    mean, rstd = row_stats(xa, oka, xb, okb, D, eps)
    out = rows[:, None].to(tl.int64) * D
    tl.store(y_ptr + out + ca[None, :], ln_piece(xa, oka, mean, rstd, lnw_ptr, lnb_ptr, ca, D)
             .to(y_ptr.dtype.element_ty), mask=oka)
    tl.store(y_ptr + out + cb[None, :], ln_piece(xb, okb, mean, rstd, lnw_ptr, lnb_ptr, cb, D)
             .to(y_ptr.dtype.element_ty), mask=okb)
    tl.store(mean_ptr + rows, mean, mask=r_ok)
    tl.store(rstd_ptr + rows, rstd, mask=r_ok)


@triton.jit
def _embed_bwd_kernel(
    dy_ptr,  # (M, D)
    ids_ptr, pos_ptr,  # (M,) int64
    hot_ptr,  # (1,) int64: the most frequent id
    w_ptr, p_ptr,  # (V, D), (P, D)
    lnw_ptr,  # (D,)
    mean_ptr, rstd_ptr,  # (M,) fp32
    dw_ptr, dp_ptr,  # (V, D), (P, D) fp32, zero-filled, atomically accumulated
    dlnw_ptr, dlnb_ptr,  # (G, D) fp32 partials
    M, D, rows_per_program,
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    ga_w = tl.load(lnw_ptr + ca, mask=ca < D, other=0.0).to(tl.float32)
    gb_w = tl.load(lnw_ptr + cb, mask=cb < D, other=0.0).to(tl.float32)
    hot = tl.load(hot_ptr)
    dga = tl.zeros((BLOCK_A,), tl.float32)
    dgb = tl.zeros((BLOCK_B,), tl.float32)
    dba = tl.zeros((BLOCK_A,), tl.float32)
    dbb = tl.zeros((BLOCK_B,), tl.float32)
    hota = tl.zeros((BLOCK_A,), tl.float32)  # this program's gradient of the hot id's row
    hotb = tl.zeros((BLOCK_B,), tl.float32)
    row0 = pid * rows_per_program
    for r0 in range(row0, tl.minimum(row0 + rows_per_program, M), BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        r_ok = (rows < M) & (rows < row0 + rows_per_program)
        oka = r_ok[:, None] & (ca[None, :] < D)
        okb = r_ok[:, None] & (cb[None, :] < D)
        ids = tl.load(ids_ptr + rows, mask=r_ok, other=0)
        is_hot = (ids == hot)[:, None]
        wrow = ids[:, None] * D
        prow = tl.load(pos_ptr + rows, mask=r_ok, other=0)[:, None] * D
        xa = (tl.load(w_ptr + wrow + ca[None, :], mask=oka, other=0.0).to(tl.float32)
              + tl.load(p_ptr + prow + ca[None, :], mask=oka, other=0.0).to(tl.float32))
        xb = (tl.load(w_ptr + wrow + cb[None, :], mask=okb, other=0.0).to(tl.float32)
              + tl.load(p_ptr + prow + cb[None, :], mask=okb, other=0.0).to(tl.float32))
        base = rows[:, None].to(tl.int64) * D
        dya = tl.load(dy_ptr + base + ca[None, :], mask=oka, other=0.0).to(tl.float32)
        dyb = tl.load(dy_ptr + base + cb[None, :], mask=okb, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=r_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=r_ok, other=0.0)
        xha, gpa = xhat_and_g(xa, dya, mean, rstd, ga_w, oka)
        xhb, gpb = xhat_and_g(xb, dyb, mean, rstd, gb_w, okb)
        c1 = (tl.sum(gpa * xha, axis=1) + tl.sum(gpb * xhb, axis=1)) / D
        c2 = (tl.sum(gpa, axis=1) + tl.sum(gpb, axis=1)) / D
        dxa = tl.where(oka, dx_piece(xha, gpa, c1, c2, rstd), 0.0)
        dxb = tl.where(okb, dx_piece(xhb, gpb, c1, c2, rstd), 0.0)
        tl.atomic_add(dw_ptr + wrow + ca[None, :], dxa, mask=oka & ~is_hot)
        tl.atomic_add(dw_ptr + wrow + cb[None, :], dxb, mask=okb & ~is_hot)
        hota += tl.sum(tl.where(is_hot, dxa, 0.0), axis=0)
        hotb += tl.sum(tl.where(is_hot, dxb, 0.0), axis=0)
        tl.atomic_add(dp_ptr + prow + ca[None, :], dxa, mask=oka)
        tl.atomic_add(dp_ptr + prow + cb[None, :], dxb, mask=okb)
        dga += tl.sum(dya * xha, axis=0)
        dgb += tl.sum(dyb * xhb, axis=0)
        dba += tl.sum(dya, axis=0)
        dbb += tl.sum(dyb, axis=0)
    tl.atomic_add(dw_ptr + hot * D + ca, hota, mask=ca < D)
    tl.atomic_add(dw_ptr + hot * D + cb, hotb, mask=cb < D)
    tl.store(dlnw_ptr + pid * D + ca, dga, mask=ca < D)
    tl.store(dlnw_ptr + pid * D + cb, dgb, mask=cb < D)
    tl.store(dlnb_ptr + pid * D + ca, dba, mask=ca < D)
    tl.store(dlnb_ptr + pid * D + cb, dbb, mask=cb < D)


def _meta(D: int, M: int) -> dict:
    meta = blocks(D, M)
    meta["num_warps"] = 4 if D <= 1024 else 8
    return meta


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
        meta = _meta(D, M)
        _embed_fwd_kernel[(triton.cdiv(M, meta["BLOCK_M"]),)](ids2, pos2, word_weight.contiguous(),
                                                              pos_weight.contiguous(), ln_weight.contiguous(),
                                                              ln_bias.contiguous(), y, mean, rstd, M, D, float(eps),
                                                              **meta)
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
        counts = torch.zeros(word_weight.shape[0], dtype=torch.int32, device=dy.device)
        counts.scatter_add_(0, ids2, torch.ones_like(ids2, dtype=torch.int32))
        hot = counts.argmax().reshape(1)  # (1,) int64: the most frequent id, found on the device (no sync)
        _embed_bwd_kernel[(G,)](dy2, ids2, pos2, hot, word_weight.contiguous(), pos_weight.contiguous(),
                                ln_weight.contiguous(), mean, rstd, dw, dp, dlnw, dlnb, M, D, rows_per,
                                **_meta(D, rows_per))
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
