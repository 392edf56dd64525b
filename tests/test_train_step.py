"""The fast training step: the CPU training attention, the tokenizer's fp32 fast copy in the step,
the fused AdamW, and the throughput benchmark's check that the fast step computes the official one."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import mage_fast
from mage_fast.ops.attention import attention_cpu_train, attention_official, attention_op
from mage_fast.training import adamw, param_groups
from mage_fast.training.engine import keep_frozen_fp32
from mage_fast.training.objective import MAGEObjective

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
att = sys.modules["mage_fast.ops.attention"]  # the module (mage_fast.ops.attention is also a function's name)


def _grads(fn, q, k, v, g):
    x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = fn(*x)
    o.backward(g.to(o.dtype))
    return [o.detach()] + [t.grad for t in x]


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("shape", [(2, 3, 37, 16), (1, 2, 129, 32), (3, 1, 5, 8)])
def test_cpu_train_attention_fp32_is_the_exact_gradient(shape):
    torch.manual_seed(0)
    q, k, v, g = (torch.randn(shape) * 1.5 for _ in range(4))
    ref = _grads(attention_official, *(t.double() for t in (q, k, v)), g.double())
    got = _grads(attention_cpu_train, q, k, v, g)
    for a, b in zip(got, ref):
        assert _rel(a, b) < 2e-6


def test_cpu_train_attention_bf16_within_its_stated_tolerance():
    """bf16 inputs: the output is sdpa's; the gradients within 3e-2 of the float64 ones (largest
    element error over the largest element), the order of bf16 rounding of the products."""
    torch.manual_seed(1)
    q, k, v, g = (torch.randn(2, 4, 65, 32) for _ in range(4))
    ref = _grads(attention_official, *(t.double() for t in (q, k, v)), g.double())
    got = _grads(attention_cpu_train, *(t.bfloat16() for t in (q, k, v)), g.bfloat16())
    sdpa = _grads(att.attention_sdpa, *(t.bfloat16() for t in (q, k, v)), g.bfloat16())
    assert torch.equal(got[0], sdpa[0])
    for a, b in zip(got[1:], ref[1:]):
        assert a.dtype == torch.bfloat16 and _rel(a, b) < 3e-2


def test_cpu_train_attention_chunks_give_the_same_gradients(monkeypatch):
    torch.manual_seed(2)
    q, k, v, g = (torch.randn(3, 2, 20, 8) for _ in range(4))
    whole = _grads(attention_cpu_train, q, k, v, g)
    monkeypatch.setattr(att, "_CHUNK_ELEMENTS", 20 * 20 * 2)  # two (batch, head) pairs per chunk: 3 chunks
    chunked = _grads(attention_cpu_train, q, k, v, g)
    for a, b in zip(chunked, whole):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)


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


def _tiny(**kw):
    torch.manual_seed(0)
    m = mage_fast.MAGE(embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
                       decoder_num_heads=2, img_size=32, vqgan_config=dict(ch=32, ch_mult=[1, 2], num_res_blocks=1,
                                                                           z_channels=32, embed_dim=32, n_embed=64),
                       vqgan_ckpt_path=None, **kw)
    for p in m.vqgan.parameters():
        p.requires_grad_(False)
    return m


def test_objective_tokens_equal_the_tokenizer_and_survive_a_bf16_cast():
    """The step's ids come from the fp32 fast copy: the same as model.tokenize; after a bf16 engine
    cast, from the kept fp32 weights (a bf16 tokenizer would pick other codes)."""
    m = _tiny()
    obj = MAGEObjective(m)
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    want = m.tokenize(x)
    assert torch.equal(obj.tokens(x), want)
    ids = torch.randint(0, 64, (2, 256))
    assert torch.equal(obj.tokens(ids.int()), ids)
    keep_frozen_fp32(obj)
    obj.bfloat16()
    assert next(m.vqgan.parameters()).dtype == torch.bfloat16
    assert torch.equal(obj.tokens(x), want)
    with pytest.raises(ValueError):
        obj.tokens(torch.rand(2, 3, 16, 16))


def test_objective_tokens_refuse_a_cast_tokenizer_without_kept_weights():
    obj = MAGEObjective(_tiny())
    obj.bfloat16()
    with pytest.raises(RuntimeError, match="keep_frozen_fp32"):
        obj.tokens(torch.rand(1, 3, 32, 32))


def test_adamw_is_fused_and_updates_as_the_default_one():
    torch.manual_seed(0)
    a = torch.nn.Linear(16, 8)
    b = torch.nn.Linear(16, 8)
    b.load_state_dict(a.state_dict())
    opt_a = adamw(param_groups(a, 0.05), 1e-2)
    assert opt_a.defaults["fused"] is True
    opt_b = torch.optim.AdamW([g for g in param_groups(b, 0.05) if g["params"]], lr=1e-2, betas=(0.9, 0.95))
    for _ in range(3):
        x = torch.randn(4, 16)
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def _bench():
    spec = importlib.util.spec_from_file_location("train_throughput", os.path.join(REPO, "benchmarks",
                                                                                   "train_throughput.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_fast_step_is_the_official_step():
    """The benchmark's own check on a tiny model: the fast paths' loss equals the official forward's
    (full logits, forward_loss, torch references) and every gradient is within 1e-5 relative."""
    bench = _bench()
    args = bench.parse_args(["--model", "tiny", "--img_size", "32", "--ch_mult", "1,2", "--batch_size", "3"])
    model, dev = bench.build(args)
    imgs, ids = bench.inputs(model, dev, 3)
    check = bench.check_same(model, dev, imgs, ids)
    assert set(check) == {"fast", "fast-ids"}
    for c in check.values():
        assert c["same_params_with_grad"]
        assert c["loss_rel_diff"] < 1e-6 and c["grad_max_rel_diff"] < 1e-5
    p = bench.Path("fast-bf16-ids", model, dev)
    t = p.step(imgs, ids)
    assert set(t) == set(bench.SECTIONS) | {"total"} and t["tokenizer"] < t["total"]


@pytest.mark.parametrize("argv, word", [(["--batch_size", "0"], "--batch_size"), (["--rounds", "-1"], "--rounds"),
                                        (["--img_size", "40"], "multiple of 16"), (["--paths", "bogus"], "--paths")])
def test_benchmark_refuses_bad_flags_in_one_line(argv, word):
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "train_throughput.py"), *argv],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and word in p.stderr and "Traceback" not in p.stderr


# ---------------------------------------------------------------- hashed dropout
from mage_fast.ops.dropout import Dropout, dropout_hashed_ref, dropout_op, new_seed  # noqa: E402

needs_dropout_op = pytest.mark.skipif(not mage_fast._ext.has_op("dropout"),
                                      reason=f"compiled ops unavailable: {mage_fast._ext.status}")


@needs_dropout_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed, offset", [(5, 0), (2 ** 40 + 3, 123), (77, 2 ** 32 - 5000)])
def test_hashed_dropout_op_equals_its_torch_oracle(dtype, seed, offset):
    x = torch.randn(3, 1000, 7).to(dtype)
    got = torch.ops.mage_fast.dropout(x, 0.1, seed, offset)
    assert torch.equal(got, dropout_hashed_ref(x, 0.1, seed, offset))
    assert abs(float((got == 0).float().mean()) - 0.1) < 0.01  # 21 000 draws: 0.1 +- 5 sigma
    kept = got != 0
    assert torch.allclose(got[kept].float(), (x[kept].float() / 0.9).to(dtype).float())


@needs_dropout_op
def test_hashed_dropout_offsets_continue_one_stream_and_seeds_differ():
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
def test_dropout_module_backward_uses_the_forward_decisions_and_torch_seeds():
    m = Dropout(0.25).train()
    x = torch.randn(64, 33, requires_grad=True)
    torch.manual_seed(3)
    y = m(x)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad != 0, y != 0) and torch.allclose(x.grad[y != 0], torch.full_like(x.grad[y != 0], 4 / 3))
    torch.manual_seed(3)
    assert torch.equal(m(x), y)  # the seed comes from torch's generator: manual_seed / saved RNG state replay it
    assert torch.equal(m.eval()(x), x)
    assert dict(dropout_op.explain(x, 0.25))["hashed"] == "selected"
    assert "CPU" in dict(dropout_op.explain(x.to("meta"), 0.25))["hashed"]
    with mage_fast.ops.force_backend("torch"):
        torch.manual_seed(3)
        assert not torch.equal(m.train()(x), y)  # the reference is torch's own dropout
    assert m.state_dict() == {}


@needs_dropout_op
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-6), (torch.bfloat16, 3e-2)])
def test_cpu_train_attention_with_dropout_is_the_gradient_of_the_dropped_weights(dtype, tol):
    torch.manual_seed(0)
    B, H, N, d = 2, 3, 37, 16
    q, k, v, g = (torch.randn(B, H, N, d) for _ in range(4))
    x = [t.clone().to(dtype).requires_grad_() for t in (q, k, v)]
    torch.manual_seed(7)
    o = attention_cpu_train(*x, dropout_p=0.2)
    o.backward(g.to(dtype))
    torch.manual_seed(7)
    seed = new_seed()
    r = [t.to(dtype).double().requires_grad_() for t in (q, k, v)]
    p = torch.softmax(r[0] @ r[1].transpose(-1, -2) * d ** -0.5, -1)
    keep = dropout_hashed_ref(torch.ones(B * H, N, N, dtype=torch.float64), 0.2, seed).view(B, H, N, N)
    ro = (p * keep) @ r[2]
    ro.backward(g.to(dtype).double())
    assert _rel(o.detach(), ro.detach()) < tol
    for a, b in zip(x, r):
        assert _rel(a.grad, b.grad) < tol


@needs_dropout_op
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p_drop", [0.0, 0.3])
def test_attention_elementwise_ops_equal_their_torch_form(monkeypatch, dtype, p_drop):
    """attn_probs / attn_dscores (compiled, one pass each) against the torch passes they replace,
    on rows that start mid-stream (offset) and scores down to where exp underflows."""
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
    assert torch.allclose(got_p, want_p, rtol=2e-6, atol=1e-30)
    tol = dict(rtol=8e-3, atol=1e-30) if dtype == torch.bfloat16 else dict(rtol=2e-6, atol=1e-30)
    assert torch.allclose(got_pd.float(), want_pd.float(), **tol) and torch.equal(got_pd == 0, want_pd == 0)
    assert torch.allclose(got_ds.float(), want_ds.float(), **(tol if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)))
