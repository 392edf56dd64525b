"""Class agreement: the Fashion-MNIST classifier trained on the real training split, its cache,
the scoring of generated images, and benchmarks/class_agreement.py."""
import json
import os
import subprocess
import sys

import pytest
import torch

from mage_fast.eval import agreement as ag

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fmnist = pytest.mark.skipif(not os.path.isfile(os.path.join(ag.FMNIST_DIR, "train-images-idx3-ubyte.gz")),
                                  reason="needs Debian's dataset-fashion-mnist (make test installs it)")


@needs_fmnist
def test_classifier_learns_from_real_images_and_is_cached(tmp_path):
    torch.manual_seed(123)  # the caller's RNG state: neither read nor advanced by the training
    before = torch.get_rng_state()
    net, scores = ag.train_classifier(epochs=2, limit=3000, cache_dir=str(tmp_path), progress=False)
    assert torch.equal(torch.get_rng_state(), before)
    assert scores["train_images"] == 3000 and 0.7 < scores["test_accuracy"] <= 1
    assert len(scores["test_per_class"]) == 10
    (cached,) = os.listdir(tmp_path)
    net2, again = ag.train_classifier(epochs=2, limit=3000, cache_dir=str(tmp_path), progress=False)
    assert again == scores
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    (tmp_path / cached).write_bytes(b"cut short")  # an unreadable cache is trained again, not a crash
    torch.rand(7)  # another RNG state: the same classifier, trained again from `seed` alone
    _, third = ag.train_classifier(epochs=2, limit=3000, cache_dir=str(tmp_path), progress=False)
    assert third == scores
    # real test images of each class, as generated images would come (3 channels, 32 px padded)
    x, y = ag.load_split("test")
    imgs = torch.nn.functional.pad(x[:500], (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    res = ag.sample_agreement(net, imgs, y[:500])
    assert res["mean"] > 0.5 and sum(map(sum, res["confusion"])) == 500


def test_classifier_input_crops_rounds_and_greys():
    imgs = torch.rand(2, 3, 32, 32) * 1.2 - 0.1
    x = ag.to_classifier_input(imgs)
    assert x.shape == (2, 1, 28, 28)
    want = imgs.clamp(0, 1).mul(255).round().div(255).mean(1, keepdim=True)[..., 2:30, 2:30]
    assert torch.allclose(x, want)
    assert ag.to_classifier_input(torch.rand(1, 3, 64, 64)).shape == (1, 1, 28, 28)


def test_agreement_counts_each_class_by_what_it_asked_for():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 0])
    res = ag.agreement_of(pred, labels, 3)
    assert res["per_class"] == [0.5, 1.0, 0.0] and res["mean"] == pytest.approx(0.5)
    assert res["confusion"] == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]


@needs_fmnist
def test_class_agreement_script_on_the_shipped_model(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import functools

    import class_agreement
    monkeypatch.setattr(ag, "train_classifier", functools.partial(ag.train_classifier, limit=3000, epochs=1,
                                                                  cache_dir=str(tmp_path / "clf"), progress=False))
    out = tmp_path / "a.json"
    class_agreement.main(["--per-class", "1", "--batch-size", "10", "--num-iter", "4", "--threads", "1",
                          "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["settings"]["num_iter"] == 4 and res["settings"]["per_class"] == 1
    assert len(res["agreement"]["per_class"]) == 10 and set(res["agreement"]["per_class"]) <= {0.0, 1.0}
    assert res["agreement_over_accuracy"] == pytest.approx(res["agreement"]["mean"] / res["classifier"]["test_accuracy"])


@pytest.mark.parametrize("argv, word", [(["--per-class", "0"], "--per-class"), (["--guidance", "-1"], "--guidance"),
                                        (["--ckpt", "/nonexistent.pt"], "not found"),
                                        (["--mode", "bogus", "--per-class", "1"], "--mode")])
def test_class_agreement_script_refuses_bad_input_in_one_line(argv, word):
    p = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "class_agreement.py"), *argv],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and word in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
