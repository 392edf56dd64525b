"""MLM head with label-smoothed masked cross entropy, chunked so full-size logits never exist.

``fc -> GELU`` run in torch, the LayerNorm is :mod:`mage_fast.triton.layer_norm`, then
:class:`FusedLinearMaskedCE` walks the rows in chunks: the chunk's logits ``h_c @ W[:C]^T`` (input
dtype, (rows, C)), one Triton kernel that adds the bias, computes each row's smoothed loss in fp32
and overwrites the logits with their gradient, then the gradient products for ``h``, ``W`` and
the bias. The gradients are finished in the forward (the loss is a scalar), so the backward only
scales them by the incoming gradient. Peak extra memory: one chunk of logits plus the gradients.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._utils import INTERPRET, lib_name, next_pow2
from .layer_norm import layer_norm


@triton.jit
def _smoothed_ce_kernel(
    logits_ptr,  # (R, C) row stride stride_r; read, then overwritten with d loss / d logits
    bias_ptr,  # (C,)
    target_ptr,  # (R,) int64
    weight_ptr,  # (R,) fp32, the mask
    denom_ptr,  # (1,) fp32, the mask's sum
    loss_ptr,  # (R,) fp32 out: mask * loss / denom
    R, C, stride_r, smoothing,
    WRITE_GRAD: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    r_ok = rows < R
    ok = r_ok[:, None] & (c[None, :] < C)
    offs = rows[:, None].to(tl.int64) * stride_r + c[None, :]
    x = tl.load(logits_ptr + offs, mask=ok, other=0.0).to(tl.float32)  # precision raised: loss in fp32
    x = x + tl.load(bias_ptr + c, mask=c < C, other=0.0).to(tl.float32)[None, :]
    x = tl.where(ok, x, float("-inf"))
    m = tl.where(r_ok, tl.max(x, axis=1), 0.0)
    e = tl.where(ok, tl.exp(x - m[:, None]), 0.0)
    s = tl.where(r_ok, tl.sum(e, axis=1), 1.0)
    lse = m + tl.log(s)
    t = tl.load(target_ptr + rows, mask=r_ok, other=0)
    is_t = c[None, :] == t[:, None]
    x_t = tl.sum(tl.where(is_t & ok, x, 0.0), axis=1)
    x_mean = tl.sum(tl.where(ok, x, 0.0), axis=1) / C
    loss = lse - (1.0 - smoothing) * x_t - smoothing * x_mean
    w = tl.load(weight_ptr + rows, mask=r_ok, other=0.0) / tl.load(denom_ptr)
    tl.store(loss_ptr + rows, loss * w, mask=r_ok)
    if WRITE_GRAD:
        g = e / s[:, None] - (1.0 - smoothing) * is_t.to(tl.float32) - smoothing / C
        tl.store(logits_ptr + offs, (g * w[:, None]).to(logits_ptr.dtype.element_ty), mask=ok)


def ce_blocks(R: int, C: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps) of the loss kernel: whole rows, about 4096 logits a program."""
    bc = next_pow2(C)
    br = max(1, min(next_pow2(R), (32768 if INTERPRET else 4096) // bc))
    return br, bc, 4 if br * bc <= 4096 else 8


@torch.library.custom_op(lib_name("smoothed_ce_"), mutates_args=("logits",))
def smoothed_ce_(logits: torch.Tensor, bias: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                 denom: torch.Tensor, smoothing: float, write_grad: bool) -> torch.Tensor:
    """Per-row weighted smoothed CE of ``logits + bias``; with ``write_grad`` logits become the gradient."""
    R, C = logits.shape
    loss = torch.empty(R, dtype=torch.float32, device=logits.device)
    if R:
        br, bc, warps = ce_blocks(R, C)
        bias, target, weight = bias.contiguous(), target.contiguous(), weight.contiguous()  # indexed densely
        _smoothed_ce_kernel[(triton.cdiv(R, br),)](logits, bias, target, weight, denom, loss, R, C, logits.stride(0),
                                                   float(smoothing), WRITE_GRAD=write_grad, BLOCK_R=br, BLOCK_C=bc,
                                                   num_warps=warps)
    return loss


@smoothed_ce_.register_fake
def _(logits, bias, target, weight, denom, smoothing, write_grad):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


class FusedLinearMaskedCE(torch.autograd.Function):
    """loss = sum_r mask_r * smoothed_ce(h_r @ W^T + b, target_r) / sum(mask), chunked over rows."""

    @staticmethod
    def forward(ctx, h, weight, bias, target, mask, smoothing: float, chunk_rows: int, grad_enabled: bool):
        # h: (M, D), weight: (C, D), bias: (C,), target: (M,) int64, mask: (M,)
        M, D = h.shape
        need_h, need_w, need_b = (n and grad_enabled for n in ctx.needs_input_grad[:3])
        w = weight.to(h.dtype)
        mask = mask.to(torch.float32)
        denom = mask.sum().reshape(1)
        loss_rows = torch.empty(M, dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        db = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b else None
        for r0 in range(0, M, chunk_rows):
            r1 = min(M, r0 + chunk_rows)
            hc = h[r0:r1]
            logits = hc @ w.t()  # (rows, C) in h's dtype, fp32 accumulation in the product
            loss_rows[r0:r1] = smoothed_ce_(logits, bias, target[r0:r1], mask[r0:r1], denom, smoothing,
                                            need_h or need_w or need_b)
            if need_h:
                dh[r0:r1] = logits @ w
            if need_w:
                dw += (logits.t() @ hc).float()
            if need_b:
                db += logits.sum(0, dtype=torch.float32)
        ctx.save_for_backward(*(t for t in (dh, dw, db) if t is not None))
        ctx.have = (need_h, need_w, need_b)
        ctx.dtypes = (weight.dtype, bias.dtype)
        return loss_rows.sum()

    @staticmethod
    def backward(ctx, go):
        saved = iter(ctx.saved_tensors)
        dh, dw, db = (next(saved) if have else None for have in ctx.have)
        dh = dh * go.to(dh.dtype) if dh is not None else None
        dw = (dw * go).to(ctx.dtypes[0]) if dw is not None else None
        db = (db * go).to(ctx.dtypes[1]) if db is not None else None
        return dh, dw, db, None, None, None, None, None


def default_chunk_rows(num_codes: int) -> int:
    """Rows per chunk: about 4M logits (8 MB in bf16) per chunk on a GPU."""
    return max(1, (1 << 22) // max(1, num_codes))


def mlm_head_loss(x, fc_weight, fc_bias, ln_weight, ln_bias, word_embeddings, bias, target, mask, num_codes: int,
                  smoothing: float = 0.1, ln_eps: float = 1e-5, chunk_rows: Optional[int] = None) -> torch.Tensor:
    """Triton backend of :func:`mage_fast.ops.mlm_head_loss.mlm_head_loss`."""
    h = F.gelu(F.linear(x, fc_weight, fc_bias))
    h = layer_norm(h, ln_weight, ln_bias, ln_eps)
    D = h.shape[-1]
    chunk = chunk_rows or default_chunk_rows(num_codes)
    return FusedLinearMaskedCE.apply(h.reshape(-1, D), word_embeddings[:num_codes], bias.reshape(-1)[:num_codes],
                                     target.reshape(-1), mask.reshape(-1), float(smoothing), int(chunk),
                                     torch.is_grad_enabled())


class MaskedCE(torch.autograd.Function):
    """:func:`mage_fast.ops.masked_ce` on given logits: one kernel, the gradient kept in the input dtype."""

    @staticmethod
    def forward(ctx, logits, target, mask, smoothing: float, grad_enabled: bool):
        # logits: (B, N, C) any strides, target: (B, N) int64, mask: (B, N)
        C = logits.shape[-1]
        work = logits.reshape(-1, C).clone(memory_format=torch.contiguous_format)  # becomes the gradient
        mask = mask.reshape(-1).to(torch.float32)
        write = grad_enabled and ctx.needs_input_grad[0]
        zero_bias = torch.zeros(C, dtype=logits.dtype, device=logits.device)
        loss = smoothed_ce_(work, zero_bias, target.reshape(-1), mask, mask.sum().reshape(1), smoothing, write)
        if write:
            ctx.save_for_backward(work)
        ctx.shape = logits.shape
        return loss.sum()

    @staticmethod
    def backward(ctx, go):
        (grad,) = ctx.saved_tensors
        return (grad * go.to(grad.dtype)).view(ctx.shape), None, None, None, None


def masked_ce(logits, target, mask, smoothing: float = 0.1) -> torch.Tensor:
    """Triton backend of :func:`mage_fast.ops.masked_ce`."""
    return MaskedCE.apply(logits, target, mask, float(smoothing), torch.is_grad_enabled())
