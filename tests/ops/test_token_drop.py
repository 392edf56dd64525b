"""gather_tokens / scatter_tokens (mage_fast.ops.token_drop): the reference against the official
nonzero() formulation, and every backend against the reference, forward and backward."""
import pytest
import torch
from op_backends import DEV, backend_fn, check_strided, device, needs_cpp, run, triton_kernels
from tolerances import F32, assert_matches, backends, cases, tol

from mage_fast.ops import gather_tokens, keep_index, scatter_tokens
from mage_fast.ops.token_drop import gather_tokens_op, gather_tokens_ref, scatter_tokens_op, scatter_tokens_ref


# ---------------------------------------------------------------- the reference

def official_restore(x, drop, allm, pos):
    """The official decoder fill, written with nonzero() as the official code."""
    pad = x[:, :1].repeat(1, drop.shape[1], 1).clone()
    pad[(1 - drop).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[-1])
    pad = torch.where(allm.unsqueeze(-1).bool(), x[:, :1].repeat(1, drop.shape[1], 1), pad)
    return pad + pos


def test_reference_matches_the_official_formulation():
    torch.manual_seed(0)
    B, L, D, K = 3, 17, 5, 9
    drop = torch.zeros(B, L)
    for b in range(B):
        drop[b, 1 + torch.randperm(L - 1)[: L - K]] = 1
    allm = drop.clone()
    allm[:, 2] = 1
    full = torch.randn(B, L, D, requires_grad=True)
    idx = keep_index(drop, K)
    kept = gather_tokens(full, idx)
    assert_matches(kept, full[(1 - drop).nonzero(as_tuple=True)].view(B, K, D), tol("gather_tokens", "torch", F32, "official"))
    x = torch.randn(B, K, D)
    pos = torch.randn(1, L, D)
    assert_matches(scatter_tokens(x, idx, allm.bool(), pos), official_restore(x, drop, allm, pos),
                   tol("scatter_tokens", "torch", F32, "official"))
    kept.sum().backward()
    assert_matches(full.grad, (1 - drop).unsqueeze(-1).expand(B, L, D), tol("gather_tokens", "torch", F32, "official"))


# ---------------------------------------------------------------- backends: index sets with a class slot

TD_SHAPES = [(1, 1, 1, 1), (2, 7, 3, 5), (3, 50, 13, 31), (4, 257, 64, 40), (16, 200, 150, 256)]  # B, L, K, D
# (the last moves over 2 MiB: two threads of the C++ kernel)


def _token_inputs(B, L, K, D, g):
    x = torch.randn(B, K, D, generator=g, requires_grad=True)
    rest = torch.stack([torch.randperm(L - 1, generator=g)[: K - 1] + 1 for _ in range(B)]) if K > 1 else \
        torch.empty(B, 0, dtype=torch.long)
    index = torch.cat([torch.zeros(B, 1, dtype=torch.long), rest.sort(1).values], 1)  # class slot first
    all_mask = torch.rand(B, L, generator=g) < 0.4
    all_mask[:, 0] = False
    pos = torch.randn(1, L, D, generator=g, requires_grad=True)
    return x, index, all_mask, pos


@pytest.mark.parametrize("target", backends("scatter_tokens", "grad", F32))
@pytest.mark.parametrize("B,L,K,D", TD_SHAPES, ids=[f"B{b}-L{l}-K{k}-D{d}" for b, l, k, d in TD_SHAPES])
def test_scatter_forward_backward(B, L, K, D, target):
    x, index, all_mask, pos = _token_inputs(B, L, K, D, torch.Generator().manual_seed(L))
    out = run(scatter_tokens_op, target, x, index, all_mask, pos)
    ref = scatter_tokens_ref(x, index, all_mask, pos)
    assert_matches(out, ref, tol("scatter_tokens", target, F32))
    grad = torch.randn_like(ref)
    g_got = torch.autograd.grad(out, (x, pos), grad)
    g_ref = torch.autograd.grad(ref, (x, pos), grad)
    for a, b in zip(g_got, g_ref):
        assert_matches(a, b, tol("scatter_tokens", target, F32, "grad"))


@pytest.mark.parametrize("target,dtype", cases("gather_tokens", [torch.float32, torch.bfloat16, torch.int64]))
@pytest.mark.parametrize("B,L,K,D", TD_SHAPES, ids=[f"B{b}-L{l}-K{k}-D{d}" for b, l, k, d in TD_SHAPES])
def test_gather_random_index(B, L, K, D, target, dtype):
    t = tol("gather_tokens", target, dtype)
    g = torch.Generator().manual_seed(K)
    x = (torch.randn(B, L, D, generator=g) * 10).to(dtype).to(device(target))
    index = torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(B)]).to(device(target))
    fn = backend_fn(gather_tokens_op, target, x, index)
    assert_matches(fn(x, index), gather_tokens_ref(x, index), t)
    if dtype == torch.float32:
        x.requires_grad_(True)
        grad = torch.randn(B, K, D, generator=g).to(device(target))
        (gx,) = torch.autograd.grad(fn(x, index), x, grad)
        (gr,) = torch.autograd.grad(gather_tokens_ref(x, index), x, grad)
        assert_matches(gx, gr, t)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [  # (B, L, K, D): L positions including the class slot, K kept
    pytest.param((1, 1, 1, 1), id="b1-l1-k1-d1"),
    pytest.param((2, 17, 5, 3), id="b2-l17-k5-d3"),
    pytest.param((3, 257, 67, 48), id="b3-l257-k67-d48"),
    pytest.param((2, 31, 31, 130), id="b2-l31-k31-d130-nothing-dropped"),
]


def _case(B, L, K, D, dtype, seed=0, dev=DEV):
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
    return [t.to(dev) for t in (x_full.to(dtype), x_kept.to(dtype), index, all_mask, pos.to(dtype))]


@pytest.mark.parametrize("target,dtype", cases("gather_tokens", DTYPES))
@pytest.mark.parametrize("shape", SHAPES)
def test_gather_keep_index(shape, target, dtype):
    x, _, index, _, _ = _case(*shape, dtype, dev=device(target))
    x.requires_grad_(True)
    t = tol("gather_tokens", target, dtype)
    out = run(gather_tokens_op, target, x, index)
    ref = gather_tokens_ref(x, index)
    assert_matches(out, ref, t)  # a copy: exact
    dout = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, dout)
    (dx_ref,) = torch.autograd.grad(ref, x, dout)
    assert dx.dtype == x.dtype
    assert_matches(dx, dx_ref, t)  # one add per row: exact


@pytest.mark.parametrize("target", backends("gather_tokens", "repeated index grad", F32))
def test_gather_repeated_index_sums_gradients(target):
    x = torch.randn(2, 7, 5, device=device(target), requires_grad=True)
    index = torch.tensor([[1, 1, 4, 1], [0, 6, 6, 2]], device=device(target))
    out = run(gather_tokens_op, target, x, index)
    dout = torch.randn_like(out)
    (dx,) = torch.autograd.grad(out, x, dout)
    (dx_ref,) = torch.autograd.grad(gather_tokens_ref(x, index), x, dout)
    assert_matches(dx, dx_ref, tol("gather_tokens", target, F32, "repeated index grad"))


@pytest.mark.parametrize("target,dtype", cases("scatter_tokens", DTYPES, "fwd+bwd"))
@pytest.mark.parametrize("shape", SHAPES)
def test_scatter_low_precision(shape, target, dtype):
    """Output within atol = rtol = t of the fp32 reference; dx within atol t * max(1, max|dx|), dpos
    within atol t * B (a sum over the batch)."""
    _, x, index, all_mask, pos = _case(*shape, dtype, dev=device(target))
    x.requires_grad_(True)
    pos.requires_grad_(True)
    out = run(scatter_tokens_op, target, x, index, all_mask, pos)
    xf, posf = (t.detach().float().requires_grad_(True) for t in (x, pos))
    ref = scatter_tokens_ref(xf, index, all_mask, posf)
    assert out.dtype == dtype
    t = tol("scatter_tokens", target, dtype, "fwd+bwd")
    torch.testing.assert_close(out.float(), ref, rtol=t.rtol, atol=t.atol)
    dout = torch.randn(out.shape, device=out.device).to(dtype)
    dx, dpos = torch.autograd.grad(out, (x, pos), dout)
    dx_ref, dpos_ref = torch.autograd.grad(ref, (xf, posf), dout.float())
    assert dx.dtype == dtype and dpos.dtype == dtype
    scale = max(1.0, float(dx_ref.abs().max()))
    torch.testing.assert_close(dx.float(), dx_ref, rtol=t.rtol, atol=t.atol * scale)
    torch.testing.assert_close(dpos.float(), dpos_ref, rtol=t.rtol, atol=t.atol * shape[0])


@pytest.mark.parametrize("target", backends("scatter_tokens", "mixed dtypes", F32))
def test_scatter_mixed_dtypes_promote_like_torch(target):
    _, x, index, all_mask, pos = _case(2, 17, 5, 8, torch.bfloat16, dev=device(target))
    out = run(scatter_tokens_op, target, x, index, all_mask, pos.float())
    assert out.dtype == torch.float32
    assert_matches(out, scatter_tokens_ref(x, index, all_mask, pos.float()),
                   tol("scatter_tokens", target, F32, "mixed dtypes"))


@pytest.mark.parametrize("target", backends("gather_tokens", "strided", F32))
def test_noncontiguous_inputs(target):
    dev = device(target)
    g = torch.Generator().manual_seed(5)
    B, L, K, D = 2, 15, 6, 20
    drop = torch.rand(B, L, generator=g).argsort(1).argsort(1) >= K
    drop[:, 0] = False
    drop[torch.arange(B), (~drop).float().cumsum(1).eq(K + 1).float().argmax(1)] = True  # exactly K kept
    index = keep_index(drop, K).to(dev)
    all_mask = (drop | (torch.rand(B, L, generator=g) < 0.3)).to(dev)
    all_mask[:, 0] = False
    x_full = torch.randn(B, L, D, generator=g).to(dev).requires_grad_(True)
    x_kept = torch.randn(B, K, D, generator=g).to(dev).requires_grad_(True)
    pos = torch.randn(1, L, D, generator=g).to(dev).requires_grad_(True)
    gather = backend_fn(gather_tokens_op, target, x_full, index)
    scatter = backend_fn(scatter_tokens_op, target, x_kept, index, all_mask, pos)
    check_strided(gather, [x_full, index], [0, 1], tol("gather_tokens", target, F32, "strided"), grad_of=(0,),
                  dy=torch.randn(B, K, D, generator=g).to(dev))
    check_strided(scatter, [x_kept, index, all_mask, pos], [0, 1, 2, 3], tol("scatter_tokens", target, F32, "strided"),
                  grad_of=(0, 3), dy=torch.randn(B, L, D, generator=g).to(dev))


# ---------------------------------------------------------------- backend-specific: errors, tracing, dispatch

@needs_cpp
def test_cpp_rejects_out_of_range():
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.mage_fast.gather_tokens(torch.randn(1, 4, 2), torch.tensor([[0, 4]]))
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.mage_fast.scatter_tokens(torch.randn(1, 2, 2), torch.tensor([[0, -1]]),
                                           torch.zeros(1, 4, dtype=torch.bool), torch.zeros(1, 4, 2))


def _small_args():
    g = torch.Generator().manual_seed(0)
    x, index, all_mask, pos = _token_inputs(2, 9, 4, 3, g)
    return {"gather_tokens": (torch.randn(2, 9, 3, requires_grad=True), index),
            "scatter_tokens": (x, index, all_mask, pos)}


@needs_cpp
@pytest.mark.parametrize("name", ["gather_tokens", "scatter_tokens"])
def test_cpp_opcheck(name):
    torch.library.opcheck(getattr(torch.ops.mage_fast, name).default, _small_args()[name])


def test_triton_dispatch_and_fake(monkeypatch):
    triton_tokens = triton_kernels("token_drop")
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
