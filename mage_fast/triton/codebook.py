"""Fused codebook nearest neighbour: distances and argmin in one pass over the codebook.

Each program owns ``BLOCK_N`` input rows, keeps them in registers, and streams the codebook in
``BLOCK_K`` tiles (fp32 inputs through 3-pass TF32 tensor-core products, about fp32-exact): a
tile of scores ``|e|^2 - 2 z.e`` (l2; ``|z|^2`` is the same for every code of a
row and is left out) or ``-z.e / |e|`` (cosine; ``|z|`` likewise), then the running minimum and its
index. The (N, K) distance matrix never exists; extra memory is the (N,) int64 output.
Ties resolve to the lowest index, as ``torch.argmin``: within a tile by taking the smallest index
that attains the minimum, across tiles by replacing the running best only on a strict improvement.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import INTERPRET, compute_f32, lib_name, next_pow2


@triton.jit
def _codebook_nn_kernel(
    z_ptr,  # (N, D) input rows, row stride stride_zn, unit column stride
    e_ptr,  # (K, D) codebook, row stride stride_ek, unit column stride
    out_ptr,  # (N,) int64
    N, K, D, stride_zn, stride_ek,
    COSINE: tl.constexpr, COMPUTE_F32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = rows < N
    col_ok = cols < D
    z = tl.load(z_ptr + rows[:, None].to(tl.int64) * stride_zn + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_N, BLOCK_D)
    if COMPUTE_F32:
        z = z.to(tl.float32)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), tl.int64)
    for k0 in range(0, K, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)  # (BLOCK_K,)
        code_ok = codes < K
        e = tl.load(e_ptr + codes[:, None].to(tl.int64) * stride_ek + cols[None, :],
                    mask=code_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_D)
        if COMPUTE_F32:
            e = e.to(tl.float32)
            dot = tl.dot(z, tl.trans(e), input_precision="tf32x3")  # (BLOCK_N, BLOCK_K), about fp32-exact
        else:
            dot = tl.dot(z, tl.trans(e))  # half inputs, fp32 accumulation
        ef = e.to(tl.float32)  # precision raised: code norms in fp32
        e_sq = tl.sum(ef * ef, axis=1)  # (BLOCK_K,)
        if COSINE:
            score = -dot / tl.maximum(tl.sqrt(e_sq), 1e-12)[None, :]
        else:
            score = e_sq[None, :] - 2.0 * dot
        score = tl.where(code_ok[None, :], score, float("inf"))
        tile_min = tl.min(score, axis=1)  # (BLOCK_N,)
        tile_idx = tl.min(tl.where(score == tile_min[:, None], codes[None, :], K), axis=1)
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, tile_idx.to(tl.int64), best_idx)
    tl.store(out_ptr + rows, best_idx, mask=row_ok)


def _configs(shapes):
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in shapes]


# fp32 tiles take twice the shared memory: smaller tiles keep D=256 under the H100's 227 KB.
_HALF_CONFIGS = _configs([(128, 64, 4, 3), (128, 128, 8, 3), (64, 128, 4, 3), (64, 64, 4, 4), (256, 64, 8, 3)])
_F32_CONFIGS = _configs([(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (32, 64, 4, 3), (32, 32, 4, 2)])
_KEY = ["K", "D", "COSINE", "COMPUTE_F32"]


def configs_for(f32: bool) -> list:
    return _F32_CONFIGS if f32 else _HALF_CONFIGS
_codebook_nn_half = triton.autotune(_HALF_CONFIGS, key=_KEY)(_codebook_nn_kernel)
_codebook_nn_f32 = triton.autotune(_F32_CONFIGS, key=_KEY)(_codebook_nn_kernel)


def codebook_nn_triton(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Launch the kernel. z: (N, D), codebook: (K, D), same float dtype -> (N,) int64."""
    z = z if z.stride(-1) == 1 else z.contiguous()
    codebook = codebook if codebook.stride(-1) == 1 else codebook.contiguous()
    N, D = z.shape
    K = codebook.shape[0]
    out = torch.empty(N, dtype=torch.int64, device=z.device)
    if N == 0:
        return out
    # fp16 x bf16 mixes are not a tl.dot pair: compute in fp32 then.
    f32 = compute_f32(z.dtype) or z.dtype != codebook.dtype
    args = (z, codebook, out, N, K, D, z.stride(0), codebook.stride(0))
    meta = dict(COSINE=metric == "cosine", COMPUTE_F32=f32, BLOCK_D=max(16, next_pow2(D)))
    if INTERPRET:  # programs run one after another: few, large ones
        bn, bk = max(16, min(64, next_pow2(N))), max(16, min(256, next_pow2(K)))
        _codebook_nn_kernel[(triton.cdiv(N, bn),)](*args, BLOCK_N=bn, BLOCK_K=bk, **meta)
    else:
        tuned = _codebook_nn_f32 if f32 else _codebook_nn_half
        tuned[lambda m: (triton.cdiv(N, m["BLOCK_N"]),)](*args, **meta)
    return out


@torch.library.custom_op(lib_name("codebook_nn"), mutates_args=())
def codebook_nn_custom(z: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    return codebook_nn_triton(z, codebook, metric)


@codebook_nn_custom.register_fake
def _(z, codebook, metric):
    return z.new_empty(z.shape[0], dtype=torch.int64)


def codebook_nn(z: torch.Tensor, codebook: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Triton backend of :func:`mage_fast.ops.codebook_nn` (not differentiable: indices)."""
    return codebook_nn_custom(z, codebook, metric)
