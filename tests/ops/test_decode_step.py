"""decode_step (mage_fast.ops.decode_step): every backend against the reference. All of them draw
from the same counter-based hash, so the sampled ids and the re-masked ids match bit for bit."""
import pytest
import torch
from op_backends import DEV, backend_fn, check_strided, device, needs_cpp, run, triton_kernels
from tolerances import F32, assert_matches, backends, tol

from mage_fast.ops.decode_step import decode_step_op, decode_step_ref

OP = "decode_step"
TARGETS = backends(OP, dtype=F32)


def _on(target, *tensors):
    dev = device(target)
    return [t.to(dev) for t in tensors]


def _assert_same(got, want, t):
    assert_matches(got[0].cpu(), want[0], t, "sampled ids differ")
    assert_matches(got[1].cpu(), want[1], t, "re-masked ids differ")


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
