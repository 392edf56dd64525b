"""Flash attention (forward and backward) with causal masking and attention dropout.

Forward: one program per (query block, batch*head) streams the keys in blocks with the online
softmax (fp32 running max and sum, base-2 exponentials) and stores the output and the row
log-sum-exp. Backward, two kernels without atomics: one per key block accumulates dK and dV over
the query blocks, one per query block accumulates dQ over the key blocks; both recompute the
probabilities from the stored log-sum-exp. ``delta = rowsum(dO * O)`` is one torch reduction.

Dropout keeps attention weight (m, n) of head ``bh`` when the top 24 bits of a counter hash of
(seed, bh, m*Nk + n) are at least ``p * 2^24``, recomputed identically in the backward (in either
orientation of the tile), so no mask is stored. The hash is two rounds of the ``mix32`` finaliser
(2 multiplies, 3 xor-shifts) per element after a per-head key: a Philox round per element (``tl.rand``,
of which one output was used) doubled the forward kernel's instructions. :func:`dropout_keep_mask`
materialises the same mask for tests.

Grids are one-dimensional, (query or key blocks) x (batch * heads) folded into x: CUDA caps grid y
at 65535, which batch * heads passes at 4096 sequences of 16 heads.

Head dims that are not powers of two (48) are padded to the next one with masked loads; lengths
that are not block multiples (129, 257) are masked likewise.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, compute_f32, lib_name, mix32 as _mix32, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _head_key(seed, bh):
    """uint32 key of head ``bh`` under the int64 ``seed`` (both halves of the seed enter)."""
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return _mix32(lo ^ _mix32(hi + bh.to(tl.uint32) * 0x9E3779B9))


@triton.jit
def _keep(key, m, n, N_K, p_drop):
    """Dropout keep mask, (len(m), len(n)) or its transpose: a counter hash of (head key, m*N_K + n)."""
    h = _mix32(_mix32(key + (m * N_K + n).to(tl.uint32)) ^ key)
    return (h >> 8).to(tl.float32) >= p_drop * 16777216.0


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    # fp32: 3-pass TF32 on tensor cores, about fp32-exact (the FMA "ieee" path compiles for minutes)
    if F32:
        return tl.dot(a, b, input_precision="tf32x3")
    return tl.dot(a, b)


@triton.jit
def _fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, N_Q|N_K, D) with strides s*b, s*h, s*n and unit last stride
    o_ptr,  # (B, H, N_Q, D) contiguous
    lse_ptr,  # (B, H, N_Q) fp32: base-2 log-sum-exp of the scaled scores
    seed_ptr,  # (1,) int64 dropout seed; None without dropout
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N_Q, N_K, D, qk_scale, p_drop,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    blocks = tl.cdiv(N_Q, BLOCK_M)
    start_m = tl.program_id(0) % blocks
    bh = tl.program_id(0) // blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    d = tl.arange(0, BLOCK_D)
    m_ok = m < N_Q
    d_ok = d < D
    q = tl.load(q_ptr + b * sqb + h * sqh + m[:, None].to(tl.int64) * sqn + d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
    if F32:
        q = q.to(tl.float32)
    key = _head_key(tl.load(seed_ptr), bh) if DROPOUT else 0
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)  # precision raised: softmax and output in fp32
    end_n = tl.minimum((start_m + 1) * BLOCK_M, N_K) if CAUSAL else N_K
    for start_n in range(0, end_n, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        n_ok = n < N_K
        kt = tl.load(k_ptr + b * skb + h * skh + n[None, :].to(tl.int64) * skn + d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (BLOCK_D, BLOCK_N)
        v = tl.load(v_ptr + b * svb + h * svh + n[:, None].to(tl.int64) * svn + d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
        if F32:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = _dot(q, kt, F32) * qk_scale  # (BLOCK_M, BLOCK_N) fp32, base-2 units
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (n[None, :] <= m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DROPOUT:
            p = tl.where(_keep(key, m[:, None], n[None, :], N_K, p_drop), p, 0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32)
        m_i = m_new
    inv = 1.0 / l_i
    if DROPOUT:
        inv = inv / (1.0 - p_drop)
    acc = acc * inv[:, None]
    tl.store(o_ptr + (bh.to(tl.int64) * N_Q + m[:, None]) * D + d[None, :], acc.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + bh.to(tl.int64) * N_Q + m, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, N, D) strided as in the forward
    do_ptr,  # (B, H, N_Q, D) contiguous
    lse_ptr, delta_ptr,  # (B, H, N_Q) fp32
    dk_ptr, dv_ptr,  # (B, H, N_K, D) contiguous
    seed_ptr,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N_Q, N_K, D, qk_scale, sm_scale, p_drop,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    blocks = tl.cdiv(N_K, BLOCK_N)
    start_n = tl.program_id(0) % blocks
    bh = tl.program_id(0) // blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    d = tl.arange(0, BLOCK_D)
    n_ok = n < N_K
    d_ok = d < D
    nd_ok = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + b * skb + h * skh + n[:, None].to(tl.int64) * skn + d[None, :], mask=nd_ok, other=0.0)
    v = tl.load(v_ptr + b * svb + h * svh + n[:, None].to(tl.int64) * svn + d[None, :], mask=nd_ok, other=0.0)
    if F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    key = _head_key(tl.load(seed_ptr), bh) if DROPOUT else 0
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    start_m0 = (start_n * BLOCK_N // BLOCK_M) * BLOCK_M if CAUSAL else 0
    for start_m in range(start_m0, N_Q, BLOCK_M):
        m = start_m + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        m_ok = m < N_Q
        md_ok = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + b * sqb + h * sqh + m[:, None].to(tl.int64) * sqn + d[None, :], mask=md_ok, other=0.0)
        do = tl.load(do_ptr + (bh.to(tl.int64) * N_Q + m[:, None]) * D + d[None, :], mask=md_ok, other=0.0)
        if F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * N_Q + m, mask=m_ok, other=0.0)
        delta = tl.load(delta_ptr + bh.to(tl.int64) * N_Q + m, mask=m_ok, other=0.0)
        st = _dot(k, tl.trans(q), F32) * qk_scale  # (BLOCK_N, BLOCK_M) scores, transposed
        valid = n_ok[:, None] & m_ok[None, :]
        if CAUSAL:
            valid = valid & (n[:, None] <= m[None, :])
        pt = tl.where(valid, tl.exp2(st - lse[None, :]), 0.0)
        dpt = _dot(v, tl.trans(do), F32)  # (BLOCK_N, BLOCK_M) = (dO V^T)^T
        if DROPOUT:
            keep = _keep(key, m[None, :], n[:, None], N_K, p_drop)
            pdt = tl.where(keep, pt / (1.0 - p_drop), 0.0)
            dpt = tl.where(keep, dpt / (1.0 - p_drop), 0.0)
        else:
            pdt = pt
        dv += _dot(pdt.to(do.dtype), do, F32)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(q.dtype), q, F32)
    dk = dk * sm_scale
    out = (bh.to(tl.int64) * N_K + n[:, None]) * D + d[None, :]
    tl.store(dk_ptr + out, dk.to(dk_ptr.dtype.element_ty), mask=nd_ok)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=nd_ok)


@triton.jit
def _bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr,
    dq_ptr,  # (B, H, N_Q, D) contiguous
    seed_ptr,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn,
    H, N_Q, N_K, D, qk_scale, sm_scale, p_drop,
    CAUSAL: tl.constexpr, DROPOUT: tl.constexpr, F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    blocks = tl.cdiv(N_Q, BLOCK_M)
    start_m = tl.program_id(0) % blocks
    bh = tl.program_id(0) // blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    m_ok = m < N_Q
    d_ok = d < D
    md_ok = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * sqb + h * sqh + m[:, None].to(tl.int64) * sqn + d[None, :], mask=md_ok, other=0.0)
    do = tl.load(do_ptr + (bh.to(tl.int64) * N_Q + m[:, None]) * D + d[None, :], mask=md_ok, other=0.0)
    if F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * N_Q + m, mask=m_ok, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * N_Q + m, mask=m_ok, other=0.0)
    key = _head_key(tl.load(seed_ptr), bh) if DROPOUT else 0
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    end_n = tl.minimum((start_m + 1) * BLOCK_M, N_K) if CAUSAL else N_K
    for start_n in range(0, end_n, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        n_ok = n < N_K
        nd_ok = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + b * skb + h * skh + n[:, None].to(tl.int64) * skn + d[None, :], mask=nd_ok, other=0.0)
        v = tl.load(v_ptr + b * svb + h * svh + n[:, None].to(tl.int64) * svn + d[None, :], mask=nd_ok, other=0.0)
        if F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = _dot(q, tl.trans(k), F32) * qk_scale  # (BLOCK_M, BLOCK_N)
        valid = m_ok[:, None] & n_ok[None, :]
        if CAUSAL:
            valid = valid & (n[None, :] <= m[:, None])
        p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), F32)
        if DROPOUT:
            keep = _keep(key, m[:, None], n[None, :], N_K, p_drop)
            dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, F32)
    dq = dq * sm_scale
    tl.store(dq_ptr + (bh.to(tl.int64) * N_Q + m[:, None]) * D + d[None, :], dq.to(dq_ptr.dtype.element_ty),
             mask=md_ok)


@triton.jit
def _keep_mask_kernel(out_ptr, seed_ptr, N_Q, N_K, p_drop, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BH, N_Q, N_K) bool: the dropout mask the kernels above use (tests only)."""
    blocks = tl.cdiv(N_Q, BLOCK_M)
    m = (tl.program_id(0) % blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    bh = tl.program_id(0) // blocks
    key = _head_key(tl.load(seed_ptr), bh)
    for start_n in range(0, N_K, BLOCK_N):
        n = start_n + tl.arange(0, BLOCK_N)
        keep = _keep(key, m[:, None], n[None, :], N_K, p_drop)
        tl.store(out_ptr + (bh.to(tl.int64) * N_Q + m[:, None]) * N_K + n[None, :], keep,
                 mask=(m[:, None] < N_Q) & (n[None, :] < N_K))


def _fwd_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4), (64, 32, 4, 4),
                                 (64, 32, 4, 2)]]  # the last fits fp32 tiles at head dim 128 in shared memory


def _bwd_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(32, 64, 4, 3), (64, 64, 4, 2), (64, 128, 8, 2), (32, 128, 8, 3), (16, 64, 4, 3),
                                 (32, 32, 4, 2)]]  # the last fits fp32 tiles at head dim 128 in shared memory


_KEY = ["N_Q", "N_K", "D", "CAUSAL", "DROPOUT", "F32"]
_fwd_tuned = triton.autotune(_fwd_configs(), key=_KEY)(_fwd_kernel)
_dkdv_tuned = triton.autotune(_bwd_configs(), key=_KEY)(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune([triton.Config({"BLOCK_M": c.kwargs["BLOCK_N"], "BLOCK_N": c.kwargs["BLOCK_M"]},
                                           num_warps=c.num_warps, num_stages=c.num_stages) for c in _bwd_configs()],
                            key=_KEY)(_bwd_dq_kernel)


def launch_grid(grid_len, bh):
    """Grid of a kernel whose programs cover ``grid_len(BLOCK_M, BLOCK_N)`` blocks of each of ``bh`` heads."""
    return lambda meta: (grid_len(meta["BLOCK_M"], meta["BLOCK_N"]) * bh,)


def _launch(kernel, tuned, grid_len, bh, args, meta, n_q, n_k):
    """Interpreter: one fixed, large block (programs run one by one). GPU: the autotuned kernel."""
    grid = launch_grid(grid_len, bh)
    if INTERPRET:
        blocks = dict(BLOCK_M=max(16, min(128, next_pow2(n_q))), BLOCK_N=max(16, min(128, next_pow2(n_k))))
        kernel[grid(blocks)](*args, **blocks, **meta)
    else:
        tuned[grid](*args, **meta)


def _strides(*ts):
    out = []
    for t in ts:
        out += [t.stride(0), t.stride(1), t.stride(2)]
    return out


def _unit_last(t):
    return t if t.stride(-1) == 1 else t.contiguous()


@torch.library.custom_op(lib_name("attention_fwd"), mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float,
                  causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    o = torch.empty((B, H, N_Q, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N_Q), dtype=torch.float32, device=q.device)
    if o.numel() == 0:
        return o, lse
    meta = dict(CAUSAL=causal, DROPOUT=dropout_p > 0, F32=compute_f32(q.dtype), BLOCK_D=max(16, next_pow2(D)))
    args = (q, k, v, o, lse, seed, *_strides(q, k, v), H, N_Q, N_K, D, scale * LOG2E, dropout_p)
    _launch(_fwd_kernel, _fwd_tuned, lambda bm, bn: triton.cdiv(N_Q, bm), B * H, args, meta, N_Q, N_K)
    return o, lse


@attention_fwd.register_fake
def _(q, k, v, seed, dropout_p, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op(lib_name("attention_bwd"), mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                  lse: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float, causal: bool,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    do = do.contiguous()
    B, H, N_Q, D = q.shape
    N_K = k.shape[2]
    dq = torch.empty((B, H, N_Q, D), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, N_K, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, N_K, D), dtype=v.dtype, device=q.device)
    if dq.numel() == 0 or dk.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = (do.float() * o.float()).sum(-1)  # (B, H, N_Q) fp32 rowsum(dO * O)
    meta = dict(CAUSAL=causal, DROPOUT=dropout_p > 0, F32=compute_f32(q.dtype), BLOCK_D=max(16, next_pow2(D)))
    common = (*_strides(q, k, v), H, N_Q, N_K, D, scale * LOG2E, scale, dropout_p)
    _launch(_bwd_dkdv_kernel, _dkdv_tuned, lambda bm, bn: triton.cdiv(N_K, bn), B * H,
            (q, k, v, do, lse, delta, dk, dv, seed, *common), meta, N_Q, N_K)
    _launch(_bwd_dq_kernel, _dq_tuned, lambda bm, bn: triton.cdiv(N_Q, bm), B * H,
            (q, k, v, do, lse, delta, dq, seed, *common), meta, N_Q, N_K)
    return dq, dk, dv


@attention_bwd.register_fake
def _(do, q, k, v, o, lse, seed, dropout_p, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, dropout_p, causal, scale, seed):
        o, lse = attention_fwd(q, k, v, seed, dropout_p, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse, seed)
        ctx.args = (dropout_p, causal, scale)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, seed = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, seed, *ctx.args)
        return dq, dk, dv, None, None, None, None


def new_seed(device) -> torch.Tensor:
    """A (1,) int64 dropout seed drawn from torch's generator on ``device`` (no host sync)."""
    return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=device)


def attention(q, k, v, dropout_p: float = 0.0, causal: bool = False, scale: Optional[float] = None,
              seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Triton backend of :func:`mage_fast.ops.attention`. ``seed`` fixes the dropout mask (tests)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if dropout_p <= 0:
        seed = None  # the kernels read no seed without dropout: nothing to allocate
    elif seed is None:
        seed = new_seed(q.device)
    return FlashAttention.apply(q, k, v, float(dropout_p), bool(causal), scale, seed)


def dropout_keep_mask(B: int, H: int, n_q: int, n_k: int, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """(B, H, n_q, n_k) bool: the keep mask the kernels draw for this seed (for tests)."""
    out = torch.empty((B, H, n_q, n_k), dtype=torch.bool, device=seed.device)
    bm, bn = min(64, next_pow2(n_q)), min(256, next_pow2(n_k))
    _keep_mask_kernel[(triton.cdiv(n_q, bm) * B * H,)](out, seed, n_q, n_k, float(dropout_p), BLOCK_M=bm, BLOCK_N=bn)
    return out


