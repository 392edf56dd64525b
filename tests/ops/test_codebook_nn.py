"""codebook_nn (mage_fast.ops.codebook): every backend against the reference, the reference against
torch.cdist, and each backend's own paths (the C++ int16 screening, Triton's codebook splits).

Where two codes are near ties in fp32 the backends may pick either; the checks bound how near
(tolerances.py, "near-tie" and "distance")."""
import platform

import pytest
import torch
from op_backends import DEV, CPP, backend_fn, check_strided, device, needs_cpp, run, triton_kernels
from tolerances import CODEBOOK_MIN_AGREEMENT, F32, F64, assert_matches, backends, tol

from mage_fast.ops import codebook_nn, codebook_nn_ref
from mage_fast.ops.codebook import codebook_nn_op

OP = "codebook_nn"


# ---------------------------------------------------------------- the reference

@pytest.mark.parametrize("N,K,D", [(1, 1, 1), (37, 1031, 8), (128, 64, 256)], ids=str)
def test_reference_l2_matches_cdist(N, K, D):
    torch.manual_seed(N + K)
    z, e = torch.randn(N, D, dtype=torch.float64), torch.randn(K, D, dtype=torch.float64)
    assert_matches(codebook_nn(z, e), torch.cdist(z, e).argmin(1), tol(OP, "torch", F64, "cdist"))


def test_ties_lowest_index_and_cosine():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [5.0, 0.0]])
    z = torch.tensor([[2.0, 0.0], [0.5, 0.5], [4.0, 0.0], [3.0, 0.0]])
    assert codebook_nn(z, e).tolist() == [0, 0, 3, 0]  # [0.5,0.5]: codes 0,1,2 tie; [3,0]: 0,2,3 tie
    assert codebook_nn(z, e, "cosine").tolist() == [0, 0, 0, 0]  # codes 0, 2 and 3 tie in angle
    with pytest.raises(ValueError, match="same D"):
        codebook_nn(z, torch.randn(3, 3))
    with pytest.raises(ValueError, match="metric"):
        codebook_nn(z, e, "l1")
    assert codebook_nn_ref(z.half(), e.half()).tolist() == [0, 0, 3, 0]


# ---------------------------------------------------------------- near ties, float64 distances

def _dist64(z, cb, metric):
    """(N, K) reference distances in float64 (cosine: negative similarity)."""
    z, cb = z.double(), cb.double()
    if metric == "cosine":
        return -(torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(cb, dim=1).t())
    return (z * z).sum(1, keepdim=True) + (cb * cb).sum(1) - 2 * z @ cb.t()


def _assert_nn_close(got, want, z, cb, metric, rel):
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


def _nn64(z, cb, metric):
    """float64 brute-force argmin (ties: lowest index)."""
    return _dist64(z, cb, metric).argmin(1)


# the last two are big enough for two threads of the C++ kernel (it stays on one below 2^26
# multiply-adds per thread): 12 rows split the codebook across threads, 1001 rows split the rows
NN_SHAPES = [(1, 1, 1), (1, 17, 3), (3, 2053, 5), (7, 33, 5), (61, 257, 64), (97, 1031, 19), (130, 300, 300),
             (12, 11003, 1024), (1001, 1103, 128)]


@pytest.mark.parametrize("target", backends(OP, "near-tie", F32))
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,K,D", NN_SHAPES, ids=[f"N{n}-K{k}-D{d}" for n, k, d in NN_SHAPES])
def test_random(N, K, D, metric, target):
    """Random codes: the reference's index up to near ties; with integer inputs and planted duplicates
    (l2: exact in fp32) the reference's index exactly, the lower of two copies winning."""
    rel = tol(OP, target, F32, "near-tie").rtol
    g = torch.Generator().manual_seed(N * 1000 + K)
    z, cb = torch.randn(N, D, generator=g), torch.randn(K, D, generator=g)
    dev = device(target)
    got = run(codebook_nn_op, target, z.to(dev), cb.to(dev), metric).cpu()
    _assert_nn_close(got, codebook_nn_ref(z, cb, metric), z, cb, metric, rel)
    if metric == "l2":
        zi, ci = z.round(), cb.round()
        ci[1::3] = ci[0:-1:3][: ci[1::3].shape[0]]
        assert torch.equal(run(codebook_nn_op, target, zi.to(dev), ci.to(dev), metric).cpu(),
                           codebook_nn_ref(zi, ci, metric))


LOWP_SHAPES = [(67, 301, 24), (1, 17, 3), (97, 1031, 19), (130, 300, 300), (1001, 1103, 128)]


@pytest.mark.parametrize("target", backends(OP, "near-tie", torch.float16))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("N,K,D", LOWP_SHAPES, ids=[f"N{n}" if n != 67 else "N67-D24" for n, _, _ in LOWP_SHAPES])
def test_low_precision_inputs(N, K, D, dtype, target):
    """fp16 / bf16 inputs (CUDA: the tensor-core kernels): near ties only; integer inputs with
    planted duplicates exactly."""
    rel = tol(OP, target, dtype, "near-tie").rtol
    g = torch.Generator().manual_seed(N + K)
    z, cb = torch.randn(N, D, generator=g).to(dtype), torch.randn(K, D, generator=g).to(dtype)
    dev = device(target)
    for metric in ("l2", "cosine"):
        got = run(codebook_nn_op, target, z.to(dev), cb.to(dev), metric).cpu()
        _assert_nn_close(got, codebook_nn_ref(z, cb, metric), z.float(), cb.float(), metric, rel)
    zi, ci = z.float().round().to(dtype), cb.float().round().to(dtype)  # exact: planted duplicates, lowest index
    ci[1::3] = ci[0:-1:3][: ci[1::3].shape[0]]
    assert torch.equal(run(codebook_nn_op, target, zi.to(dev), ci.to(dev), "l2").cpu(), codebook_nn_ref(zi, ci, "l2"))


@pytest.mark.parametrize("target", backends(OP, "planted", F32))
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,K,D", [(5, 1031, 7), (200, 97, 13), (12, 11003, 1024)],
                         ids=["few-rows", "many-rows", "two-threads-split-codes"])
def test_planted_ties_lowest_index(N, K, D, metric, target):
    """Integer inputs make fp32 distances exact: the result must equal the reference exactly, and a
    duplicated (cosine: doubled) code never wins over its lower-index original."""
    g = torch.Generator().manual_seed(7)
    cb = torch.randint(-3, 4, (K, D), generator=g).float()
    cb[1::3] = cb[0:-1:3][: cb[1::3].shape[0]] * (2.0 if metric == "cosine" else 1.0)
    z = torch.randint(-3, 4, (N, D), generator=g).float()
    z[: min(N, 4)] = cb[0:12:3][: min(N, 4)] * 3  # rows whose nearest code is exactly a planted pair
    dev = device(target)
    got = run(codebook_nn_op, target, z.to(dev), cb.to(dev), metric).cpu()
    if metric == "l2":
        assert torch.equal(got, codebook_nn_ref(z, cb, metric))
    else:
        _assert_nn_close(got, codebook_nn_ref(z, cb, metric), z, cb, metric, rel=tol(OP, target, F32, "planted").rtol)
    assert not bool((got[: min(N, 4)] % 3 == 1).any()), got[:4]
    assert torch.equal(got[: min(N, 4)], torch.arange(0, 12, 3)[: min(N, 4)])


# ---------------------------------------------------------------- within a distance tolerance

def _scores(z, e, metric):
    z, e = z.double(), e.double()
    if metric == "cosine":
        return -torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(e, dim=1).t()
    return torch.cdist(z, e) ** 2


SHAPES = [  # (N, K, D)
    pytest.param((1, 1, 8), id="n1-k1-d8"),
    pytest.param((37, 1031, 8), id="n37-k1031-d8"),
    pytest.param((101, 300, 32), id="n101-k300-d32"),
    pytest.param((67, 517, 256), id="n67-k517-d256"),
    pytest.param((13, 64, 3), id="n13-k64-d3"),
]


@pytest.mark.parametrize("target", backends(OP, "distance", F32))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape", SHAPES)
def test_chosen_code_within_distance_tolerance(shape, metric, dtype, target):
    """The chosen code's float64 score is within the table's atol * (1 + the row's largest score) of
    the reference's choice, and most rows choose the reference's code."""
    atol = tol(OP, target, dtype, "distance").atol
    N, K, D = shape
    g = torch.Generator().manual_seed(N * 7 + K)
    z = torch.randn(N, D, generator=g).to(device(target), dtype)
    e = torch.randn(K, D, generator=g).to(device(target), dtype)
    got = run(codebook_nn_op, target, z, e, metric)
    ref = codebook_nn_ref(z, e, metric)
    assert got.dtype == torch.int64 and got.shape == (N,)
    assert bool(((got >= 0) & (got < K)).all())
    s = _scores(z, e, metric)
    got_s, ref_s = s.gather(1, got[:, None]), s.gather(1, ref[:, None])
    scale = 1 + s.abs().amax(1, keepdim=True)
    assert torch.all((got_s - ref_s).abs() <= atol * scale), "a chosen code is farther than the best"
    assert (got == ref).float().mean() > CODEBOOK_MIN_AGREEMENT


@pytest.mark.parametrize("target", backends(OP, "ties", F32))
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ties_go_to_lowest_index(metric, target):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 16, generator=g)
    e = torch.cat([base, base, base[:5]])  # every code appears two or three times, copies in later tiles
    e = e[torch.randperm(e.shape[0], generator=g)]
    z = base[[3, 7, 0, 39]] + 0.01 * torch.randn(4, 16, generator=g)
    dev = device(target)
    got = run(codebook_nn_op, target, z.to(dev), e.to(dev), metric).cpu()
    t = tol(OP, target, F32, "ties")
    assert_matches(got, torch.argmin(_scores(z, e, metric), dim=1), t)
    assert_matches(got, codebook_nn_ref(z, e, metric), t)


@pytest.mark.parametrize("target", backends(OP, "strided rows", F32))
def test_strided_rows_and_large_block_count(target):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(300, 24, generator=g)[::2, :20]  # row stride 48, non-contiguous
    e = torch.randn(2053, 20, generator=g)
    dev = device(target)
    assert_matches(run(codebook_nn_op, target, z.to(dev), e.to(dev)).cpu(), codebook_nn_ref(z, e),
                   tol(OP, target, F32, "strided rows"))


@pytest.mark.parametrize("target", backends(OP, "strided", F32))
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_noncontiguous_inputs(metric, target):
    g = torch.Generator().manual_seed(1)
    z, cb = torch.randn(37, 24, generator=g).to(device(target)), torch.randn(70, 24, generator=g).to(device(target))
    fn = backend_fn(codebook_nn_op, target, z, cb, metric)
    check_strided(lambda a, b: fn(a, b, metric), [z, cb], [0, 1], tol(OP, target, F32, "strided"))


# ---------------------------------------------------------------- the C++ int16 screening path
# (exact: fp32 re-scoring of every candidate, fp32 fallback)

INT16 = platform.machine() in ("x86_64", "AMD64")  # the int16 path needs the AVX2 build


def _run(z, cb, metric, mode=0):
    CPP._codebook_nn_set_mode(mode)
    try:
        got = torch.ops.mage_fast.codebook_nn(z, cb, metric)
    finally:
        CPP._codebook_nn_set_mode(0)
    return got, dict(CPP._codebook_nn_last_stats())


def _assert_path(stats, path):
    if INT16 or path == "fp32":
        assert stats["path"] == path, stats


# odd sizes (not multiples of the 6-code x 16-row tile, odd D pads a zero int16), D = 1 and D at the
# int16 budget's edge (D = 8190: Q = 512); N >= 32 takes the int16 path
INT_SHAPES = [(33, 1001, 7), (100, 517, 255), (257, 3001, 64), (45, 97, 1), (64, 200, 1023), (77, 1500, 33),
              (40, 50, 8190), (300, 2100, 256)]  # the last: two threads (>= 2^26 multiply-adds each)
INT16_REL = tol(OP, "cpp", F32, "int16").rtol


@needs_cpp
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,K,D", INT_SHAPES, ids=[f"N{n}-K{k}-D{d}" for n, k, d in INT_SHAPES])
def test_cpp_int16_matches_float64(N, K, D, metric):
    g = torch.Generator().manual_seed(N * 7 + K * 3 + D)
    z, cb = torch.randn(N, D, generator=g), torch.randn(K, D, generator=g) * 0.5
    got, st = _run(z, cb, metric)
    _assert_path(st, "int16")
    assert st["fallback_rows"] == 0 or D <= 1, st  # random data: no row needs the fp32 path
    want = _nn64(z, cb, metric)
    _assert_nn_close(got, want, z, cb, metric, rel=INT16_REL)
    ref, st32 = _run(z, cb, metric, mode=1)
    _assert_path(st32, "fp32")
    _assert_nn_close(got, ref, z, cb, metric, rel=INT16_REL)


@needs_cpp
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("N,K,D", [(300, 2000, 96), (256, 4100, 160)], ids=["one-thread", "two-threads"])
def test_cpp_int16_ties_lowest_index(N, K, D, metric):
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
    _assert_nn_close(got, want, z, cb, metric, rel=INT16_REL)
    # the winner is the first of its identical copies
    first = torch.tensor([int((cb == cb[i]).all(1).nonzero()[0]) for i in got.tolist()])
    assert torch.equal(got, first)


@needs_cpp
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cpp_int16_adversarial_near_duplicates(metric):
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
    _assert_nn_close(got, _nn64(z, cb, metric), z, cb, metric, rel=INT16_REL)


@needs_cpp
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cpp_int16_dynamic_range_and_zeros(metric):
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
    _assert_nn_close(got, _nn64(z, cb, metric), z, cb, metric, rel=INT16_REL)
    ref, _ = _run(z, cb, metric, mode=1)
    _assert_nn_close(got, ref, z, cb, metric, rel=INT16_REL)


@needs_cpp
def test_cpp_int16_lattice_falls_back_exactly():
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


@needs_cpp
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_cpp_int16_fallbacks(metric):
    g = torch.Generator().manual_seed(17)
    # D past the int16 budget (Q < 512): the whole call on the fp32 path
    z, cb = torch.randn(40, 8191, generator=g), torch.randn(50, 8191, generator=g)
    got, st = _run(z, cb, metric)
    assert st["path"] == "fp32", st
    _assert_nn_close(got, _nn64(z, cb, metric), z, cb, metric, rel=INT16_REL)
    # few rows: fp32 path
    z, cb = torch.randn(31, 24, generator=g), torch.randn(500, 24, generator=g)
    got, st = _run(z, cb, metric)
    assert st["path"] == "fp32", st
    _assert_nn_close(got, _nn64(z, cb, metric), z, cb, metric, rel=INT16_REL)
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
    _assert_nn_close(got, _nn64(z, cb, metric), z, cb, metric, rel=INT16_REL)


@needs_cpp
def test_cpp_rejects_bad_args():
    with pytest.raises(RuntimeError, match="metric"):
        torch.ops.mage_fast.codebook_nn(torch.randn(2, 3), torch.randn(4, 3), "dot")
    with pytest.raises(RuntimeError, match="expects z"):
        torch.ops.mage_fast.codebook_nn(torch.randn(2, 3), torch.randn(4, 5), "l2")


@needs_cpp
def test_cpp_opcheck():
    torch.library.opcheck(torch.ops.mage_fast.codebook_nn.default, (torch.randn(5, 4), torch.randn(7, 4), "l2"))


# ---------------------------------------------------------------- Triton: dispatch, tracing, splits

def test_triton_dispatch(monkeypatch):
    z, e = torch.randn(5, 8), torch.randn(9, 8)
    verdict = dict(codebook_nn_op.explain(z, e, "l2"))
    if DEV == "cpu":
        assert "CPU" in verdict["triton"]
        monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
        assert dict(codebook_nn_op.explain(z, e, "l2"))["triton"] == "selected"
    assert "dtype torch.int32" in dict(codebook_nn_op.explain(z, e.int(), "l2"))["triton"] or DEV == "cpu"
    assert "metric" in dict(codebook_nn_op.explain(z.to(DEV), e.to(DEV), "dot"))["triton"]


def test_triton_custom_op_traces():
    triton_codebook = triton_kernels("codebook")
    z, e = torch.randn(6, 8, device=DEV), torch.randn(11, 8, device=DEV)
    torch.library.opcheck(triton_codebook.codebook_nn_custom, (z, e, "l2"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_triton_ties_across_codebook_splits_go_to_lowest_index(metric):
    triton_codebook = triton_kernels("codebook")
    g = torch.Generator().manual_seed(2)
    base = torch.randn(40, 16, generator=g)
    e = torch.cat([base, 3 * torch.randn(1500, 16, generator=g), base])  # copies 1540 codes apart
    z = base[[3, 7, 0, 39]] + 0.01 * torch.randn(4, 16, generator=g)
    sms = 1 if DEV == "cpu" else torch.cuda.get_device_properties(0).multi_processor_count
    assert triton_codebook.splits(z.shape[0], e.shape[0], sms) > 1, "the codebook is not split: nothing tested"
    got = triton_codebook.codebook_nn(z.to(DEV), e.to(DEV), metric).cpu()
    assert torch.equal(got, torch.tensor([3, 7, 0, 39]))

