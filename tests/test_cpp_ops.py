"""The compiled C++ CPU ops (backend "cpp") against their plain-torch references.

The extension is built in place (``setup.py build_ext --inplace``, about a minute) when it is not
already loadable; ``MAGE_FAST_SKIP_EXT=1`` skips this file instead.
"""
import importlib
import os
import platform
import subprocess
import sys

import pytest
import torch

from conftest import REPO

if os.environ.get("MAGE_FAST_SKIP_EXT") == "1":
    pytest.skip("MAGE_FAST_SKIP_EXT=1: compiled extension not built", allow_module_level=True)

import mage_fast  # noqa: E402
from mage_fast import _ext  # noqa: E402
from mage_fast.ops import force_backend  # noqa: E402
from mage_fast.ops.codebook import codebook_nn_op, codebook_nn_ref  # noqa: E402
from mage_fast.ops.decode_step import decode_step_op, decode_step_ref  # noqa: E402
from mage_fast.ops.token_drop import (gather_tokens_op, gather_tokens_ref, scatter_tokens_op,  # noqa: E402
                                      scatter_tokens_ref)


def _ensure_built():
    if _ext.load() is not None:
        return
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "1"))
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, f"building mage_fast._C failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    _ext._tried = False
    assert _ext.load() is not None, _ext.status
    importlib.reload(importlib.import_module("mage_fast.backends.cpp"))


_ensure_built()
ops = torch.ops.mage_fast


# ---------------------------------------------------------------- codebook nearest neighbour

def _dist64(z, cb, metric):
    """(N, K) reference distances in float64 (cosine: negative similarity)."""
    z, cb = z.double(), cb.double()
    if metric == "cosine":
        return -(torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(cb, dim=1).t())
    return (z * z).sum(1, keepdim=True) + (cb * cb).sum(1) - 2 * z @ cb.t()


def _assert_nn_close(got, want, z, cb, metric, rel=1e-5):
    """Indices equal, except on genuine near-ties: there the distance gap must be < rel relative."""
    assert got.dtype == torch.int64 and got.shape == want.shape
    assert bool(((got >= 0) & (got < cb.shape[0])).all())
    diff = (got != want).nonzero().flatten()
    if diff.numel() == 0:
        return
    d = _dist64(z, cb, metric)[diff]
    dg, dw = d.gather(1, got[diff, None]), d.gather(1, want[diff, None])
    scale = d.abs().amax(1, keepdim=True).clamp_min(1.0)
    gap = ((dg - dw).abs() / scale).max().item()
    assert gap < rel, f"{diff.numel()} rows differ, relative distance gap up to {gap:.3g}"


# the last two are big enough for two threads (the kernel stays on one below 2^26 multiply-adds per
# thread): 12 rows split the codebook across threads, 1001 rows split the rows
NN_SHAPES = [(1, 1, 1), (1, 17, 3), (3, 2053, 5), (7, 33, 5), (61, 257, 64), (97, 1031, 19), (130, 300, 300),
             (12, 11003, 1024), (1001, 1103, 128)]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,K,D", NN_SHAPES, ids=[f"N{n}-K{k}-D{d}" for n, k, d in NN_SHAPES])
def test_codebook_nn_random(N, K, D, metric):
    g = torch.Generator().manual_seed(N * 1000 + K)
    z, cb = torch.randn(N, D, generator=g), torch.randn(K, D, generator=g)
    _assert_nn_close(ops.codebook_nn(z, cb, metric), codebook_nn_ref(z, cb, metric), z, cb, metric)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_codebook_nn_low_precision_inputs(dtype):
    z, cb = torch.randn(67, 24).to(dtype), torch.randn(301, 24).to(dtype)
    for metric in ("l2", "cosine"):
        _assert_nn_close(ops.codebook_nn(z, cb, metric), codebook_nn_ref(z, cb, metric), z.float(), cb.float(), metric)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,K,D", [(5, 1031, 7), (200, 97, 13), (12, 11003, 1024)],
                         ids=["few-rows", "many-rows", "two-threads-split-codes"])
def test_codebook_nn_planted_ties_lowest_index(N, K, D, metric):
    """Integer inputs make fp32 distances exact: the result must equal the reference exactly, and a
    duplicated (cosine: doubled) code never wins over its lower-index original."""
    g = torch.Generator().manual_seed(7)
    cb = torch.randint(-3, 4, (K, D), generator=g).float()
    cb[1::3] = cb[0:-1:3][: cb[1::3].shape[0]] * (2.0 if metric == "cosine" else 1.0)
    z = torch.randint(-3, 4, (N, D), generator=g).float()
    z[: min(N, 4)] = cb[0:12:3][: min(N, 4)] * 3  # rows whose nearest code is exactly a planted pair
    got = ops.codebook_nn(z, cb, metric)
    if metric == "l2":
        assert torch.equal(got, codebook_nn_ref(z, cb, metric))
    else:
        _assert_nn_close(got, codebook_nn_ref(z, cb, metric), z, cb, metric, rel=1e-6)
    assert not bool((got[: min(N, 4)] % 3 == 1).any()), got[:4]
    assert torch.equal(got[: min(N, 4)], torch.arange(0, 12, 3)[: min(N, 4)])


# ---- the int16 screening path (exact: fp32 re-scoring of every candidate, fp32 fallback)

_C = _ext.load()
INT16 = platform.machine() in ("x86_64", "AMD64")  # the int16 path needs the AVX2 build


def _nn64(z, cb, metric):
    """float64 brute-force argmin (ties: lowest index)."""
    return _dist64(z, cb, metric).argmin(1)


def _run(z, cb, metric, mode=0):
    _C._codebook_nn_set_mode(mode)
    try:
        got = ops.codebook_nn(z, cb, metric)
    finally:
        _C._codebook_nn_set_mode(0)
    return got, dict(_C._codebook_nn_last_stats())


def _assert_path(stats, path):
    if INT16 or path == "fp32":
        assert stats["path"] == path, stats


# odd sizes (not multiples of the 6-code x 16-row tile, odd D pads a zero int16), D = 1 and D at the
# int16 budget's edge (D = 8190: Q = 512); N >= 32 takes the int16 path
INT_SHAPES = [(33, 1001, 7), (100, 517, 255), (257, 3001, 64), (45, 97, 1), (64, 200, 1023), (77, 1500, 33),
              (40, 50, 8190), (300, 2100, 256)]  # the last: two threads (>= 2^26 multiply-adds each)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,K,D", INT_SHAPES, ids=[f"N{n}-K{k}-D{d}" for n, k, d in INT_SHAPES])
def test_codebook_nn_int16_matches_float64(N, K, D, metric):
    g = torch.Generator().manual_seed(N * 7 + K * 3 + D)
    z, cb = torch.randn(N, D, generator=g), torch.randn(K, D, generator=g) * 0.5
    got, st = _run(z, cb, metric)
    _assert_path(st, "int16")
    assert st["fallback_rows"] == 0 or D <= 1, st  # random data: no row needs the fp32 path
    want = _nn64(z, cb, metric)
    _assert_nn_close(got, want, z, cb, metric, rel=1e-6)
    ref, st32 = _run(z, cb, metric, mode=1)
    _assert_path(st32, "fp32")
    _assert_nn_close(got, ref, z, cb, metric, rel=1e-6)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,K,D", [(300, 2000, 96), (256, 4100, 160)], ids=["one-thread", "two-threads"])
def test_codebook_nn_int16_ties_lowest_index(N, K, D, metric):
    """Exact duplicates (any fp32 order scores them identically) at random places: the lowest index
    wins, also when the copies fall in code blocks that different threads scan."""
    g = torch.Generator().manual_seed(3)
    cb = torch.randn(K, D, generator=g)
    src = torch.randint(0, K, (400,), generator=g)
    dst = torch.randint(0, K, (400,), generator=g)
    cb[dst] = cb[src]
    z = cb[torch.randint(0, K, (N,), generator=g)] + 0.05 * torch.randn(N, D, generator=g)
    got, st = _run(z, cb, metric)
    _assert_path(st, "int16")
    want = _nn64(z, cb, metric)
    _assert_nn_close(got, want, z, cb, metric, rel=1e-6)
    # the winner is the first of its identical copies
    first = torch.tensor([int((cb == cb[i]).all(1).nonzero()[0]) for i in got.tolist()])
    assert torch.equal(got, first)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_codebook_nn_int16_adversarial_near_duplicates(metric):
    """Many codes one tiny step apart in one coordinate (far below the int16 resolution), z on top of
    them: most of them are candidates; the answer must still be the fp32 argmin."""
    g = torch.Generator().manual_seed(5)
    K, D, N = 1200, 64, 96
    base = torch.randn(8, D, generator=g)
    cb = base[torch.arange(K) % 8].clone()
    k = torch.arange(K)
    cb[k, k % D] += (k // 8).float() * 1e-4 - 0.005
    z = base[torch.randint(0, 8, (N,), generator=g)] + 1e-3 * torch.randn(N, D, generator=g)
    got, st = _run(z, cb, metric)
    _assert_path(st, "int16")
    _assert_nn_close(got, _nn64(z, cb, metric), z, cb, metric, rel=1e-6)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_codebook_nn_int16_dynamic_range_and_zeros(metric):
    g = torch.Generator().manual_seed(11)
    K, D, N = 700, 40, 130
    cb = torch.randn(K, D, generator=g) * torch.logspace(-3, 3, K)[torch.randperm(K, generator=g), None]
    cb[::50] = 0.0                               # zero codes
    cb[5, 3] = 1e4                               # one huge coordinate in a code
    z = torch.randn(N, D, generator=g) * torch.logspace(-3, 3, N)[:, None]
    z[::17] = 0.0                                # zero rows (fp32 path)
    z[3::17, 0] = 1e6                            # one huge coordinate: the rest quantises to 0
    got, st = _run(z, cb, metric)
    _assert_path(st, "int16")
    _assert_nn_close(got, _nn64(z, cb, metric), z, cb, metric, rel=1e-6)
    ref, _ = _run(z, cb, metric, mode=1)
    _assert_nn_close(got, ref, z, cb, metric, rel=1e-6)


def test_codebook_nn_int16_lattice_falls_back_exactly():
    """Lattice data: hundreds of exact ties per row, the candidate cap sends rows to the fp32
    path; l2 on integers is exact in fp32, so the answer must equal the float64 one exactly."""
    g = torch.Generator().manual_seed(13)
    K, D, N = 3000, 3, 200
    cb = torch.randint(-1, 2, (K, D), generator=g).float()       # 27 distinct codes, ~110 copies each
    z = torch.randint(0, 2, (N, D), generator=g).float() - 0.5    # 0 and 1 tie in every coordinate
    got, st = _run(z, cb, "l2")
    _assert_path(st, "int16")
    assert torch.equal(got, _nn64(z, cb, "l2"))
    assert not INT16 or st["fallback_rows"] > 0, st


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_codebook_nn_int16_fallbacks(metric):
    g = torch.Generator().manual_seed(17)
    # D past the int16 budget (Q < 512): the whole call on the fp32 path
    z, cb = torch.randn(40, 8191, generator=g), torch.randn(50, 8191, generator=g)
    got, st = _run(z, cb, metric)
    assert st["path"] == "fp32", st
    _assert_nn_close(got, _nn64(z, cb, metric), z, cb, metric, rel=1e-6)
    # few rows: fp32 path
    z, cb = torch.randn(31, 24, generator=g), torch.randn(500, 24, generator=g)
    got, st = _run(z, cb, metric)
    assert st["path"] == "fp32", st
    _assert_nn_close(got, _nn64(z, cb, metric), z, cb, metric, rel=1e-6)
    # a code out of the int16 path's scale range or non-finite: whole call on the fp32 path, same answer
    for bad in (1e-20, float("inf"), float("nan")):
        z, cb = torch.randn(64, 24, generator=g), torch.randn(500, 24, generator=g)
        cb[7] = bad
        got, st = _run(z, cb, metric)
        assert st["path"] == "fp32", (bad, st)
        ref, _ = _run(z, cb, metric, mode=1)
        assert torch.equal(got, ref)
    # all codes identical: every code is a candidate, every row hits the cap -> fp32 path, index 0
    z, cb = torch.randn(64, 24, generator=g), torch.randn(1, 24, generator=g).repeat(3000, 1)
    got, st = _run(z, cb, metric)
    _assert_path(st, "int16")
    assert not INT16 or st["fallback_rows"] == 64, st
    assert bool((got == 0).all())
    # rows out of the scale range (tiny, zero): those rows alone on the fp32 path
    z, cb = torch.randn(64, 24, generator=g), torch.randn(500, 24, generator=g)
    z[:5] *= 1e-20
    z[5] = 0.0
    got, st = _run(z, cb, metric)
    _assert_path(st, "int16")
    assert not INT16 or st["fallback_rows"] == 6, st
    _assert_nn_close(got, _nn64(z, cb, metric), z, cb, metric, rel=1e-6)


def test_codebook_nn_rejects_bad_args():
    with pytest.raises(RuntimeError, match="metric"):
        ops.codebook_nn(torch.randn(2, 3), torch.randn(4, 3), "dot")
    with pytest.raises(RuntimeError, match="expects z"):
        ops.codebook_nn(torch.randn(2, 3), torch.randn(4, 5), "l2")


# ---------------------------------------------------------------- decode step

DS_CASES = [  # B, N, C, step, mask_len, noise_scale, known_every
    (1, 1, 1, 0, 0, 1.0, 0),
    (3, 17, 29, 2, 5, 1.3, 3),
    (2, 64, 1031, 7, 40, 4.5, 5),
    (4, 256, 16, 0, 255, 0.0, 0),
    (2, 33, 8, 2**32 // 33 + 5, 10, 2.0, 2),  # step * N past 2^32: the counter wraps as the reference
]


@pytest.mark.parametrize("B,N,C,step,mask_len,noise,every", DS_CASES,
                         ids=["1x1x1", "3x17x29", "2x64x1031", "4x256x16-noiseless", "counter-wrap"])
def test_decode_step_matches_reference(B, N, C, step, mask_len, noise, every):
    g = torch.Generator().manual_seed(B * N * C)
    logits = torch.randn(B, N + 1, C + 3, generator=g)[:, 1:, :C] * 3  # strided view, as from the model
    ids = torch.full((B, N), C, dtype=torch.long)
    if every:
        ids[:, ::every] = torch.randint(0, C, (B, (N + every - 1) // every), generator=g)
    key = torch.tensor([0, 2**32 - 1, 12345, 7][:B] + [99] * max(0, B - 4), dtype=torch.long)
    want = decode_step_ref(logits, ids, key, step, mask_len, noise, C)
    got = ops.decode_step(logits, ids, key, step, mask_len, noise, C)
    assert torch.equal(got[0], want[0]), (got[0] != want[0]).nonzero()[:5]
    assert torch.equal(got[1], want[1]), (got[1] != want[1]).nonzero()[:5]
    assert int((got[1] == C).sum()) == B * mask_len


def test_decode_step_ties_lower_position_remasked():
    """Equal logits everywhere and no noise: every confidence ties, the lowest positions are re-masked."""
    B, N, C = 2, 37, 5
    logits, ids, key = torch.zeros(B, N, C), torch.full((B, N), C), torch.tensor([3, 4])
    ids[:, 5] = 1  # a known position is never re-masked
    got = ops.decode_step(logits, ids, key, 1, 9, 0.0, C)
    want = decode_step_ref(logits, ids, key, 1, 9, 0.0, C)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    expect = torch.tensor([p for p in range(N) if p != 5][:9])
    assert torch.equal((got[1][0] == C).nonzero().flatten(), expect)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_step_low_precision_logits(dtype):
    logits = (torch.randn(2, 23, 50) * 2).to(dtype)
    ids, key = torch.full((2, 23), 50), torch.tensor([5, 6])
    want = decode_step_ref(logits, ids, key, 3, 11, 1.0, 50)
    got = ops.decode_step(logits, ids, key, 3, 11, 1.0, 50)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------- token gather / scatter

TD_SHAPES = [(1, 1, 1, 1), (2, 7, 3, 5), (3, 50, 13, 31), (4, 257, 64, 40), (16, 200, 150, 256)]  # B, L, K, D
# (the last moves over 2 MiB: two threads)


def _token_inputs(B, L, K, D, g):
    x = torch.randn(B, K, D, generator=g, requires_grad=True)
    rest = torch.stack([torch.randperm(L - 1, generator=g)[: K - 1] + 1 for _ in range(B)]) if K > 1 else \
        torch.empty(B, 0, dtype=torch.long)
    index = torch.cat([torch.zeros(B, 1, dtype=torch.long), rest.sort(1).values], 1)  # class slot first
    all_mask = torch.rand(B, L, generator=g) < 0.4
    all_mask[:, 0] = False
    pos = torch.randn(1, L, D, generator=g, requires_grad=True)
    return x, index, all_mask, pos


@pytest.mark.parametrize("B,L,K,D", TD_SHAPES, ids=[f"B{b}-L{l}-K{k}-D{d}" for b, l, k, d in TD_SHAPES])
def test_scatter_tokens_forward_backward(B, L, K, D):
    x, index, all_mask, pos = _token_inputs(B, L, K, D, torch.Generator().manual_seed(L))
    out = ops.scatter_tokens(x, index, all_mask, pos)
    ref = scatter_tokens_ref(x, index, all_mask, pos)
    assert torch.equal(out, ref)
    grad = torch.randn_like(ref)
    g_got = torch.autograd.grad(out, (x, pos), grad)
    g_ref = torch.autograd.grad(ref, (x, pos), grad)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64], ids=["fp32", "bf16", "int64"])
@pytest.mark.parametrize("B,L,K,D", TD_SHAPES, ids=[f"B{b}-L{l}-K{k}-D{d}" for b, l, k, d in TD_SHAPES])
def test_gather_tokens(B, L, K, D, dtype):
    g = torch.Generator().manual_seed(K)
    x = (torch.randn(B, L, D, generator=g) * 10).to(dtype)
    index = torch.stack([torch.randperm(L, generator=g)[:K] for _ in range(B)])
    assert torch.equal(ops.gather_tokens(x, index), gather_tokens_ref(x, index))
    if dtype == torch.float32:
        x.requires_grad_(True)
        grad = torch.randn(B, K, D, generator=g)
        (gx,) = torch.autograd.grad(ops.gather_tokens(x, index), x, grad)
        (gr,) = torch.autograd.grad(gather_tokens_ref(x, index), x, grad)
        assert torch.equal(gx, gr)


def test_token_ops_reject_out_of_range():
    with pytest.raises(RuntimeError, match="outside"):
        ops.gather_tokens(torch.randn(1, 4, 2), torch.tensor([[0, 4]]))
    with pytest.raises(RuntimeError, match="outside"):
        ops.scatter_tokens(torch.randn(1, 2, 2), torch.tensor([[0, -1]]), torch.zeros(1, 4, dtype=torch.bool),
                           torch.zeros(1, 4, 2))


# ---------------------------------------------------------------- torch.library, dispatcher, loader

def _small_args():
    g = torch.Generator().manual_seed(0)
    x, index, all_mask, pos = _token_inputs(2, 9, 4, 3, g)
    return {
        "codebook_nn": (torch.randn(5, 4), torch.randn(7, 4), "l2"),
        "decode_step": (torch.randn(2, 6, 5), torch.full((2, 6), 5), torch.tensor([1, 2]), 1, 3, 1.0, 5),
        "gather_tokens": (torch.randn(2, 9, 3, requires_grad=True), index),
        "scatter_tokens": (x, index, all_mask, pos),
    }


@pytest.mark.parametrize("name", ["codebook_nn", "decode_step", "gather_tokens", "scatter_tokens"])
def test_opcheck(name):
    torch.library.opcheck(getattr(ops, name).default, _small_args()[name])


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


def test_extension_is_current():
    assert "stale" not in _ext.status, f"{_ext.status}: rebuild with `python setup.py build_ext --inplace`"


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


# ---------------------------------------------------------------- CUDA kernels (where a GPU and a CUDA build exist)

needs_cuda_ext = pytest.mark.skipif(not (torch.cuda.is_available() and _ext.with_cuda()),
                                    reason="needs a CUDA GPU and mage_fast._C built with CUDA")


@needs_cuda_ext
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,K,D", NN_SHAPES, ids=[f"N{n}-K{k}-D{d}" for n, k, d in NN_SHAPES])
def test_codebook_nn_cuda(N, K, D, metric):
    g = torch.Generator().manual_seed(N * 1000 + K)
    z, cb = torch.randn(N, D, generator=g), torch.randn(K, D, generator=g)
    got = ops.codebook_nn(z.cuda(), cb.cuda(), metric).cpu()
    _assert_nn_close(got, codebook_nn_ref(z, cb, metric), z, cb, metric)
    if metric == "l2":  # integer inputs, planted duplicates: exact, the lower index wins
        zi, ci = z.round(), cb.round()
        ci[1::3] = ci[0:-1:3][: ci[1::3].shape[0]]
        assert torch.equal(ops.codebook_nn(zi.cuda(), ci.cuda(), metric).cpu(), codebook_nn_ref(zi, ci, metric))


@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("N,K,D", [(1, 17, 3), (97, 1031, 19), (130, 300, 300), (1001, 1103, 128)],
                         ids=["N1", "N97", "N130", "N1001"])
def test_codebook_nn_cuda_tensor_cores(N, K, D, dtype):
    g = torch.Generator().manual_seed(N + K)
    z, cb = torch.randn(N, D, generator=g).to(dtype), torch.randn(K, D, generator=g).to(dtype)
    for metric in ("l2", "cosine"):
        got = ops.codebook_nn(z.cuda(), cb.cuda(), metric).cpu()
        _assert_nn_close(got, codebook_nn_ref(z, cb, metric), z.float(), cb.float(), metric)
    zi, ci = z.float().round().to(dtype), cb.float().round().to(dtype)  # exact: planted duplicates, lowest index
    ci[1::3] = ci[0:-1:3][: ci[1::3].shape[0]]
    assert torch.equal(ops.codebook_nn(zi.cuda(), ci.cuda(), "l2").cpu(), codebook_nn_ref(zi, ci, "l2"))


@needs_cuda_ext
@pytest.mark.parametrize("B,N,C,step,mask_len,noise,every", DS_CASES,
                         ids=["1x1x1", "3x17x29", "2x64x1031", "4x256x16-noiseless", "counter-wrap"])
def test_decode_step_cuda(B, N, C, step, mask_len, noise, every):
    g = torch.Generator().manual_seed(B * N * C)
    logits = torch.randn(B, N + 1, C + 3, generator=g)[:, 1:, :C] * 3
    ids = torch.full((B, N), C, dtype=torch.long)
    if every:
        ids[:, ::every] = torch.randint(0, C, (B, (N + every - 1) // every), generator=g)
    key = torch.tensor([0, 2**32 - 1, 12345, 7][:B] + [99] * max(0, B - 4), dtype=torch.long)
    want = decode_step_ref(logits, ids, key, step, mask_len, noise, C)
    got = ops.decode_step(logits.cuda(), ids.cuda(), key.cuda(), step, mask_len, noise, C)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
    ties = ops.decode_step(torch.zeros(2, 37, 5, device="cuda"), torch.full((2, 37), 5, device="cuda"),
                           torch.tensor([3, 4], device="cuda"), 1, 9, 0.0, 5)[1].cpu()
    assert torch.equal((ties[0] == 5).nonzero().flatten(), torch.arange(9))


@needs_cuda_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_decode_step_cuda_16bit_logits(dtype):
    """16-bit logits are widened in the kernel, as the reference's .float(): the same ids."""
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(3, 65, 1024, generator=g)).to(dtype)[:, 1:]  # the model's view: strided
    ids = torch.full((3, 64), 1024, dtype=torch.long)
    ids[:, ::3] = torch.randint(0, 1024, (3, 22), generator=g)
    key = torch.tensor([5, 2**32 - 1, 77], dtype=torch.long)
    want = decode_step_ref(logits, ids, key, 2, 20, 1.5, 1024)
    got = ops.decode_step(logits.cuda(), ids.cuda(), key.cuda(), 2, 20, 1.5, 1024)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])
