"""Decoding modes (mage_fast.decoding): what each network-pass strategy must reproduce."""
import pytest
import torch

import mage_fast
from mage_fast.decoding import MODES, DecodeMode, encode_dropped, mode_name, resolve_mode, run_counts
from mage_fast.decoding.modes import drop_mask_for, first_true
from mage_fast.ops import decode_step_ref, image_keys
from mage_fast.sampling import TEMPERATURE_ANNEALING, decode_loop, schedule_from


def _has_torchao():
    try:
        import torchao  # noqa: F401
        return True
    except ImportError:
        return False


needs_torchao = pytest.mark.skipif(not _has_torchao(), reason="torchao not installed (the 'quant' extra)")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = mage_fast.mage_vit_tiny().eval()
    with torch.no_grad():  # random weights, scaled up so the logits depend clearly on the input
        for p in m.parameters():
            if p.dim() == 2 and p.requires_grad:
                p.mul_(2.0)
    return m


def _partly_known(model, B, n_known, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = model.seq_len
    ids = torch.full((B, L), model.mask_token_label)
    for b in range(B):
        pos = torch.randperm(L, generator=g)[:n_known]
        ids[b, pos] = torch.randint(0, model.codebook_size, (n_known,), generator=g)
    return ids


def test_exact_is_the_default_and_refresh_every_step_equals_exact(tiny):
    kw = dict(num_iter=6, temperature=4.5, return_ids=True)
    _, ref = mage_fast.generate(tiny, 3, rng="torch", **kw)
    _, same = mage_fast.generate(tiny, 3, rng="torch", mode="exact", **kw)
    assert torch.equal(ref, same)
    for drop in ("none",):
        _, ids = mage_fast.generate(tiny, 3, rng="torch", mode=DecodeMode(drop=drop, refresh_every=1), **kw)
        assert torch.equal(ids, ref)
    # the training-matched drop with a cache refreshed every step is drop_train (same drawn drops)
    _, train = mage_fast.generate(tiny, 3, rng="torch", mode="drop_train", **kw)
    _, train_cached = mage_fast.generate(tiny, 3, rng="torch", mode=DecodeMode(drop="train", refresh_every=1), **kw)
    assert torch.equal(train_cached, train) and not torch.equal(train, ref)
    _, off = mage_fast.generate(tiny, 2, rng="official", **kw)
    _, off_cached = mage_fast.generate(tiny, 2, rng="official", mode=DecodeMode(refresh_every=1), **kw)
    assert torch.equal(off, off_cached)
    # a cache that is never refreshed after step 0 does change the result (the cached path runs)
    _, stale = mage_fast.generate(tiny, 3, rng="torch", mode=DecodeMode(refresh_every=6), **kw)
    assert not torch.equal(stale, ref)


def test_refresh_every_step_equals_exact_with_guidance(tiny):
    kw = dict(num_iter=5, temperature=2.0, return_ids=True, rng="torch", class_ids=torch.tensor([3, 7]),
              guidance_scale=1.5)
    _, ref = mage_fast.generate(tiny, 2, **kw)
    _, ids = mage_fast.generate(tiny, 2, mode=DecodeMode(refresh_every=1), **kw)
    assert torch.equal(ids, ref)


@pytest.mark.parametrize("drop", ["none", "train", "all"])
def test_cached_pass_on_unchanged_input_equals_full_pass(tiny, drop):
    """Keys/values cached from the same input: the cached pass recomputes only the fresh rows, and
    must give the full pass's logits at every masked row (this checks slots, gathers and scatters)."""
    ids = _partly_known(tiny, 3, 90)
    m = int((ids[0] == tiny.mask_token_label).sum())
    with torch.no_grad():
        exact = tiny.code_logits(ids)
        net = DecodeMode(drop=drop, refresh_every=2).build(tiny, [m, m])
        full = net(ids, None, 0)
        cached = net(ids, None, 1)  # nothing changed since the full pass: zero tokens fixed
    masked = ids == tiny.mask_token_label
    if drop == "none":
        assert torch.equal(full[masked], exact[masked]) or torch.allclose(full[masked], exact[masked], atol=1e-5)
    torch.testing.assert_close(cached[masked], full[masked], atol=2e-5, rtol=1e-4)
    assert torch.count_nonzero(cached[~masked]) == 0


def test_cached_train_drop_fills_dropped_slots_and_replaces_kept_masked_ones(tiny):
    """drop='train' with a cache: the encoder cache holds every position at its own slot, the
    dropped ones hidden. With a one-block encoder nothing in the cache is stale, so the cached pass
    after new tokens must give, at the class slot and the new tokens, exactly the encoder on what
    the cache then holds: the full pass's kept tokens with the new tokens in place (whether their
    position was kept as a mask token or dropped)."""
    import copy
    m1 = copy.deepcopy(tiny)
    m1.blocks = m1.blocks[:1]
    B, L, n_new = 2, tiny.seq_len, 40
    ids0 = _partly_known(m1, B, 60, seed=3)
    masked0 = ids0 == m1.mask_token_label
    m = int(masked0[0].sum())
    new = first_true(masked0, n_new)
    ids1 = ids0.clone()
    ids1.scatter_(1, new, torch.randint(0, m1.codebook_size, new.shape, generator=torch.Generator().manual_seed(4)))
    keys = torch.arange(B)
    with torch.no_grad():
        net = DecodeMode(drop="train", refresh_every=2).build(m1, [m, m - n_new], keys)
        net(ids0, None, 0)
        net(ids1, None, 1)
        dropped0 = drop_mask_for(masked0, 128, keys, 0)
        full1 = m1._with_class_slot(ids1, m1.fake_class_label)
        for b in range(B):
            was_dropped = dropped0[b, new[b]]
            assert was_dropped.any() and not was_dropped.all()  # both kinds of slot are exercised
            seen = torch.cat([torch.ones(1, dtype=torch.bool), ~dropped0[b]])
            seen[new[b] + 1] = True
            h, keep, _, _ = encode_dropped(m1, full1[b:b + 1], ~seen[None], int(seen.sum()))
            ref = torch.zeros(L + 1, net.state.E.shape[-1])
            ref[keep[0]] = m1.decoder_embed(h)[0]
            rows = torch.cat([torch.zeros(1, dtype=torch.long), new[b] + 1])
            torch.testing.assert_close(net.state.E[b, rows], ref[rows], atol=2e-5, rtol=1e-4)


def test_cached_pass_after_new_tokens_matches_full_pass_of_new_input(tiny):
    """Step i fixes tokens; the cached pass at i+1 recomputes the new tokens and all masked rows.
    With an encoder and decoder of depth 2 only the known tokens' stale keys/values differ from a
    full pass, so the logits stay close (and are not identical: the cache really was reused)."""
    ids0 = _partly_known(tiny, 2, 60, seed=1)
    ids1 = ids0.clone()
    masked0 = ids0 == tiny.mask_token_label
    new = first_true(masked0, 10)
    ids1.scatter_(1, new, torch.randint(0, 1024, new.shape, generator=torch.Generator().manual_seed(2)))
    with torch.no_grad():
        net = DecodeMode(refresh_every=2).build(tiny, [196, 186])
        net(ids0, None, 0)
        cached = net(ids1, None, 1)
        exact = tiny.code_logits(ids1)
    m1 = ids1 == tiny.mask_token_label
    err = (cached[m1] - exact[m1]).norm() / exact[m1].norm()
    assert 0 < err < 0.2


def test_encode_dropped_equals_official_forward_encoder(official_tiny, fixture_data):
    """The drop modes' encoder, given the official token_drop_mask, is the official forward_encoder."""
    d = fixture_data
    model = official_tiny
    gt, drop, allm = d["vq_indices"], d["train_token_drop_mask"].bool(), d["train_token_all_mask"].bool()
    ids = torch.where(allm[:, 1:], model.mask_token_label, gt)
    full = torch.cat([torch.full_like(ids[:, :1], model.fake_class_label), ids], 1)
    num_keep = full.shape[1] - int(drop[0].sum())
    with torch.no_grad():
        latent, keep, _, _ = encode_dropped(model, full, drop, num_keep)
        ours_official_api = model.forward_encoder(d["images"], d["train_token_drop_mask"], d["train_token_all_mask"])[0]
    assert latent.shape == (2, 129, 64)
    assert torch.equal(latent, ours_official_api)
    torch.testing.assert_close(latent, d["train_latent"], atol=1e-5, rtol=1e-4)


def test_drop_train_pass_equals_official_encoder_and_decoder(official_tiny):
    """A drop='train' network pass equals forward_encoder + forward_decoder with the same masks."""
    model = official_tiny
    ids = _partly_known(model, 2, 40, seed=3)
    masked = ids == model.mask_token_label
    keys = torch.tensor([11, 12])
    with torch.no_grad():
        logits = DecodeMode(drop="train").build(model, [216], keys)(ids, None, 0)
        drop = drop_mask_for(masked, 128, keys, 0)
        z = torch.zeros_like(drop[:, :1])
        drop_f, allm_f = torch.cat([z, drop], 1).float(), torch.cat([z, masked], 1).float()
        h, _, _ = model.encode_masked(torch.where(masked, 0, ids), drop_f, allm_f)
        ref = model.forward_decoder(h, drop_f, allm_f)[:, 1:, :1024]
    torch.testing.assert_close(logits[masked], ref[masked], atol=1e-5, rtol=1e-5)


def test_drop_mask_is_a_random_subset_of_the_masked_tokens():
    g = torch.Generator().manual_seed(0)
    masked = torch.rand(4, 256, generator=g) < 0.7
    n = int(masked.sum(1).min())
    keys = torch.tensor([1, 2, 3, 4])
    d0 = drop_mask_for(masked, n - 5, keys, 0)
    assert bool((d0 <= masked).all()) and d0.sum(1).tolist() == [n - 5] * 4
    assert not torch.equal(d0, drop_mask_for(masked, n - 5, keys, 1))  # a new draw each step
    assert not torch.equal(d0[0], d0[1])  # and per image


@pytest.mark.parametrize("name", ["drop_train", "drop_all"])
def test_drop_modes_generate_valid_ids(tiny, name):
    _, ids = mage_fast.generate(tiny, 2, num_iter=6, temperature=4.5, rng="torch", mode=name, return_ids=True)
    assert ids.shape == (2, 256) and int(ids.max()) < 1024 and int(ids.min()) >= 0


# Tolerances of the low-precision passes, per shipped model: relative L2 error of the code logits at
# masked rows against fp32, and the least share of masked rows whose top code is fp32's. int8:
# Linear layers only; bf16: the whole pass. The 256-token model's 1024-code logits are flatter than
# the 49-token model's, so a small error flips more top codes (what the yardstick's Frechet measures).
LOW_PRECISION_TOL = {("mage_fmnist", "int8"): (0.05, 0.9), ("mage_fmnist", "bf16"): (0.05, 0.9),
                     ("mage_fmnist256", "int8"): (0.06, 0.8), ("mage_fmnist256", "bf16"): (0.05, 0.9)}
SHIPPED = ["mage_fmnist256", "mage_fmnist"]


def _shipped_pass(*modes, name=None):
    """A shipped model's (default: the CLI's) exact code logits on partly known ids and those of
    ``modes``, with the masked positions: (ref, [logits per mode], masked)."""
    from mage_fast.cli import load_model
    model, _ = load_model(name, None)
    model.eval()
    ids = _partly_known(model, 4, 20, seed=4)
    masked = ids == model.mask_token_label
    m = int(masked[0].sum())
    cls = model.class_token_ids(torch.tensor([0, 3, 5, 9]))
    with torch.no_grad():
        ref = model.code_logits(ids, cls)
        outs = [mode.build(model, [m])(ids, cls, 0) for mode in modes]
    assert next(model.parameters()).dtype == torch.float32  # the model is untouched
    return ref, outs, masked


def _rel_err(a, ref, masked) -> float:
    return ((a[masked] - ref[masked]).norm() / ref[masked].norm()).item()


@needs_torchao
@pytest.mark.parametrize("name", SHIPPED)
def test_int8_logits_within_tolerance_of_fp32(name):
    ref, (q, fp), masked = _shipped_pass(DecodeMode(quant="int8"), DecodeMode(drop="none", refresh_every=1),
                                         name=name)
    rel_tol, top1 = LOW_PRECISION_TOL[name, "int8"]
    assert 0 < _rel_err(q, ref, masked) < rel_tol
    assert _rel_err(fp, ref, masked) < 1e-5
    # the same top code at most masked rows
    assert (q[masked].argmax(-1) == ref[masked].argmax(-1)).float().mean() > top1


@pytest.mark.parametrize("name", SHIPPED)
def test_bf16_logits_within_tolerance_of_fp32(name):
    ref, (q,), masked = _shipped_pass(DecodeMode(quant="bf16"), name=name)
    rel_tol, top1 = LOW_PRECISION_TOL[name, "bf16"]
    assert q.dtype == torch.float32
    assert 0 < _rel_err(q, ref, masked) < rel_tol
    assert (q[masked].argmax(-1) == ref[masked].argmax(-1)).float().mean() > top1


@pytest.mark.parametrize("name", sorted(MODES))
def test_mode_loop_traces_as_one_graph(tiny, name):
    """The whole sampling loop, in each mode, traces with fullgraph=True (no graph break, no host
    sync) and gives the eager result."""
    if MODES[name].quant in ("int8", "fp8") and not _has_torchao():
        pytest.skip("torchao not installed")
    T, B = 5, 1
    _, mask_lens = schedule_from(T, 256, 256)
    keys = image_keys(0, torch.arange(B))

    def loop(net, ids):
        return decode_loop(tiny, net, ids, range(T), num_iter=T, mask_lens=mask_lens, temperature=4.5,
                           anneal=TEMPERATURE_ANNEALING["linear"], rng="torch", keys=keys,
                           ac=torch.autocast("cpu", enabled=False))[0]

    ids = torch.full((B, 256), tiny.mask_token_label)
    torch._dynamo.reset()
    with torch.no_grad():
        choice = [(s, 4.5 * TEMPERATURE_ANNEALING["linear"]((s + 1) / T)) for s in range(T)]  # focus by the sampler
        ref = loop(MODES[name].build(tiny, run_counts(256, mask_lens), keys, choice), ids)
        compiled = torch.compile(loop, fullgraph=True, backend="eager")
        out = compiled(MODES[name].build(tiny, run_counts(256, mask_lens), keys, choice), ids)
    assert torch.equal(ref, out)


def test_unknown_mode_and_bad_settings_raise(tiny):
    with pytest.raises(ValueError, match="unknown decoding mode"):
        mage_fast.generate(tiny, 1, num_iter=2, mode="fastest")
    with pytest.raises(ValueError, match="drop"):
        DecodeMode(drop="some")
    with pytest.raises(ValueError, match="refresh_every"):
        DecodeMode(refresh_every=-1)
    with pytest.raises(ValueError, match="pixels"):
        resolve_mode("quant=bf16,pixels=int8")
    m = resolve_mode("refresh=4,quant=bf16,pixels=fp32")
    assert m == DecodeMode(refresh_every=4, quant="bf16", pixels="fp32") and m.pixel_dtype == torch.float32
    assert not m.is_exact and mode_name(m) == "drop=none,refresh=4,quant=bf16,pixels=fp32"
    assert MODES["cached_bf16"].pixel_dtype == torch.bfloat16 and MODES["cached"].pixel_dtype == torch.float32
    assert resolve_mode(mode_name(resolve_mode("quant=bf16,pixels=fp32"))) == resolve_mode("quant=bf16,pixels=fp32")


def test_focus_covering_every_masked_row_equals_plain_cached(tiny):
    """focus large enough to pick every masked row recomputes the same rows as focus=0 (in another
    order), so the logits agree; a small focus recomputes fewer rows and keeps stale logits."""
    T = 6
    _, mask_lens = schedule_from(T, 256, 256)
    counts = run_counts(256, mask_lens)
    keys = image_keys(0, torch.arange(2))
    noise = TEMPERATURE_ANNEALING["linear"]
    outs = {}
    for focus in (0, 1000, 1):
        net = DecodeMode(drop="all", refresh_every=3, focus=focus).build(tiny, counts, keys)
        ids, logs = torch.full((2, 256), tiny.mask_token_label), []
        with torch.no_grad():
            for i in range(T):
                logits = net(ids, None, i)
                masked = ids == tiny.mask_token_label
                logs.append(logits[masked].clone())
                if focus == 0:  # one trajectory for all three: the focus=0 one
                    _, ids = mage_fast.ops.decode_step(logits, ids, keys, i, mask_lens[i], 4.5 * noise((i + 1) / T),
                                                       tiny.mask_token_label)
                    outs.setdefault("ids", []).append(ids)
                else:
                    ids = outs["ids"][i]
        outs[focus] = logs
    for a, b in zip(outs[0], outs[1000]):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(outs[0], outs[1]))


class _RecordBuild:
    """A custom mode object: records what generate() hands its build()."""

    def __init__(self, mode):
        self.mode, self.calls = mode, []

    def build(self, model, counts, keys=None, choice=None):
        self.calls.append((list(counts), choice))
        return self.mode.build(model, counts, keys, choice)


def test_generate_hands_the_sampler_choice_to_the_pass(tiny):
    """rng='torch' with the confidence order: build() gets (step, temperature * anneal) per step,
    from the first step actually run (a partial start skips the schedule's first steps); the
    official sampler and the Halton order give None."""
    T, temp = 6, 3.0
    anneal = TEMPERATURE_ANNEALING["linear"]
    rec = _RecordBuild(MODES["cached_focus"])
    mage_fast.generate(tiny, 2, num_iter=T, temperature=temp, rng="torch", mode=rec)
    assert rec.calls[-1][1] == [(s, temp * anneal((s + 1) / T)) for s in range(T)]
    init = _partly_known(tiny, 2, 100)
    mage_fast.generate(tiny, 2, num_iter=T, temperature=temp, rng="torch", mode=rec, init_ids=init)
    counts, choice = rec.calls[-1]
    assert counts[0] == 156 and len(choice) == len(counts) < T and choice[0][0] == T - len(counts)
    mage_fast.generate(tiny, 2, num_iter=T, temperature=temp, rng="torch", mode=rec, order="halton")
    mage_fast.generate(tiny, 2, num_iter=T, rng="official", mode=rec)
    assert rec.calls[-2][1] is None and rec.calls[-1][1] is None


@pytest.mark.parametrize("drop", ["none", "train"])
def test_sampler_focus_recomputes_the_rows_the_sampler_would_fix_first(tiny, drop):
    """focus_by='sampler': at a cached step the recomputed masked rows are exactly the r rows a
    decode step on the last logits keeps (decode_step_ref with mask_len = masked - r, the same
    key, step and noise), and they differ from the largest-log-probability ranking."""
    T, B, temp = 6, 2, 4.5
    _, mask_lens = schedule_from(T, 256, 256)
    counts = run_counts(256, mask_lens)
    keys = image_keys(0, torch.arange(B))
    anneal = TEMPERATURE_ANNEALING["linear"]
    choice = [(s, temp * anneal((s + 1) / T)) for s in range(T)]
    mode = DecodeMode(drop=drop, refresh_every=3, focus=1)
    net = mode.build(tiny, counts, keys, choice)
    by_max = DecodeMode(drop=drop, refresh_every=3, focus=1, focus_by="max").build(tiny, counts, keys, choice)
    assert by_max.choice is None
    ids, checked, differ = torch.full((B, 256), tiny.mask_token_label), 0, 0
    with torch.no_grad():
        for i in range(T):
            stale = None if net.state is None or net.state.logits is None else net.state.logits.clone()
            logits = net(ids, None, i)
            by_max(ids, None, i)
            m, last = counts[i], i == T - 1
            if i % 3 and not last:
                r = min(m, counts[i] - counts[i + 1])
                _, keep = decode_step_ref(stale, ids, keys, i, m - r, choice[i][1], tiny.mask_token_label)
                want = (keep != tiny.mask_token_label) & (ids == tiny.mask_token_label)
                got = torch.zeros_like(want).scatter(1, net.focus_rows, True)
                assert torch.equal(got, want)
                checked += 1
                differ += not torch.equal(got, torch.zeros_like(want).scatter(1, by_max.focus_rows, True))
            _, ids = decode_step_ref(logits, ids, keys, i, mask_lens[i], choice[i][1], tiny.mask_token_label)
    assert checked == 3 and differ > 0


def test_mode_pixel_decode_matches_the_exact_tokenizer_decode():
    """The non-exact modes decode through a channels-last copy of the tokenizer: fp32 gives the
    exact decode's pixels to rounding, bf16 (quant='bf16') within 35 dB PSNR of them, and the
    model's own tokenizer is untouched."""
    from mage_fast.cli import load_model
    model, _ = load_model(None, None)
    model.eval()
    ids = torch.randint(0, model.codebook_size, (3, model.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model.decode_tokens(ids)
        fp = MODES["cached"].build(model, [1]).decode_images(ids)
        bf = MODES["bf16"].build(model, [1]).decode_images(ids, chunk=2)
        bf_px32 = resolve_mode("quant=bf16,pixels=fp32").build(model, [1]).decode_images(ids)
        px16 = resolve_mode("refresh=4,pixels=bf16").build(model, [1]).decode_images(ids, chunk=2)
    assert fp.dtype == bf.dtype == torch.float32 and fp.shape == bf.shape == ref.shape
    torch.testing.assert_close(fp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bf_px32, ref, atol=1e-5, rtol=1e-5)  # bf16 pass, fp32 pixels
    torch.testing.assert_close(px16, bf, atol=0, rtol=0)  # fp32 pass, bf16 pixels: the bf16 decode
    psnr = 10 * torch.log10(1.0 / (bf.clamp(0, 1) - ref.clamp(0, 1)).pow(2).mean())
    assert 35 < float(psnr) < 200, float(psnr)  # close, and really bf16
    assert next(model.vqgan.parameters()).dtype == torch.float32
    assert model.vqgan.decoder.conv_in.weight.is_contiguous()  # the model's layout is untouched


def test_halton_order_is_a_spread_permutation_and_fixes_tokens_in_it(tiny):
    from mage_fast.ops.decode_step import halton_ranks, halton_step
    rank = halton_ranks(16)
    assert sorted(rank.tolist()) == list(range(256))
    p = (rank < 16).nonzero().view(-1)  # the first 16 positions: no two neighbours
    y, x = p // 16, p % 16
    gap = torch.maximum((y[:, None] - y[None]).abs(), (x[:, None] - x[None]).abs()).fill_diagonal_(99)
    assert int(gap.min()) >= 2
    per_block = (rank < 64).view(4, 4, 4, 4).sum((1, 3))  # the first 64: 3-5 in every 4x4 block (4 on average)
    assert int(per_block.min()) >= 3 and int(per_block.max()) <= 5
    ids = torch.full((2, 256), tiny.mask_token_label)
    logits = torch.randn(2, 256, 1024, generator=torch.Generator().manual_seed(0))
    sampled, nxt = halton_step(logits, ids, torch.tensor([3, 4]), 0, 240, rank, tiny.mask_token_label)
    known = nxt != tiny.mask_token_label
    assert torch.equal(known, (rank < 16).expand(2, -1))  # the 16 earliest positions, whatever the logits
    assert torch.equal(nxt[known], sampled[known])
    _, ids = mage_fast.generate(tiny, 2, num_iter=6, temperature=4.5, rng="torch", order="halton", return_ids=True)
    assert ids.shape == (2, 256) and int(ids.max()) < 1024
    _, conf = mage_fast.generate(tiny, 2, num_iter=6, temperature=4.5, rng="torch", return_ids=True)
    assert not torch.equal(ids, conf)
    with pytest.raises(ValueError, match="order"):
        mage_fast.generate(tiny, 1, num_iter=2, rng="torch", order="random")
    with pytest.raises(ValueError, match="orders"):
        mage_fast.generate(tiny, 1, num_iter=2, rng="official", order="halton")


def test_halton_loop_traces_as_one_graph(tiny):
    from mage_fast.ops.decode_step import halton_ranks
    T = 4
    _, mask_lens = schedule_from(T, 256, 256)
    keys = image_keys(0, torch.arange(1))
    rank = halton_ranks(16)

    def loop(ids):
        return decode_loop(tiny, MODES["exact"].build(tiny, run_counts(256, mask_lens), keys), ids, range(T),
                           num_iter=T, mask_lens=mask_lens, temperature=4.5, anneal=TEMPERATURE_ANNEALING["linear"],
                           rng="torch", keys=keys, ac=torch.autocast("cpu", enabled=False), rank=rank)[0]

    ids = torch.full((1, 256), tiny.mask_token_label)
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.equal(loop(ids), torch.compile(loop, fullgraph=True, backend="eager")(ids))
