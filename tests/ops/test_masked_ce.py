"""masked_ce (mage_fast.ops.mlm_loss): the label-smoothed masked cross entropy; the reference against
the official formula, the backends against the reference."""
import pytest
import torch
from op_backends import backend_fn, check_strided, device, run
from tolerances import F32, backends, tol

from mage_fast.ops import masked_ce
from mage_fast.ops.mlm_loss import masked_ce_op, masked_ce_ref

OP = "masked_ce"


def test_reference_matches_official_label_smoothing():
    torch.manual_seed(0)
    logits, tgt = torch.randn(2, 6, 10), torch.randint(0, 10, (2, 6))
    mask = (torch.rand(2, 6) > 0.5).float()
    mask[0, 0] = 1
    lp = logits.log_softmax(-1)
    per = 0.9 * -lp.gather(-1, tgt[..., None])[..., 0] + 0.1 * -lp.mean(-1)
    t = tol(OP, "torch", F32, "official")
    torch.testing.assert_close(masked_ce(logits, tgt, mask), (per * mask).sum() / mask.sum(), atol=t.atol, rtol=t.rtol)


@pytest.mark.parametrize("target", backends(OP, "lowp"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_strided_logits_view(dtype, target):
    """The model's logits view (class slot and extra codes cut off): loss and gradient within twice
    torch's own error in the dtype plus atol * max|reference|; no gradient outside the view."""
    atol = tol(OP, target, dtype, "lowp").atol
    dev = device(target)
    g = torch.Generator().manual_seed(4)
    full = (3 * torch.randn(2, 14, 1031, generator=g)).to(dev, dtype).requires_grad_(True)
    tgt = torch.randint(0, 1024, (2, 13), generator=g).to(dev)
    mask = (torch.rand(2, 13, generator=g) < 0.5).float().to(dev)
    mask[0, 0] = 1
    got = run(masked_ce_op, target, full[:, 1:, :1024], tgt, mask, 0.1)
    (dgot,) = torch.autograd.grad(got, full)
    f32 = full.detach().float().requires_grad_(True)
    ref = masked_ce_ref(f32[:, 1:, :1024], tgt, mask, 0.1)
    (dref,) = torch.autograd.grad(ref, f32)
    lp = full.detach().clone().requires_grad_(True)
    low = masked_ce_ref(lp[:, 1:, :1024], tgt, mask, 0.1, upcast=False)
    (dlow,) = torch.autograd.grad(low, lp)
    assert dgot.dtype == dtype
    for a, r, t in ((got, ref, low), (dgot, dref, dlow)):
        err = (a.float() - r).abs().max().item()
        bound = 2 * (t.float() - r).abs().max().item() + atol * r.abs().max().item()
        assert err <= bound, f"error {err:.3g} > bound {bound:.3g}"
    assert float(dgot[:, 0].abs().max()) == 0 and float(dgot[:, :, 1024:].abs().max()) == 0


@pytest.mark.parametrize("target", backends(OP, "strided", F32))
def test_noncontiguous_inputs(target):
    dev = device(target)
    g = torch.Generator().manual_seed(6)
    B, N, C = 2, 5, 29
    # the random stream of the combined Triton strided test, which drew the head's inputs first
    for shape in [(B, N, 12), (16, 12), (16,), (16,), (16,), (37, 16), (37,)]:
        torch.randn(*shape, generator=g)
    tgt = torch.randint(0, C, (B, N), generator=g).to(dev)
    mask = (torch.rand(B, N, generator=g) < 0.6).float().to(dev)
    mask[0, 0] = 1.0
    logits = torch.randn(B, N, C, generator=g).to(dev).requires_grad_(True)
    fn = backend_fn(masked_ce_op, target, logits, tgt, mask, 0.1)
    check_strided(lambda lg, t, m: fn(lg, t, m, 0.1), [logits, tgt, mask], [0, 1, 2], tol(OP, target, F32, "strided"),
                  grad_of=(0,))
