"""Triton token gather / scatter, forward and backward, against the torch references."""
import pytest
import torch

from mage_fast.ops.token_drop import (gather_tokens_op, gather_tokens_ref, keep_index, scatter_tokens_op,
                                      scatter_tokens_ref)

triton_tokens = pytest.importorskip("mage_fast.triton.token_drop", reason="triton not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (B, L, K, D): L positions including the class slot, K kept
    pytest.param((1, 1, 1, 1), id="b1-l1-k1-d1"),
    pytest.param((2, 17, 5, 3), id="b2-l17-k5-d3"),
    pytest.param((3, 257, 67, 48), id="b3-l257-k67-d48"),
    pytest.param((2, 31, 31, 130), id="b2-l31-k31-d130-nothing-dropped"),
]


def _case(B, L, K, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + L + K + D)
    drop = torch.rand(B, L, generator=g).argsort(1).argsort(1) >= K  # exactly L-K dropped per row, rows differ
    drop[:, 0] = False
    need = K - (~drop).sum(1)  # keep the class slot: give back one dropped position per row if needed
    for b in range(B):
        if need[b] > 0:
            drop[b, torch.nonzero(drop[b])[0]] = False
        elif need[b] < 0:
            drop[b, torch.nonzero(~drop[b])[-1]] = True
    index = keep_index(drop, K)
    all_mask = drop | (torch.rand(B, L, generator=g) < 0.3)
    all_mask[:, 0] = False
    x_full = torch.randn(B, L, D, generator=g)
    x_kept = torch.randn(B, K, D, generator=g)
    pos = torch.randn(1, L, D, generator=g)
    return [t.to(DEV) for t in (x_full.to(dtype), x_kept.to(dtype), index, all_mask, pos.to(dtype))]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES)
def test_gather(shape, dtype):
    x, _, index, _, _ = _case(*shape, dtype)
    x.requires_grad_(True)
    out = triton_tokens.gather_tokens(x, index)
    ref = gather_tokens_ref(x, index)
    assert torch.equal(out, ref)  # a copy: exact
    dout = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, dout)
    (dx_ref,) = torch.autograd.grad(ref, x, dout)
    assert dx.dtype == x.dtype and torch.equal(dx, dx_ref)  # one add per row: exact


def test_gather_repeated_index_sums_gradients():
    x = torch.randn(2, 7, 5, device=DEV, requires_grad=True)
    index = torch.tensor([[1, 1, 4, 1], [0, 6, 6, 2]], device=DEV)
    out = triton_tokens.gather_tokens(x, index)
    dout = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, dout)
    (dx_ref,) = torch.autograd.grad(gather_tokens_ref(x, index), x, dout)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-6, atol=1e-6)


# out = x + pos once, grads are sums of a few rows: rounding of one add / a short sum.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES)
def test_scatter(shape, dtype):
    _, x, index, all_mask, pos = _case(*shape, dtype)
    x.requires_grad_(True)
    pos.requires_grad_(True)
    out = triton_tokens.scatter_tokens(x, index, all_mask, pos)
    xf, posf = (t.detach().float().requires_grad_(True) for t in (x, pos))
    ref = scatter_tokens_ref(xf, index, all_mask, posf)
    assert out.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)
    dout = torch.randn(out.shape, device=DEV).to(dtype)
    dx, dpos = torch.autograd.grad(out, (x, pos), dout)
    dx_ref, dpos_ref = torch.autograd.grad(ref, (xf, posf), dout.float())
    assert dx.dtype == dtype and dpos.dtype == dtype
    scale = max(1.0, float(dx_ref.abs().max()))
    torch.testing.assert_close(dx.float(), dx_ref, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(dpos.float(), dpos_ref, rtol=tol, atol=tol * shape[0])


def test_scatter_mixed_dtypes_promote_like_torch():
    _, x, index, all_mask, pos = _case(2, 17, 5, 8, torch.bfloat16)
    out = triton_tokens.scatter_tokens(x, index, all_mask, pos.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, scatter_tokens_ref(x, index, all_mask, pos.float()))


def test_dispatch_and_fake(monkeypatch):
    x, xk, index, all_mask, pos = _case(2, 17, 5, 3, torch.float32)
    if DEV == "cpu":
        assert "CPU" in dict(gather_tokens_op.explain(x, index))["triton"]
        monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
    assert dict(gather_tokens_op.explain(x, index))["triton"] == "selected"
    assert dict(scatter_tokens_op.explain(xk, index, all_mask, pos))["triton"] == "selected"
    assert "int64" in dict(gather_tokens_op.explain(x, index.int()))["triton"]
    torch.library.opcheck(triton_tokens.gather_fwd, (x, index), test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(triton_tokens.scatter_fwd, (xk, index, all_mask, pos),
                          test_utils=("test_schema", "test_faketensor"))
