"""mlm_head_loss (mage_fast.ops.mlm_head_loss): the MLM head and label-smoothed masked cross entropy
in one op, against the fp32 reference, loss and all gradients."""
import functools

import pytest
import torch
from op_backends import DEV, assert_close_to_lowp_reference, backend_fn, check_strided, device, triton_kernels
from tolerances import F32, backends, tol

from mage_fast.ops.mlm_head_loss import mlm_head_loss, mlm_head_loss_op, mlm_head_loss_ref

OP = "mlm_head_loss"
NAMES = ["loss", "x", "fc_weight", "fc_bias", "ln_weight", "ln_bias", "word_embeddings", "bias"]
CASES = [  # (B, N, Dd, D, V, C, chunk_rows)
    pytest.param((2, 5, 12, 16, 37, 29, 4), id="m10-c29-3chunks"),
    pytest.param((1, 1, 8, 8, 5, 5, 1), id="m1-c5"),
    pytest.param((3, 17, 24, 32, 1031, 1024, 7), id="m51-c1024-8chunks"),
]


def _inputs(B, N, Dd, D, V, C, dtype, seed=0, dev=DEV):
    g = torch.Generator().manual_seed(seed + B * N + C)
    floats = [torch.randn(B, N, Dd, generator=g), torch.randn(D, Dd, generator=g) / Dd ** 0.5,
              0.1 * torch.randn(D, generator=g), 1 + 0.2 * torch.randn(D, generator=g),
              0.1 * torch.randn(D, generator=g),
              torch.randn(V, D, generator=g), 0.5 * torch.randn(V, generator=g)]
    floats = [t.to(dev, dtype).requires_grad_(True) for t in floats]
    target = torch.randint(0, C, (B, N), generator=g).to(dev)
    mask = (torch.rand(B, N, generator=g) < 0.6).float()
    mask.view(-1)[0] = 1.0
    return floats, target, mask.to(dev)


def _loss_and_grads(fn, floats, target, mask, C, **kw):
    loss = fn(*floats, target, mask, C, 0.1, 1e-5, **kw)
    return [loss, *torch.autograd.grad(loss, floats)]


def _impl(target, args, chunk_rows):
    """The backend's function for this call; Triton's with the case's rows per chunk (its own argument)."""
    fn = backend_fn(mlm_head_loss_op, target, *args)
    if target == "triton":
        return functools.partial(triton_kernels("mlm_head_loss").mlm_head_loss, chunk_rows=chunk_rows)
    return fn


@pytest.mark.parametrize("target", backends(OP, "lowp"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients(case, dtype, target):
    atol = tol(OP, target, dtype, "lowp").atol
    B, N, Dd, D, V, C, chunk = case
    floats, tgt, mask = _inputs(B, N, Dd, D, V, C, dtype, dev=device(target))
    got = _loss_and_grads(_impl(target, (*floats, tgt, mask, C, 0.1, 1e-5), chunk), floats, tgt, mask, C)
    assert got[0].dtype == torch.float32 and [g.dtype for g in got[1:]] == [dtype] * 7
    ref = _loss_and_grads(mlm_head_loss_ref, [t.detach().float().requires_grad_(True) for t in floats], tgt, mask, C)
    lowp = [t.detach().clone().requires_grad_(True) for t in floats]
    torch_lowp = _loss_and_grads(lambda *a: mlm_head_loss_ref(*a, upcast=False), lowp, tgt, mask, C)
    assert_close_to_lowp_reference(NAMES, got, ref, torch_lowp, atol)


@pytest.mark.parametrize("target", backends(OP, "strided", F32))
def test_noncontiguous_inputs(target):
    dev = device(target)
    g = torch.Generator().manual_seed(6)
    B, N, Dd, D, V, C = 2, 5, 12, 16, 37, 29
    floats = [torch.randn(B, N, Dd, generator=g), torch.randn(D, Dd, generator=g) / Dd ** 0.5,
              0.1 * torch.randn(D, generator=g), 1 + 0.2 * torch.randn(D, generator=g),
              0.1 * torch.randn(D, generator=g), torch.randn(V, D, generator=g), 0.5 * torch.randn(V, generator=g)]
    floats = [t.to(dev).requires_grad_(True) for t in floats]
    tgt = torch.randint(0, C, (B, N), generator=g).to(dev)
    mask = (torch.rand(B, N, generator=g) < 0.6).float().to(dev)
    mask[0, 0] = 1.0
    impl = _impl(target, (*floats, tgt, mask, C, 0.1, 1e-5), 4)

    def head(*a):
        return impl(*a, C, 0.1, 1e-5)
    check_strided(head, [*floats, tgt, mask], range(9), tol(OP, target, F32, "strided"), grad_of=tuple(range(7)))


def test_triton_unused_codes_get_no_gradient_and_chunking_is_invisible():
    triton_mlm = triton_kernels("mlm_head_loss")
    floats, target, mask = _inputs(2, 5, 12, 16, 37, 29, torch.float32)
    a = _loss_and_grads(triton_mlm.mlm_head_loss, floats, target, mask, 29, chunk_rows=3)
    b = _loss_and_grads(triton_mlm.mlm_head_loss, floats, target, mask, 29, chunk_rows=1000)
    t = tol(OP, "triton", F32, "chunking")
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=t.rtol, atol=t.atol)
    assert float(a[6][29:].abs().max()) == 0.0 and float(a[7][29:].abs().max()) == 0.0


def test_triton_public_function_dispatches(monkeypatch):
    triton_mlm = triton_kernels("mlm_head_loss")
    floats, target, mask = _inputs(1, 3, 8, 8, 9, 7, torch.float32)
    args = (*floats, target, mask, 7)
    if DEV == "cpu":
        assert "CPU" in dict(mlm_head_loss_op.explain(*args))["triton"]
        monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
    assert dict(mlm_head_loss_op.explain(*args))["triton"] == "selected"
    t = tol(OP, "triton", F32)
    torch.testing.assert_close(mlm_head_loss(*args), mlm_head_loss_ref(*args), atol=t.atol, rtol=t.rtol)
    logits = torch.randn(4, 7, device=DEV)
    torch.library.opcheck(triton_mlm.smoothed_ce_, (logits, torch.zeros(7, device=DEV), torch.arange(4, device=DEV),
                                                    torch.ones(4, device=DEV), torch.full((1,), 4.0, device=DEV),
                                                    0.1, True), test_utils=("test_schema", "test_faketensor"))


def test_triton_no_grad_evaluation_matches():
    triton_mlm = triton_kernels("mlm_head_loss")
    floats, target, mask = _inputs(2, 5, 12, 16, 37, 29, torch.float32)
    with torch.no_grad():
        loss = triton_mlm.mlm_head_loss(*floats, target, mask, 29, chunk_rows=4)
    t = tol(OP, "triton", F32)
    torch.testing.assert_close(loss, mlm_head_loss_ref(*floats, target, mask, 29).detach(), atol=t.atol, rtol=t.rtol)
