"""Fused codebook nearest neighbour: distances and argmin in one pass over the codebook.

``_code_norm_kernel`` computes the code norms once, (K,) fp32. Each program of ``_codebook_nn_kernel``
owns ``BLOCK_N`` input rows and one split of the codebook (a grid of (row blocks, splits): when N alone
gives few programs the codes are shared out, as the CUDA launcher does), and streams its codes in
``BLOCK_K`` tiles: a tile of scores ``|e|^2 - 2 z.e`` (l2; ``|z|^2`` is the same for every code of a
row and is left out) or ``-z.e / |e|`` (cosine; ``|z|`` likewise), then the running minimum and its
index. 16-bit inputs keep the rows in registers and take whole rows of each code tile; fp32 products
(3-pass TF32 on tensor cores, about fp32-exact) walk D in slices. The (N, K) distance matrix never
exists; extra memory is (K,) norms and (splits, N) per-split minima, reduced by torch.
Ties resolve to the lowest index, as ``torch.argmin``: within a tile by taking the smallest index
that attains the minimum, across tiles by replacing the running best only on a strict improvement,
across splits (in code order) by the first minimum.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, compute_f32, lib_name, next_pow2
from .layer_norm import _num_sms


@triton.jit
def _code_norm_kernel(
    e_ptr,  # (K, D) codebook, row stride stride_ek, unit column stride
    norm_ptr,  # (K,) fp32 out: |e|^2 (l2) or max(|e|, 1e-12) (cosine, as F.normalize)
    K, D, stride_ek,
    COSINE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,) whole rows
    ok = (codes[:, None] < K) & (cols[None, :] < D)
    e = tl.load(e_ptr + codes[:, None].to(tl.int64) * stride_ek + cols[None, :], mask=ok,
                other=0.0).to(tl.float32)  # precision raised: code norms in fp32
    sq = tl.sum(e * e, axis=1)
    tl.store(norm_ptr + codes, tl.maximum(tl.sqrt(sq), 1e-12) if COSINE else sq, mask=codes < K)


@triton.jit
def _codebook_nn_kernel(
    z_ptr,  # (N, D) input rows, row stride stride_zn, unit column stride
    e_ptr,  # (K, D) codebook, row stride stride_ek, unit column stride
    norm_ptr,  # (K,) fp32 code norms from _code_norm_kernel
    best_ptr,  # (S, N) fp32 out: each row's best score among the codes of split s
    out_ptr,  # (S, N) int64 out: the code that attains it (lowest on ties)
    N, K, D, stride_zn, stride_ek, codes_per_program,
    COSINE: tl.constexpr, COMPUTE_F32: tl.constexpr, Z_RESIDENT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    row_ok = rows < N
    k_begin = split * codes_per_program
    k_end = tl.minimum(K, k_begin + codes_per_program)
    if Z_RESIDENT:  # BLOCK_D covers D: the rows stay in registers for the whole split
        cols = tl.arange(0, BLOCK_D)
        z = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_zn + cols[None, :],
                    mask=row_ok[:, None] & (cols[None, :] < D), other=0.0)  # (BLOCK_N, BLOCK_D)
        if COMPUTE_F32:
            z = z.to(tl.float32)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int64)
    for k0 in range(k_begin, k_end, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        code_ok = codes < k_end
        if Z_RESIDENT:
            e = tl.load(e_ptr + codes[:, None].to(tl.int64) * stride_ek + cols[None, :],
                        mask=code_ok[:, None] & (cols[None, :] < D), other=0.0)  # (BLOCK_K, BLOCK_D)
            if COMPUTE_F32:
                dot = tl.dot(z, tl.trans(e.to(tl.float32)), input_precision="tf32x3")  # about fp32-exact
            else:
                dot = tl.dot(z, tl.trans(e))  # half inputs, fp32 accumulation
        else:  # D in BLOCK_D slices: small fp32 operand tiles, no spills
            dot = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                col_ok = cols < D
                zc = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_zn + cols[None, :],
                             mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
                ec = tl.load(e_ptr + codes[:, None].to(tl.int64) * stride_ek + cols[None, :],
                             mask=code_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_D)
                if COMPUTE_F32:
                    dot = tl.dot(zc.to(tl.float32), tl.trans(ec.to(tl.float32)), dot, input_precision="tf32x3")
                else:
                    dot = tl.dot(zc, tl.trans(ec), dot)
        norm = tl.load(norm_ptr + codes, mask=code_ok, other=1.0)  # (BLOCK_K,)
        if COSINE:
            score = -dot / norm[None, :]
        else:
            score = norm[None, :] - 2.0 * dot
        score = tl.where(code_ok[None, :], score, float("inf"))
        tile_min = tl.min(score, axis=1)  # (BLOCK_N,)
        tile_idx = tl.min(tl.where(score == tile_min[:, None], codes[None, :], K), axis=1)
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, tile_idx.to(tl.int64), best_idx)
    tl.store(best_ptr + split.to(tl.int64) * N + rows, best, mask=row_ok)
    tl.store(out_ptr + split.to(tl.int64) * N + rows, best_idx, mask=row_ok)


def _configs(shapes):
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in shapes]


# 16-bit inputs: the rows stay in registers (Z_RESIDENT), BLOCK_D = D rounded up to a power of two.
_HALF_CONFIGS = _configs([(128, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 3), (64, 64, 4, 4), (256, 64, 8, 3)])
# fp32 products (fp32 inputs, or the autocast mix bf16 z / fp32 codebook) split each operand into three
# TF32 parts: D is walked in BLOCK_D slices so the operand tiles stay small (no spills, shared memory
# well under 227 KB at D=256).
_F32_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "BLOCK_D": bd}, num_warps=w, num_stages=s)
                for bn, bk, bd, w, s in [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3),
                                         (128, 128, 32, 8, 3), (64, 64, 64, 4, 2)]]
_KEY = ["K", "D", "COSINE", "COMPUTE_F32"]


def configs_for(f32: bool) -> list:
    return _F32_CONFIGS if f32 else _HALF_CONFIGS


_codebook_nn_half = triton.autotune(_HALF_CONFIGS, key=_KEY)(_codebook_nn_kernel)
_codebook_nn_f32 = triton.autotune(_F32_CONFIGS, key=_KEY)(_codebook_nn_kernel)
_SPLIT_ALIGN = 128  # codes per split are a multiple of every BLOCK_K


def launch_meta(D: int, f32: bool, cosine: bool) -> dict:
    """Constexprs the launcher passes besides the autotuned blocks."""
    meta = dict(COSINE=cosine, COMPUTE_F32=f32, Z_RESIDENT=not f32)
    if not f32:
        meta["BLOCK_D"] = max(16, next_pow2(D))
    return meta


def splits(N: int, K: int, sms: int) -> int:
    """How many programs share each block of rows: about two programs per SM when N alone gives fewer
    (N=256 at K=262144 would otherwise be 2-4 programs, each streaming the whole codebook)."""
    want = triton.cdiv(2 * sms * 64, max(N, 1))
    return max(1, min(want, triton.cdiv(K, 4 * _SPLIT_ALIGN), 256))


def codebook_nn_triton(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Launch the kernels. z: (N, D), codebook: (K, D), float dtypes -> (N,) int64."""
    z = z if z.stride(-1) == 1 else z.contiguous()
    codebook = codebook if codebook.stride(-1) == 1 else codebook.contiguous()
    N, D = z.shape
    K = codebook.shape[0]
    if N == 0:
        return torch.empty(N, dtype=torch.int64, device=z.device)
    cosine = metric == "cosine"
    norm = torch.empty(K, dtype=torch.float32, device=z.device)  # (K,)
    bd = max(16, next_pow2(D))
    bk = max(1, min(next_pow2(K), 4096 // bd))
    _code_norm_kernel[(triton.cdiv(K, bk),)](codebook, norm, K, D, codebook.stride(0), COSINE=cosine,
                                             BLOCK_K=bk, BLOCK_D=bd, num_warps=4)
    # fp16 x bf16 mixes are not a tl.dot pair: compute in fp32 then.
    f32 = compute_f32(z.dtype) or z.dtype != codebook.dtype
    S = splits(N, K, _num_sms(z.device))
    per = triton.cdiv(triton.cdiv(K, S), _SPLIT_ALIGN) * _SPLIT_ALIGN
    S = triton.cdiv(K, per)
    best = torch.empty((S, N), dtype=torch.float32, device=z.device)
    idx = torch.empty((S, N), dtype=torch.int64, device=z.device)
    args = (z, codebook, norm, best, idx, N, K, D, z.stride(0), codebook.stride(0), per)
    meta = launch_meta(D, f32, cosine)
    if INTERPRET:  # programs run one after another: few, large ones
        bn, bk = max(16, min(64, next_pow2(N))), max(16, min(256, next_pow2(K)))
        meta.setdefault("BLOCK_D", min(64, bd))
        _codebook_nn_kernel[(triton.cdiv(N, bn), S)](*args, BLOCK_N=bn, BLOCK_K=bk, **meta)
    else:
        tuned = _codebook_nn_f32 if f32 else _codebook_nn_half
        tuned[lambda m: (triton.cdiv(N, m["BLOCK_N"]), S)](*args, **meta)
    if S == 1:
        return idx[0]
    return idx.gather(0, best.argmin(0, keepdim=True))[0]  # splits in code order: first minimum = lowest code


@torch.library.custom_op(lib_name("codebook_nn"), mutates_args=())
def codebook_nn_custom(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    return codebook_nn_triton(z, codebook, metric)


@codebook_nn_custom.register_fake
def _(z, codebook, metric):
    return z.new_empty(z.shape[0], dtype=torch.int64)


def codebook_nn(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Triton backend of :func:`mage_fast.ops.codebook_nn` (not differentiable: indices)."""
    return codebook_nn_custom(z, codebook, metric)
