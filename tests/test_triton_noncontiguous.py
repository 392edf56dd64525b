"""Every Triton op gives the same numbers on non-contiguous inputs as on contiguous copies of them.

Each tensor argument is replaced by a view with doubled strides in every dimension (the skipped
elements hold NaN or out-of-range ids), and for 2-D and higher tensors also by a transposed copy
viewed back, so a kernel that indexes an argument as dense rows reads the wrong elements and fails.
"""
import pytest
import torch

pytest.importorskip("triton", reason="triton not installed")
from mage_fast.ops.decode_step import decode_step_ref  # noqa: E402
from mage_fast.ops.token_drop import keep_index  # noqa: E402
from mage_fast.triton import attention, codebook, decode_step, layer_norm, mlm_head_loss  # noqa: E402
from mage_fast.triton import token_drop, token_embed  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def spread(t: torch.Tensor) -> torch.Tensor:
    """Same values, every stride doubled; the skipped elements are NaN (floats) or -7 (ints)."""
    big = torch.full([2 * n for n in t.shape], float("nan") if t.is_floating_point() else -7, dtype=t.dtype,
                     device=t.device)
    out = big[tuple(slice(None, None, 2) for _ in t.shape)]
    out.copy_(t.detach())
    return out.requires_grad_(t.requires_grad)


def flipped(t: torch.Tensor) -> torch.Tensor:
    """Same values, column-major in the last two dimensions."""
    out = t.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    return out.requires_grad_(t.requires_grad)


def _leaf(t):
    return t.detach().clone().requires_grad_(t.requires_grad)


def _outputs(fn, args, grad_of=(), dy=None):
    """fn(*args) and, for the float args at positions grad_of, the gradients of <out, dy>."""
    args = [_leaf(a) if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*args)
    outs = list(out) if isinstance(out, tuple) else [out]
    if grad_of:
        wrt = [args[i] for i in grad_of]
        seed = dy if dy is not None else torch.ones_like(outs[0])
        outs += list(torch.autograd.grad(outs[0], wrt, seed))
    return [o.detach() for o in outs]


def _check(fn, args, strided_positions, grad_of=(), dy=None):
    want = _outputs(fn, args, grad_of, dy)
    for make in (spread, flipped):
        for i in strided_positions:
            if make is flipped and args[i].dim() < 2:
                continue
            moved = list(args)
            moved[i] = make(args[i])
            if make is spread:
                assert moved[i].stride() != args[i].stride()
            got = _outputs(fn, moved, grad_of, dy)
            for k, (g, w) in enumerate(zip(got, want)):
                assert torch.equal(g, w) or torch.allclose(g, w, rtol=1e-6, atol=1e-6, equal_nan=False), \
                    f"{make.__name__}(arg {i}) changes output {k}: max diff {(g.float() - w.float()).abs().max()}"


def test_decode_step():
    g = torch.Generator().manual_seed(0)
    B, N, C = 4, 19, 33
    logits = (3 * torch.randn(B, N, C, generator=g)).to(DEV)
    ids = torch.randint(0, C, (B, N), generator=g)
    ids[torch.rand(B, N, generator=g) < 0.6] = C
    ids = ids.to(DEV)
    key = torch.randint(0, 2 ** 32, (B,), generator=g).to(DEV)

    def fn(lg, i, k):
        return decode_step.decode_step(lg, i, k, 2, 5, 1.3, C)
    _check(fn, [logits, ids, key], [0, 1, 2])
    # the case that failed: every other image's key, as keys[::2] of a larger batch
    keys = torch.randint(0, 2 ** 32, (2 * B,), generator=g).to(DEV)
    got = decode_step.decode_step(logits, ids, keys[::2], 2, 5, 1.3, C)
    ref = decode_step_ref(logits, ids, keys[::2].contiguous(), 2, 5, 1.3, C)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_codebook_nn(metric):
    g = torch.Generator().manual_seed(1)
    z, cb = torch.randn(37, 24, generator=g).to(DEV), torch.randn(70, 24, generator=g).to(DEV)
    _check(lambda a, b: codebook.codebook_nn(a, b, metric), [z, cb], [0, 1])


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_attention(dropout_p):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 17, 24, generator=g).to(DEV).requires_grad_(True) for _ in range(3))
    seed = torch.tensor([12345], dtype=torch.int64, device=DEV)
    dy = torch.randn(2, 3, 17, 24, generator=g).to(DEV)

    def fn(a, b, c):
        return attention.attention(a, b, c, dropout_p=dropout_p, seed=seed)
    _check(fn, [q, k, v], [0, 1, 2], grad_of=(0, 1, 2), dy=dy)


def test_layer_norm():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 7, 40, generator=g).to(DEV).requires_grad_(True)
    w = (1 + 0.2 * torch.randn(40, generator=g)).to(DEV).requires_grad_(True)
    b = (0.1 * torch.randn(40, generator=g)).to(DEV).requires_grad_(True)
    dy = torch.randn(3, 7, 40, generator=g).to(DEV)
    _check(lambda a, c, d: layer_norm.layer_norm(a, c, d, 1e-5), [x, w, b], [0, 1, 2], grad_of=(0, 1, 2), dy=dy)


def test_token_embed():
    g = torch.Generator().manual_seed(4)
    B, L, K, V, D = 2, 13, 6, 21, 24
    positions = keep_index(torch.rand(B, L, generator=g).argsort(1).argsort(1) >= K, K).to(DEV)
    ids = torch.randint(0, V, (B, K), generator=g).to(DEV)
    floats = [(0.5 * torch.randn(V, D, generator=g)).to(DEV), (0.5 * torch.randn(L, D, generator=g)).to(DEV),
              (1 + 0.2 * torch.randn(D, generator=g)).to(DEV), (0.1 * torch.randn(D, generator=g)).to(DEV)]
    floats = [t.requires_grad_(True) for t in floats]
    dy = torch.randn(B, K, D, generator=g).to(DEV)
    _check(lambda *a: token_embed.token_embed(*a, 1e-6), [ids, positions, *floats], range(6),
           grad_of=(2, 3, 4, 5), dy=dy)


def test_token_drop():
    g = torch.Generator().manual_seed(5)
    B, L, K, D = 2, 15, 6, 20
    drop = torch.rand(B, L, generator=g).argsort(1).argsort(1) >= K
    drop[:, 0] = False
    drop[torch.arange(B), (~drop).float().cumsum(1).eq(K + 1).float().argmax(1)] = True  # exactly K kept
    index = keep_index(drop, K).to(DEV)
    all_mask = (drop | (torch.rand(B, L, generator=g) < 0.3)).to(DEV)
    all_mask[:, 0] = False
    x_full = torch.randn(B, L, D, generator=g).to(DEV).requires_grad_(True)
    x_kept = torch.randn(B, K, D, generator=g).to(DEV).requires_grad_(True)
    pos = torch.randn(1, L, D, generator=g).to(DEV).requires_grad_(True)
    _check(token_drop.gather_tokens, [x_full, index], [0, 1], grad_of=(0,), dy=torch.randn(B, K, D, generator=g))
    _check(token_drop.scatter_tokens, [x_kept, index, all_mask, pos], [0, 1, 2, 3], grad_of=(0, 3),
           dy=torch.randn(B, L, D, generator=g))


def test_mlm_head_loss_and_masked_ce():
    g = torch.Generator().manual_seed(6)
    B, N, Dd, D, V, C = 2, 5, 12, 16, 37, 29
    floats = [torch.randn(B, N, Dd, generator=g), torch.randn(D, Dd, generator=g) / Dd ** 0.5,
              0.1 * torch.randn(D, generator=g), 1 + 0.2 * torch.randn(D, generator=g),
              0.1 * torch.randn(D, generator=g), torch.randn(V, D, generator=g), 0.5 * torch.randn(V, generator=g)]
    floats = [t.to(DEV).requires_grad_(True) for t in floats]
    target = torch.randint(0, C, (B, N), generator=g).to(DEV)
    mask = (torch.rand(B, N, generator=g) < 0.6).float().to(DEV)
    mask[0, 0] = 1.0

    def head(*a):
        return mlm_head_loss.mlm_head_loss(*a, C, 0.1, 1e-5, chunk_rows=4)
    _check(head, [*floats, target, mask], range(9), grad_of=tuple(range(7)))
    logits = torch.randn(B, N, C, generator=g).to(DEV).requires_grad_(True)
    _check(lambda lg, t, m: mlm_head_loss.masked_ce(lg, t, m, 0.1), [logits, target, mask], [0, 1, 2], grad_of=(0,))
