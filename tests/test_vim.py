"""VIM: causal attention against SDPA, the key/value cache against full passes, cached sampling
equal to uncached sampling for the same random numbers, the filters and the sampling
distribution, the loss, probe features, a tokenizer round trip, and errors on bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from mage_fast.models.vim import VIM
from mage_fast.models.vit_vqgan import ViTVQGAN
from mage_fast.ops import attention, force_backend
from mage_fast.vim_sampling import filter_logits, generate, sample_next, sample_tokens

L, K, C = 16, 64, 10


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vim():
    torch.manual_seed(0)
    return VIM(seq_len=L, codebook_size=K, num_classes=C, embed_dim=32, depth=2, num_heads=4).eval()


@pytest.mark.parametrize("shape", [(1, 1, 1, 8), (2, 3, 17, 16), (1, 2, 64, 8)], ids=str)
@pytest.mark.parametrize("backend", ["torch", None], ids=["reference", "dispatched"])
def test_causal_attention_matches_sdpa(shape, backend):
    torch.manual_seed(shape[2])
    q, k, v = (torch.randn(shape) for _ in range(3))  # fp32: the reference upcasts scores to fp32 only
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True).float()
    if backend is None:
        got = attention(q, k, v, causal=True)
    else:
        with force_backend(backend):
            got = attention(q, k, v, causal=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)


def test_block_attention_matches_sdpa_and_is_causal(vim):
    attn = vim.blocks[0].attn
    x = torch.randn(2, 9, 32)
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
    want = F.linear(o.transpose(1, 2).reshape(2, 9, 32), attn.proj.weight, attn.proj.bias)
    torch.testing.assert_close(attn(x), want)
    tokens = torch.randint(0, K, (2, L))
    base = vim.logits(vim.inputs(tokens, None))
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % K  # token 6 is the input at position 7
    after = vim.logits(vim.inputs(changed, None))
    torch.testing.assert_close(after[:, :7], base[:, :7], rtol=0, atol=0)
    assert not torch.allclose(after[:, 7:], base[:, 7:])


def test_cached_steps_match_full_pass(vim):
    torch.manual_seed(1)
    tokens = torch.randint(0, K, (3, L))
    ids = vim.inputs(tokens, torch.tensor([0, 9, -1]))
    full = vim.logits(ids)  # (3, L, K)
    cache = vim.new_cache(3)  # torch.empty: NaN-poisoned in tests, so unwritten slots would show
    steps = [vim.step(ids[:, t:t + 1], cache) for t in range(L)]
    assert cache.length == L and torch.isfinite(torch.stack(steps)).all()
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)
    prefilled = vim.new_cache(3)
    first = vim.step(ids[:, :5], prefilled)  # several positions on an empty cache, then single steps
    torch.testing.assert_close(first, full[:, 4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(vim.step(ids[:, 5:6], prefilled), full[:, 5], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="empty cache"):
        vim.step(ids[:, 6:8], prefilled)


OPTIONS = [dict(), dict(temperature=0.7, top_k=8), dict(temperature=1.3, top_p=0.6),
           dict(top_k=20, top_p=0.9), dict(temperature=0.0)]


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_cached_sampling_equals_uncached(vim, opts):
    labels = torch.tensor([0, 3, -1, 9])
    cached = sample_tokens(vim, 4, labels=labels, seed=7, **opts)
    uncached = sample_tokens(vim, 4, labels=labels, seed=7, use_cache=False, **opts)
    assert cached.shape == (4, L) and torch.equal(cached, uncached)
    assert int(cached.min()) >= 0 and int(cached.max()) < K
    if opts.get("temperature", 1.0) > 0:
        assert len(set(map(tuple, cached.tolist()))) == 4  # rows differ
        assert not torch.equal(cached, sample_tokens(vim, 4, labels=labels, seed=8, **opts))


def test_image_depends_only_on_seed_and_index(vim):
    whole = sample_tokens(vim, 3, labels=torch.tensor([1, 2, 3]), seed=5)
    part = sample_tokens(vim, 2, labels=torch.tensor([2, 3]), seed=5, first_index=1)
    assert torch.equal(whole[1:], part)


def test_filters_match_brute_force():
    torch.manual_seed(2)
    logits = torch.randn(6, 11)
    for k in (1, 3, 11):
        kept = torch.isfinite(filter_logits(logits, top_k=k))
        for row, mask in zip(logits, kept):
            assert set(mask.nonzero().flatten().tolist()) == set(row.argsort(descending=True)[:k].tolist())
    for p in (0.05, 0.5, 0.9, 1.0):
        kept = torch.isfinite(filter_logits(logits, top_p=p))
        for row, mask in zip(logits, kept):
            order, probs, mass, want = row.argsort(descending=True).tolist(), row.softmax(0), 0.0, set()
            for j in order:
                want.add(j)
                mass += float(probs[j])
                if mass >= p:
                    break
            assert set(mask.nonzero().flatten().tolist()) == want, p


def test_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 40000
    keys = torch.arange(n)
    for temperature, top_k in ((1.0, None), (0.5, None), (1.0, 2)):
        draws = sample_next(logits.expand(n, 4), keys, 3, temperature, top_k)
        freq = torch.bincount(draws, minlength=4).double() / n
        want = filter_logits((logits / temperature).view(1, 4), top_k).softmax(-1).view(4).double()
        assert (freq - want).abs().max() < 4 * math.sqrt(0.25 / n), (temperature, top_k, freq, want)
    assert torch.equal(sample_next(logits.expand(2, 4), keys[:2], 0, 0.0), torch.zeros(2, dtype=torch.long))
    flat = torch.zeros(1, 1000)  # the step is part of the counter: fresh numbers at every position
    assert len({int(sample_next(flat, keys[:1], t)) for t in range(8)}) > 1


def test_loss_is_next_token_cross_entropy_and_label_dropout():
    torch.manual_seed(3)
    m = VIM(seq_len=L, codebook_size=K, num_classes=C, embed_dim=32, depth=2, num_heads=4, dropout=0.0,
            class_dropout_prob=1.0)
    tokens, labels = torch.randint(0, K, (3, L)), torch.tensor([1, 2, 3])
    m.eval()
    loss, logits = m(tokens, labels)
    assert logits.shape == (3, L, K)
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, K), tokens.reshape(-1)))
    uncond, _ = m(tokens, None)
    assert not torch.allclose(loss, uncond)
    m.train()
    dropped, _ = m(tokens, labels)  # every label dropped to the "no class" id
    torch.testing.assert_close(dropped, uncond)
    dropped.backward()
    assert m.tok_emb.weight.grad.abs().sum() > 0 and m.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert m.num_parameters() == sum(p.numel() for p in m.parameters())


def test_probe_features(vim):
    tokens = torch.randint(0, K, (2, L))
    f = vim.probe_features(tokens, layer=1, norm=False)
    h = vim._embed(vim.inputs(tokens, None))
    want = vim.blocks[0](h)[:, 1:].mean(1)
    torch.testing.assert_close(f, want)
    g = vim.probe_features(tokens, layer=2)
    assert g.shape == (2, 32)
    torch.testing.assert_close(g.mean(1), torch.zeros(2), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="layer"):
        vim.probe_features(tokens, layer=3)


def test_bad_inputs(vim):
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        vim(torch.full((1, L), K), None)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        vim(torch.full((1, L), -1), None)
    with pytest.raises(ValueError, match="expected tokens"):
        vim(torch.zeros(1, L + 1, dtype=torch.long), None)
    with pytest.raises(ValueError, match="class labels"):
        vim(torch.zeros(1, L, dtype=torch.long), torch.tensor([C]))
    with pytest.raises(ValueError, match="top_p"):
        sample_tokens(vim, 1, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(vim, 1, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        sample_tokens(vim, 1, top_k=0)
    from mage_fast import InputError  # MAGE's sampler's error type, never a float rounded into top_k
    for bad in ({"top_k": 1.5}, {"top_p": float("nan")}, {"top_p": True}, {"temperature": float("inf")}):
        with pytest.raises(InputError, match=next(iter(bad))):
            sample_tokens(vim, 1, **bad)
    with pytest.raises(ValueError, match="labels"):
        sample_tokens(vim, 2, labels=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="seq_len and codebook_size"):
        VIM(seq_len=L)


def test_with_vit_vqgan_tokenizer_round_trip():
    torch.manual_seed(4)
    vq = ViTVQGAN(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, n_embed=K, code_dim=8)
    m = VIM(num_classes=C, embed_dim=32, depth=2, num_heads=4, tokenizer=vq)
    assert (m.seq_len, m.codebook_size, m.token_grid) == (16, K, 4)
    assert not any(p.requires_grad for p in vq.parameters())
    assert m.num_parameters() == sum(p.numel() for n, p in m.named_parameters() if not n.startswith("tokenizer"))
    imgs = torch.rand(2, 3, 16, 16)
    tokens = m.tokenize(imgs)
    loss, _ = m(tokens, torch.tensor([1, 2]))
    loss.backward()
    assert all(p.grad is None for p in vq.parameters())
    m.eval()
    out, ids = generate(m, 2, labels=torch.tensor([4, 5]), top_k=16, return_ids=True)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, vq.decode_code(ids))
    with pytest.raises(ValueError, match="contradicts"):
        VIM(seq_len=20, tokenizer=vq)


def test_ar_vs_mage_benchmark_runs(tmp_path):
    import importlib.util
    import json
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "ar_vs_mage.py"
    spec = importlib.util.spec_from_file_location("ar_vs_mage", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    bench.main(["--img-size", "32", "--patch-size", "8", "--batch-size", "2", "--repeats", "1", "--mage-steps", "2,3",
                "--out", str(out)])
    r = json.loads(out.read_text())
    assert r["seq_len"] == 16 and (tmp_path / "r.png").is_file()
    assert r["paths"]["vim_cached"]["forward_passes_per_image"] == 16
    assert r["paths"]["vim_cached"]["block_token_evals_per_image"] == 16 * 4  # 4 blocks, one position per pass
    assert r["paths"]["vim_uncached"]["block_token_evals_per_image"] == 4 * 16 * 17 / 2
    assert r["paths"]["mage_T3"]["forward_passes_per_image"] == 3
    assert r["ratios"]["mage_T2_over_vim_cached"] == pytest.approx(
        r["paths"]["mage_T2"]["images_per_s"] / r["paths"]["vim_cached"]["images_per_s"])


def test_sampling_under_bf16_autocast(vim):
    cache = vim.new_cache(2, dtype=torch.bfloat16)
    assert cache.k[0].dtype == torch.bfloat16 and cache.k[0].shape == (2, 4, L, 8)
    ids = sample_tokens(vim, 2, labels=torch.tensor([1, -1]), autocast_dtype=torch.bfloat16)
    assert ids.shape == (2, L) and int(ids.min()) >= 0 and int(ids.max()) < K
    vq = ViTVQGAN(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, n_embed=K, code_dim=8)
    imgs = torch.rand(2, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, (_, _, idx) = vq.encode(imgs)
    assert idx.shape == (32,) and int(idx.max()) < K
