"""token_embed (mage_fast.ops.token_embed): the fused token embedding (+ LayerNorm) against the fp32
reference, forward and all gradients."""
import pytest
import torch
from op_backends import DEV, assert_close_to_lowp_reference, backend_fn, check_strided, device, triton_kernels
from tolerances import F32, backends, tol

from mage_fast.ops.token_drop import keep_index
from mage_fast.ops.token_embed import token_embed, token_embed_op, token_embed_ref

OP = "token_embed"
NAMES = ["y", "word_weight", "pos_weight", "ln_weight", "ln_bias"]
CASES = [  # (B, L, K, V, D)
    pytest.param((1, 1, 1, 3, 5), id="b1-k1-d5"),
    pytest.param((3, 17, 7, 11, 24), id="b3-l17-k7-d24"),
    pytest.param((2, 257, 67, 1026, 48), id="b2-l257-k67-v1026-d48"),
]


def _inputs(B, L, K, V, D, dtype, seed=0, dev=DEV):
    g = torch.Generator().manual_seed(seed + L + D)
    drop = torch.rand(B, L, generator=g).argsort(1).argsort(1) >= K
    positions = keep_index(drop, K)
    ids = torch.randint(0, V, (B, K), generator=g)
    ids[:, ::2] = V - 1  # a shared [MASK]-like id: many tokens add into one embedding row
    floats = [0.5 * torch.randn(V, D, generator=g), 0.5 * torch.randn(L, D, generator=g),
              1 + 0.2 * torch.randn(D, generator=g), 0.1 * torch.randn(D, generator=g)]
    floats = [t.to(dev, dtype).requires_grad_(True) for t in floats]
    dy = torch.randn(B, K, D, generator=g).to(dev, dtype)
    return ids.to(dev), positions.to(dev), floats, dy


def _run(fn, ids, positions, floats, dy):
    y = fn(ids, positions, *floats, 1e-6)
    return [y, *torch.autograd.grad(y, floats, dy)]


@pytest.mark.parametrize("target", backends(OP, "lowp"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES)
def test_forward_backward(case, dtype, target):
    atol = tol(OP, target, dtype, "lowp").atol
    ids, positions, floats, dy = _inputs(*case, dtype, dev=device(target))
    got = _run(backend_fn(token_embed_op, target, ids, positions, *floats, 1e-6), ids, positions, floats, dy)
    assert [t.dtype for t in got] == [dtype] * 5
    ref = _run(token_embed_ref, ids, positions, [t.detach().float().requires_grad_(True) for t in floats], dy.float())
    lowp = [t.detach().clone().requires_grad_(True) for t in floats]
    torch_lowp = _run(lambda *a: token_embed_ref(*a, upcast=False), ids, positions, lowp, dy)
    assert_close_to_lowp_reference(NAMES, got, ref, torch_lowp, atol)


@pytest.mark.parametrize("target", backends(OP, "strided", F32))
def test_noncontiguous_inputs(target):
    dev = device(target)
    g = torch.Generator().manual_seed(4)
    B, L, K, V, D = 2, 13, 6, 21, 24
    positions = keep_index(torch.rand(B, L, generator=g).argsort(1).argsort(1) >= K, K).to(dev)
    ids = torch.randint(0, V, (B, K), generator=g).to(dev)
    floats = [(0.5 * torch.randn(V, D, generator=g)).to(dev), (0.5 * torch.randn(L, D, generator=g)).to(dev),
              (1 + 0.2 * torch.randn(D, generator=g)).to(dev), (0.1 * torch.randn(D, generator=g)).to(dev)]
    floats = [t.requires_grad_(True) for t in floats]
    dy = torch.randn(B, K, D, generator=g).to(dev)
    fn = backend_fn(token_embed_op, target, ids, positions, *floats, 1e-6)
    check_strided(lambda *a: fn(*a, 1e-6), [ids, positions, *floats], range(6), tol(OP, target, F32, "strided"),
                  grad_of=(2, 3, 4, 5), dy=dy)


def test_triton_default_positions_and_dispatch(monkeypatch):
    triton_embed = triton_kernels("token_embed")
    ids, _, floats, _ = _inputs(2, 5, 5, 7, 8, torch.float32)
    args = (ids, None, *floats)
    if DEV == "cpu":
        assert "CPU" in dict(token_embed_op.explain(*args))["triton"]
        monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
    assert dict(token_embed_op.explain(*args))["triton"] == "selected"
    t = tol(OP, "triton", F32)
    torch.testing.assert_close(token_embed(*args), token_embed_ref(*args), rtol=t.rtol, atol=t.atol)
    pos = torch.arange(5, device=DEV).expand(2, 5)
    torch.library.opcheck(triton_embed.token_embed_fwd, (ids, pos, *(t.detach() for t in floats), 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
