"""Triton codebook nearest neighbour against the fp32 reference (interpreter on a CPU)."""
import pytest
import torch

from mage_fast.ops.codebook import codebook_nn_op, codebook_nn_ref

triton_codebook = pytest.importorskip("mage_fast.triton.codebook", reason="triton not installed")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = [  # (N, K, D)
    pytest.param((1, 1, 8), id="n1-k1-d8"),
    pytest.param((37, 1031, 8), id="n37-k1031-d8"),
    pytest.param((101, 300, 32), id="n101-k300-d32"),
    pytest.param((67, 517, 256), id="n67-k517-d256"),
    pytest.param((13, 64, 3), id="n13-k64-d3"),
]
# Chosen distances may differ from the reference's by rounding when two codes are near ties.
DIST_ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-3}


def _scores(z, e, metric):
    z, e = z.double(), e.double()
    if metric == "cosine":
        return -torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(e, dim=1).t()
    return torch.cdist(z, e) ** 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, metric, dtype):
    N, K, D = shape
    g = torch.Generator().manual_seed(N * 7 + K)
    z = torch.randn(N, D, generator=g).to(DEV, dtype)
    e = torch.randn(K, D, generator=g).to(DEV, dtype)
    got = triton_codebook.codebook_nn(z, e, metric)
    ref = codebook_nn_ref(z, e, metric)
    assert got.dtype == torch.int64 and got.shape == (N,)
    assert bool(((got >= 0) & (got < K)).all())
    s = _scores(z, e, metric)
    got_s, ref_s = s.gather(1, got[:, None]), s.gather(1, ref[:, None])
    scale = 1 + s.abs().amax(1, keepdim=True)
    assert torch.all((got_s - ref_s).abs() <= DIST_ATOL[dtype] * scale), "a chosen code is farther than the best"
    assert (got == ref).float().mean() > 0.97


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ties_go_to_lowest_index(metric):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, 16, generator=g)
    e = torch.cat([base, base, base[:5]])  # every code appears two or three times, copies in later tiles
    e = e[torch.randperm(e.shape[0], generator=g)]
    z = base[[3, 7, 0, 39]] + 0.01 * torch.randn(4, 16, generator=g)
    got = triton_codebook.codebook_nn(z.to(DEV), e.to(DEV), metric).cpu()
    assert torch.equal(got, torch.argmin(_scores(z, e, metric), dim=1))
    assert torch.equal(got, codebook_nn_ref(z, e, metric))


def test_strided_rows_and_large_block_count():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(300, 24, generator=g)[::2, :20]  # row stride 48, non-contiguous
    e = torch.randn(2053, 20, generator=g)
    assert torch.equal(triton_codebook.codebook_nn(z.to(DEV), e.to(DEV)).cpu(), codebook_nn_ref(z, e))


def test_dispatch(monkeypatch):
    z, e = torch.randn(5, 8), torch.randn(9, 8)
    verdict = dict(codebook_nn_op.explain(z, e, "l2"))
    if DEV == "cpu":
        assert "CPU" in verdict["triton"]
        monkeypatch.setenv("MAGE_FAST_TRITON_INTERPRET_DISPATCH", "1")
        assert dict(codebook_nn_op.explain(z, e, "l2"))["triton"] == "selected"
    assert "dtype torch.int32" in dict(codebook_nn_op.explain(z, e.int(), "l2"))["triton"] or DEV == "cpu"
    assert "metric" in dict(codebook_nn_op.explain(z.to(DEV), e.to(DEV), "dot"))["triton"]


def test_custom_op_traces():
    z, e = torch.randn(6, 8, device=DEV), torch.randn(11, 8, device=DEV)
    torch.library.opcheck(triton_codebook.codebook_nn_custom, (z, e, "l2"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_ties_across_codebook_splits_go_to_lowest_index(metric):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(40, 16, generator=g)
    e = torch.cat([base, 3 * torch.randn(1500, 16, generator=g), base])  # copies 1540 codes apart
    z = base[[3, 7, 0, 39]] + 0.01 * torch.randn(4, 16, generator=g)
    sms = 1 if DEV == "cpu" else torch.cuda.get_device_properties(0).multi_processor_count
    assert triton_codebook.splits(z.shape[0], e.shape[0], sms) > 1, "the codebook is not split: nothing tested"
    got = triton_codebook.codebook_nn(z.to(DEV), e.to(DEV), metric).cpu()
    assert torch.equal(got, torch.tensor([3, 7, 0, 39]))
