"""attention (mage_fast.ops.attention): the backends against the official fp32 arithmetic
(``attention_official``) or float64, forward and backward: SDPA, Triton's kernels, the CPU training
backend (``cpu_train``) and its compiled elementwise passes; the reasons the attention libraries decline.

A low-precision result may differ from the fp32 reference by at most twice what torch's own
attention (SDPA) in that precision differs by, plus the table's atol ("lowp")."""
import importlib.util
import sys

import pytest
import torch
import torch.nn.functional as F
from op_backends import DEV, backend_fn, check_strided, device, run, triton_kernels
from tolerances import F32, backends, cases, tol

import mage_fast
from mage_fast.ops.attention import attention_cpu_train, attention_official, attention_op
from mage_fast.ops.dispatch import Op
from mage_fast.ops.dropout import dropout_hashed_ref, new_seed

OP = "attention"
F16, BF16 = torch.float16, torch.bfloat16


@pytest.mark.parametrize("target", backends(OP, "", F32))
@pytest.mark.parametrize("N,d,causal", [(129, 48, False), (257, 64, False), (7, 16, True)], ids=str)
def test_matches_official(N, d, causal, target):
    t = tol(OP, target, F32)
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, N, d) for _ in range(3))
    ref = attention_official(q, k, v, causal=causal)
    dev = device(target)
    got = run(attention_op, target, q.to(dev), k.to(dev), v.to(dev), causal=causal)
    torch.testing.assert_close(got.cpu(), ref, rtol=t.rtol, atol=t.atol)
    if causal:
        torch.testing.assert_close(ref, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=t.rtol,
                                   atol=t.atol)


CASES = [  # (B, H, N, d, causal): the real lengths 129/257 and head dims 48/64/128, plus odd ones; dtype
    pytest.param(1, 1, 129, 48, False, F32, id="n129-d48-f32"),
    pytest.param(1, 1, 257, 64, True, F32, id="n257-d64-causal-f32"),
    pytest.param(2, 3, 17, 128, True, F32, id="b2h3-n17-d128-causal-f32"),
    pytest.param(1, 2, 1, 64, False, F32, id="n1-d64-f32"),
    pytest.param(1, 1, 129, 48, False, F16, id="n129-d48-f16"),
    pytest.param(1, 1, 129, 64, True, F16, id="n129-d64-causal-f16"),
    pytest.param(1, 1, 129, 128, False, BF16, id="n129-d128-bf16"),
    pytest.param(1, 1, 257, 48, True, BF16, id="n257-d48-causal-bf16"),
]


def _qkv(B, H, N, d, dtype, seed, dev=DEV):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, N, 3, H, d, generator=g).to(dev, dtype)  # the model's layout: a strided view per tensor
    return [t.requires_grad_(True) for t in qkv.permute(2, 0, 3, 1, 4).unbind(0)]


def _leaf32(ts):
    return [t.detach().float().requires_grad_(True) for t in ts]


def _grads(out, inputs, dout):
    return [out] + list(torch.autograd.grad(out, inputs, dout))


def _assert_within(got, ref, torch_lowp, atol, what):
    for name, a, r, t in zip(["out", "dq", "dk", "dv"], got, ref, torch_lowp):
        err = (a.float() - r).abs().max().item()
        bound = 2 * (t.float() - r).abs().max().item() + atol
        assert err <= bound, f"{what} {name}: error {err:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("target", backends(OP, "lowp"))
@pytest.mark.parametrize("B,H,N,d,causal,dtype", CASES)
def test_forward_backward(B, H, N, d, causal, dtype, target):
    atol = tol(OP, target, dtype, "lowp").atol
    dev = device(target)
    q, k, v = _qkv(B, H, N, d, dtype, seed=N * d, dev=dev)
    dout = torch.randn(B, H, N, d, generator=torch.Generator().manual_seed(1)).to(dev, dtype)
    got = _grads(run(attention_op, target, q, k, v, causal=causal), (q, k, v), dout)
    assert got[0].dtype == dtype and all(g.dtype == dtype for g in got[1:])
    q32 = _leaf32((q, k, v))
    ref = _grads(attention_official(*q32, causal=causal), q32, dout.float())
    lowp = _leaf32((q, k, v)) if dtype == F32 else [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    torch_lowp = _grads(F.scaled_dot_product_attention(*lowp, is_causal=causal), lowp, dout.to(lowp[0].dtype))
    _assert_within(got, ref, torch_lowp, atol, f"{dtype} causal={causal}")


# ---------------------------------------------------------------- Triton: dropout, dispatch, tracing

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
def test_triton_dropout_matches_reference_with_the_same_mask(B, H, N, d, causal, dtype):
    triton_attn = triton_kernels("attention")
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
    _assert_within(got, ref, torch_lowp, tol(OP, "triton", dtype, "lowp").atol, "dropout")


def test_triton_dropout_seed_is_fresh_each_call():
    triton_attn = triton_kernels("attention")
    q, k, v = _qkv(1, 1, 16, 16, F32, seed=0)
    a = triton_attn.attention(q, k, v, dropout_p=0.5)
    b = triton_attn.attention(q, k, v, dropout_p=0.5)
    assert not torch.equal(a, b)


def test_triton_dispatch_and_fake(monkeypatch):
    triton_attn = triton_kernels("attention")
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


@pytest.mark.parametrize("target", backends(OP, "strided", F32))
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_noncontiguous_inputs(dropout_p, target):
    """The same numbers on strided and column-major views of q, k, v as on contiguous ones (with
    dropout: one seed, so one mask)."""
    dev = device(target)
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 17, 24, generator=g).to(dev).requires_grad_(True) for _ in range(3))
    seed = torch.tensor([12345], dtype=torch.int64, device=dev)
    dy = torch.randn(2, 3, 17, 24, generator=g).to(dev)
    backend_fn(attention_op, target, q, k, v, dropout_p=dropout_p)  # skips where the backend declines
    kernel = triton_kernels("attention")  # the seed is the kernel's own argument

    def fn(a, b, c):
        return kernel.attention(a, b, c, dropout_p=dropout_p, seed=seed)
    check_strided(fn, [q, k, v], [0, 1, 2], tol(OP, target, F32, "strided"), grad_of=(0, 1, 2), dy=dy)


@pytest.mark.parametrize("name", ["flash_attn", "flash_attn_4", "xformers"])
def test_attention_libraries_say_why_they_decline(name):
    q = torch.randn(1, 2, 5, 8)
    verdict = dict(Op.registry["attention"].explain(q, q, q))[name]
    top = {"flash_attn": "flash_attn", "flash_attn_4": "flash_attn", "xformers": "xformers"}[name]
    if importlib.util.find_spec(top) is None:
        assert verdict == f"{top} is not installed"
    else:
        assert "CUDA only" in verdict


def test_triton_attention_defers_to_sdpa_on_padded_shapes():
    import types

    from mage_fast.backends import triton as tb
    assert abs(tb.attention_padding(257, 257, 64) - 1.40) < 0.01  # encoder, N=257
    assert abs(tb.attention_padding(129, 129, 64) - 1.85) < 0.01  # training encoder, N=129
    assert tb.attention_padding(256, 256, 64) == 1.0
    assert abs(tb.attention_padding(256, 256, 48) - 4 / 3) < 1e-9  # d=48 padded to 64

    def fake(n, d):
        return types.SimpleNamespace(device=torch.device("cuda"), shape=(64, 12, n, d))
    why = tb._attention_defer(fake(257, 64), fake(257, 64), fake(257, 64))
    assert why is not None and "1.40x" in why
    assert tb._attention_defer(fake(256, 64), fake(256, 64), fake(256, 64)) is None
    q = torch.randn(1, 2, 257, 64)
    assert tb._attention_defer(q, q, q) is None  # CPU / interpreter calls keep the registered order


# ---------------------------------------------------------------- cpu_train: the CPU training backend
# (torch's CPU flash forward, a backward of batched matrix products; the hashed dropout's mask)

att = sys.modules["mage_fast.ops.attention"]  # the module (mage_fast.ops.attention is also a function's name)
needs_dropout_op = pytest.mark.skipif(not mage_fast._ext.has_op("dropout"),
                                      reason=f"compiled ops unavailable: {mage_fast._ext.status}")


def _grads_of(fn, q, k, v, g):
    x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = fn(*x)
    o.backward(g.to(o.dtype))
    return [o.detach()] + [t.grad for t in x]


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _backend(target):
    return lambda *a, **k: run(attention_op, target, *a, **k)


@pytest.mark.parametrize("target", backends(OP, "float64", F32))
@pytest.mark.parametrize("shape", [(2, 3, 37, 16), (1, 2, 129, 32), (3, 1, 5, 8)])
def test_fp32_is_the_exact_gradient(shape, target):
    rtol = tol(OP, target, F32, "float64").rtol
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(shape) * 1.5 for _ in range(4))
    ref = _grads_of(attention_official, *(t.double() for t in (q, k, v)), g.double())
    got = _grads_of(_backend(target), q, k, v, g)
    for a, b in zip(got, ref):
        assert _rel(a, b) < rtol


@pytest.mark.parametrize("target", backends(OP, "float64", BF16))
def test_bf16_within_its_stated_tolerance(target):
    """bf16 inputs: the output is sdpa's; the gradients within the table's rtol of the float64 ones
    (largest element error over the largest element), the order of bf16 rounding of the products."""
    rtol = tol(OP, target, BF16, "float64").rtol
    torch.manual_seed(1)
    q, k, v, g = (torch.randn(2, 4, 65, 32) for _ in range(4))
    ref = _grads_of(attention_official, *(t.double() for t in (q, k, v)), g.double())
    got = _grads_of(_backend(target), *(t.bfloat16() for t in (q, k, v)), g.bfloat16())
    sdpa = _grads_of(att.attention_sdpa, *(t.bfloat16() for t in (q, k, v)), g.bfloat16())
    assert torch.equal(got[0], sdpa[0])
    for a, b in zip(got[1:], ref[1:]):
        assert a.dtype == torch.bfloat16 and _rel(a, b) < rtol


def test_cpu_train_chunks_give_the_same_gradients(monkeypatch):
    t = tol(OP, "cpu_train", F32, "chunks")
    torch.manual_seed(2)
    q, k, v, g = (torch.randn(3, 2, 20, 8) for _ in range(4))
    whole = _grads_of(attention_cpu_train, q, k, v, g)
    monkeypatch.setattr(att, "_CHUNK_ELEMENTS", 20 * 20 * 2)  # two (batch, head) pairs per chunk: 3 chunks
    chunked = _grads_of(attention_cpu_train, q, k, v, g)
    for a, b in zip(chunked, whole):
        assert torch.allclose(a, b, rtol=t.rtol, atol=t.atol)


def test_dispatch_takes_cpu_train_only_where_it_applies():
    q = torch.randn(1, 2, 9, 8, requires_grad=True)
    k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    assert dict(attention_op.explain(q, k, v))["cpu_train"] == "selected"
    with torch.no_grad():
        assert "no gradient" in dict(attention_op.explain(q, k, v))["cpu_train"]
    assert "causal" in dict(attention_op.explain(q, k, v, causal=True))["cpu_train"]
    assert dict(attention_op.explain(q, k, v, causal=True))["sdpa"] == "selected"
    assert "fp32 or all bf16" in dict(attention_op.explain(q.double(), k.double(), v.double()))["cpu_train"]
    if mage_fast._ext.has_op("dropout"):  # dropout through the hashed dropout
        assert dict(attention_op.explain(q, k, v, dropout_p=0.1))["cpu_train"] == "selected"


@needs_dropout_op
@pytest.mark.parametrize("target,dtype", cases(OP, [F32, BF16], "dropout float64"))
def test_with_dropout_is_the_gradient_of_the_dropped_weights(target, dtype):
    rtol = tol(OP, target, dtype, "dropout float64").rtol
    torch.manual_seed(0)
    B, H, N, d = 2, 3, 37, 16
    q, k, v, g = (torch.randn(B, H, N, d) for _ in range(4))
    x = [t.clone().to(dtype).requires_grad_() for t in (q, k, v)]
    torch.manual_seed(7)
    o = run(attention_op, target, *x, dropout_p=0.2)
    o.backward(g.to(dtype))
    torch.manual_seed(7)
    seed = new_seed()
    r = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    p = torch.softmax(r[0] @ r[1].transpose(-1, -2) * d ** -0.5, -1)
    keep = dropout_hashed_ref(torch.ones(B * H, N, N, dtype=torch.float64), 0.2, seed).view(B, H, N, N)
    ro = (p * keep) @ r[2]
    ro.backward(g.to(dtype).double())
    assert _rel(o.detach(), ro.detach()) < rtol
    for a, b in zip(x, r):
        assert _rel(a.grad, b.grad) < rtol


@needs_dropout_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_cpu_train_elementwise_ops_equal_their_torch_form(monkeypatch, dtype, p_drop):
    """attn_probs / attn_dscores (compiled, one pass each) against the torch passes they replace,
    on rows that start mid-stream (offset) and scores down to where exp underflows."""
    tp, tpd, tds = (tol(OP, "cpu_train", dtype, c) for c in ("probs", "dropped probs", "dscores"))
    torch.manual_seed(0)
    s = (torch.randn(3, 7, 33) * 30).to(dtype)
    lse = torch.logsumexp(s.float() * 0.2, -1, keepdim=True)
    dp, delta = torch.randn(3, 7, 33).to(dtype), torch.randn(3, 7, 1)
    got_p, got_pd = att._probs(s, lse, 0.2, p_drop, 11, 500, True, dtype)
    got_ds = att._dscores(dp, got_p, delta, 0.2, p_drop, 11, 500, dtype).clone()
    got_p, got_pd = got_p.clone(), got_pd.clone()
    real = mage_fast._ext.has_op
    monkeypatch.setattr(mage_fast._ext, "has_op", lambda name: name not in ("attn_probs", "attn_dscores") and real(name))
    want_p, want_pd = att._probs(s, lse, 0.2, p_drop, 11, 500, True, dtype)
    want_ds = att._dscores(dp, want_p, delta, 0.2, p_drop, 11, 500, dtype)
    assert torch.allclose(got_p, want_p, rtol=tp.rtol, atol=tp.atol)
    assert torch.allclose(got_pd.float(), want_pd.float(), rtol=tpd.rtol, atol=tpd.atol)
    assert torch.equal(got_pd == 0, want_pd == 0)
    assert torch.allclose(got_ds.float(), want_ds.float(), rtol=tds.rtol, atol=tds.atol)
