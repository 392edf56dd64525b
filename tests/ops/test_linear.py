"""linear (mage_fast.ops.linear): the MKL packed backend against its plain-torch reference (F.linear),
and the exact network pass through it against the pass with every op on its reference."""
import pytest
import torch
import torch.nn.functional as F
from tolerances import F32, assert_matches, backends, tol

import mage_fast
from mage_fast.ops import force_backend
from mage_fast.ops.linear import MIN_ROWS, linear, linear_op, mkl_packed_available, packed_weight

OP = "linear"
needs_mkl = pytest.mark.skipif(not mkl_packed_available(), reason="torch built without MKL's packed linear")


def _backend(*args):
    return linear_op.select(*args).name


@needs_mkl
@pytest.mark.parametrize("target", backends(OP, "", F32))
@pytest.mark.parametrize("shape,out,bias", [((1028, 768), 3072, True), ((4, 257, 768), 2304, False),
                                            ((2, 129, 64), 48, True), ((3, 200, 96), 96, True)], ids=str)
def test_backend_equals_f_linear(shape, out, bias, target):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    w = torch.randn(out, shape[-1]) * 0.05
    b = torch.randn(out) if bias else None
    with torch.no_grad():
        assert _backend(x, w, b) == target
        got = linear(x, w, b)
    assert got.shape == (*shape[:-1], out)
    assert_matches(got, F.linear(x, w, b), tol(OP, target, F32))  # the same kernel and summation order


@needs_mkl
def test_packed_copy_follows_in_place_changes_and_row_counts():
    t = tol(OP, "mkl_packed", F32)
    torch.manual_seed(1)
    w, b = torch.randn(64, 32), torch.randn(64)
    x = torch.randn(MIN_ROWS, 32)
    with torch.no_grad():
        first = packed_weight(w, MIN_ROWS)
        assert packed_weight(w, MIN_ROWS) is first  # cached
        w.mul_(2)  # e.g. an optimizer step or load_state_dict
        assert_matches(linear(x, w, b), F.linear(x, w, b), t)
        assert packed_weight(w, MIN_ROWS) is not first
        x2 = torch.randn(2 * MIN_ROWS, 32)
        assert_matches(linear(x2, w, b), F.linear(x2, w, b), t)


def test_declines_training_small_and_other_dtypes():
    w = torch.randn(16, 8, requires_grad=True)
    x = torch.randn(MIN_ROWS, 8)
    assert _backend(x, w, None) == "torch"  # records a gradient
    with torch.no_grad():
        assert _backend(torch.randn(MIN_ROWS - 1, 8), w, None) == "torch"  # a matrix-vector path could round differently
        assert _backend(x.double(), w.double(), None) == "torch"
        assert _backend(x.bfloat16(), w.bfloat16(), None) == "torch"
    y = linear(x, w, None)
    y.sum().backward()
    t = tol(OP, "torch", F32, "grad")
    torch.testing.assert_close(w.grad, x.sum(0).expand(16, 8), atol=t.atol, rtol=t.rtol)  # through F.linear


def test_network_pass_equals_the_reference_pass():
    """The exact pass with the packed linears gives the logits of the same pass with every op forced
    to its plain-torch reference, within fp32 rounding of the other ops' backends."""
    torch.manual_seed(0)
    model = mage_fast.mage_vit_tiny().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.codebook_size, (8, model.seq_len), generator=g)
    ids[:, ::3] = model.mask_token_label
    with torch.inference_mode():
        got = model.code_logits(ids, None)
        with force_backend("torch"):
            ref = model.code_logits(ids, None)
    assert (got - ref).abs().max().item() <= tol(OP, "mkl_packed", F32, "logits").rtol * ref.abs().max().item()
