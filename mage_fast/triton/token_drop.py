"""Token dropping (encoder gather) and restoring (decoder scatter), forward and backward.

``gather``: out[b, k] = x[b, index[b, k]]; its backward adds rows back with fp32 atomics (a
keep-list has distinct positions, so each row receives one add and the result is deterministic;
repeated positions are still summed correctly).

``scatter``: out[b, l] = (x[b, 0] if all_mask[b, l] or l is not kept else x[b, src[b, l]]) + pos[l],
with ``src`` the inverse of the keep-list (a (B, L) int32 map built with one torch scatter). Its
backward is one kernel per (image, column block): the class-slot gradient (sum over the positions
that used the fill) and a gather of the output gradient for every kept row; the position-embedding
gradient is a torch sum over the batch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, lib_name, next_pow2


@triton.jit
def _gather_kernel(
    x_ptr,  # (B, L, D) contiguous
    idx_ptr,  # (B, K) int64 contiguous
    out_ptr,  # (B, K, D) contiguous
    L, K, D,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    k_ok = k < K
    rows = tl.load(idx_ptr + b * K + k, mask=k_ok, other=0)  # (BLOCK_K,) int64
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = k_ok[:, None] & (d[None, :] < D)
        v = tl.load(x_ptr + (b * L + rows[:, None]) * D + d[None, :], mask=ok)
        tl.store(out_ptr + (b * K + k[:, None]) * D + d[None, :], v, mask=ok)


@triton.jit
def _gather_bwd_kernel(
    dout_ptr,  # (B, K, D) contiguous
    idx_ptr,  # (B, K) int64
    dx_ptr,  # (B, L, D) fp32, zero-filled
    L, K, D,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    rows = tl.load(idx_ptr + b * K + k, mask=k_ok, other=0)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = k_ok[:, None] & (d[None, :] < D)
        g = tl.load(dout_ptr + (b * K + k[:, None]) * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.atomic_add(dx_ptr + (b * L + rows[:, None]) * D + d[None, :], g, mask=ok)


@triton.jit
def _scatter_kernel(
    x_ptr,  # (B, K, D) contiguous, x[:, 0] the class slot
    src_ptr,  # (B, L) int32, kept row feeding position l or -1
    mask_ptr,  # (B, L) bool, True where masked
    pos_ptr,  # (L, D) contiguous
    out_ptr,  # (B, L, D) contiguous
    L, K, D,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    l = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)  # (BLOCK_L,)
    l_ok = l < L
    src = tl.load(src_ptr + b * L + l, mask=l_ok, other=-1)
    masked = tl.load(mask_ptr + b * L + l, mask=l_ok, other=1) != 0
    row = tl.where(masked | (src < 0), 0, src).to(tl.int64)  # the class slot fills the rest
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        ok = l_ok[:, None] & (d[None, :] < D)
        v = tl.load(x_ptr + (b * K + row[:, None]) * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
        p = tl.load(pos_ptr + l[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + (b * L + l[:, None]) * D + d[None, :], (v + p).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scatter_bwd_kernel(
    dout_ptr,  # (B, L, D) contiguous
    src_ptr,  # (B, L) int32
    mask_ptr,  # (B, L) bool
    idx_ptr,  # (B, K) int64
    dx_ptr,  # (B, K, D) out, x's dtype
    L, K, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    d_ok = d < D
    fill = tl.zeros((BLOCK_D,), tl.float32)  # precision raised: the class-slot sum in fp32
    for l0 in range(0, L, BLOCK_R):
        l = l0 + tl.arange(0, BLOCK_R)
        l_ok = l < L
        src = tl.load(src_ptr + b * L + l, mask=l_ok, other=0)
        masked = tl.load(mask_ptr + b * L + l, mask=l_ok, other=0) != 0
        use = l_ok & (masked | (src < 0))
        g = tl.load(dout_ptr + (b * L + l[:, None]) * D + d[None, :], mask=use[:, None] & d_ok[None, :], other=0.0)
        fill += tl.sum(g.to(tl.float32), axis=0)
    for k0 in range(0, K, BLOCK_R):
        k = k0 + tl.arange(0, BLOCK_R)
        k_ok = k < K
        rows = tl.load(idx_ptr + b * K + k, mask=k_ok, other=0)
        kept = tl.load(mask_ptr + b * L + rows, mask=k_ok, other=1) == 0
        g = tl.load(dout_ptr + (b * L + rows[:, None]) * D + d[None, :],
                    mask=(k_ok & kept)[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        g += tl.where(k[:, None] == 0, fill[None, :], 0.0)
        tl.store(dx_ptr + (b * K + k[:, None]) * D + d[None, :], g.to(dx_ptr.dtype.element_ty),
                 mask=k_ok[:, None] & d_ok[None, :])


def _blocks(rows: int, D: int):
    bd = min(next_pow2(D), 256 if not INTERPRET else 1024)
    br = max(1, min(next_pow2(rows), (16384 if INTERPRET else 4096) // bd))
    return br, bd


@torch.library.custom_op(lib_name("gather_tokens"), mutates_args=())
def gather_fwd(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    x, index = x.contiguous(), index.contiguous()
    B, L, D = x.shape
    K = index.shape[1]
    out = torch.empty((B, K, D), dtype=x.dtype, device=x.device)
    if out.numel():
        bk, bd = _blocks(K, D)
        _gather_kernel[(B, triton.cdiv(K, bk))](x, index, out, L, K, D, BLOCK_K=bk, BLOCK_D=bd)
    return out


@gather_fwd.register_fake
def _(x, index):
    return x.new_empty((x.shape[0], index.shape[1], x.shape[2]))


@torch.library.custom_op(lib_name("gather_tokens_bwd"), mutates_args=())
def gather_bwd(dout: torch.Tensor, index: torch.Tensor, L: int) -> torch.Tensor:
    dout, index = dout.contiguous(), index.contiguous()
    B, K, D = dout.shape
    dx = torch.zeros((B, L, D), dtype=torch.float32, device=dout.device)
    if dout.numel():
        bk, bd = _blocks(K, D)
        _gather_bwd_kernel[(B, triton.cdiv(K, bk))](dout, index, dx, L, K, D, BLOCK_K=bk, BLOCK_D=bd)
    return dx.to(dout.dtype)


@gather_bwd.register_fake
def _(dout, index, L):
    return dout.new_empty((dout.shape[0], L, dout.shape[2]))


def _inverse(index: torch.Tensor, L: int) -> torch.Tensor:
    """(B, K) keep-list -> (B, L) int32: the kept row at each position, -1 where none."""
    B, K = index.shape
    src = torch.full((B, L), -1, dtype=torch.int32, device=index.device)
    return src.scatter_(1, index, torch.arange(K, dtype=torch.int32, device=index.device).expand(B, K))


@torch.library.custom_op(lib_name("scatter_tokens"), mutates_args=())
def scatter_fwd(x: torch.Tensor, index: torch.Tensor, all_mask: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
    x, index, all_mask = x.contiguous(), index.contiguous(), all_mask.to(torch.bool).contiguous()
    B, K, D = x.shape
    L = all_mask.shape[1]
    pos = pos_embed.reshape(L, D).contiguous()
    out = torch.empty((B, L, D), dtype=torch.result_type(x, pos_embed), device=x.device)
    if out.numel():
        bl, bd = _blocks(L, D)
        _scatter_kernel[(B, triton.cdiv(L, bl))](x, _inverse(index, L), all_mask, pos, out, L, K, D,
                                                  BLOCK_L=bl, BLOCK_D=bd)
    return out


@scatter_fwd.register_fake
def _(x, index, all_mask, pos_embed):
    return x.new_empty((x.shape[0], all_mask.shape[1], x.shape[2]), dtype=torch.result_type(x, pos_embed))


@torch.library.custom_op(lib_name("scatter_tokens_bwd"), mutates_args=())
def scatter_bwd(dout: torch.Tensor, index: torch.Tensor, all_mask: torch.Tensor, x_dtype: torch.dtype) -> torch.Tensor:
    dout, index, all_mask = dout.contiguous(), index.contiguous(), all_mask.to(torch.bool).contiguous()
    B, L, D = dout.shape
    K = index.shape[1]
    dx = torch.empty((B, K, D), dtype=x_dtype, device=dout.device)
    if dx.numel():
        bd = min(next_pow2(D), 1024 if INTERPRET else 64)
        br = max(1, min(next_pow2(max(L, K)), (16384 if INTERPRET else 4096) // bd))
        _scatter_bwd_kernel[(B, triton.cdiv(D, bd))](dout, _inverse(index, L), all_mask, index, dx, L, K, D,
                                                      BLOCK_R=br, BLOCK_D=bd)
    return dx


@scatter_bwd.register_fake
def _(dout, index, all_mask, x_dtype):
    return dout.new_empty((dout.shape[0], index.shape[1], dout.shape[2]), dtype=x_dtype)


class GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        ctx.L = x.shape[1]
        return gather_fwd(x, index)

    @staticmethod
    def backward(ctx, dout):
        (index,) = ctx.saved_tensors
        return gather_bwd(dout, index, ctx.L), None


class ScatterTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index, all_mask, pos_embed):
        ctx.save_for_backward(index, all_mask)
        ctx.x_dtype, ctx.pos_dtype, ctx.pos_shape = x.dtype, pos_embed.dtype, pos_embed.shape
        return scatter_fwd(x, index, all_mask, pos_embed)

    @staticmethod
    def backward(ctx, dout):
        index, all_mask = ctx.saved_tensors
        dx = scatter_bwd(dout, index, all_mask, ctx.x_dtype) if ctx.needs_input_grad[0] else None
        dpos = None
        if ctx.needs_input_grad[3]:
            dpos = dout.sum(0, dtype=torch.float32).reshape(ctx.pos_shape).to(ctx.pos_dtype)
        return dx, None, None, dpos


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Triton backend of :func:`mage_fast.ops.gather_tokens` (differentiable in ``x``)."""
    return GatherTokens.apply(x, index)


def scatter_tokens(x, index, all_mask, pos_embed) -> torch.Tensor:
    """Triton backend of :func:`mage_fast.ops.scatter_tokens` (differentiable in ``x`` and ``pos_embed``)."""
    return ScatterTokens.apply(x, index, all_mask, pos_embed)
