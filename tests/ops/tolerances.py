"""The one tolerance table of the op tests: how far each backend of each op may be from its oracle.

A key is ``(op, backend, dtype)``, and a fourth part, the check, where one op has checks of different
quantities (outputs and gradients, a backend's own path, a model-sized run). An op test looks its
bound up with :func:`tol`; a backend that is tested by a check is one that has an entry for it
(:func:`backends`), so adding a backend to a check is adding its row here.

``Tol(atol, rtol)`` is applied as the test that reads it says (its docstring names the formula):
``torch.testing.assert_close(got, want, atol=, rtol=)`` unless stated otherwise. ``EXACT`` means
bit-equal (``torch.equal``). Where torch's own defaults were used they are written out (fp32:
atol 1e-5, rtol 1.3e-6; fp64: atol 1e-7, rtol 1e-7).

"lowp" bounds (Triton kernels in fp16 / bf16): ``err <= 2 * err(torch's own op in that dtype) +
atol * max(1, max|reference|)`` (attention: ``+ atol``), the error measured against the fp32
reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

F32, F16, BF16, F64, I64 = torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64


@dataclass(frozen=True)
class Tol:
    atol: float = 0.0
    rtol: float = 0.0

    @property
    def exact(self) -> bool:
        return self.atol == 0.0 and self.rtol == 0.0


EXACT = Tol()
FP32_DEFAULT = Tol(atol=1e-5, rtol=1.3e-6)  # torch.testing.assert_close's fp32 default
FP64_DEFAULT = Tol(atol=1e-7, rtol=1e-7)    # ... and its fp64 default
STRIDED = Tol(atol=1e-6, rtol=1e-6)         # a non-contiguous view against its contiguous copy

# Triton's codebook search: the share of rows whose chosen code is the reference's (the rest are
# near-ties, bounded by the "distance" rows below).
CODEBOOK_MIN_AGREEMENT = 0.97

TOLERANCES: dict[tuple, Tol] = {
    # ---- attention (reference: attention_official, fp32 scores)
    ("attention", "sdpa", F32): Tol(atol=1e-5, rtol=1e-5),
    ("attention", "triton", F32, "lowp"): Tol(atol=2e-5),  # out, dq, dk, dv; attention's "lowp" formula
    ("attention", "triton", F16, "lowp"): Tol(atol=1e-3),
    ("attention", "triton", BF16, "lowp"): Tol(atol=8e-3),
    ("attention", "triton", F32, "strided"): STRIDED,
    # cpu_train (the CPU training backend): "float64" is max |err| / max |float64 reference| < rtol,
    # for the output and dq, dk, dv (bf16: the gradients; its output is sdpa's, bit for bit)
    ("attention", "cpu_train", F32, "float64"): Tol(rtol=2e-6),
    ("attention", "cpu_train", BF16, "float64"): Tol(rtol=3e-2),
    ("attention", "cpu_train", F32, "chunks"): Tol(atol=1e-6),  # chunked vs whole score matrices
    ("attention", "cpu_train", F32, "dropout float64"): Tol(rtol=2e-6),  # with the hashed dropout's mask
    ("attention", "cpu_train", BF16, "dropout float64"): Tol(rtol=3e-2),
    # its compiled elementwise passes (attn_probs, attn_dscores) vs their torch form (torch.allclose)
    ("attention", "cpu_train", F32, "probs"): Tol(atol=1e-30, rtol=2e-6),
    ("attention", "cpu_train", BF16, "probs"): Tol(atol=1e-30, rtol=2e-6),
    ("attention", "cpu_train", F32, "dropped probs"): Tol(atol=1e-30, rtol=2e-6),
    ("attention", "cpu_train", BF16, "dropped probs"): Tol(atol=1e-30, rtol=8e-3),
    ("attention", "cpu_train", F32, "dscores"): Tol(atol=1e-6, rtol=1e-5),
    ("attention", "cpu_train", BF16, "dscores"): Tol(atol=1e-30, rtol=8e-3),

    # ---- codebook_nn (reference: codebook_nn_ref; indices)
    ("codebook_nn", "torch", F64, "cdist"): EXACT,  # the reference against torch.cdist's argmin
    # "near-tie": indices equal except where the float64 distances of the two codes differ by less
    # than rtol of the row's largest distance (at least 1)
    ("codebook_nn", "cpp", F32, "near-tie"): Tol(rtol=1e-5),
    ("codebook_nn", "cuda", F32, "near-tie"): Tol(rtol=1e-5),
    ("codebook_nn", "cpp", F16, "near-tie"): Tol(rtol=1e-5),
    ("codebook_nn", "cpp", BF16, "near-tie"): Tol(rtol=1e-5),
    ("codebook_nn", "cuda", F16, "near-tie"): Tol(rtol=1e-5),
    ("codebook_nn", "cuda", BF16, "near-tie"): Tol(rtol=1e-5),
    ("codebook_nn", "cpp", F32, "planted"): Tol(rtol=1e-6),  # integer inputs (l2: EXACT, checked as such)
    ("codebook_nn", "cpp", F32, "int16"): Tol(rtol=1e-6),    # the int16 screening path vs float64
    # "distance": the chosen code's float64 score within atol * (1 + max|score|) of the reference's
    ("codebook_nn", "triton", F32, "distance"): Tol(atol=1e-4),
    ("codebook_nn", "triton", F16, "distance"): Tol(atol=2e-3),
    ("codebook_nn", "triton", BF16, "distance"): Tol(atol=2e-3),
    ("codebook_nn", "triton", F32, "ties"): EXACT,  # duplicated codes: the lowest index
    ("codebook_nn", "cpp", F32, "ties"): EXACT,
    ("codebook_nn", "triton", F32, "strided rows"): EXACT,  # a row-strided z, many codebook blocks
    ("codebook_nn", "cpp", F32, "strided rows"): EXACT,
    ("codebook_nn", "triton", F32, "strided"): STRIDED,
    ("codebook_nn", "cpp", F32, "strided"): STRIDED,

    # ---- decode_step (reference: decode_step_ref; the same hash, so ids match bit for bit)
    # Gumbel-max sampling of 4 000 positions: code frequencies within atol * sqrt(0.25 / N) of softmax
    ("decode_step", "torch", F32, "sampling"): Tol(atol=4.0),
    ("decode_step", "cpp", F32, "sampling"): Tol(atol=4.0),
    ("decode_step", "cuda", F32, "sampling"): Tol(atol=4.0),
    ("decode_step", "triton", F32, "sampling"): Tol(atol=4.0),
    ("decode_step", "cpp", F32): EXACT,
    ("decode_step", "cpp", F16): EXACT,
    ("decode_step", "cpp", BF16): EXACT,
    ("decode_step", "cuda", F32): EXACT,
    ("decode_step", "cuda", F16): EXACT,
    ("decode_step", "cuda", BF16): EXACT,
    ("decode_step", "triton", F32): EXACT,
    ("decode_step", "triton", F16): EXACT,
    ("decode_step", "triton", BF16): EXACT,
    ("decode_step", "triton", F32, "strided"): STRIDED,
    ("decode_step", "cpp", F32, "strided"): STRIDED,

    # ---- dropout (the hashed backend against its own oracle, dropout_hashed_ref: torch's dropout
    # draws other random numbers)
    ("dropout", "hashed", F32): EXACT,
    ("dropout", "hashed", BF16): EXACT,
    ("dropout", "hashed", F32, "kept"): Tol(atol=1e-8, rtol=1e-5),  # kept elements x / (1 - p) (torch.allclose)
    ("dropout", "hashed", BF16, "kept"): Tol(atol=1e-8, rtol=1e-5),
    ("dropout", "hashed", F32, "rate"): Tol(atol=0.01),  # dropped share of 21 000 draws vs p (5 sigma)
    ("dropout", "hashed", BF16, "rate"): Tol(atol=0.01),
    ("dropout", "hashed", F32, "grad"): Tol(atol=1e-8, rtol=1e-5),  # kept gradients 1 / (1 - p)

    # ---- gather_tokens / scatter_tokens (reference: *_ref; copies and one add)
    ("gather_tokens", "torch", F32, "official"): EXACT,  # the reference vs the official nonzero() formulation
    ("gather_tokens", "cpp", F32): EXACT,    # output and gradient
    ("gather_tokens", "cpp", BF16): EXACT,
    ("gather_tokens", "cpp", I64): EXACT,
    ("gather_tokens", "triton", F32): EXACT,
    ("gather_tokens", "triton", F16): EXACT,
    ("gather_tokens", "triton", BF16): EXACT,
    ("gather_tokens", "triton", F32, "repeated index grad"): Tol(atol=1e-6, rtol=1e-6),
    ("gather_tokens", "cpp", F32, "repeated index grad"): Tol(atol=1e-6, rtol=1e-6),
    ("gather_tokens", "triton", F32, "strided"): STRIDED,
    ("gather_tokens", "cpp", F32, "strided"): STRIDED,
    ("scatter_tokens", "torch", F32, "official"): EXACT,
    ("scatter_tokens", "cpp", F32): EXACT,
    ("scatter_tokens", "cpp", F32, "grad"): Tol(atol=1e-6, rtol=1e-6),
    # "fwd+bwd": output atol = rtol = t; dx atol t * max(1, max|dx|); dpos atol t * B; rtol t
    ("scatter_tokens", "triton", F32, "fwd+bwd"): Tol(atol=1e-5, rtol=1e-5),
    ("scatter_tokens", "triton", F16, "fwd+bwd"): Tol(atol=2e-3, rtol=2e-3),
    ("scatter_tokens", "triton", BF16, "fwd+bwd"): Tol(atol=1.6e-2, rtol=1.6e-2),
    ("scatter_tokens", "triton", F32, "mixed dtypes"): FP32_DEFAULT,
    ("scatter_tokens", "triton", F32, "strided"): STRIDED,
    ("scatter_tokens", "cpp", F32, "strided"): STRIDED,

    # ---- group_norm_silu (reference: F.silu(F.group_norm(...)))
    # "float64": max error below rtol * max(1, max|float64 reference|)
    ("group_norm_silu", "cpp", F32, "float64"): Tol(rtol=2e-5),
    ("group_norm_silu", "cpp", F32, "module"): Tol(atol=2e-5),     # GroupNormSiLU vs silu(norm(x))
    ("group_norm_silu", "torch", F64, "module"): FP64_DEFAULT,
    ("group_norm_silu", "cpp", F32, "decoder"): Tol(atol=1e-4),    # a fused VQGAN decoder vs the unfused

    # ---- layer_norm (reference: layer_norm_ref)
    ("layer_norm", "triton", F32, "lowp"): Tol(atol=1e-5),  # y, dx, dw, db
    ("layer_norm", "triton", F16, "lowp"): Tol(atol=1e-3),
    ("layer_norm", "triton", BF16, "lowp"): Tol(atol=8e-3),
    ("layer_norm", "triton", F32): FP32_DEFAULT,             # through the public function
    ("layer_norm", "triton", F32, "compile grad"): Tol(atol=1e-5, rtol=1e-4),
    ("layer_norm", "triton", F32, "strided"): STRIDED,

    # ---- linear (reference: F.linear)
    ("linear", "mkl_packed", F32): EXACT,              # the same kernel and summation order
    ("linear", "torch", F32, "grad"): FP32_DEFAULT,
    ("linear", "mkl_packed", F32, "logits"): Tol(rtol=1e-5),  # max |logits - ref| <= rtol * max|ref|

    # ---- masked_ce (reference: masked_ce_ref)
    ("masked_ce", "torch", F32, "official"): FP32_DEFAULT,  # the reference vs the official label smoothing
    ("masked_ce", "triton", F32, "lowp"): Tol(atol=1e-5),  # strided logits view; atol * max|ref|
    ("masked_ce", "triton", F16, "lowp"): Tol(atol=2e-3),
    ("masked_ce", "triton", BF16, "lowp"): Tol(atol=1.5e-2),
    ("masked_ce", "triton", F32, "strided"): STRIDED,

    # ---- mlm_head_loss (reference: mlm_head_loss_ref)
    ("mlm_head_loss", "triton", F32, "lowp"): Tol(atol=1e-5),  # loss and seven gradients
    ("mlm_head_loss", "triton", F16, "lowp"): Tol(atol=2e-3),
    ("mlm_head_loss", "triton", BF16, "lowp"): Tol(atol=1.5e-2),
    ("mlm_head_loss", "triton", F32): FP32_DEFAULT,             # public function, no-grad evaluation
    ("mlm_head_loss", "triton", F32, "chunking"): Tol(atol=1e-6, rtol=1e-5),
    ("mlm_head_loss", "triton", F32, "strided"): STRIDED,

    # ---- token_embed (reference: token_embed_ref)
    ("token_embed", "triton", F32, "lowp"): Tol(atol=1e-5),  # y and four gradients
    ("token_embed", "triton", F16, "lowp"): Tol(atol=1e-3),
    ("token_embed", "triton", BF16, "lowp"): Tol(atol=8e-3),
    ("token_embed", "triton", F32): Tol(atol=1e-5, rtol=1e-5),  # through the public function
    ("token_embed", "triton", F32, "strided"): STRIDED,

    # ---- vqgan_decode (reference: decode_reference, the official NCHW arithmetic)
    # max |got - reference| <= rtol * max |reference|: other summation orders and the fused norms
    ("vqgan_decode", "channels_last", F32): Tol(rtol=1e-4),

    # ---- winograd_conv3x3 (reference: F.conv2d after the optional nearest 2x upsampling)
    # "float64": max |got - float64 conv| / max |float64 conv| < rtol
    ("winograd_conv3x3", "cpp", F32, "float64"): Tol(rtol=1e-5),
    ("winograd_conv3x3", "cpp", F32, "module"): Tol(atol=1e-5, rtol=1e-4),     # WinogradConv2d vs nn.Conv2d
    ("winograd_conv3x3", "cpp", F32, "scaled weight"): Tol(atol=1e-4, rtol=1e-4),
    ("winograd_conv3x3", "torch", F64, "module"): EXACT,
}


def tol(op: str, backend: str, dtype: torch.dtype, check: str = "") -> Tol:
    """The bound for ``op`` on ``backend`` in ``dtype`` (``check``: which quantity, where the op has several)."""
    key = (op, backend, dtype, check) if check else (op, backend, dtype)
    try:
        return TOLERANCES[key]
    except KeyError:
        raise KeyError(f"no tolerance for {key} in tests/ops/tolerances.py; add the row with the test") from None


def backends(op: str, check: str = "", dtype: torch.dtype | None = None) -> list[str]:
    """The backends that have a row for ``op`` (and ``check``, and ``dtype`` if given), in table order."""
    seen: list[str] = []
    for key in TOLERANCES:
        if key[0] == op and (key[3] if len(key) > 3 else "") == check and (dtype is None or key[2] == dtype):
            if key[1] not in seen:
                seen.append(key[1])
    return seen


def assert_matches(got: torch.Tensor, want: torch.Tensor, t: Tol, msg: str = "") -> None:
    """``torch.equal`` where ``t`` is EXACT, else ``assert_close`` with its atol / rtol."""
    if t.exact:
        assert torch.equal(got, want), msg or f"not bit-equal: max diff {(got.double() - want.double()).abs().max()}"
    else:
        torch.testing.assert_close(got, want, atol=t.atol, rtol=t.rtol, msg=msg or None)


def cases(op: str, dtypes, check: str = "") -> list:
    """pytest params ``(backend, dtype)`` for every backend with a row for ``op`` / ``check`` in each of ``dtypes``."""
    return [pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for d in dtypes for b in backends(op, check, d)]
