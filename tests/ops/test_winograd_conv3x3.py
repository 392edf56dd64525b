"""winograd_conv3x3 (mage_fast.ops.winograd, csrc/cpu/winograd.cpp): Winograd F(4x4, 3x3)
convolutions against F.conv2d; the WinogradConv2d module and the fast tokenizer that uses it. The
dispatcher's handling of the op (force_backend, reasons, info) is in test_dispatch.py."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from op_backends import run
from tolerances import F32, F64, backends, tol

from mage_fast.ops import winograd
from mage_fast.ops.winograd import WinogradConv2d, conv3x3_op, conv3x3_ref, winograd_convs

OP = "winograd_conv3x3"
needs_op = pytest.mark.skipif(not winograd.available(), reason="mage_fast._C is not built (make setup builds it)")


def _case(N, C, Co, H, W, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(Co, C, 3, 3, generator=g) / (3 * C ** 0.5)
    b = torch.randn(Co, generator=g) if bias else None
    return x, w, b


@needs_op
@pytest.mark.parametrize("target", backends(OP, "float64", F32))
@pytest.mark.parametrize("N,C,Co,H,W,bias", [(2, 8, 5, 9, 6, True), (1, 16, 12, 7, 7, False), (3, 64, 32, 16, 12, True),
                                             (1, 3, 7, 4, 4, True), (2, 33, 40, 1, 5, True)])
@pytest.mark.parametrize("upsample", [False, True])
def test_conv_matches_the_direct_convolution(N, C, Co, H, W, bias, upsample, target):
    """Sizes that are not multiples of the 4x4 tile, a 1-pixel-high image, with and without bias and
    the in-place 2x upsampling; the error is within the table's rtol of the output's scale (a direct
    fp32 convolution: ~1e-6), in channels-last and in contiguous inputs."""
    rtol = tol(OP, target, F32, "float64").rtol
    x, w, b = _case(N, C, Co, H, W, seed=C + Co + H)
    U = torch.ops.mage_fast.winograd_weight(w)  # the compiled op's transformed weight
    assert U.shape == (36, C, Co)
    ref = conv3x3_ref(x.double(), w.double(), None if b is None else b.double(), upsample)
    for xin in (x, x.to(memory_format=torch.channels_last)):
        y = run(conv3x3_op, target, xin, w, b, upsample)
        assert y.shape == ref.shape and y.dtype == torch.float32
        assert y.is_contiguous(memory_format=torch.channels_last)
        err = (y.double() - ref).abs().max() / ref.abs().max()
        assert err < rtol, float(err)


@needs_op
@pytest.mark.parametrize("target", backends(OP, "float64", F32))
def test_conv_spans_several_chunks(target):
    """More tiles than one cache-sized chunk (the last chunk shorter): every tile is written once, right."""
    x, w, b = _case(2, 32, 32, 100, 70, seed=3)  # 2 * 25 * 18 = 900 tiles; chunks of 455
    y = run(conv3x3_op, target, x, w, b, False)
    ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
    assert float((y.double() - ref).abs().max() / ref.abs().max()) < tol(OP, target, F32, "float64").rtol


@needs_op
def test_op_refuses_bad_arguments():
    x, w, b = _case(1, 8, 4, 6, 6, seed=0)
    U = torch.ops.mage_fast.winograd_weight(w)
    with pytest.raises(RuntimeError, match="U must be float32 \\(36, 4, Cout\\)"):
        torch.ops.mage_fast.winograd_conv3x3(x[:, :4], U, b, False)
    with pytest.raises(RuntimeError, match="expects float32 x"):
        torch.ops.mage_fast.winograd_conv3x3(x.double(), U, b, False)
    with pytest.raises(RuntimeError, match="bias must be float32 \\(4,\\)"):
        torch.ops.mage_fast.winograd_conv3x3(x, U, b[:3], False)
    with pytest.raises(RuntimeError, match="3, 3\\) weight"):
        torch.ops.mage_fast.winograd_weight(w[..., :2])


def test_module_falls_back_off_fp32_and_follows_weight_changes():
    """Off fp32 (or without the compiled op) the module is the reference convolution; an in-place
    weight change is seen by the next call (the transformed weight is rebuilt)."""
    t64, t, ts = tol(OP, "torch", F64, "module"), tol(OP, "cpp", F32, "module"), tol(OP, "cpp", F32, "scaled weight")
    conv = nn.Conv2d(8, 6, 3, padding=1)
    m = WinogradConv2d(conv)
    x = torch.randn(2, 8, 10, 10)
    with torch.no_grad():
        m64 = WinogradConv2d(conv).double()
        torch.testing.assert_close(m64(x.double()), conv3x3_ref(x.double(), m64.weight, m64.bias, False),
                                   atol=t64.atol, rtol=t64.rtol)
        torch.testing.assert_close(m(x), conv(x), atol=t.atol, rtol=t.rtol)
        torch.testing.assert_close(m(x, upsample=True), conv(F.interpolate(x, scale_factor=2.0)), atol=t.atol,
                                   rtol=t.rtol)
        m.weight.mul_(-2.0)
        torch.testing.assert_close(m(x), -2.0 * (conv(x) - conv.bias.view(1, -1, 1, 1)) + conv.bias.view(1, -1, 1, 1),
                                   atol=ts.atol, rtol=ts.rtol)
    with pytest.raises(ValueError, match="3x3 convolution with stride 1"):
        WinogradConv2d(nn.Conv2d(8, 6, 3, padding=1, stride=2))


def test_winograd_convs_replaces_only_what_it_can_compute():
    net = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 1), nn.Conv2d(64, 3, 3, padding=1),
                        nn.Sequential(nn.Conv2d(32, 48, 3, padding=1), nn.Conv2d(48, 48, 3, padding=2, dilation=2)))
    assert winograd_convs(net) == 2
    assert [type(m).__name__ for m in (net[0], net[1], net[2], net[3][0], net[3][1])] == \
        ["WinogradConv2d", "Conv2d", "Conv2d", "WinogradConv2d", "Conv2d"]


@needs_op
def test_fast_tokenizer_uses_winograd_in_fp32_on_the_cpu():
    """The fp32 pixel decode of the non-exact modes runs its decoder's wide 3x3 convolutions (the
    upsampling ones included) by Winograd; the bf16 copy does not."""
    from mage_fast.cli import load_model
    from mage_fast.decoding.quant import fast_tokenizer
    model, _ = load_model(None, None)
    fp = fast_tokenizer(model, torch.float32)
    kinds = {type(m).__name__ for m in fp.decoder.modules()}
    assert "WinogradConv2d" in kinds
    assert isinstance(fp.decoder.up[1].upsample.conv, WinogradConv2d)
    assert not any(isinstance(m, WinogradConv2d) for m in fast_tokenizer(model, torch.bfloat16).modules())
    assert not any(isinstance(m, WinogradConv2d) for m in model.vqgan.modules())  # the model's own tokenizer


@needs_op
def test_module_runs_on_inference_tensors():
    """A copy made under torch.inference_mode (as the CLI's generate makes the pixel decoder) has
    weights without a version counter; the module still runs and matches the convolution."""
    t = tol(OP, "cpp", F32, "module")
    conv = nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(1, 32, 8, 8)
    with torch.inference_mode():
        m = WinogradConv2d(conv)
        y = m(x, upsample=True)
        ref = conv(F.interpolate(x, scale_factor=2.0))
    torch.testing.assert_close(y, ref, atol=t.atol, rtol=t.rtol)
