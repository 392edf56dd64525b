"""Triton MLM head + label-smoothed masked CE (chunked) against the fp32 reference, loss and all gradients."""
import pytest
import torch

from mage_fast.ops.mlm_head_loss import mlm_head_loss, mlm_head_loss_op, mlm_head_loss_ref

triton_mlm = pytest.importorskip("mage_fast.triton.mlm_head_loss", reason="triton not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
NAMES = ["loss", "x", "fc_weight", "fc_bias", "ln_weight", "ln_bias", "word_embeddings", "bias"]
CASES = [  # (B, N, Dd, D, V, C, chunk_rows)
    pytest.param((2, 5, 12, 16, 37, 29, 4), id="m10-c29-3chunks"),
    pytest.param((1, 1, 8, 8, 5, 5, 1), id="m1-c5"),
    pytest.param((3, 17, 24, 32, 1031, 1024, 7), id="m51-c1024-8chunks"),
]


def _inputs(B, N, Dd, D, V, C, dtype, seed=0):
    g = torch.Generator().manual_seed(seed + B * N + C)
    floats = [torch.randn(B, N, Dd, generator=g), torch.randn(D, Dd, generator=g) / Dd ** 0.5,
              0.1 * torch.randn(D, generator=g), 1 + 0.2 * torch.randn(D, generator=g),
              0.1 * torch.randn(D, generator=g),
              torch.randn(V, D, generator=g), 0.5 * torch.randn(V, generator=g)]
    floats = [t.to(DEV, dtype).requires_grad_(True) for t in floats]
    target = torch.randint(0, C, (B, N), generator=g).to(DEV)
    mask = (torch.rand(B, N, generator=g) < 0.6).float()
    mask.view(-1)[0] = 1.0
    return floats, target, mask.to(DEV)


def _loss_and_grads(fn, floats, target, mask, C, **kw):
    loss = fn(*floats, target, mask, C, 0.1, 1e-5, **kw)
    return [loss, *torch.autograd.grad(loss, floats)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradients(case, dtype):
    B, N, Dd, D, V, C, chunk = case
    floats, target, mask = _inputs(B, N, Dd, D, V, C, dtype)
    got = _loss_and_grads(triton_mlm.mlm_head_loss, floats, target, mask, C, chunk_rows=chunk)
    assert got[0].dtype == torch.float32 and [g.dtype for g in got[1:]] == [dtype] * 7
    ref = _loss_and_grads(mlm_head_loss_ref, [t.detach().float().requires_grad_(True) for t in floats], target, mask, C)
    lowp = [t.detach().clone().requires_grad_(True) for t in floats]
    torch_lowp = _loss_and_grads(lambda *a: mlm_head_loss_ref(*a, upcast=False), lowp, target, mask, C)
    for name, a, r, t in zip(NAMES, got, ref, torch_lowp):
        err = (a.float() - r).abs().max().item()
        bound = 2 * (t.float() - r).abs().max().item() + ATOL[dtype] * max(1.0, r.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


def test_unused_codes_get_no_gradient_and_chunking_is_invisible():
    floats, target, mask = _inputs(2, 5, 12, 16, 37, 29, torch.float32)
    a = _loss_and_grads(triton_mlm.mlm_head_loss, floats, target, mask, 29, chunk_rows=3)
    b = _loss_and_grads(triton_mlm.mlm_head_loss, floats, target, mask, 29, chunk_rows=1000)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert float(a[6][29:].abs().max()) == 0.0 and float(a[7][29:].abs().max()) == 0.0


def test_public_function_dispatches(monkeypatch):
    floats, target, mask = _inputs(1, 3, 8, 8, 9, 7, torch.float32)
    args = (*floats, target, mask, 7)
    if DEV == "cpu":
        assert "CPU" in dict(mlm_head_loss_op.explain(*args))["triton"]
        monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
    assert dict(mlm_head_loss_op.explain(*args))["triton"] == "selected"
    torch.testing.assert_close(mlm_head_loss(*args), mlm_head_loss_ref(*args))
    logits = torch.randn(4, 7, device=DEV)
    torch.library.opcheck(triton_mlm.smoothed_ce_, (logits, torch.zeros(7, device=DEV), torch.arange(4, device=DEV),
                                                    torch.ones(4, device=DEV), torch.full((1,), 4.0, device=DEV),
                                                    0.1, True), test_utils=("test_schema", "test_faketensor"))


def test_no_grad_evaluation_matches():
    floats, target, mask = _inputs(2, 5, 12, 16, 37, 29, torch.float32)
    with torch.no_grad():
        loss = triton_mlm.mlm_head_loss(*floats, target, mask, 29, chunk_rows=4)
    torch.testing.assert_close(loss, mlm_head_loss_ref(*floats, target, mask, 29).detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_masked_ce_on_a_strided_logits_view(dtype):
    from mage_fast.ops.mlm_loss import masked_ce_ref
    g = torch.Generator().manual_seed(4)
    full = (3 * torch.randn(2, 14, 1031, generator=g)).to(DEV, dtype).requires_grad_(True)
    target = torch.randint(0, 1024, (2, 13), generator=g).to(DEV)
    mask = (torch.rand(2, 13, generator=g) < 0.5).float().to(DEV)
    mask[0, 0] = 1
    got = triton_mlm.masked_ce(full[:, 1:, :1024], target, mask, 0.1)
    (dgot,) = torch.autograd.grad(got, full)
    f32 = full.detach().float().requires_grad_(True)
    ref = masked_ce_ref(f32[:, 1:, :1024], target, mask, 0.1)
    (dref,) = torch.autograd.grad(ref, f32)
    lp = full.detach().clone().requires_grad_(True)
    low = masked_ce_ref(lp[:, 1:, :1024], target, mask, 0.1, upcast=False)
    (dlow,) = torch.autograd.grad(low, lp)
    assert dgot.dtype == dtype
    for a, r, t in ((got, ref, low), (dgot, dref, dlow)):
        err = (a.float() - r).abs().max().item()
        bound = 2 * (t.float() - r).abs().max().item() + ATOL[dtype] * r.abs().max().item()
        assert err <= bound, f"error {err:.3g} > bound {bound:.3g}"
    assert float(dgot[:, 0].abs().max()) == 0 and float(dgot[:, :, 1024:].abs().max()) == 0
