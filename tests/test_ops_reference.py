"""The plain-torch op references against independent formulations, and the dispatcher."""
import pytest
import torch
import torch.nn.functional as F

from mage_fast.ops import (Op, attention, attention_official, codebook_nn, codebook_nn_ref, force_backend,
                           gather_tokens, keep_index, masked_ce, scatter_tokens)
from mage_fast.ops.dispatch import NoBackendError


@pytest.mark.parametrize("N,K,D", [(1, 1, 1), (37, 1031, 8), (128, 64, 256)], ids=str)
def test_codebook_l2_matches_cdist(N, K, D):
    torch.manual_seed(N + K)
    z, e = torch.randn(N, D, dtype=torch.float64), torch.randn(K, D, dtype=torch.float64)
    assert torch.equal(codebook_nn(z, e), torch.cdist(z, e).argmin(1))


def test_codebook_ties_lowest_index_and_cosine():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [5.0, 0.0]])
    z = torch.tensor([[2.0, 0.0], [0.5, 0.5], [4.0, 0.0], [3.0, 0.0]])
    assert codebook_nn(z, e).tolist() == [0, 0, 3, 0]  # [0.5,0.5]: codes 0,1,2 tie; [3,0]: 0,2,3 tie
    assert codebook_nn(z, e, "cosine").tolist() == [0, 0, 0, 0]  # codes 0, 2 and 3 tie in angle
    with pytest.raises(ValueError, match="same D"):
        codebook_nn(z, torch.randn(3, 3))
    with pytest.raises(ValueError, match="metric"):
        codebook_nn(z, e, "l1")
    assert codebook_nn_ref(z.half(), e.half()).tolist() == [0, 0, 3, 0]


def official_restore(x, drop, allm, pos):
    """The official decoder fill, written with nonzero() as the official code."""
    pad = x[:, :1].repeat(1, drop.shape[1], 1).clone()
    pad[(1 - drop).nonzero(as_tuple=True)] = x.reshape(-1, x.shape[-1])
    pad = torch.where(allm.unsqueeze(-1).bool(), x[:, :1].repeat(1, drop.shape[1], 1), pad)
    return pad + pos


def test_token_drop_restore_match_official_formulation():
    torch.manual_seed(0)
    B, L, D, K = 3, 17, 5, 9
    drop = torch.zeros(B, L)
    for b in range(B):
        drop[b, 1 + torch.randperm(L - 1)[: L - K]] = 1
    allm = drop.clone()
    allm[:, 2] = 1
    full = torch.randn(B, L, D, requires_grad=True)
    idx = keep_index(drop, K)
    kept = gather_tokens(full, idx)
    assert torch.equal(kept, full[(1 - drop).nonzero(as_tuple=True)].view(B, K, D))
    x = torch.randn(B, K, D)
    pos = torch.randn(1, L, D)
    assert torch.equal(scatter_tokens(x, idx, allm.bool(), pos), official_restore(x, drop, allm, pos))
    kept.sum().backward()
    assert torch.equal(full.grad, (1 - drop).unsqueeze(-1).expand(B, L, D))


@pytest.mark.parametrize("N,d,causal", [(129, 48, False), (257, 64, False), (7, 16, True)], ids=str)
def test_attention_sdpa_matches_official(N, d, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, N, d) for _ in range(3))
    ref = attention_official(q, k, v, causal=causal)
    torch.testing.assert_close(attention(q, k, v, causal=causal), ref, rtol=1e-5, atol=1e-5)
    if causal:
        torch.testing.assert_close(ref, F.scaled_dot_product_attention(q, k, v, is_causal=True), rtol=1e-5, atol=1e-5)


def test_masked_ce_matches_official_label_smoothing():
    torch.manual_seed(0)
    logits, tgt = torch.randn(2, 6, 10), torch.randint(0, 10, (2, 6))
    mask = (torch.rand(2, 6) > 0.5).float()
    mask[0, 0] = 1
    lp = logits.log_softmax(-1)
    per = 0.9 * -lp.gather(-1, tgt[..., None])[..., 0] + 0.1 * -lp.mean(-1)
    torch.testing.assert_close(masked_ce(logits, tgt, mask), (per * mask).sum() / mask.sum())


def test_dispatch_explain_force_and_errors():
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
