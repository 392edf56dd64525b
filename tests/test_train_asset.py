"""The shipped Fashion-MNIST models (mage_fast/assets/): the 256-token default (mage_fmnist256.pt,
32 px) and the 49-token one (mage_fmnist.pt, 28 px). Each loads strictly, is small, round-trips
through its tokenizer, and generates garment-sized images."""
import os

import pytest
import torch

import mage_fast
from mage_fast.models.checkpoint import build_from_checkpoint

ASSETS = os.path.join(os.path.dirname(mage_fast.__file__), "assets")
# name, image size, tokens (the class slot not counted)
SHIPPED = [("mage_fmnist256", 32, 256), ("mage_fmnist", 28, 49)]


@pytest.fixture(params=SHIPPED, ids=[n for n, _, _ in SHIPPED])
def asset(request):
    name, size, tokens = request.param
    return os.path.join(ASSETS, name + ".pt"), size, tokens


def test_the_default_is_the_256_token_model():
    import mage_fast.cli as cli
    assert cli.DEFAULT_CKPT == os.path.join(ASSETS, "mage_fmnist256.pt")


def test_asset_is_small_fp32_and_loads_strictly(asset):
    path, size, tokens = asset
    assert os.path.getsize(path) < 20 * 2 ** 20
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) >= {"model", "config"}
    assert all(v.dtype in (torch.float32, torch.int64) for v in raw["model"].values())
    model = build_from_checkpoint(path)
    assert model.img_size == size and model.seq_len == tokens


def test_asset_generates_and_reconstructs(asset):
    path, size, _ = asset
    model = build_from_checkpoint(path).eval()
    imgs = mage_fast.generate(model, 2, num_iter=4, temperature=4.5, seed=0)
    assert imgs.shape == (2, 3, size, size) and torch.isfinite(imgs).all()
    x = torch.zeros(1, 3, size, size)
    x[:, :, 6:22, 8:20] = 0.8  # a bright block on black, like a garment silhouette
    with torch.no_grad():
        z_q, _, _ = model.vqgan.encode(x)
        rec = model.vqgan.decode(z_q)
    assert float(((rec.clamp(0, 1) - x) ** 2).mean()) < 0.05


def test_asset_model_card_and_class_conditioning(asset):
    import json
    path = asset[0]
    from mage_fast.cli import resolve_class
    with open(os.path.splitext(path)[0] + ".json") as f:
        card = json.load(f)
    assert card["class_conditional"] is True and len(card["classes"]) == 10
    assert resolve_class("bag", path) == 8 and resolve_class("all", path) == "all"
    model = build_from_checkpoint(path).eval()
    kw = dict(num_iter=card["sampling"]["num_iter"], temperature=card["sampling"]["temperature"], seed=0,
              rng="torch", return_ids=True)
    _, trousers = mage_fast.generate(model, 4, class_ids=1, **kw)
    _, bags = mage_fast.generate(model, 4, class_ids=8, guidance_scale=1.0, **kw)
    _, uncond = mage_fast.generate(model, 4, **kw)
    # same random numbers, other class token: the decoded token grids differ
    assert (trousers != bags).float().mean() > 0.3 and (trousers != uncond).float().mean() > 0.1
