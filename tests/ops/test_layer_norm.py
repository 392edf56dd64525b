"""layer_norm (mage_fast.ops.layer_norm): the backends against the fp32 reference, forward and
backward, through the dispatcher and under torch.compile."""
import pytest
import torch
from op_backends import DEV, assert_close_to_lowp_reference, backend_fn, check_strided, device, triton_kernels
from tolerances import F32, backends, tol

from mage_fast.ops.layer_norm import layer_norm, layer_norm_op, layer_norm_ref

OP = "layer_norm"
SHAPES = [
    pytest.param((1, 3), id="m1-d3"),
    pytest.param((3, 5, 7), id="m15-d7"),
    pytest.param((2, 129, 48), id="m258-d48"),
    pytest.param((67, 768), id="m67-d768"),
    pytest.param((5, 1031), id="m5-d1031"),
]


def _case(shape, dtype, seed=0, dev=DEV):
    g = torch.Generator().manual_seed(seed + sum(shape))
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dev, dtype).requires_grad_(True)
    D = shape[-1]
    w = (1 + 0.3 * torch.randn(D, generator=g)).to(dev, dtype).requires_grad_(True)
    b = (0.3 * torch.randn(D, generator=g)).to(dev, dtype).requires_grad_(True)
    dy = torch.randn(shape, generator=g).to(dev, dtype)
    return x, w, b, dy


def _run(fn, x, w, b, dy, eps):
    y = fn(x, w, b, eps)
    return [y, *torch.autograd.grad(y, (x, w, b), dy)]


@pytest.mark.parametrize("target", backends(OP, "lowp"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_backward(shape, dtype, target):
    atol = tol(OP, target, dtype, "lowp").atol
    x, w, b, dy = _case(shape, dtype, dev=device(target))
    got = _run(backend_fn(layer_norm_op, target, x, w, b, 1e-6), x, w, b, dy, 1e-6)
    assert [t.dtype for t in got] == [dtype] * 4
    leaves = [t.detach().float().requires_grad_(True) for t in (x, w, b)]
    ref = _run(layer_norm_ref, *leaves, dy.float(), 1e-6)
    lowp = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    torch_lowp = _run(lambda *a: layer_norm_ref(*a, upcast=False), *lowp, dy, 1e-6)  # torch's own, in dtype
    assert_close_to_lowp_reference(["y", "dx", "dw", "db"], got, ref, torch_lowp, atol)


@pytest.mark.parametrize("target", backends(OP, "strided", F32))
def test_noncontiguous_inputs(target):
    dev = device(target)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 40, generator=g).to(dev).requires_grad_(True)
    w = (1 + 0.2 * torch.randn(40, generator=g)).to(dev).requires_grad_(True)
    b = (0.1 * torch.randn(40, generator=g)).to(dev).requires_grad_(True)
    dy = torch.randn(3, 7, 40, generator=g).to(dev)
    fn = backend_fn(layer_norm_op, target, x, w, b, 1e-5)
    check_strided(lambda a, c, d: fn(a, c, d, 1e-5), [x, w, b], [0, 1, 2], tol(OP, target, F32, "strided"),
                  grad_of=(0, 1, 2), dy=dy)


def test_triton_public_function_dispatches(monkeypatch):
    triton_ln = triton_kernels("layer_norm")
    x, w, b, dy = _case((4, 9), torch.float32)
    if DEV == "cpu":
        assert "CPU" in dict(layer_norm_op.explain(x, w, b, 1e-5))["triton"]
        monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
    assert dict(layer_norm_op.explain(x, w, b, 1e-5))["triton"] == "selected"
    assert "weight and bias" in dict(layer_norm_op.explain(x, None, None, 1e-5))["triton"]
    t = tol(OP, "triton", F32)
    torch.testing.assert_close(layer_norm(x, w, b), layer_norm_ref(x, w, b), atol=t.atol, rtol=t.rtol)
    torch.library.opcheck(triton_ln.layer_norm_fwd, (x.detach(), w.detach(), b.detach(), 1e-5),
                          test_utils=("test_schema", "test_faketensor"))


def test_triton_rows_split_in_two_pieces_leave_few_lanes_idle():
    triton_ln = triton_kernels("layer_norm")
    assert triton_ln.pieces(768) == (512, 256) and triton_ln.pieces(48) == (32, 16)
    assert triton_ln.pieces(1024) == (1024, 16) and triton_ln.pieces(3) == (2, 16)
    for D in range(1, 4097):
        a, b = triton_ln.pieces(D)
        assert a <= D <= a + b and (a + b - D) <= max(16, D // 2), D


def test_triton_under_torch_compile(monkeypatch):
    triton_kernels("layer_norm")
    from mage_fast.backends.triton import load_kernels
    load_kernels()
    monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
    x = torch.randn(5, 24, device=DEV, requires_grad=True)
    w = torch.randn(24, device=DEV, requires_grad=True)
    b = torch.randn(24, device=DEV, requires_grad=True)
    code = []

    def recording_backend(gm, example_inputs):
        code.extend(m.code for m in gm.modules() if hasattr(m, "code"))
        return gm

    f = torch.compile(lambda x, w, b: layer_norm(x * 2, w, b).sum(), backend=recording_backend, fullgraph=True)
    got = f(x, w, b)
    assert any("layer_norm_fwd" in c for c in code), "the Triton custom op is not in the compiled graph"
    grads = torch.autograd.grad(got, (x, w, b))
    ref = layer_norm_ref(x * 2, w, b).sum()
    t, tg = tol(OP, "triton", F32), tol(OP, "triton", F32, "compile grad")
    torch.testing.assert_close(got, ref, atol=t.atol, rtol=t.rtol)
    for g, r in zip(grads, torch.autograd.grad(ref, (x, w, b))):
        torch.testing.assert_close(g, r, rtol=tg.rtol, atol=tg.atol)
