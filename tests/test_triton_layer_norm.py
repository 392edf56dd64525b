"""Triton LayerNorm forward and backward against the fp32 reference (interpreter on a CPU)."""
import pytest
import torch

from mage_fast.ops.layer_norm import layer_norm, layer_norm_op, layer_norm_ref

triton_ln = pytest.importorskip("mage_fast.triton.layer_norm", reason="triton not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SHAPES = [
    pytest.param((1, 3), id="m1-d3"),
    pytest.param((3, 5, 7), id="m15-d7"),
    pytest.param((2, 129, 48), id="m258-d48"),
    pytest.param((67, 768), id="m67-d768"),
    pytest.param((5, 1031), id="m5-d1031"),
]


def _case(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    x = (torch.randn(shape, generator=g) * 3 + 1).to(DEV, dtype).requires_grad_(True)
    D = shape[-1]
    w = (1 + 0.3 * torch.randn(D, generator=g)).to(DEV, dtype).requires_grad_(True)
    b = (0.3 * torch.randn(D, generator=g)).to(DEV, dtype).requires_grad_(True)
    dy = torch.randn(shape, generator=g).to(DEV, dtype)
    return x, w, b, dy


def _run(fn, x, w, b, dy, eps):
    y = fn(x, w, b, eps)
    return [y, *torch.autograd.grad(y, (x, w, b), dy)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward(shape, dtype):
    x, w, b, dy = _case(shape, dtype)
    got = _run(triton_ln.layer_norm, x, w, b, dy, 1e-6)
    assert [t.dtype for t in got] == [dtype] * 4
    leaves = [t.detach().float().requires_grad_(True) for t in (x, w, b)]
    ref = _run(layer_norm_ref, *leaves, dy.float(), 1e-6)
    lowp = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    torch_lowp = _run(lambda *a: layer_norm_ref(*a, upcast=False), *lowp, dy, 1e-6)  # torch's own, in dtype
    for name, a, r, t in zip(["y", "dx", "dw", "db"], got, ref, torch_lowp):
        err = (a.float() - r).abs().max().item()
        bound = 2 * (t.float() - r).abs().max().item() + ATOL[dtype] * max(1.0, r.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


def test_public_function_dispatches(monkeypatch):
    x, w, b, dy = _case((4, 9), torch.float32)
    if DEV == "cpu":
        assert "CPU" in dict(layer_norm_op.explain(x, w, b, 1e-5))["triton"]
        monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
    assert dict(layer_norm_op.explain(x, w, b, 1e-5))["triton"] == "selected"
    assert "weight and bias" in dict(layer_norm_op.explain(x, None, None, 1e-5))["triton"]
    torch.testing.assert_close(layer_norm(x, w, b), layer_norm_ref(x, w, b))
    torch.library.opcheck(triton_ln.layer_norm_fwd, (x.detach(), w.detach(), b.detach(), 1e-5),
                          test_utils=("test_schema", "test_faketensor"))


def test_rows_split_in_two_pieces_leave_few_lanes_idle():
    assert triton_ln.pieces(768) == (512, 256) and triton_ln.pieces(48) == (32, 16)
    assert triton_ln.pieces(1024) == (1024, 16) and triton_ln.pieces(3) == (2, 16)
    for D in range(1, 4097):
        a, b = triton_ln.pieces(D)
        assert a <= D <= a + b and (a + b - D) <= max(16, D // 2), D
