"""Decoding: schedule, the counter-based torch sampler, and the decode-step reference."""
import math

import numpy as np
import pytest
import torch

import mage_fast
from mage_fast.ops import decode_step_ref, image_keys
from mage_fast.ops.decode_step import counter_uniform

FACTS_T20 = [255, 252, 248, 243, 236, 228, 218, 207, 194, 181, 166, 150, 133, 116, 97, 79, 59, 40, 20, 1]


def test_schedule_matches_official_counts():
    assert mage_fast.mask_schedule(20) == FACTS_T20
    s12 = mage_fast.mask_schedule(12)
    assert s12[-1] == 1 and all(a > b for a, b in zip(s12, s12[1:]))
    with pytest.raises(ValueError):
        mage_fast.mask_schedule(0)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mage_fast.mage_vit_tiny().eval()


def test_torch_rng_image_depends_only_on_seed_and_index(tiny):
    _, ids3 = mage_fast.generate(tiny, 3, num_iter=4, seed=5, rng="torch", return_ids=True)
    _, ids1 = mage_fast.generate(tiny, 1, num_iter=4, seed=5, rng="torch", return_ids=True, first_index=2)
    _, ids2 = mage_fast.generate(tiny, 2, num_iter=4, seed=5, rng="torch", return_ids=True, first_index=1)
    assert torch.equal(ids3[2:], ids1) and torch.equal(ids3[1:], ids2)
    _, other = mage_fast.generate(tiny, 3, num_iter=4, seed=6, rng="torch", return_ids=True)
    assert not torch.equal(ids3, other)
    assert not torch.equal(ids3[0], ids3[1])


def test_torch_rng_touches_no_global_rng(tiny):
    np.random.seed(1)
    torch.manual_seed(1)
    np_state, torch_state = np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    imgs, ids = mage_fast.generate(tiny, 2, num_iter=3, rng="torch", return_ids=True)
    assert np.array_equal(np.random.get_state()[1], np_state) and torch.equal(torch.get_rng_state(), torch_state)
    assert imgs.shape == (2, 3, 256, 256) and ids.shape == (2, 256)
    assert int(ids.min()) >= 0 and int(ids.max()) < 1024


def test_official_rng_depends_on_batch_as_official(tiny):
    _, a = mage_fast.generate(tiny, 2, num_iter=3, seed=0, rng="official", return_ids=True)
    _, b = mage_fast.generate(tiny, 1, num_iter=3, seed=0, rng="official", return_ids=True)
    _, c = mage_fast.generate(tiny, 2, num_iter=3, seed=0, rng="official", return_ids=True)
    assert torch.equal(a, c)  # reseeded each call
    assert not torch.equal(a[1:], b)  # image 1 of a batch of 2 differs from a batch of 1's image


def test_bad_rng_mode(tiny):
    with pytest.raises(ValueError, match="rng must be one of"):
        mage_fast.generate(tiny, 1, rng="numpy")


def _step_inputs(B=3, N=37, C=11, seed=0, n_known=9):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, N, C, generator=g) * 2
    ids = torch.full((B, N), 99, dtype=torch.long)
    for b in range(B):
        pos = torch.randperm(N, generator=g)[:n_known]
        ids[b, pos] = torch.randint(0, C, (n_known,), generator=g)
    return logits, ids, torch.tensor([11, 2**32 - 1, 0][:B])


def test_decode_step_masks_exactly_k_lowest_and_keeps_known():
    logits, ids, key = _step_inputs()
    k = 20
    sampled, nxt = decode_step_ref(logits, ids, key, 3, k, 2.0, 99)
    known = ids != 99
    assert torch.equal(sampled[known], ids[known]) and bool((sampled < 11).all())
    assert ((nxt == 99).sum(1) == k).all()
    assert not bool(((nxt == 99) & known).any())  # known tokens are never re-masked
    assert torch.equal(nxt[nxt != 99], sampled[nxt != 99])


def test_decode_step_confidence_order():
    """With no confidence noise, the re-masked positions are the k with the lowest log p(sample)."""
    logits, ids, key = _step_inputs()
    k = 10
    sampled, nxt = decode_step_ref(logits, ids, key, 0, k, 0.0, 99)
    logp = torch.log_softmax(logits, -1).gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(ids == 99, logp, torch.full_like(logp, math.inf))
    expect = torch.zeros_like(ids, dtype=torch.bool).scatter(1, logp.argsort(1)[:, :k], True)
    assert torch.equal(nxt == 99, expect)


def test_gumbel_max_sampling_follows_softmax():
    torch.manual_seed(0)
    C, N = 5, 4000
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5]).expand(1, N, C).contiguous()
    ids = torch.full((1, N), 7)
    sampled, _ = decode_step_ref(logits, ids, torch.tensor([1234]), 0, 0, 1.0, 7)
    freq = torch.bincount(sampled[0], minlength=C).float() / N
    p = torch.softmax(logits[0, 0], -1)
    assert (freq - p).abs().max() < 4 * math.sqrt(0.25 / N)


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
