"""Triton flash attention, forward and backward, against the fp32 reference (interpreter on a CPU).

A low-precision result may differ from the fp32 reference by at most twice what torch's own
attention (SDPA) in that precision differs by, plus a small atol.
"""
import pytest
import torch
import torch.nn.functional as F

from mage_fast.ops.attention import attention_official, attention_op

triton_attn = pytest.importorskip("mage_fast.triton.attention", reason="triton not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32

CASES = [  # (B, H, N, d, causal, dtype): the real lengths 129/257 and head dims 48/64/128, plus odd ones
    pytest.param(1, 1, 129, 48, False, F32, id="n129-d48-f32"),
    pytest.param(1, 1, 257, 64, True, F32, id="n257-d64-causal-f32"),
    pytest.param(2, 3, 17, 128, True, F32, id="b2h3-n17-d128-causal-f32"),
    pytest.param(1, 2, 1, 64, False, F32, id="n1-d64-f32"),
    pytest.param(1, 1, 129, 48, False, F16, id="n129-d48-f16"),
    pytest.param(1, 1, 129, 64, True, F16, id="n129-d64-causal-f16"),
    pytest.param(1, 1, 129, 128, False, BF16, id="n129-d128-bf16"),
    pytest.param(1, 1, 257, 48, True, BF16, id="n257-d48-causal-bf16"),
]


def _qkv(B, H, N, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(DEV, dtype)  # the model's layout: a strided view per tensor
    return [t.requires_grad_(True) for t in qkv.permute(2, 0, 3, 1, 4).unbind(0)]


def _leaf32(ts):
    return [t.detach().float().requires_grad_(True) for t in ts]


def _grads(out, inputs, dout):
    return [out] + list(torch.autograd.grad(out, inputs, dout))


def _assert_within(got, ref, torch_lowp, dtype, what):
    for name, a, r, t in zip(["out", "dq", "dk", "dv"], got, ref, torch_lowp):
        err = (a.float() - r).abs().max().item()
        bound = 2 * (t.float() - r).abs().max().item() + ATOL[dtype]
        assert err <= bound, f"{what} {name}: error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("B,H,N,d,causal,dtype", CASES)
def test_forward_backward(B, H, N, d, causal, dtype):
    q, k, v = _qkv(B, H, N, d, dtype, seed=N * d)
    dout = torch.randn(B, H, N, d, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
    got = _grads(triton_attn.attention(q, k, v, causal=causal), (q, k, v), dout)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1:])
    q32 = _leaf32((q, k, v))
    ref = _grads(attention_official(*q32, causal=causal), q32, dout.float())
    lowp = _leaf32((q, k, v)) if dtype == F32 else [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    torch_lowp = _grads(F.scaled_dot_product_attention(*lowp, is_causal=causal), lowp, dout.to(lowp[0].dtype))
    _assert_within(got, ref, torch_lowp, dtype, f"{dtype} causal={causal}")


def _dropout_reference(q, k, v, keep, p, causal, dout):
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    out = (s.softmax(-1) * keep / (1 - p)) @ v
    return _grads(out, (q, k, v), dout)


@pytest.mark.parametrize("B,H,N,d,causal,dtype", [
    pytest.param(1, 2, 129, 48, False, F32, id="n129-d48-f32"),
    pytest.param(2, 1, 33, 64, True, F16, id="b2-n33-d64-causal-f16"),
])
def test_dropout_matches_reference_with_the_same_mask(B, H, N, d, causal, dtype):
    p = 0.1
    q, k, v = _qkv(B, H, N, d, dtype, seed=3)
    seed = torch.tensor([123456789], device=DEV)
    dout = torch.randn(B, H, N, d, generator=torch.Generator().manual_seed(2)).to(DEV, dtype)
    got = _grads(triton_attn.attention(q, k, v, dropout_p=p, causal=causal, seed=seed), (q, k, v), dout)
    keep = triton_attn.dropout_keep_mask(B, H, N, N, p, seed)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.02
    assert not torch.equal(keep, triton_attn.dropout_keep_mask(B, H, N, N, p, seed + 1))
    q32 = _leaf32((q, k, v))
    ref = _dropout_reference(*q32, keep.float(), p, causal, dout.float())
    lowp = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    torch_lowp = ref if dtype == F32 else [t for t in _dropout_reference(*[x.float() for x in lowp], keep.float(), p,
                                                                          causal, dout.float())]
    if dtype != F32:  # torch's own low-precision error: the same computation rounded through the dtype
        torch_lowp = [t.to(dtype) for t in torch_lowp]
    _assert_within(got, ref, torch_lowp, dtype, "dropout")


def test_dropout_seed_is_fresh_each_call():
    q, k, v = _qkv(1, 1, 16, 16, F32, seed=0)
    a = triton_attn.attention(q, k, v, dropout_p=0.5)
    b = triton_attn.attention(q, k, v, dropout_p=0.5)
    assert not torch.equal(a, b)


def test_dispatch_and_fake(monkeypatch):
    q, k, v = (t.detach() for t in _qkv(1, 2, 5, 8, F32, seed=0))
    if DEV == "cpu":
        assert "CPU" in dict(attention_op.explain(q, k, v))["triton"]
        monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
    assert dict(attention_op.explain(q, k, v, dropout_p=0.1))["triton"] == "selected"
    assert "causal" in dict(attention_op.explain(q, k[:, :, :3], v[:, :, :3], causal=True))["triton"]
    assert "mixed dtypes" in dict(attention_op.explain(q, k.half(), v))["triton"]
    seed = torch.zeros(1, dtype=torch.int64, device=DEV)
    torch.library.opcheck(triton_attn.attention_fwd, (q, k, v, seed, 0.0, False, 0.3),
                          test_utils=("test_schema", "test_faketensor"))
