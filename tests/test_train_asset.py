"""The shipped Fashion-MNIST model (mage_fast/assets/mage_fmnist.pt): loads strictly, is small,
round-trips through the tokenizer, and generates garment-sized images."""
import os

import pytest
import torch

import mage_fast
from mage_fast.models.checkpoint import build_from_checkpoint

ASSET = os.path.join(os.path.dirname(mage_fast.__file__), "assets", "mage_fmnist.pt")
pytestmark = pytest.mark.skipif(not os.path.isfile(ASSET), reason="shipped model not present")


def test_asset_is_small_fp32_and_loads_strictly():
    assert os.path.getsize(ASSET) < 20 * 2 ** 20
    raw = torch.load(ASSET, map_location="cpu", weights_only=True)
    assert set(raw) >= {"model", "config"}
    assert all(v.dtype in (torch.float32, torch.int64) for v in raw["model"].values())
    model = build_from_checkpoint(ASSET)
    assert model.img_size == 28 and model.seq_len == 49


def test_asset_generates_and_reconstructs():
    model = build_from_checkpoint(ASSET).eval()
    imgs = mage_fast.generate(model, 2, num_iter=4, temperature=4.5, seed=0)
    assert imgs.shape == (2, 3, 28, 28) and torch.isfinite(imgs).all()
    x = torch.zeros(1, 3, 28, 28)
    x[:, :, 6:22, 8:20] = 0.8  # a bright block on black, like a garment silhouette
    with torch.no_grad():
        z_q, _, _ = model.vqgan.encode(x)
        rec = model.vqgan.decode(z_q)
    assert float(((rec.clamp(0, 1) - x) ** 2).mean()) < 0.05


def test_asset_model_card_and_class_conditioning():
    import json

    from mage_fast.__main__ import resolve_class
    with open(os.path.splitext(ASSET)[0] + ".json") as f:
        card = json.load(f)
    assert card["class_conditional"] is True and len(card["classes"]) == 10
    assert resolve_class("bag", ASSET) == 8 and resolve_class("all", ASSET) == "all"
    model = build_from_checkpoint(ASSET).eval()
    kw = dict(num_iter=card["sampling"]["num_iter"], temperature=card["sampling"]["temperature"], seed=0,
              rng="torch", return_ids=True)
    _, trousers = mage_fast.generate(model, 4, class_ids=1, **kw)
    _, bags = mage_fast.generate(model, 4, class_ids=8, guidance_scale=1.0, **kw)
    _, uncond = mage_fast.generate(model, 4, **kw)
    # same random numbers, other class token: the decoded token grids differ
    assert (trousers != bags).float().mean() > 0.3 and (trousers != uncond).float().mean() > 0.1
