"""LayerNorm forward and backward.

Forward: each program normalises ``BLOCK_M`` whole rows (fp32 mean and rstd, saved for the
backward). Backward: each of ``G`` programs walks a contiguous range of rows, writes dx, and keeps
fp32 partial sums of dweight and dbias in registers; the (G, D) partials are summed by torch, so
the result is deterministic (no atomics).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, lib_name, next_pow2


@triton.jit
def ln_rows(x, ok, w_ptr, b_ptr, cols, D, eps):
    """LayerNorm of a (BLOCK_M, BLOCK_D) fp32 tile of whole rows (``ok`` masks the padding):
    returns (y, mean, rstd) with fp32 statistics."""
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    return xc * rstd[:, None] * w[None, :] + b[None, :], mean, rstd


@triton.jit
def ln_rows_backward(x, dy, mean, rstd, w, ok, D):
    """LayerNorm backward on a fp32 tile of whole rows: returns (dx, xhat); the weight and bias
    gradients of these rows are ``sum(dy * xhat, 0)`` and ``sum(dy, 0)``."""
    xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
    g = dy * w[None, :]
    c1 = tl.sum(g * xhat, axis=1) / D
    c2 = tl.sum(g, axis=1) / D
    return (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None], xhat


@triton.jit
def _ln_fwd_kernel(
    x_ptr,  # (M, D) contiguous
    w_ptr, b_ptr,  # (D,)
    y_ptr,  # (M, D) x's dtype
    mean_ptr, rstd_ptr,  # (M,) fp32
    M, D, eps,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    ok = (rows[:, None] < M) & (cols[None, :] < D)
    offs = rows[:, None].to(tl.int64) * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)  # precision raised: fp32 statistics
    y, mean, rstd = ln_rows(x, ok, w_ptr, b_ptr, cols, D, eps)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=ok)
    tl.store(mean_ptr + rows, mean, mask=rows < M)
    tl.store(rstd_ptr + rows, rstd, mask=rows < M)


@triton.jit
def _ln_bwd_kernel(
    dy_ptr, x_ptr,  # (M, D) contiguous
    w_ptr,  # (D,)
    mean_ptr, rstd_ptr,  # (M,) fp32
    dx_ptr,  # (M, D) x's dtype
    dw_ptr, db_ptr,  # (G, D) fp32 partial sums
    M, D, rows_per_program,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < D
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_D,), tl.float32)
    db = tl.zeros((BLOCK_D,), tl.float32)
    row0 = pid * rows_per_program
    for r0 in range(row0, tl.minimum(row0 + rows_per_program, M), BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = (rows < M) & (rows < row0 + rows_per_program)
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        dx, xhat = ln_rows_backward(x, dy, mean, rstd, w, ok, D)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=ok)
        dw += tl.sum(dy * xhat, axis=0)
        db += tl.sum(dy, axis=0)
    tl.store(dw_ptr + pid * D + cols, dw, mask=col_ok)
    tl.store(db_ptr + pid * D + cols, db, mask=col_ok)


def _block_m(D: int) -> int:
    bd = next_pow2(D)
    return max(1, min(64 if INTERPRET else 16, (65536 if INTERPRET else 4096) // bd))


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return 1 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


def _warps(D: int) -> int:
    return 4 if D <= 1024 else 8


def blocks(D: int, rows: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_D, num_warps) for ``rows`` rows of length D."""
    return min(_block_m(D), next_pow2(rows)), next_pow2(D), _warps(D)


@torch.library.custom_op(lib_name("layer_norm_fwd"), mutates_args=())
def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    M = x2.shape[0]
    y = torch.empty_like(x2)
    mean = torch.empty(M, dtype=torch.float32, device=x.device)
    rstd = torch.empty(M, dtype=torch.float32, device=x.device)
    if M:
        bm = min(_block_m(D), next_pow2(M))
        _ln_fwd_kernel[(triton.cdiv(M, bm),)](x2, weight.contiguous(), bias.contiguous(), y, mean, rstd, M, D,
                                              float(eps), BLOCK_M=bm, BLOCK_D=next_pow2(D), num_warps=_warps(D))
    return y.view(x.shape), mean, rstd


@layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    M = x.numel() // x.shape[-1]
    return x.new_empty(x.shape), x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32)


@torch.library.custom_op(lib_name("layer_norm_bwd"), mutates_args=())
def layer_norm_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    D = x.shape[-1]
    x2, dy2 = x.reshape(-1, D).contiguous(), dy.reshape(-1, D).contiguous()
    M = x2.shape[0]
    dx = torch.empty_like(x2)
    G = max(1, min(M, 4 * _num_sms(x.device)))
    rows_per = triton.cdiv(max(M, 1), G)
    G = triton.cdiv(max(M, 1), rows_per)
    dw = torch.empty((G, D), dtype=torch.float32, device=x.device)
    db = torch.empty((G, D), dtype=torch.float32, device=x.device)
    if M:
        bm = min(_block_m(D), next_pow2(rows_per))
        _ln_bwd_kernel[(G,)](dy2, x2, weight.contiguous(), mean, rstd, dx, dw, db, M, D, rows_per,
                             BLOCK_M=bm, BLOCK_D=next_pow2(D), num_warps=_warps(D))
    else:
        dw.zero_()
        db.zero_()
    return dx.view(x.shape), dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)


@layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)


class LayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, rstd = layer_norm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.bias_dtype = bias.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = layer_norm_bwd(dy, x, weight, mean, rstd)
        return dx, dw, db.to(ctx.bias_dtype), None


def layer_norm(x, weight, bias, eps: float = 1e-5) -> torch.Tensor:
    """Triton backend of :func:`mage_fast.ops.layer_norm.layer_norm` (weight and bias required)."""
    return LayerNorm.apply(x, weight, bias, float(eps))
