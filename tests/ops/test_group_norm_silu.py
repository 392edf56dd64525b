"""group_norm_silu (mage_fast.ops.group_norm, csrc/cpu/group_norm.cpp): GroupNorm + SiLU in one op,
against torch in float64; the GroupNormSiLU module and a fused VQGAN decoder against the unfused ones.
The dispatcher's handling of the op (force_backend, reasons, info) is in test_dispatch.py."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from tolerances import F32, F64, tol

from mage_fast.models.vqgan import VQModel
from mage_fast.ops import group_norm
from mage_fast.ops.group_norm import GroupNormSiLU, fuse_group_norm_silu, group_norm_silu_ref, norm_silu

OP = "group_norm_silu"
needs_op = pytest.mark.skipif(not group_norm.available(), reason="mage_fast._C is not built (make setup builds it)")


def _case(N, C, H, W, seed, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(N, C, H, W, generator=g) + offset
    return x, torch.randn(C, generator=g), torch.randn(C, generator=g)


@needs_op
@pytest.mark.parametrize("N,C,H,W,G", [(2, 64, 9, 7, 32), (1, 12, 33, 31, 3), (3, 8, 1, 1, 8), (1, 128, 40, 40, 32),
                                       (2, 13, 5, 6, 1)])
@pytest.mark.parametrize("silu", [False, True])
def test_op_matches_float64(N, C, H, W, G, silu):
    """Channel counts that are and are not multiples of the 8-lane vector, a pixel count above the
    kernel's 512-pixel block, a 1x1 image, one group; a large common offset (statistics that
    cancel in fp32 sums); contiguous and channels-last input, channels-last output. The compiled
    op itself (``silu=False`` is its plain GroupNorm)."""
    rtol = tol(OP, "cpp", F32, "float64").rtol
    x, w, b = _case(N, C, H, W, seed=C + H, offset=40.0)
    ref = F.group_norm(x.double(), G, w.double(), b.double(), 1e-6)
    if silu:
        ref = F.silu(ref)
    for xin in (x, x.to(memory_format=torch.channels_last)):
        y = torch.ops.mage_fast.group_norm_silu(xin, G, w, b, 1e-6, silu)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert y.is_contiguous(memory_format=torch.channels_last)
        err = float((y.double() - ref).abs().max())
        assert err < rtol * max(1.0, float(ref.abs().max())), err


@needs_op
def test_op_is_closer_to_float64_than_torch_fp32():
    """At the decoder's size the fused op's error is below torch's own fp32 group_norm + silu."""
    x, w, b = _case(2, 128, 64, 64, seed=3, offset=5.0)
    x = x.to(memory_format=torch.channels_last)
    ref = F.silu(F.group_norm(x.double(), 32, w.double(), b.double(), 1e-6))
    ours = (torch.ops.mage_fast.group_norm_silu(x, 32, w, b, 1e-6, True).double() - ref).abs().max()
    theirs = (group_norm_silu_ref(x, 32, w, b, 1e-6).double() - ref).abs().max()
    assert ours <= theirs, (float(ours), float(theirs))


@needs_op
def test_op_rejects_bad_arguments():
    x, w, b = _case(1, 12, 4, 4, seed=0)
    with pytest.raises(RuntimeError, match="do not split into 5 groups"):
        torch.ops.mage_fast.group_norm_silu(x, 5, w, b, 1e-6, True)
    with pytest.raises(RuntimeError, match="expects float32 x"):
        torch.ops.mage_fast.group_norm_silu(x.double(), 3, w, b, 1e-6, True)
    with pytest.raises(RuntimeError, match="weight and bias must be float32"):
        torch.ops.mage_fast.group_norm_silu(x, 3, w[:5], b, 1e-6, True)
    with pytest.raises(RuntimeError, match="eps must be >= 0"):
        torch.ops.mage_fast.group_norm_silu(x, 3, w, b, -1.0, True)


def test_module_shares_the_norms_parameters_and_falls_back():
    """The wrapper computes silu(norm(x)) with the norm's own parameters (an in-place change shows),
    by the op where it can and by the reference under autograd and in other dtypes."""
    t32, t64 = tol(OP, "cpp", F32, "module"), tol(OP, "torch", F64, "module")
    norm = nn.GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    fused = GroupNormSiLU(norm)
    assert fused.weight is norm.weight
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), F.silu(norm(x)), atol=t32.atol, rtol=t32.rtol)
        norm.weight.mul_(2)
        torch.testing.assert_close(fused(x), F.silu(norm(x)), atol=t32.atol, rtol=t32.rtol)
        norm.double()  # the wrapper holds the same parameters: now float64, the reference path
        torch.testing.assert_close(fused(x.double()), F.silu(norm(x.double())), atol=t64.atol, rtol=t64.rtol)
        norm.float()
    xg = x.clone().requires_grad_(True)
    fused(xg).sum().backward()  # the reference path under autograd
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    assert norm_silu(fused, x).shape == x.shape
    with pytest.raises(ValueError, match="affine nn.GroupNorm"):
        GroupNormSiLU(nn.GroupNorm(4, 16, affine=False))


@needs_op
def test_fused_decoder_decodes_as_before():
    """fuse_group_norm_silu replaces every norm of the decoder that a SiLU follows (two per residual
    block and norm_out) and the decode agrees with the unfused one."""
    t = tol(OP, "cpp", F32, "decoder")
    torch.manual_seed(0)
    vq = VQModel(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=16, embed_dim=16, n_embed=64, ckpt_path=None).eval()
    fused = copy.deepcopy(vq)
    blocks = sum(1 for m in vq.decoder.modules() if type(m).__name__ == "ResnetBlock")
    assert fuse_group_norm_silu(fused.decoder) == 2 * blocks + 1
    assert not any(type(m) is nn.GroupNorm for m in fused.decoder.modules())
    codes = torch.randint(0, 64, (2, 4, 4))
    with torch.no_grad():
        z = vq.quantize.get_codebook_entry(codes.flatten(1), shape=(2, 4, 4, 16))
        torch.testing.assert_close(fused.decode(z), vq.decode(z), atol=t.atol, rtol=t.rtol)
