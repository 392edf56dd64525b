"""train/evaluate.py's probe pieces on a tiny random MAGE: features read after any encoder block,
the raw-pixel baseline on the tokenizer's reconstructions, and the seeded training subset."""
import json
import pathlib
import sys

import pytest
import torch
import torch.nn.functional as F

import mage_fast

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "train"))
import evaluate as ev  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return mage_fast.mage_vit_tiny().eval()


def _ids(model, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vqgan.n_embed, (n, model.seq_len), generator=g)


def test_block_features_follow_the_official_read_out(tiny):
    ids = _ids(tiny, 3)
    full = tiny._with_class_slot(ids, tiny.fake_class_label)
    with torch.no_grad():
        last = tiny.encode_ids(full, final_norm=False)[:, 1:].mean(1)
        first = tiny.blocks[0](tiny.token_emb(full))[:, 1:].mean(1)
    ln = lambda h: F.layer_norm(h, h.shape[-1:], eps=1e-6)  # noqa: E731
    depth = len(tiny.blocks)
    torch.testing.assert_close(ev.mage_features(tiny, ids), ln(last))
    torch.testing.assert_close(ev.mage_features(tiny, ids, block=depth), ln(last))
    torch.testing.assert_close(ev.mage_features(tiny, ids, block=1), ln(first))
    assert not torch.allclose(ln(first), ln(last), atol=1e-3)
    for bad in (0, depth + 1):
        with pytest.raises(ValueError, match=f"block must be in \\[1, {depth}\\]"):
            ev.mage_features(tiny, ids, block=bad)


def test_token_pixel_features_are_the_clamped_reconstruction(tiny):
    ids = _ids(tiny, 2, seed=1)
    x = ev.token_pixel_features(tiny, ids)
    g = tiny.token_grid
    with torch.no_grad():
        rec = tiny.vqgan.decode_code(ids.view(2, g, g))
    assert x.shape == (2, tiny.img_size ** 2)
    assert float(x.min()) >= 0 and float(x.max()) <= 1
    torch.testing.assert_close(x, rec[:, 0].clamp(0, 1).flatten(1))


def test_subset_is_seeded_and_shared():
    assert torch.equal(ev.subset(10), torch.arange(10)) and torch.equal(ev.subset(10, 50), torch.arange(10))
    a, b = ev.subset(100, 7), ev.subset(100, 7)
    assert torch.equal(a, b) and len(a) == 7 and len(set(a.tolist())) == 7
    assert not torch.equal(a, torch.arange(7))  # a permutation, not the class-sorted head of a folder


def test_cli_block_and_token_pixels(tiny, tmp_path):
    ckpt, cache = tmp_path / "tiny.pth", tmp_path / "cache.pt"
    torch.save({"model": tiny.state_dict()}, ckpt)
    ids = _ids(tiny, 30, seed=2)
    torch.save({"ids": ids[:, None].to(torch.int16), "labels": torch.arange(30) % 3}, cache)
    out = tmp_path / "res.jsonl"
    common = ["--ckpt", str(ckpt), "--train_cache", str(cache), "--test_cache", str(cache), "--train_limit", "20"]
    ev.main(["--json", str(out), "probe", *common, "--block", "1", "--fewshot", "1", "2"])
    ev.main(["--json", str(out), "token_pixels", *common])
    probe, pixels = [json.loads(line) for line in out.read_text().splitlines()]
    assert probe["block"] == 1 and probe["dim"] == tiny.blocks[0].norm1.normalized_shape[0] and probe["train_n"] == 20
    assert pixels["dim"] == tiny.img_size ** 2 and pixels["train_n"] == 20 and pixels["test_n"] == 30
    assert 0 <= probe["test_accuracy"] <= 1 and 0 <= pixels["test_accuracy"] <= 1
    assert set(probe["few_shot"]) == {"1", "2"} and len(probe["few_shot"]["2"]["runs"]) == 5
    assert "few_shot" not in pixels
    with pytest.raises(SystemExit, match="--fewshot takes images per class >= 1"):
        ev.main(["probe", *common, "--fewshot", "5", "0"])
    with pytest.raises(SystemExit, match="--block must be in"):
        ev.main(["probe", *common, "--block", "9"])
