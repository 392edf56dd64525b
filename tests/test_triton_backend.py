"""The Triton backend's registration: cheap import, reasons for declining, torch.compile tracing."""
import os
import subprocess
import sys

import pytest
import torch

from mage_fast.ops.dispatch import Op

pytest.importorskip("triton", reason="triton not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
OPS = ["attention", "codebook_nn", "decode_step", "gather_tokens", "layer_norm", "masked_ce", "mlm_head_loss",
       "scatter_tokens", "token_embed"]


def test_import_mage_fast_does_not_import_triton():
    code = "import sys, mage_fast; print('triton' in sys.modules, 'mage_fast.triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


@pytest.mark.parametrize("name", OPS)
def test_triton_ranks_above_the_torch_paths(name):
    order = [b.name for b in Op.registry[name].backends]
    assert order.index("triton") < order.index("torch")
    assert "sdpa" not in order or order.index("triton") < order.index("sdpa")


@pytest.mark.skipif(DEV == "cuda", reason="checks the CPU verdict (not on a CUDA device)")
def test_cpu_tensors_are_declined_with_a_reason_and_the_reference_runs():
    op = Op.registry["layer_norm"]
    x, w = torch.randn(3, 4), torch.ones(4)
    rows = dict(op.explain(x, w, w, 1e-5))
    assert "CPU" in rows["triton"] and rows["torch"] == "selected"
    assert op.select(x, w, w, 1e-5).name == "torch"


def test_interpreter_dispatch_needs_both_switches(monkeypatch):
    op = Op.registry["codebook_nn"]
    z, e = torch.randn(3, 8, device=DEV), torch.randn(5, 8, device=DEV)
    monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if DEV == "cpu" else os.environ.get("TRITON_INTERPRET", "0"))
    assert dict(op.explain(z, e, "l2"))["triton"] == "selected"
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "CPU" in dict(op.explain(z, e, "l2"))["triton"]


def test_layer_norm_under_torch_compile(monkeypatch):
    from mage_fast.backends.triton import load_kernels
    from mage_fast.ops.layer_norm import layer_norm, layer_norm_ref
    load_kernels()
    monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
    x = torch.randn(5, 24, device=DEV, requires_grad=True)
    w = torch.randn(24, device=DEV, requires_grad=True)
    b = torch.randn(24, device=DEV, requires_grad=True)
    code = []

    def recording_backend(gm, example_inputs):
        code.extend(m.code for m in gm.modules() if hasattr(m, "code"))
        return gm

    f = torch.compile(lambda x, w, b: layer_norm(x * 2, w, b).sum(), backend=recording_backend, fullgraph=True)
    got = f(x, w, b)
    assert any("layer_norm_fwd" in c for c in code), "the Triton custom op is not in the compiled graph"
    grads = torch.autograd.grad(got, (x, w, b))
    ref = layer_norm_ref(x * 2, w, b).sum()
    torch.testing.assert_close(got, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, (x, w, b))):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["flash_attn", "flash_attn_4", "xformers"])
def test_attention_libraries_say_why_they_decline(name):
    import importlib.util
    q = torch.randn(1, 2, 5, 8)
    verdict = dict(Op.registry["attention"].explain(q, q, q))[name]
    top = {"flash_attn": "flash_attn", "flash_attn_4": "flash_attn", "xformers": "xformers"}[name]
    if importlib.util.find_spec(top) is None:
        assert verdict == f"{top} is not installed"
    else:
        assert "CUDA only" in verdict


def test_a_deferring_backend_yields_to_the_next_but_beats_the_reference(monkeypatch):
    op = Op("defer_demo", lambda x: "torch")
    monkeypatch.setitem(Op.registry, "defer_demo", op)
    mid_ok = {"v": True}
    op.register("mid", lambda x: "mid", lambda x: None if mid_ok["v"] else "mid declines")
    op.register("fast", lambda x: "fast", lambda x: None, defer=lambda x: "cost model says slower")
    assert op(1) == "mid"
    assert dict(op.explain(1))["fast"] == "deferred: cost model says slower"
    assert dict(op.explain(1))["mid"] == "selected"
    mid_ok["v"] = False  # only the reference is left: the deferring backend still runs
    assert op(1) == "fast" and dict(op.explain(1))["fast"].startswith("selected")
    mid_ok["v"] = True
    monkeypatch.setenv("MAGE_FAST_BACKEND_DEFER_DEMO", "fast")  # forcing ignores deferral
    assert op(1) == "fast"


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
