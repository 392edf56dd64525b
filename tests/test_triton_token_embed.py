"""Triton fused token embedding (+ LayerNorm) against the fp32 reference, forward and all gradients."""
import pytest
import torch

from mage_fast.ops.token_drop import keep_index
from mage_fast.ops.token_embed import token_embed, token_embed_op, token_embed_ref

triton_embed = pytest.importorskip("mage_fast.triton.token_embed", reason="triton not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
NAMES = ["y", "word_weight", "pos_weight", "ln_weight", "ln_bias"]
CASES = [  # (B, L, K, V, D)
    pytest.param((1, 1, 1, 3, 5), id="b1-k1-d5"),
    pytest.param((3, 17, 7, 11, 24), id="b3-l17-k7-d24"),
    pytest.param((2, 257, 67, 1026, 48), id="b2-l257-k67-v1026-d48"),
]


def _inputs(B, L, K, V, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + L + D)
    drop = torch.rand(B, L, generator=g).argsort(1).argsort(1) >= K
    positions = keep_index(drop, K)
    ids = torch.randint(0, V, (B, K), generator=g)
    ids[:, ::2] = V - 1  # a shared [MASK]-like id: many tokens add into one embedding row
    floats = [0.5 * torch.randn(V, D, generator=g), 0.5 * torch.randn(L, D, generator=g),
              1 + 0.2 * torch.randn(D, generator=g), 0.1 * torch.randn(D, generator=g)]
    floats = [t.to(DEV, dtype).requires_grad_(True) for t in floats]
    dy = torch.randn(B, K, D, generator=g).to(DEV, dtype)
    return ids.to(DEV), positions.to(DEV), floats, dy


def _run(fn, ids, positions, floats, dy):
    y = fn(ids, positions, *floats, 1e-6)
    return [y, *torch.autograd.grad(y, floats, dy)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES)
def test_forward_backward(case, dtype):
    ids, positions, floats, dy = _inputs(*case, dtype)
    got = _run(triton_embed.token_embed, ids, positions, floats, dy)
    assert [t.dtype for t in got] == [dtype] * 5
    ref = _run(token_embed_ref, ids, positions, [t.detach().float().requires_grad_(True) for t in floats], dy.float())
    lowp = [t.detach().clone().requires_grad_(True) for t in floats]
    torch_lowp = _run(lambda *a: token_embed_ref(*a, upcast=False), ids, positions, lowp, dy)
    for name, a, r, t in zip(NAMES, got, ref, torch_lowp):
        err = (a.float() - r).abs().max().item()
        bound = 2 * (t.float() - r).abs().max().item() + ATOL[dtype] * max(1.0, r.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


def test_default_positions_and_dispatch(monkeypatch):
    ids, _, floats, _ = _inputs(2, 5, 5, 7, 8, torch.float32)
    args = (ids, None, *floats)
    if DEV == "cpu":
        assert "CPU" in dict(token_embed_op.explain(*args))["triton"]
        monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
    assert dict(token_embed_op.explain(*args))["triton"] == "selected"
    torch.testing.assert_close(token_embed(*args), token_embed_ref(*args), rtol=1e-5, atol=1e-5)
    pos = torch.arange(5, device=DEV).expand(2, 5)
    torch.library.opcheck(triton_embed.token_embed_fwd, (ids, pos, *(t.detach() for t in floats), 1e-6),
                          test_utils=("test_schema", "test_faketensor"))
