"""LayerNorm forward and backward.

A row of length D is held in registers as two power-of-two pieces, ``BLOCK_A`` (the largest power
of two <= D) and ``BLOCK_B`` (the rest, rounded up; fully masked when D is a power of two), so D=768
is 512 + 256 with no idle lane where one 1024-wide tile left a quarter idle (48 = 32 + 16 likewise).
Forward: each program normalises ``BLOCK_M`` whole rows (fp32 mean and rstd, two-pass in registers,
saved for the backward). Backward: each of ``G`` programs walks a contiguous range of rows, writes dx,
and keeps fp32 partial sums of dweight and dbias in registers; the (G, D) partials are summed by
torch, so the result is deterministic (no atomics).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, lib_name, next_pow2


@triton.jit
def row_stats(xa, oka, xb, okb, D, eps):
    """fp32 (mean, rstd) of rows split in two masked pieces (BLOCK_M, BLOCK_A) and (BLOCK_M, BLOCK_B)."""
    mean = (tl.sum(xa, axis=1) + tl.sum(xb, axis=1)) / D
    xca = tl.where(oka, xa - mean[:, None], 0.0)
    xcb = tl.where(okb, xb - mean[:, None], 0.0)
    var = (tl.sum(xca * xca, axis=1) + tl.sum(xcb * xcb, axis=1)) / D
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def ln_piece(x, ok, mean, rstd, w_ptr, b_ptr, cols, D):
    """LayerNorm output of one piece (fp32) given the row statistics."""
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
    return tl.where(ok, x - mean[:, None], 0.0) * rstd[:, None] * w[None, :] + b[None, :]


@triton.jit
def xhat_and_g(x, dy, mean, rstd, w, ok):
    """Backward of one piece: (xhat, dy * w), zero in the padding."""
    return tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0), dy * w[None, :]


@triton.jit
def dx_piece(xhat, g, c1, c2, rstd):
    """LayerNorm input gradient of one piece: (g - (xhat c1 + c2)) rstd, with c1 = mean(g xhat), c2 = mean(g)."""
    return (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]


@triton.jit
def _ln_fwd_kernel(
    x_ptr,  # (M, D) contiguous
    w_ptr, b_ptr,  # (D,)
    y_ptr,  # (M, D) x's dtype
    mean_ptr, rstd_ptr,  # (M,) fp32
    M, D, eps,
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ca = tl.arange(0, BLOCK_A)  # (BLOCK_A,) first piece of the row
    cb = BLOCK_A + tl.arange(0, BLOCK_B)  # (BLOCK_B,) the rest
    r_ok = rows < M
    oka = r_ok[:, None] & (ca[None, :] < D)
    okb = r_ok[:, None] & (cb[None, :] < D)
    base = rows[:, None].to(tl.int64) * D
    xa = tl.load(x_ptr + base + ca[None, :], mask=oka, other=0.0).to(tl.float32)  # precision raised: fp32 stats
    xb = tl.load(x_ptr + base + cb[None, :], mask=okb, other=0.0).to(tl.float32)
    mean, rstd = row_stats(xa, oka, xb, okb, D, eps)
    ya = ln_piece(xa, oka, mean, rstd, w_ptr, b_ptr, ca, D)
    yb = ln_piece(xb, okb, mean, rstd, w_ptr, b_ptr, cb, D)
    tl.store(y_ptr + base + ca[None, :], ya.to(y_ptr.dtype.element_ty), mask=oka)
    tl.store(y_ptr + base + cb[None, :], yb.to(y_ptr.dtype.element_ty), mask=okb)
    tl.store(mean_ptr + rows, mean, mask=r_ok)
    tl.store(rstd_ptr + rows, rstd, mask=r_ok)


@triton.jit
def _ln_bwd_kernel(
    dy_ptr, x_ptr,  # (M, D) contiguous
    w_ptr,  # (D,)
    mean_ptr, rstd_ptr,  # (M,) fp32
    dx_ptr,  # (M, D) x's dtype
    dw_ptr, db_ptr,  # (G, D) fp32 partial sums
    M, D, rows_per_program,
    BLOCK_M: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    pid = tl.program_id(0)
    ca = tl.arange(0, BLOCK_A)
    cb = BLOCK_A + tl.arange(0, BLOCK_B)
    wa = tl.load(w_ptr + ca, mask=ca < D, other=0.0).to(tl.float32)
    wb = tl.load(w_ptr + cb, mask=cb < D, other=0.0).to(tl.float32)
    dwa = tl.zeros((BLOCK_A,), tl.float32)
    dwb = tl.zeros((BLOCK_B,), tl.float32)
    dba = tl.zeros((BLOCK_A,), tl.float32)
    dbb = tl.zeros((BLOCK_B,), tl.float32)
    row0 = pid * rows_per_program
    for r0 in range(row0, tl.minimum(row0 + rows_per_program, M), BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        r_ok = (rows < M) & (rows < row0 + rows_per_program)
        oka = r_ok[:, None] & (ca[None, :] < D)
        okb = r_ok[:, None] & (cb[None, :] < D)
        base = rows[:, None].to(tl.int64) * D
        xa = tl.load(x_ptr + base + ca[None, :], mask=oka, other=0.0).to(tl.float32)
        xb = tl.load(x_ptr + base + cb[None, :], mask=okb, other=0.0).to(tl.float32)
        dya = tl.load(dy_ptr + base + ca[None, :], mask=oka, other=0.0).to(tl.float32)
        dyb = tl.load(dy_ptr + base + cb[None, :], mask=okb, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=r_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=r_ok, other=0.0)
        xha, ga = xhat_and_g(xa, dya, mean, rstd, wa, oka)
        xhb, gb = xhat_and_g(xb, dyb, mean, rstd, wb, okb)
        c1 = (tl.sum(ga * xha, axis=1) + tl.sum(gb * xhb, axis=1)) / D
        c2 = (tl.sum(ga, axis=1) + tl.sum(gb, axis=1)) / D
        tl.store(dx_ptr + base + ca[None, :], dx_piece(xha, ga, c1, c2, rstd).to(dx_ptr.dtype.element_ty), mask=oka)
        tl.store(dx_ptr + base + cb[None, :], dx_piece(xhb, gb, c1, c2, rstd).to(dx_ptr.dtype.element_ty), mask=okb)
        dwa += tl.sum(dya * xha, axis=0)
        dwb += tl.sum(dyb * xhb, axis=0)
        dba += tl.sum(dya, axis=0)
        dbb += tl.sum(dyb, axis=0)
    tl.store(dw_ptr + pid * D + ca, dwa, mask=ca < D)
    tl.store(dw_ptr + pid * D + cb, dwb, mask=cb < D)
    tl.store(db_ptr + pid * D + ca, dba, mask=ca < D)
    tl.store(db_ptr + pid * D + cb, dbb, mask=cb < D)


def pieces(D: int) -> tuple[int, int]:
    """(BLOCK_A, BLOCK_B): the largest power of two <= D, and the rest rounded up (16 when nothing is left)."""
    a = 1 << (max(int(D), 1).bit_length() - 1)
    return a, max(16, next_pow2(D - a))


def _block_m(D: int) -> int:
    a, b = pieces(D)
    fit = (65536 if INTERPRET else 4096) // (a + b)  # about 4096 elements a program on a GPU
    return max(1, min(64 if INTERPRET else 16, 1 << max(fit, 1).bit_length() - 1))  # a power of two


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    return 1 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


def _warps(D: int) -> int:
    return 4 if D <= 1024 else 8


def blocks(D: int, rows: int) -> dict:
    """Launch meta for ``rows`` rows of length D: BLOCK_M, BLOCK_A, BLOCK_B, num_warps."""
    a, b = pieces(D)
    return dict(BLOCK_M=min(_block_m(D), next_pow2(rows)), BLOCK_A=a, BLOCK_B=b, num_warps=_warps(D))


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
        meta = blocks(D, M)
        _ln_fwd_kernel[(triton.cdiv(M, meta["BLOCK_M"]),)](x2, weight.contiguous(), bias.contiguous(), y, mean, rstd,
                                                           M, D, float(eps), **meta)
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
        _ln_bwd_kernel[(G,)](dy2, x2, weight.contiguous(), mean, rstd, dx, dw, db, M, D, rows_per,
                             **blocks(D, rows_per))
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
