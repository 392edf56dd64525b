"""Triton decode step against the reference: same hash, so sampled ids and re-masks match exactly."""
import pytest
import torch

from mage_fast.ops.decode_step import decode_step_op, decode_step_ref

triton_decode = pytest.importorskip("mage_fast.triton.decode_step", reason="triton not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = [  # (B, N, C)
    pytest.param((1, 1, 5), id="b1-n1-c5"),
    pytest.param((2, 37, 70), id="b2-n37-c70"),
    pytest.param((3, 131, 17), id="b3-n131-c17"),
    pytest.param((1, 256, 1024), id="b1-n256-c1024"),
]


def _inputs(B, N, C, seed, dtype=torch.float32, known=0.4):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(B, N, C, generator=g)).to(dtype)
    ids = torch.randint(0, C, (B, N), generator=g)
    ids[torch.rand(B, N, generator=g) >= known] = C  # mask_id = C
    ids[:, 0] = C  # at least one unknown per row
    key = torch.randint(0, 2 ** 32, (B,), generator=g)
    return logits.to(DEV), ids.to(DEV), key.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, dtype):
    B, N, C = shape
    logits, ids, key = _inputs(B, N, C, seed=N + C, dtype=dtype)
    mask_len = int((ids == C).sum(1).min()) // 2
    got = triton_decode.decode_step(logits, ids, key, 3, mask_len, 1.7, C)
    ref = decode_step_ref(logits, ids, key, 3, mask_len, 1.7, C)
    assert torch.equal(got[0], ref[0]), "sampled ids differ"
    assert torch.equal(got[1], ref[1]), "re-masked ids differ"
    assert bool(((got[1] == C).sum(1) == mask_len).all())


def test_strided_logits_view_and_step():
    logits, ids, key = _inputs(2, 29, 40, seed=5)
    wide = torch.randn(2, 30, 53, device=DEV)
    wide[:, 1:, :40] = logits
    view = wide[:, 1:, :40]  # what the model passes: codes of the image positions only
    for step in (0, 7):
        got = triton_decode.decode_step(view, ids, key, step, 4, 0.5, 40)
        ref = decode_step_ref(logits, ids, key, step, 4, 0.5, 40)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_ties_remask_lower_positions_first():
    B, N, C = 2, 23, 8
    logits = torch.zeros(B, N, C, device=DEV)  # every unknown position has the same confidence
    ids = torch.full((B, N), C, device=DEV)
    ids[:, 3] = 1
    key = torch.tensor([1, 2 ** 32 - 1], device=DEV)
    _, nxt = triton_decode.decode_step(logits, ids, key, 0, 5, 0.0, C)
    expect = torch.tensor([0, 1, 2, 4, 5])
    for b in range(B):
        assert torch.equal(torch.nonzero(nxt[b].cpu() == C).flatten(), expect)
    assert torch.equal(nxt, decode_step_ref(logits, ids, key, 0, 5, 0.0, C)[1])


def test_known_tokens_kept_and_image_independent_of_batch():
    logits, ids, key = _inputs(3, 50, 33, seed=9, known=0.5)
    s_all, n_all = triton_decode.decode_step(logits, ids, key, 2, 6, 1.0, 33)
    known = ids != 33
    assert torch.equal(s_all[known], ids[known]) and torch.equal(n_all[known], ids[known])
    s_one, n_one = triton_decode.decode_step(logits[1:2], ids[1:2], key[1:2], 2, 6, 1.0, 33)
    assert torch.equal(s_one, s_all[1:2]) and torch.equal(n_one, n_all[1:2])


def test_dispatch_and_fake(monkeypatch):
    logits, ids, key = _inputs(1, 8, 6, seed=1)
    if DEV == "cpu":
        assert "CPU" in dict(decode_step_op.explain(logits, ids, key, 0, 1, 1.0, 6))["triton"]
        monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
    assert dict(decode_step_op.explain(logits, ids, key, 0, 1, 1.0, 6))["triton"] == "selected"
    assert "int64" in dict(decode_step_op.explain(logits, ids.int(), key, 0, 1, 1.0, 6))["triton"]
    torch.library.opcheck(triton_decode.decode_step_custom, (logits, ids, key, 0, 1, 1.0, 6),
                          test_utils=("test_schema", "test_faketensor"))
