"""The one key/value cache (mage_fast.modules.kv_cache.KVCache) and the attention that reads it."""
import pathlib
import re

import pytest
import torch

import mage_fast
from mage_fast.decoding import DecodeMode
from mage_fast.models.vim import VIM
from mage_fast.modules.kv_cache import KVCache, KVCacheError
from mage_fast.modules.transformer import Attention, Block
from mage_fast.ops.attention import attention

B, H, S, D = 2, 3, 10, 4


def _rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)


def test_slot_write_of_a_contiguous_range_equals_append():
    k0, v0 = _rows(S, 0)
    k, v = _rows(4, 1)
    by_slots = KVCache.from_layers([k0.clone()], [v0.clone()])
    by_append = KVCache.from_layers([k0.clone()], [v0.clone()])
    by_append.length = 3
    by_slots.write(0, torch.arange(3, 7).expand(B, -1), k, v)
    assert by_append.append(0, k, v) == 7 and by_append.length == 3  # length moves on advance only
    assert torch.equal(by_slots.k[0], by_append.k[0]) and torch.equal(by_slots.v[0], by_append.v[0])
    assert torch.equal(by_slots.k[0][:, :, 3:7], k) and torch.equal(by_slots.k[0][:, :, 7:], k0[:, :, 7:])
    by_append.advance(4)
    assert by_append.length == 7


def test_slot_write_puts_each_row_at_its_own_slot_per_sequence():
    k0, v0 = _rows(S, 2)
    cache = KVCache.from_layers([k0], [v0])
    k, v = _rows(2, 3)
    slots = torch.tensor([[7, 1], [0, 9]])
    cache.write(0, slots, k, v)
    for b in range(B):
        for j in range(2):
            assert torch.equal(cache.k[0][b, :, slots[b, j]], k[b, :, j])
            assert torch.equal(cache.v[0][b, :, slots[b, j]], v[b, :, j])


def test_preallocated_cache_shapes_and_dtype():
    cache = KVCache(depth=3, batch_size=B, num_heads=H, max_len=S, head_dim=D, dtype=torch.bfloat16)
    assert cache.depth == 3 and cache.max_len == S and cache.length == 0 and cache.key_mask is None
    assert all(t.shape == (B, H, S, D) and t.dtype == torch.bfloat16 for t in cache.k + cache.v)
    k, v = _rows(2, 4)
    cache.append(1, k, v)  # fp32 rows are stored in the cache's dtype
    assert torch.equal(cache.k[1][:, :, :2], k.to(torch.bfloat16))


def test_key_mask_hides_empty_slots():
    """A query of a cached pass sees exactly the slots its cache's key mask shows: the result equals
    attention over the visible slots alone, whatever the hidden ones hold."""
    torch.manual_seed(5)
    attn = Attention(H * D, num_heads=H).eval()
    k, v = _rows(S, 6)
    visible = torch.rand(B, S) < 0.6
    visible[:, [0, 5]] = True
    k_junk, v_junk = k.clone(), v.clone()
    k_junk[~visible[:, None, :, None].expand_as(k)] = 1e4  # large, finite (see the KVCache docstring)
    v_junk[~visible[:, None, :, None].expand_as(v)] = -1e4
    x = torch.randn(B, 2, H * D)
    slots = torch.stack([visible[b].nonzero()[:2, 0] for b in range(B)])  # rewrite two visible slots
    outs = []
    for kk, vv in ((k, v), (k_junk, v_junk)):
        cache = KVCache.from_layers([kk.clone()], [vv.clone()], key_mask=visible.clone())
        with torch.no_grad():
            outs.append(attn.attend_cached(x, cache, 0, slots))
    assert torch.equal(outs[0], outs[1])
    with torch.no_grad():  # reference: per sequence, attention over its visible slots only
        q, kn, vn = attn._qkv(x)
        for b in range(B):
            kb, vb = k.clone()[b:b + 1], v.clone()[b:b + 1]
            kb[:, :, slots[b]] = kn[b:b + 1]
            vb[:, :, slots[b]] = vn[b:b + 1]
            o = attention(q[b:b + 1], kb[:, :, visible[b]], vb[:, :, visible[b]], scale=attn.scale)
            want = attn.proj(o.transpose(1, 2).reshape(1, 2, H * D))
            torch.testing.assert_close(outs[0][b:b + 1], want, atol=1e-6, rtol=1e-5)
    # and the mask matters: without it the hidden slots change the result
    cache = KVCache.from_layers([k_junk.clone()], [v_junk.clone()])
    with torch.no_grad():
        assert not torch.allclose(attn.attend_cached(x, cache, 0, slots), outs[0])


def test_reveal_and_grow_update_the_mask():
    k, v = _rows(4, 7)
    mask = torch.tensor([[True, False, True, False], [True, True, False, False]])
    cache = KVCache.from_layers([k], [v], key_mask=mask)
    old = cache.key_mask
    cache.reveal(torch.tensor([[1], [3]]))
    assert torch.equal(cache.key_mask, torch.tensor([[True, True, True, False], [True, True, False, True]]))
    assert torch.equal(old, mask)  # out of place: a mask handed out earlier is unchanged
    cache.grow(2)
    assert cache.max_len == 6 and cache.length == 6 and cache.k[0].shape == (B, H, 6, D)
    assert torch.equal(cache.k[0][:, :, :4], k) and not cache.k[0][:, :, 4:].any()
    assert not cache.key_mask[:, 4:].any()
    with pytest.raises(KVCacheError, match="no key mask"):
        KVCache.from_layers([k], [v]).reveal(torch.tensor([[0], [0]]))


def test_bad_writes_raise_named_errors():
    cache = KVCache(depth=2, batch_size=B, num_heads=H, max_len=S, head_dim=D)
    k, v = _rows(3, 8)
    with pytest.raises(KVCacheError, match=r"keys to write must be \(B, H, F, d\) = \(2, 3, F, 4\).*\(2, 3, 3, 5\)"):
        cache.append(0, torch.zeros(B, H, 3, D + 1), v)
    with pytest.raises(KVCacheError, match="values to write must be"):
        cache.write_range(0, 0, k, v[:1])
    with pytest.raises(KVCacheError, match="differ in rows: 3 and 2"):
        cache.append(0, k, v[:, :, :2])
    with pytest.raises(KVCacheError, match=r"slots must be \(B, F\) = \(2, 3\).*\(2, 2\)"):
        cache.write(0, torch.zeros(B, 2, dtype=torch.long), k, v)
    with pytest.raises(KVCacheError, match="cache holds 10 positions, 12 requested"):
        cache.write_range(1, 9, k, v)
    cache.advance(8)
    with pytest.raises(KVCacheError, match="cache holds 10 positions, 11 requested"):
        cache.append(0, k, v)
    with pytest.raises(KVCacheError, match="cache holds 10 positions, 13 requested"):
        cache.advance(5)
    with pytest.raises(KVCacheError, match="layer 1's values have shape"):
        KVCache.from_layers([k, k], [v, v[:, :, :2]])
    with pytest.raises(KVCacheError, match="key_mask must be"):
        KVCache.from_layers([k], [v], key_mask=torch.ones(B, 3))
    assert issubclass(KVCacheError, ValueError)


def test_block_cached_pass_on_every_row_equals_the_full_pass():
    torch.manual_seed(9)
    blk = Block(H * D, H).eval()
    x = torch.randn(B, 7, H * D)
    with torch.no_grad():
        full, k, v = blk.forward_kv(x)
        torch.testing.assert_close(full, blk(x), atol=1e-6, rtol=1e-6)
        cache = KVCache.from_layers([k.contiguous()], [v.contiguous()])
        rows = torch.tensor([[0, 3, 6], [5, 1, 2]])
        part = blk.forward_cached(torch.gather(x, 1, rows[..., None].expand(-1, -1, H * D)), cache, 0, rows)
    torch.testing.assert_close(part, torch.gather(full, 1, rows[..., None].expand(-1, -1, H * D)),
                               atol=1e-5, rtol=1e-5)


def test_causal_attention_appends_only():
    vim = VIM(seq_len=8, codebook_size=16, num_classes=2, embed_dim=H * D, depth=1, num_heads=H).eval()
    cache = vim.new_cache(B)
    attn = vim.blocks[0].attn
    with pytest.raises(ValueError, match="takes no slots"):
        attn.attend_cached(torch.randn(B, 1, H * D), cache, 0, torch.zeros(B, 1, dtype=torch.long))
    with torch.no_grad():
        vim.step(torch.zeros(B, 2, dtype=torch.long), cache)
    assert cache.length == 2
    with pytest.raises(ValueError, match="several only on an empty cache"):
        attn.attend_cached(torch.randn(B, 2, H * D), cache, 0)


def test_mage_cached_passes_and_vim_share_the_cache_class():
    torch.manual_seed(0)
    model = mage_fast.mage_vit_tiny().eval()
    L = model.seq_len
    for drop in ("none", "train", "all"):
        net = DecodeMode(drop=drop, refresh_every=2).build(model, [L, L - 20], torch.arange(2))
        ids = torch.full((2, L), model.mask_token_label)
        with torch.no_grad():
            net(ids, None, 0)
            ids[:, :20] = 1
            net(ids, None, 1)
        assert type(net.state.enc) is KVCache and type(net.state.dec) is KVCache
        assert net.state.enc.depth == len(model.blocks) and net.state.dec.depth == len(model.decoder_blocks)
        assert (net.state.enc.key_mask is not None) == (drop == "train")
    vim = VIM(seq_len=8, codebook_size=16, num_classes=2, embed_dim=H * D, depth=2, num_heads=H)
    assert type(vim.new_cache(1)) is KVCache


def test_no_module_splits_an_attention_projection_from_outside():
    """Only the attention modules call their own ``_qkv``: cached passes go through the blocks."""
    root = pathlib.Path(mage_fast.__file__).parent
    outside = []
    for path in root.rglob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"(?<!self)\._qkv\(", line):
                outside.append(f"{path.relative_to(root)}:{n}")
    assert not outside, outside
