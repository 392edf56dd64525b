"""Recognition and quality metrics: exact formulas on synthetic data, the CLI on a tiny folder."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mage_fast
from mage_fast.cli import main
from mage_fast.eval import (LARS, few_shot, fid_inception, frechet_distance, gaussian_stats, linear_probe,
                            param_groups_lrd)


def test_frechet_distance_closed_form():
    torch.manual_seed(0)
    a, b = torch.rand(6, dtype=torch.float64) + 0.1, torch.rand(6, dtype=torch.float64) + 0.1
    mu1, mu2 = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    expect = (mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum()
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(float(expect), rel=1e-9)
    # rotation-invariant, and zero against itself for a full covariance
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))
    s1 = q @ torch.diag(a.double()) @ q.t()
    s2 = q @ torch.diag(b.double()) @ q.t()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(float(expect), rel=1e-7)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-9


def test_gaussian_stats_match_torch_cov():
    x = torch.randn(50, 4)
    mu, cov = gaussian_stats(x)
    torch.testing.assert_close(mu, x.double().mean(0))
    torch.testing.assert_close(cov, torch.cov(x.double().t()))


def _blobs(n_per, classes=4, dim=16, sep=4.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * sep
    y = torch.arange(classes).repeat_interleave(n_per)
    return centers[y] + torch.randn(len(y), dim, generator=g), y


def test_linear_probe_and_few_shot_learn_separable_features():
    xtr, ytr = _blobs(60)
    xte, yte = _blobs(30, seed=0)  # same centres and distribution (a fresh draw of 30 per class)
    # LARS steps are relative to the weight norm (trust 1e-3): a short run needs a large base lr
    r = linear_probe(xtr, ytr, xte, yte, epochs=30, batch_size=32, warmup_epochs=2, blr=50.0)
    assert r["top1"] > 0.95
    fs = few_shot(xtr, ytr, xte, yte, shots=(1, 5), seeds=(0, 1, 2))
    assert set(fs) == {1, 5} and len(fs[5]["runs"]) == 3
    assert fs[5]["mean"] > 0.9 and fs[5]["mean"] >= fs[1]["mean"] - 0.05
    # shuffled labels carry no signal: near chance
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))
    fs_bad = few_shot(xtr, ytr[perm], xte, yte[torch.randperm(len(yte))], shots=(5,), seeds=(0, 1))
    assert fs_bad[5]["mean"] < 0.5
    with pytest.raises(ValueError, match="fewer than k=100"):
        few_shot(xtr, ytr, xte, yte, shots=(100,), seeds=(0,))


def test_one_logistic_regression_fit_serves_both_probes():
    """few_shot (nn.Linear's weight layout) and train/evaluate.py's linear probe ((D, K)) share one
    L-BFGS fit; its two layouts solve the same problem (they differ only in rounding), and
    logistic_regression is that fit as an nn.Linear, bit for bit."""
    from mage_fast.eval import fit_logistic_regression, logistic_regression
    x, y = _blobs(20)
    x = (x - x.mean(0)) / x.std(0)
    w, b = fit_logistic_regression(x, y, 4, 1e-3)
    w_lin, b_lin = fit_logistic_regression(x, y, 4, 1e-3, linear_layout=True)
    assert w.shape == w_lin.shape == (x.shape[1], 4) and b.shape == (4,)
    torch.testing.assert_close(w_lin, w, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(b_lin, b, atol=1e-3, rtol=1e-3)
    assert torch.equal((x @ w + b).argmax(1), y)
    clf = logistic_regression(x, y, 4, 1e-3)
    assert torch.equal(clf.weight, w_lin.t()) and torch.equal(clf.bias, b_lin)


def test_lars_decreases_loss():
    torch.manual_seed(0)
    x, y = _blobs(20)
    lin = torch.nn.Linear(16, 4, bias=False)
    opt = LARS(lin.parameters(), lr=10.0)  # trust ratio 1e-3: a relative step of about 1 %
    losses = []
    for _ in range(50):
        loss = torch.nn.functional.cross_entropy(lin(x), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


def test_layer_decay_groups():
    torch.manual_seed(0)
    m = mage_fast.mage_vit_tiny()
    groups = param_groups_lrd(m, weight_decay=0.05, layer_decay=0.5)
    scale = {}
    for g in groups:
        for p in g["params"]:
            scale[id(p)] = (g["lr_scale"], g["weight_decay"])
    named = dict(m.named_parameters())
    n = len(m.blocks)
    assert scale[id(named["token_emb.word_embeddings.weight"])] == (0.5 ** (n + 1), 0.05)
    assert scale[id(named["blocks.0.attn.qkv.weight"])] == (0.5 ** n, 0.05)
    assert scale[id(named["blocks.1.attn.qkv.bias"])] == (0.5 ** (n - 1), 0.0)
    assert scale[id(named["norm.weight"])] == (1.0, 0.0)
    assert id(named["decoder_embed.weight"]) not in scale and id(named["vqgan.quantize.embedding.weight"]) not in scale


def test_fid_needs_user_weights(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        fid_inception(str(tmp_path), str(tmp_path), None)
    with pytest.raises(FileNotFoundError, match="Inception weights not found"):
        fid_inception(str(tmp_path), str(tmp_path), str(tmp_path / "nope.pth"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 3)):
        for c, color in enumerate(((220, 40, 40), (40, 40, 220))):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                arr = np.clip(np.array(color) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    torch.manual_seed(0)
    torch.save({"model": mage_fast.mage_vit_tiny().state_dict()}, root / "tiny.pth")
    return root


def test_cli_eval_fewshot_and_probe(folder, tmp_path, capsys):
    common = ["--ckpt", str(folder / "tiny.pth"), "--train-dir", str(folder / "train"), "--test-dir",
              str(folder / "test"), "--cache-dir", str(tmp_path / "cache"), "--batch-size", "4"]
    assert main(["eval", "fewshot", *common, "--shots", "1", "5", "--seeds", "2", "--json", str(tmp_path / "fs.json")]) == 0
    out = capsys.readouterr().out
    assert "5-shot logistic regression" in out and os.path.isfile(tmp_path / "fs.json")
    assert len(os.listdir(tmp_path / "cache")) == 2  # features cached once per split
    assert main(["eval", "probe", *common, "--epochs", "5", "--blr", "50"]) == 0
    assert "linear probe (official head, LARS)" in capsys.readouterr().out


def test_offline_frechet_on_folders(folder, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="offline Frechet needs efficientnet-lite-pytorch "
                                                            "(a [test] extra)")
    from mage_fast.eval import offline_frechet
    a = str(folder / "train" / "class0")
    same = offline_frechet(a, a, progress=False)["frechet_efficientnet_lite0"]
    diff = offline_frechet(a, str(folder / "train" / "class1"), progress=False)["frechet_efficientnet_lite0"]
    assert abs(same) < 1e-3 and diff > 1.0 and not math.isnan(diff)
    # a reference-statistics cache: written once, reused for the same files, redone for others
    cache = str(tmp_path / "ref.pt")
    first = offline_frechet(a, str(folder / "train" / "class1"), progress=False, ref_cache=cache)
    assert os.path.isfile(cache) and first["frechet_efficientnet_lite0"] == pytest.approx(diff, rel=1e-9)
    st = torch.load(cache, weights_only=True)
    torch.save(dict(st, mu=st["mu"] + 1.0), cache)  # a stale cache for the same files would be used as is
    shifted = offline_frechet(a, str(folder / "train" / "class1"), progress=False, ref_cache=cache)
    assert shifted["frechet_efficientnet_lite0"] > diff + 100  # ... so the cache was read, not recomputed
    again = offline_frechet(a, a, progress=False, ref_cache=cache)  # other files: recomputed, overwritten
    assert abs(again["frechet_efficientnet_lite0"]) < 1e-3


def test_frechet_distance_survives_an_eigensolver_that_fails_to_converge(monkeypatch):
    """LAPACK's eigh can fail on the rank-deficient covariances of few samples (seen in CI with 20
    samples of 1280 features): the distance retries with a negligible diagonal offset."""
    from mage_fast.eval import frechet
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(20, 64, generator=g), torch.randn(20, 64, generator=g) + 0.5
    want = frechet.frechet_distance(*frechet.gaussian_stats(a), *frechet.gaussian_stats(b))
    real, calls = torch.linalg.eigh, []

    def flaky(m):
        calls.append(1)
        if len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(m)
    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    got = frechet.frechet_distance(*frechet.gaussian_stats(a), *frechet.gaussian_stats(b))
    assert len(calls) == 3 and got == pytest.approx(want, rel=1e-6)
    calls.clear()
    monkeypatch.setattr(torch.linalg, "eigh", lambda m: (_ for _ in ()).throw(torch.linalg.LinAlgError("no")))
    psd = frechet.frechet_distance(*frechet.gaussian_stats(a), *frechet.gaussian_stats(b))  # through the SVD
    assert psd == pytest.approx(want, rel=1e-6)

