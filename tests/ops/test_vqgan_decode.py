"""vqgan_decode (the tokenizer's decode, mage_fast.models.vqgan.decode_op): the channels-last backend
against the official NCHW arithmetic (its plain-torch reference).

The channels-last convolutions sum in another order and the compiled GroupNorm + SiLU rounds
differently from torch's two ops, so pixels agree within the table's rtol of the largest pixel
(random weights, seen: about 7e-6 for the tiny tokenizer, 2e-5 for ViT-B's)."""
import pytest
import torch
from tolerances import F32, backends, tol

import mage_fast
from mage_fast.models.vqgan import decode_op
from mage_fast.ops import force_backend
from mage_fast.ops.group_norm import available

OP = "vqgan_decode"
needs_op = pytest.mark.skipif(not available(), reason="the compiled group_norm_silu op is not built")


@pytest.fixture(scope="module")
def vq():
    torch.manual_seed(0)
    return mage_fast.mage_vit_tiny().vqgan.eval()


def _z(vq, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vq.n_embed, (B, 4, 4), generator=g)
    return vq.quantize.get_codebook_entry(ids.reshape(-1), (B, 4, 4, vq.quantize.e_dim))


@needs_op
@pytest.mark.parametrize("target", backends(OP, "", F32))
def test_decode_within_tolerance_of_the_official_arithmetic(vq, target):
    z = _z(vq)
    with torch.inference_mode():
        assert decode_op.select(vq.decoder, z).name == target
        got = vq.decode(z)
        with force_backend("torch"):
            ref = vq.decode(z)
    assert got.shape == ref.shape and got.dtype == torch.float32 and got.is_contiguous()
    err = (got - ref).abs().max().item() / ref.abs().max().item()
    assert err <= tol(OP, target, F32).rtol, f"relative pixel error {err:.2e}"
    with torch.inference_mode():
        again = vq.decode(z)
    assert torch.equal(got, again)  # deterministic across calls (freed memory reused)


@needs_op
def test_channels_last_decode_leaves_gradients_and_other_dtypes_to_the_reference(vq):
    z = _z(vq, B=1)
    zg = z.clone().requires_grad_(True)
    assert decode_op.select(vq.decoder, zg).name == "torch"  # records a gradient
    out = vq.decode(zg)
    out.sum().backward()
    assert zg.grad is not None and zg.grad.shape == z.shape
    with torch.no_grad():
        assert decode_op.select(vq.decoder, z.double()).name == "torch"
        assert decode_op.select(vq.decoder, z[0]).name == "torch"  # not (B, C, h, w)


@needs_op
@pytest.mark.parametrize("target", backends(OP, "", F32))
def test_decode_matches_the_reference_with_the_official_fixture_tokenizer_size(target):
    """A wider tokenizer (the official channel counts at a small resolution): the in-place residual
    add and the fused norms keep the decode within the table's rtol."""
    torch.manual_seed(3)
    from mage_fast.models.vqgan import VQModel
    vq = VQModel(ch=64, ch_mult=(1, 2), num_res_blocks=1, z_channels=32, embed_dim=32, n_embed=64).eval()
    z = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        assert decode_op.select(vq.decoder, z).name == target
        got = vq.decode(z)
        with force_backend("torch"):
            ref = vq.decode(z)
    assert (got - ref).abs().max().item() <= tol(OP, target, F32).rtol * ref.abs().max().item()
