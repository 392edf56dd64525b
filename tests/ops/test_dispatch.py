"""The dispatcher (mage_fast.ops.dispatch) as every op sees it: backend order, forcing, deferral, the
reasons a backend declines, ``info``'s table, tracing through the public ops, and a missing or stale
compiled extension. What one op's backends compute is in that op's file."""
import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from op_backends import DEV, needs_cpp

import mage_fast
from conftest import REPO
from mage_fast import _ext
from mage_fast.ops import force_backend
from mage_fast.ops.codebook import codebook_nn_op, codebook_nn_ref
from mage_fast.ops.decode_step import decode_step_op
from mage_fast.ops.dispatch import Backend, NoBackendError, Op
from mage_fast.ops.token_drop import gather_tokens_op, scatter_tokens_op

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
TRITON_OPS = ["attention", "codebook_nn", "decode_step", "gather_tokens", "layer_norm", "masked_ce", "mlm_head_loss",
              "scatter_tokens", "token_embed"]


# ---------------------------------------------------------------- the Op class

def test_explain_force_and_errors():
    calls = []
    op = Op("_test_op", lambda x: ("torch", x))
    op.register("fast", lambda x: calls.append(x) or ("fast", x), lambda x: None if x > 0 else "x must be positive")
    assert op(1) == ("fast", 1) and op(-1) == ("torch", -1)
    assert op.explain(-1) == [("fast", "x must be positive"), ("torch", "selected")]
    with force_backend("torch"):
        assert op(1) == ("torch", 1)
    with force_backend("fast"), pytest.raises(NoBackendError, match="fast: x must be positive"):
        op(-1)
    with force_backend("nope"), pytest.raises(NoBackendError, match="not registered"):
        op(1)
    del Op.registry["_test_op"]


def test_a_deferring_backend_yields_to_the_next_but_beats_the_reference(monkeypatch):
    monkeypatch.setattr(Op, "registry", dict(Op.registry))  # the demo op registers in a copy, dropped after
    op = Op("defer_demo", lambda x: "torch")
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


# ---------------------------------------------------------------- ops that modules call: force_backend, reasons, info

def _group_norm_silu():
    from mage_fast.ops.group_norm import GroupNormSiLU, available, group_norm_silu_op, group_norm_silu_ref
    norm = nn.GroupNorm(4, 16, eps=1e-6)
    fused, x = GroupNormSiLU(norm), torch.randn(2, 16, 5, 5)
    w, b = norm.weight.detach(), norm.bias.detach()
    return dict(
        op=group_norm_silu_op, available=available(),
        record=lambda x, groups, weight, bias, eps: groups,  # what the spy backend notes of a call
        plain=lambda: fused(x), forced=lambda: fused(x), recorded=[4],
        reference=lambda: group_norm_silu_ref(x, 4, norm.weight, norm.bias, 1e-6),
        args=(x, 4, norm.weight, norm.bias, 1e-6),
        declines=[((x.double(), 4, w.double(), b.double(), 1e-6), "float32"), ((x[0], 4, w, b, 1e-6), "4-D"),
                  ((x.clone().requires_grad_(True), 4, w, b, 1e-6), "gradients")])


def _winograd_conv3x3():
    from mage_fast.ops.winograd import WinogradConv2d, available, conv3x3_op, conv3x3_ref
    m, x = WinogradConv2d(nn.Conv2d(8, 6, 3, padding=1)), torch.randn(2, 8, 10, 10)
    return dict(
        op=conv3x3_op, available=available(),
        record=lambda x, weight, bias, upsample, packed=None: upsample,
        plain=lambda: m(x), forced=lambda: m(x, upsample=True), recorded=[True],
        reference=lambda: conv3x3_ref(x, m.weight, m.bias, False),
        args=(x, m.weight, m.bias, False),
        declines=[((x.double(), m.weight.double(), None, False), "float32")])


@pytest.mark.parametrize("case", [_group_norm_silu, _winograd_conv3x3], ids=["group_norm_silu", "winograd_conv3x3"])
def test_module_op_goes_through_the_dispatcher(case, monkeypatch):
    """The module calls its Op: force_backend reaches it (a spy backend runs only when forced; forcing
    ``torch`` gives the reference bit for bit), the cpp backend names why it declines a call, and
    ``info`` lists the op."""
    from mage_fast.info import backend_table
    c = case()
    op = c["op"]
    assert Op.registry[op.name] is op
    monkeypatch.setattr(op, "backends", list(op.backends))
    reference = op.backends[-1].fn
    calls = []

    def spy(*args, **kwargs):
        calls.append(c["record"](*args, **kwargs))
        return reference(*args, **kwargs)
    op.backends.append(Backend("spy", spy, lambda *a, **k: None))  # after the reference: runs only when forced
    with torch.no_grad():
        c["plain"]()
        assert calls == []
        with force_backend("spy"):
            c["forced"]()
        assert calls == c["recorded"]
        with force_backend("torch"):
            assert torch.equal(c["plain"](), c["reference"]())
            assert dict(op.explain(*c["args"]))["torch"] == "selected"
    for args, words in c["declines"]:
        assert words in dict(op.explain(*args))["cpp"]
    rows = {name: chosen for name, chosen, _ in backend_table(torch.device("cpu"))}
    assert rows[op.name] == ("cpp" if c["available"] else "torch")


# ---------------------------------------------------------------- the cpp backend

def _small_args():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, generator=g, requires_grad=True)
    rest = torch.stack([torch.randperm(8, generator=g)[:3] + 1 for _ in range(2)])
    index = torch.cat([torch.zeros(2, 1, dtype=torch.long), rest.sort(1).values], 1)
    all_mask = torch.rand(2, 9, generator=g) < 0.4
    all_mask[:, 0] = False
    pos = torch.randn(1, 9, 3, generator=g, requires_grad=True)
    return {
        "codebook_nn": (torch.randn(5, 4), torch.randn(7, 4), "l2"),
        "decode_step": (torch.randn(2, 6, 5), torch.full((2, 6), 5), torch.tensor([1, 2]), 1, 3, 1.0, 5),
        "gather_tokens": (torch.randn(2, 9, 3, requires_grad=True), index),
        "scatter_tokens": (x, index, all_mask, pos),
    }


@needs_cpp
def test_torch_compile_fullgraph():
    """The public ops, through the dispatcher, trace into one graph with the fake implementations."""
    from mage_fast.ops import codebook_nn, decode_step, gather_tokens, scatter_tokens
    args = _small_args()

    def f(z, cb, logits, ids, key, x, index, all_mask, pos):
        idx = codebook_nn(z, cb, "cosine")
        sampled, next_ids = decode_step(logits, ids, key, 1, 3, 1.0, 5)
        return idx, sampled, next_ids, scatter_tokens(gather_tokens(x, index), index, all_mask, pos)

    x, index, all_mask, pos = args["scatter_tokens"]
    a = (*args["codebook_nn"][:2], *args["decode_step"][:3], torch.randn(2, 9, 3), index, all_mask, pos.detach())
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*a)
    want = f(*a)
    assert all(torch.equal(g, w) for g, w in zip(got, want))


@needs_cpp
def test_extension_is_current():
    assert "stale" not in _ext.status, f"{_ext.status}: rebuild with `python setup.py build_ext --inplace`"


@needs_cpp
def test_dispatcher_selects_cpp_on_cpu_and_explains_declines():
    args = _small_args()
    for op in (codebook_nn_op, decode_step_op, gather_tokens_op, scatter_tokens_op):
        chosen = [b for b, verdict in op.explain(*args[op.name]) if verdict == "selected"]
        assert chosen == ["cpp"], op.explain(*args[op.name])
    meta = torch.randn(5, 4, device="meta"), torch.randn(7, 4, device="meta"), "l2"
    verdict = dict(codebook_nn_op.explain(*meta))["cpp"]
    assert "meta" in verdict
    verdict = dict(codebook_nn_op.explain(torch.randn(5, 4).double(), torch.randn(7, 4).double(), "l2"))["cpp"]
    assert "dtype" in verdict
    x, index, all_mask, pos = args["scatter_tokens"]
    verdict = dict(scatter_tokens_op.explain(x.bfloat16(), index, all_mask, pos))["cpp"]
    assert "float32" in verdict
    with force_backend("cpp"):
        assert torch.equal(mage_fast.ops.codebook_nn(*args["codebook_nn"]), codebook_nn_ref(*args["codebook_nn"]))


@needs_cpp
def test_missing_extension_warns_once_and_falls_back():
    code = """
import sys, warnings
sys.modules['mage_fast._C'] = None  # as if never built
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    import torch, mage_fast
    from mage_fast import _ext
    from mage_fast.ops.codebook import codebook_nn_op
    _ext.load(); _ext.load()
z, cb = torch.randn(3, 4), torch.randn(5, 4)
verdicts = dict(codebook_nn_op.explain(z, cb, 'l2'))
assert verdicts['torch'] == 'selected', verdicts
assert 'extension unavailable' in verdicts['cpp'], verdicts
assert mage_fast.ops.codebook_nn(z, cb).shape == (3,)
msgs = [str(x.message) for x in w if 'compiled ops unavailable' in str(x.message)]
assert len(msgs) == 1, msgs
print('ok')
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


# ---------------------------------------------------------------- the Triton backend's registration

def test_import_mage_fast_does_not_import_triton():
    code = "import sys, mage_fast; print('triton' in sys.modules, 'mage_fast.triton' in sys.modules)"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["False", "False"], out.stdout + out.stderr


@pytest.mark.parametrize("name", TRITON_OPS)
def test_triton_ranks_above_the_torch_paths(name):
    order = [b.name for b in Op.registry[name].backends]
    assert order.index("triton") < order.index("torch")
    assert "sdpa" not in order or order.index("triton") < order.index("sdpa")


@needs_triton
@pytest.mark.skipif(DEV == "cuda", reason="checks the CPU verdict (not on a CUDA device)")
def test_cpu_tensors_are_declined_by_triton_with_a_reason_and_the_reference_runs():
    op = Op.registry["layer_norm"]
    x, w = torch.randn(3, 4), torch.ones(4)
    rows = dict(op.explain(x, w, w, 1e-5))
    assert "CPU" in rows["triton"] and rows["torch"] == "selected"
    assert op.select(x, w, w, 1e-5).name == "torch"


@needs_triton
def test_triton_interpreter_dispatch_needs_both_switches(monkeypatch):
    op = Op.registry["codebook_nn"]
    z, e = torch.randn(3, 8, device=DEV), torch.randn(5, 8, device=DEV)
    monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1" if DEV == "cpu" else os.environ.get("TRITON_INTERPRET", "0"))
    assert dict(op.explain(z, e, "l2"))["triton"] == "selected"
    if DEV == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert "CPU" in dict(op.explain(z, e, "l2"))["triton"]


# ---------------------------------------------------------------- the tolerance table against the registry

def test_tolerance_table_covers_every_op_and_names_only_registered_backends():
    """Each registered op has its bounds in tests/ops/tolerances.py, and each row names an op and a
    backend that exist (a misspelt row would leave its check with no backend to run)."""
    for module in ("mage_fast.models.vqgan", "mage_fast.ops.dropout", "mage_fast.ops.linear"):
        importlib.import_module(module)  # each registers its op
    from op_backends import backend_name
    from tolerances import TOLERANCES
    ops = {name for name in Op.registry if not name.startswith("_")}
    assert ops <= {key[0] for key in TOLERANCES}, sorted(ops - {key[0] for key in TOLERANCES})
    for key in TOLERANCES:
        assert key[0] in Op.registry, f"{key}: no op {key[0]!r}"
        names = [b.name for b in Op.registry[key[0]].backends]
        assert backend_name(key[1]) in names, f"{key}: {key[0]} has no backend {key[1]!r} ({names})"
