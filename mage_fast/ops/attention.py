"""Multi-head attention core: softmax(q k^T * scale) v, non-causal or causal, with dropout.

Two plain-torch paths: ``attention_official`` reproduces the official MAGE arithmetic (q.k in
fp32 with autocast off, max subtracted, softmax, dropout, product with v); ``attention_sdpa``
calls ``torch.nn.functional.scaled_dot_product_attention``, which picks flash / memory-efficient
/ math kernels itself and accumulates the softmax in fp32 for half inputs.

``attention_cpu_train`` is the training backend on the CPU: torch's CPU flash kernel forward (it
returns the row log-sum-exp), and a backward written as five batched matrix products around one
fp32 elementwise pass, the form FlashAttention's backward takes, on whole (chunks of) score
matrices. The products run in the inputs' dtype through oneDNN (AMX / AVX512-BF16 for bf16), where
torch's own CPU flash backward loops over small blocks. With dropout, the weights are dropped by
the hashed dropout (:mod:`mage_fast.ops.dropout`), recomputed in the backward, never stored. fp32 inputs give the exact gradient up to
fp32 rounding; bf16 inputs round the recomputed scores and the products' outputs to bf16 (as every
bf16 matrix product of an autocast step does) and keep the softmax and its derivative in fp32.
"""
from __future__ import annotations

import math
import threading
from typing import Optional

import torch
import torch.nn.functional as F

from .. import _ext
from .dispatch import Op
from .dropout import new_seed


def attention_official(q, k, v, dropout_p: float = 0.0, causal: bool = False, scale: Optional[float] = None):
    """q, k, v: (B, H, N, d) -> (B, H, N, d). The official MAGE computation, fp32 scores."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(device_type=q.device.type, enabled=False):
        attn = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, N, N) fp32
    if causal:
        n = q.shape[-2]
        attn = attn.masked_fill(torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    attn = attn - attn.amax(dim=-1, keepdim=True)
    attn = attn.softmax(dim=-1)
    if dropout_p > 0:
        attn = F.dropout(attn, p=dropout_p)
    if not torch.is_autocast_enabled(q.device.type):
        attn = attn.to(v.dtype)  # fp64 / low-precision inputs outside autocast: weights in v's dtype
    return attn @ v  # under autocast this product runs in the autocast dtype, as the official one


def attention_sdpa(q, k, v, dropout_p: float = 0.0, causal: bool = False, scale: Optional[float] = None):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale)


# Score-matrix elements one chunk holds at most (fp32: 4 bytes each); bounds the reused buffers
# (five of them, at most 4 bytes x this each) for long sequences and large batches, far above what
# one chunk needs to keep oneDNN busy.
_CHUNK_ELEMENTS = 1 << 22


class _CPUTrainAttention(torch.autograd.Function):
    """Non-causal attention whose backward is batched matrix products (see the module docstring).
    With ``dropout_p`` > 0 the softmax weights are dropped by the hashed dropout of
    :mod:`mage_fast.ops.dropout` (element index = position in the (B*H, N, K) weights, one seed per
    call); the forward then computes the weights itself, with fp32 scores as the official code.
    The elementwise passes run in the compiled ``attn_probs`` / ``attn_dscores`` where they are
    built, else in torch (the same arithmetic)."""

    @staticmethod
    def forward(ctx, q, k, v, scale: float, dropout_p: float, seed: int):
        B, H, N, d = q.shape
        K = k.shape[2]
        if dropout_p == 0:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
        else:
            qf, kf, vf = (t.reshape(B * H, t.shape[2], t.shape[3]) for t in (q, k, v))
            out = torch.empty(B * H, N, d, dtype=v.dtype)
            lse = torch.empty(B * H, N, 1, dtype=torch.float32)
            for i, j in _chunks(B * H, N * K):
                s = torch.bmm(qf[i:j].float(), kf[i:j].float().transpose(1, 2),
                              out=_buffer("s", (j - i, N, K), torch.float32)).mul_(scale)
                torch.logsumexp(s, dim=-1, keepdim=True, out=lse[i:j])
                _, pd = _probs(s, lse[i:j], 1.0, dropout_p, seed, i * N * K, False, vf.dtype)
                torch.bmm(pd, vf[i:j], out=out[i:j])
            out = out.view(B, H, N, d)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        scale, p_drop, seed = ctx.scale, ctx.dropout_p, ctx.seed
        B, H, N, d = q.shape
        K = k.shape[2]
        flat = [t.reshape(B * H, t.shape[2], t.shape[3]) for t in (q, k, v, out, dout.to(q.dtype))]
        lse = lse.reshape(B * H, N, 1)
        dq, dk, dv = (torch.empty_like(t) for t in flat[:3])
        for i, j in _chunks(B * H, N * K):
            qi, ki, vi, oi, gi = (t[i:j] for t in flat)
            # the scores as the forward had them: in the inputs' dtype (fp32 with dropout, as its forward)
            shape = (j - i, N, K)
            if p_drop > 0:
                s = torch.bmm(qi.float(), ki.float().transpose(1, 2), out=_buffer("s", shape, torch.float32))
            else:
                s = torch.bmm(qi, ki.transpose(1, 2), out=_buffer("s", shape, qi.dtype))
            p, pd = _probs(s, lse[i:j], scale, p_drop, seed, i * N * K, True, vi.dtype)
            torch.bmm(pd.transpose(1, 2), gi, out=dv[i:j])
            delta = (gi.float() * oi.float()).sum(-1, keepdim=True)  # rowsum(dO * O) = rowsum(dP * P)
            dp = torch.bmm(gi, vi.transpose(1, 2), out=_buffer("dp", shape, vi.dtype))
            ds = _dscores(dp, p, delta, scale, p_drop, seed, i * N * K, qi.dtype)
            torch.bmm(ds, ki, out=dq[i:j])
            torch.bmm(ds.transpose(1, 2), qi, out=dk[i:j])
        return dq.view_as(q), dk.view_as(k), dv.view_as(v), None, None, None


_WORKSPACE = threading.local()


def _buffer(name: str, shape, dtype) -> torch.Tensor:
    """A reusable buffer of this thread (the backward's score-sized temporaries: fresh ones of tens of
    MB cost more in first-touch page faults than the passes that fill them). At most one per name,
    grown as needed: a few chunks' worth (:data:`_CHUNK_ELEMENTS`) stays allocated."""
    n = math.prod(shape)
    bufs = _WORKSPACE.__dict__.setdefault("bufs", {})
    t = bufs.get(name)
    if t is None or t.dtype != dtype or t.numel() < n:
        t = bufs[name] = torch.empty(n, dtype=dtype)
    return t[:n].view(shape)


def _probs(s, lse, scale, p_drop, seed, offset, with_p, dtype):
    """(p = exp(scale s - lse) in fp32 or None, the dropped weights in ``dtype``)."""
    if _ext.has_op("attn_probs"):
        pd = _buffer("pd", s.shape, dtype)
        p = _buffer("p", s.shape, torch.float32) if with_p else torch.empty(0)
        torch.ops.mage_fast.attn_probs(s.contiguous(), lse.contiguous(), scale, p_drop, seed, offset, p, pd)
        return (p if with_p else None), pd
    p = s.float().mul_(scale).sub_(lse).exp_()
    pd = torch.ops.mage_fast.dropout(p, p_drop, seed, offset) if p_drop > 0 else p
    return p, pd.to(dtype)


def _dscores(dp, p, delta, scale, p_drop, seed, offset, dtype):
    """scale * p * (dropout(dp) - delta), in ``dtype``."""
    if _ext.has_op("attn_dscores"):
        ds = _buffer("ds", dp.shape, dtype)
        torch.ops.mage_fast.attn_dscores(dp.contiguous(), p, delta.reshape(-1).contiguous(), scale, p_drop, seed,
                                         offset, ds)
        return ds
    dp = dp.float()
    if p_drop > 0:
        dp = torch.ops.mage_fast.dropout(dp, p_drop, seed, offset)
    return dp.sub_(delta).mul_(p).mul_(scale).to(dtype)


def _chunks(n: int, per_item: int):
    step = max(1, _CHUNK_ELEMENTS // per_item)
    return ((i, min(n, i + step)) for i in range(0, n, step))


def attention_cpu_train(q, k, v, dropout_p: float = 0.0, causal: bool = False, scale: Optional[float] = None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    seed = new_seed() if dropout_p > 0 else 0
    return _CPUTrainAttention.apply(q, k, v, scale, float(dropout_p), seed)


def _cpu_train_supports(q, k, v, dropout_p: float = 0.0, causal: bool = False, scale=None) -> Optional[str]:
    if q.device.type != "cpu":
        return "not on the CPU"
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return "no gradient needed (its forward is sdpa's)"
    if causal:
        return "causal masks are not supported"
    if not q.dtype == k.dtype == v.dtype or q.dtype not in (torch.float32, torch.bfloat16):
        return "needs q, k, v all fp32 or all bf16"
    if q.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape != v.shape or k.shape[3] != q.shape[3]:
        return "needs (B, H, N, d) q and k, v of one shape"
    if dropout_p > 0 and not _ext.has_op("dropout"):
        return f"dropout needs the compiled ops ({_ext.status})"
    return None


attention_op = Op("attention", attention_official)
attention_op.register("sdpa", attention_sdpa, lambda *a, **k: None)
attention_op.register("cpu_train", attention_cpu_train, _cpu_train_supports)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
              causal: bool = False, scale: Optional[float] = None) -> torch.Tensor:
    """Scaled dot-product attention.

    Args:
        q, k, v: (B, H, N, d) tensors of one float dtype. Softmax is accumulated in fp32.
        dropout_p: dropout on the attention weights (pass 0 in eval).
        causal: mask future keys (autoregressive baselines).
        scale: defaults to ``d ** -0.5``.

    Returns:
        (B, H, N, d) in the input dtype.

    Example:
        >>> q = k = v = torch.randn(1, 2, 5, 8)
        >>> attention(q, k, v).shape
        torch.Size([1, 2, 5, 8])
    """
    return attention_op(q, k, v, dropout_p=dropout_p, causal=causal, scale=scale)
