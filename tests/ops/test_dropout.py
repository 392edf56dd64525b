"""dropout (mage_fast.ops.dropout): the hashed backend against its plain-torch oracle of the same hash
(``dropout_hashed_ref``; the op's reference, torch's dropout, draws other random numbers), and the
Dropout module through the dispatcher."""
import pytest
import torch
from tolerances import F32, assert_matches, tol

import mage_fast
from mage_fast.ops.dropout import Dropout, dropout_hashed_ref, dropout_op

OP = "dropout"
needs_dropout_op = pytest.mark.skipif(not mage_fast._ext.has_op("dropout"),
                                      reason=f"compiled ops unavailable: {mage_fast._ext.status}")


@needs_dropout_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed, offset", [(5, 0), (2 ** 40 + 3, 123), (77, 2 ** 32 - 5000)])
def test_hashed_op_equals_its_torch_oracle(dtype, seed, offset):
    t, rate, kept_tol = tol(OP, "hashed", dtype), tol(OP, "hashed", dtype, "rate"), tol(OP, "hashed", dtype, "kept")
    x = torch.randn(3, 1000, 7).to(dtype)
    got = torch.ops.mage_fast.dropout(x, 0.1, seed, offset)
    assert_matches(got, dropout_hashed_ref(x, 0.1, seed, offset), t)
    assert abs(float((got == 0).float().mean()) - 0.1) < rate.atol  # 21 000 draws: 0.1 +- 5 sigma
    kept = got != 0
    assert torch.allclose(got[kept].float(), (x[kept].float() / 0.9).to(dtype).float(), rtol=kept_tol.rtol,
                          atol=kept_tol.atol)


@needs_dropout_op
def test_hashed_offsets_continue_one_stream_and_seeds_differ():
    x = torch.ones(2, 5000)
    whole = torch.ops.mage_fast.dropout(x, 0.3, 9, 0)
    assert torch.equal(torch.ops.mage_fast.dropout(x[1], 0.3, 9, 5000), whole[1])
    assert not torch.equal(torch.ops.mage_fast.dropout(x, 0.3, 10, 0), whole)
    y = torch.tensor([float("nan"), float("inf"), 1.0] * 400)
    out = torch.ops.mage_fast.dropout(y, 0.5, 1, 0)
    assert torch.isnan(out[0::3]).all()  # NaN * anything, as torch's dropout multiplies
    with pytest.raises(RuntimeError, match="p must be in"):
        torch.ops.mage_fast.dropout(x, 1.0, 1, 0)


@needs_dropout_op
def test_module_backward_uses_the_forward_decisions_and_torch_seeds():
    t = tol(OP, "hashed", F32, "grad")
    m = Dropout(0.25).train()
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(3)
    y = m(x)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, y != 0)
    assert torch.allclose(x.grad[y != 0], torch.full_like(x.grad[y != 0], 4 / 3), rtol=t.rtol, atol=t.atol)
    torch.manual_seed(3)
    assert torch.equal(m(x), y)  # the seed comes from torch's generator: manual_seed / saved RNG state replay it
    assert torch.equal(m.eval()(x), x)
    assert dict(dropout_op.explain(x, 0.25))["hashed"] == "selected"
    assert "CPU" in dict(dropout_op.explain(x.to("meta"), 0.25))["hashed"]
    with mage_fast.ops.force_backend("torch"):
        torch.manual_seed(3)
        assert not torch.equal(m.train()(x), y)  # the reference is torch's own dropout
    assert m.state_dict() == {}
