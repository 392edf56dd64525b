"""decode_step (mage_fast.ops.decode_step): what a step does (exactly k re-masked, known tokens kept,
confidence order, Gumbel-max sampling) on every backend; every backend against the reference (all
draw from the same counter-based hash, so the sampled and re-masked ids match bit for bit); the hash
against its pure-Python definition."""
import math

import pytest
import torch
from op_backends import DEV, backend_fn, check_strided, device, needs_cpp, run, triton_kernels
from tolerances import F32, assert_matches, backends, tol

from mage_fast.ops import image_keys
from mage_fast.ops.decode_step import counter_uniform, decode_step_op, decode_step_ref

OP = "decode_step"
TARGETS = backends(OP, dtype=F32)


def _on(target, *tensors):
    dev = device(target)
    return [t.to(dev) for t in tensors]


def _assert_same(got, want, t):
    assert_matches(got[0].cpu(), want[0], t, "sampled ids differ")
    assert_matches(got[1].cpu(), want[1], t, "re-masked ids differ")


# ---------------------------------------------------------------- what one step does

def _step_inputs(B=3, N=37, C=11, seed=0, n_known=9):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, N, C, generator=g) * 2
    ids = torch.full((B, N), 99, dtype=torch.long)
    for b in range(B):
        pos = torch.randperm(N, generator=g)[:n_known]
        ids[b, pos] = torch.randint(0, C, (n_known,), generator=g)
    return logits, ids, torch.tensor([11, 2**32 - 1, 0][:B])


@pytest.mark.parametrize("target", ["torch"] + TARGETS)
def test_masks_exactly_k_and_keeps_known(target):
    logits, ids, key = _step_inputs()
    k = 20
    sampled, nxt = (t.cpu() for t in run(decode_step_op, target, *_on(target, logits, ids, key), 3, k, 2.0, 99))
    known = ids != 99
    assert torch.equal(sampled[known], ids[known]) and bool((sampled < 11).all())
    assert ((nxt == 99).sum(1) == k).all()
    assert not bool(((nxt == 99) & known).any())  # known tokens are never re-masked
    assert torch.equal(nxt[nxt != 99], sampled[nxt != 99])


@pytest.mark.parametrize("target", ["torch"] + TARGETS)
def test_confidence_order(target):
    """With no confidence noise, the re-masked positions are the k with the lowest log p(sample)."""
    logits, ids, key = _step_inputs()
    k = 10
    sampled, nxt = (t.cpu() for t in run(decode_step_op, target, *_on(target, logits, ids, key), 0, k, 0.0, 99))
    logp = torch.log_softmax(logits, -1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(ids == 99, logp, torch.full_like(logp, math.inf))
    expect = torch.zeros_like(ids, dtype=torch.bool).scatter(1, logp.argsort(1)[:, :k], True)
    assert torch.equal(nxt == 99, expect)


@pytest.mark.parametrize("target", backends(OP, "sampling", F32))
def test_gumbel_max_sampling_follows_softmax(target):
    torch.manual_seed(0)
    C, N = 5, 4000
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5]).expand(1, N, C).contiguous()
    ids = torch.full((1, N), 7)
    sampled, _ = run(decode_step_op, target, *_on(target, logits, ids, torch.tensor([1234])), 0, 0, 1.0, 7)
    sampled = sampled.cpu()
    freq = torch.bincount(sampled[0], minlength=C).float() / N
    p = torch.softmax(logits[0, 0], -1)
    assert (freq - p).abs().max() < tol(OP, target, F32, "sampling").atol * math.sqrt(0.25 / N)


def test_counter_uniform_is_uniform_and_key_dependent():
    row = torch.arange(64).view(64, 1)
    col = torch.arange(1024).view(1, 1024)
    u = counter_uniform(torch.tensor(3), 0, row, col)
    assert float(u.min()) > 0 and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.002
    v = counter_uniform(torch.tensor(4), 0, row, col)
    assert float((u == v).float().mean()) < 0.01


def test_image_keys_deterministic_and_distinct():
    a = image_keys(0, torch.arange(8))
    assert torch.equal(a, image_keys(0, torch.arange(8)))
    assert len(set(a.tolist())) == 8 and bool((a >= 0).all()) and bool((a < 2**32).all())
    assert torch.equal(a[3:5], image_keys(0, torch.arange(3, 5)))
    assert not torch.equal(a, image_keys(1, torch.arange(8)))


def _py_mix32(x: int) -> int:
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def _py_uniform(key: int, stream: int, row: int, col: int) -> float:
    m = 0xFFFFFFFF
    h = _py_mix32((key ^ stream) & m)
    h = _py_mix32((h + row) & m)
    h = _py_mix32((h + col) & m)
    return min(((h >> 8) + 0.5) / 2 ** 24, 1 - 2 ** -24)


def _py_unmix32(x: int) -> int:
    """The inverse of ``_py_mix32`` (each xorshift and odd multiply is invertible mod 2^32)."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * pow(0x846CA68B, -1, 2 ** 32)) & m
    x ^= (x >> 15) ^ (x >> 30)
    x = (x * pow(0x7FEB352D, -1, 2 ** 32)) & m
    return x ^ (x >> 16)


def test_largest_hash_gives_a_uniform_below_one():
    """The column whose hash has all 24 top bits set: ((2^24 - 1) + 0.5) rounds to 2^24 in fp32, so
    without the bound u would be exactly 1 and its Gumbel draw infinite (that code sampled whatever
    its logit, its token never re-masked)."""
    from mage_fast.ops.decode_step import _STREAM_CONF, _STREAM_SAMPLE, UNIFORM_MAX, gumbel_from_uniform
    m = 0xFFFFFFFF
    assert _py_unmix32(_py_mix32(0xDEADBEEF)) == 0xDEADBEEF
    for stream in (_STREAM_SAMPLE, _STREAM_CONF):
        key, row = 7, 19 * 256 + 13
        h2 = _py_mix32((_py_mix32((key ^ stream) & m) + row) & m)
        col = (_py_unmix32(0xFFFFFF00 | 0x5A) - h2) & m  # the last mix lands on a hash >> 8 == 2^24 - 1
        u = counter_uniform(torch.tensor(key), stream, torch.tensor(row), torch.tensor(col))
        assert float(u) == UNIFORM_MAX < 1.0
        assert bool(torch.isfinite(gumbel_from_uniform(u)))


def test_counter_hash_matches_pure_python_definition():
    """The RNG every backend must reproduce, checked against plain Python integers (no wrap-around)."""
    from mage_fast.ops.decode_step import _STREAM_CONF, _STREAM_SAMPLE, mix32
    xs = [0, 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 0xDEADBEEF, 12345678]
    assert mix32(torch.tensor(xs)).tolist() == [_py_mix32(x) for x in xs]
    keys = [0, 7, 2 ** 32 - 1, 0x80000000]
    rows = [0, 1, 255, 19 * 256 + 13, 2 ** 31 + 5]
    cols = [0, 1, 1023, 70000]
    for stream in (_STREAM_SAMPLE, _STREAM_CONF):
        k = torch.tensor(keys).view(-1, 1, 1)
        r = torch.tensor(rows).view(1, -1, 1)
        c = torch.tensor(cols).view(1, 1, -1)
        got = counter_uniform(k, stream, r, c)
        want = torch.tensor([[[_py_uniform(a, stream, b, d) for d in cols] for b in rows] for a in keys])
        assert torch.equal(got, want.float())


# ---------------------------------------------------------------- backends against the reference

DS_CASES = [  # B, N, C, step, mask_len, noise_scale, known_every
    (1, 1, 1, 0, 0, 1.0, 0),
    (3, 17, 29, 2, 5, 1.3, 3),
    (2, 64, 1031, 7, 40, 4.5, 5),
    (4, 256, 16, 0, 255, 0.0, 0),
    (2, 33, 8, 2**32 // 33 + 5, 10, 2.0, 2),  # step * N past 2^32: the counter wraps as the reference
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("B,N,C,step,mask_len,noise,every", DS_CASES,
                         ids=["1x1x1", "3x17x29", "2x64x1031", "4x256x16-noiseless", "counter-wrap"])
def test_matches_reference(B, N, C, step, mask_len, noise, every, target):
    """A strided logits view (as the model passes), known positions, a counter past 2^32; and with
    equal logits and no noise the lowest positions are re-masked."""
    t = tol(OP, target, F32)
    g = torch.Generator().manual_seed(B * N * C)
    logits = torch.randn(B, N + 1, C + 3, generator=g)[:, 1:, :C] * 3  # strided view, as from the model
    ids = torch.full((B, N), C, dtype=torch.long)
    if every:
        ids[:, ::every] = torch.randint(0, C, (B, (N + every - 1) // every), generator=g)
    key = torch.tensor([0, 2**32 - 1, 12345, 7][:B] + [99] * max(0, B - 4), dtype=torch.long)
    want = decode_step_ref(logits, ids, key, step, mask_len, noise, C)
    dev = device(target)
    got = run(decode_step_op, target, logits.to(dev), ids.to(dev), key.to(dev), step, mask_len, noise, C)
    assert_matches(got[0].cpu(), want[0], t, str((got[0].cpu() != want[0]).nonzero()[:5]))
    assert_matches(got[1].cpu(), want[1], t, str((got[1].cpu() != want[1]).nonzero()[:5]))
    assert int((got[1] == C).sum()) == B * mask_len
    ties = run(decode_step_op, target, *_on(target, torch.zeros(2, 37, 5), torch.full((2, 37), 5),
                                            torch.tensor([3, 4])), 1, 9, 0.0, 5)[1].cpu()
    assert torch.equal((ties[0] == 5).nonzero().flatten(), torch.arange(9))


@pytest.mark.parametrize("target", TARGETS)
def test_ties_lower_position_remasked(target):
    """Equal logits everywhere and no noise: every confidence ties, the lowest positions are re-masked."""
    B, N, C = 2, 37, 5
    logits, ids, key = torch.zeros(B, N, C), torch.full((B, N), C), torch.tensor([3, 4])
    ids[:, 5] = 1  # a known position is never re-masked
    got = run(decode_step_op, target, *_on(target, logits, ids, key), 1, 9, 0.0, C)
    want = decode_step_ref(logits, ids, key, 1, 9, 0.0, C)
    _assert_same(got, want, tol(OP, target, F32))
    expect = torch.tensor([p for p in range(N) if p != 5][:9])
    assert torch.equal((got[1][0].cpu() == C).nonzero().flatten(), expect)


@pytest.mark.parametrize("target", TARGETS)
def test_ties_remask_lower_positions_first(target):
    B, N, C = 2, 23, 8
    logits = torch.zeros(B, N, C)  # every unknown position has the same confidence
    ids = torch.full((B, N), C)
    ids[:, 3] = 1
    key = torch.tensor([1, 2 ** 32 - 1])
    _, nxt = run(decode_step_op, target, *_on(target, logits, ids, key), 0, 5, 0.0, C)
    expect = torch.tensor([0, 1, 2, 4, 5])
    for b in range(B):
        assert torch.equal(torch.nonzero(nxt[b].cpu() == C).flatten(), expect)
    assert_matches(nxt.cpu(), decode_step_ref(logits, ids, key, 0, 5, 0.0, C)[1], tol(OP, target, F32))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_logits(dtype, target):
    logits = (torch.randn(2, 23, 50) * 2).to(dtype)
    ids, key = torch.full((2, 23), 50), torch.tensor([5, 6])
    want = decode_step_ref(logits, ids, key, 3, 11, 1.0, 50)
    got = run(decode_step_op, target, *_on(target, logits, ids, key), 3, 11, 1.0, 50)
    _assert_same(got, want, tol(OP, target, dtype))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_16bit_logits_strided_view(dtype, target):
    """16-bit logits, the model's strided view, are widened as the reference's .float(): the same ids."""
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(3, 65, 1024, generator=g)).to(dtype)[:, 1:]  # the model's view: strided
    ids = torch.full((3, 64), 1024, dtype=torch.long)
    ids[:, ::3] = torch.randint(0, 1024, (3, 22), generator=g)
    key = torch.tensor([5, 2**32 - 1, 77], dtype=torch.long)
    want = decode_step_ref(logits, ids, key, 2, 20, 1.5, 1024)
    got = run(decode_step_op, target, *_on(target, logits, ids, key), 2, 20, 1.5, 1024)
    _assert_same(got, want, tol(OP, target, dtype))


SHAPES = [  # (B, N, C)
    pytest.param((1, 1, 5), id="b1-n1-c5"),
    pytest.param((2, 37, 70), id="b2-n37-c70"),
    pytest.param((3, 131, 17), id="b3-n131-c17"),
    pytest.param((1, 256, 1024), id="b1-n256-c1024"),
]


def _inputs(B, N, C, seed, dtype=torch.float32, known=0.4, dev="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, N, C, generator=g)).to(dtype)
    ids = torch.randint(0, C, (B, N), generator=g)
    ids[torch.rand(B, N, generator=g) >= known] = C  # mask_id = C
    ids[:, 0] = C  # at least one unknown per row
    key = torch.randint(0, 2 ** 32, (B,), generator=g)
    return logits.to(dev), ids.to(dev), key.to(dev)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference_random_keys(shape, dtype, target):
    B, N, C = shape
    logits, ids, key = _inputs(B, N, C, seed=N + C, dtype=dtype, dev=device(target))
    mask_len = int((ids == C).sum(1).min()) // 2
    got = run(decode_step_op, target, logits, ids, key, 3, mask_len, 1.7, C)
    ref = decode_step_ref(logits, ids, key, 3, mask_len, 1.7, C)
    t = tol(OP, target, dtype)
    assert_matches(got[0], ref[0], t, "sampled ids differ")
    assert_matches(got[1], ref[1], t, "re-masked ids differ")
    assert bool(((got[1] == C).sum(1) == mask_len).all())


@pytest.mark.parametrize("target", TARGETS)
def test_strided_logits_view_and_step(target):
    dev = device(target)
    logits, ids, key = _inputs(2, 29, 40, seed=5, dev=dev)
    wide = torch.randn(2, 30, 53, device=dev)
    wide[:, 1:, :40] = logits
    view = wide[:, 1:, :40]  # what the model passes: codes of the image positions only
    for step in (0, 7):
        got = run(decode_step_op, target, view, ids, key, step, 4, 0.5, 40)
        ref = decode_step_ref(logits, ids, key, step, 4, 0.5, 40)
        _assert_same(got, [r.cpu() for r in ref], tol(OP, target, F32))


@pytest.mark.parametrize("target", TARGETS)
def test_known_tokens_kept_and_image_independent_of_batch(target):
    logits, ids, key = _inputs(3, 50, 33, seed=9, known=0.5, dev=device(target))
    fn = backend_fn(decode_step_op, target, logits, ids, key, 2, 6, 1.0, 33)
    s_all, n_all = fn(logits, ids, key, 2, 6, 1.0, 33)
    known = ids != 33
    assert torch.equal(s_all[known], ids[known]) and torch.equal(n_all[known], ids[known])
    s_one, n_one = fn(logits[1:2], ids[1:2], key[1:2], 2, 6, 1.0, 33)
    assert torch.equal(s_one, s_all[1:2]) and torch.equal(n_one, n_all[1:2])


@pytest.mark.parametrize("target", backends(OP, "strided", F32))
def test_noncontiguous_inputs(target):
    dev = device(target)
    g = torch.Generator().manual_seed(0)
    B, N, C = 4, 19, 33
    logits = (3 * torch.randn(B, N, C, generator=g)).to(dev)
    ids = torch.randint(0, C, (B, N), generator=g)
    ids[torch.rand(B, N, generator=g) < 0.6] = C
    ids = ids.to(dev)
    key = torch.randint(0, 2 ** 32, (B,), generator=g).to(dev)
    impl = backend_fn(decode_step_op, target, logits, ids, key, 2, 5, 1.3, C)

    def fn(lg, i, k):
        return impl(lg, i, k, 2, 5, 1.3, C)
    check_strided(fn, [logits, ids, key], [0, 1, 2], tol(OP, target, F32, "strided"))
    # the case that failed: every other image's key, as keys[::2] of a larger batch
    keys = torch.randint(0, 2 ** 32, (2 * B,), generator=g).to(dev)
    got = impl(logits, ids, keys[::2], 2, 5, 1.3, C)
    ref = decode_step_ref(logits, ids, keys[::2].contiguous(), 2, 5, 1.3, C)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@needs_cpp
def test_cpp_opcheck():
    args = (torch.randn(2, 6, 5), torch.full((2, 6), 5), torch.tensor([1, 2]), 1, 3, 1.0, 5)
    torch.library.opcheck(torch.ops.mage_fast.decode_step.default, args)


def test_triton_dispatch_and_fake(monkeypatch):
    triton_decode = triton_kernels("decode_step")
    logits, ids, key = _inputs(1, 8, 6, seed=1, dev=DEV)
    if DEV == "cpu":
        assert "CPU" in dict(decode_step_op.explain(logits, ids, key, 0, 1, 1.0, 6))["triton"]
        monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
    assert dict(decode_step_op.explain(logits, ids, key, 0, 1, 1.0, 6))["triton"] == "selected"
    assert "int64" in dict(decode_step_op.explain(logits, ids.int(), key, 0, 1, 1.0, 6))["triton"]
    torch.library.opcheck(triton_decode.decode_step_custom, (logits, ids, key, 0, 1, 1.0, 6),
                          test_utils=("test_schema", "test_faketensor"))
