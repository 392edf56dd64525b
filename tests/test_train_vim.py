"""ViT-VQGAN tokenizer training (train/train_tokenizer.py --arch vit), token caches made with it,
VIM stage-2 training (train/train_vim.py: real deepspeed launcher, exact resume after SIGKILL,
on-the-fly tokenization under ZeRO-3), the export loaders (build_tokenizer, load_vim) and the
VIM evaluation subcommands. Tiny configs: 16x16 images, 4x4 patches -> 16 tokens, 64 codes."""
import importlib.util
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from launch import DEEPSPEED, deepspeed_launcher, needs_deepspeed, ok, run
from mage_fast.models import ViTVQGAN
from mage_fast.models.checkpoint import (CheckpointError, build_tokenizer, load_vim, tokenizer_checksum,
                                         tokenizer_export)
from mage_fast.models.vit_vqgan import vit_vqgan_loss
from mage_fast.training.tokenizer import VQGANObjective
from mage_fast.vim_sampling import generate

needs_deepspeed_module = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                            reason="deepspeed is not installed")
VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, n_embed=64, code_dim=8)
VIT_ARGS = ["--arch", "vit", "--img_size", "16", "--patch_size", "4", "--embed_dim", "32", "--depth", "1",
            "--num_heads", "2", "--code_dim", "8", "--n_embed", "64"]
VIM_ARGS = ["--embed_dim", "32", "--depth", "2", "--num_heads", "2", "--no_progress", "--log_every", "1"]


def _metrics(path):
    with open(path) as f:
        header, *rows = f.read().splitlines()
    cols = header.split(",")
    return [dict(zip(cols, r.split(","))) for r in rows]


# ------------------------------------------------------------------ in-process pieces
def test_objective_trains_vit_vqgan_with_its_loss():
    torch.manual_seed(0)
    vq = ViTVQGAN(**VIT)
    obj = VQGANObjective(vq, l1_weight=0.5, codebook_weight=0.7)
    x = torch.rand(3, 3, 16, 16)
    loss, stats, rec = obj(x)
    ref_rec, vq_loss = vq(x)
    ref, _ = vit_vqgan_loss(x, ref_rec, vq_loss, l1_weight=0.5, vq_weight=0.7)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(rec, ref_rec.detach())
    assert {"recon_mse", "recon_l1", "quant_loss", "loss"} <= set(stats)
    assert obj.normalise_restarts and int(obj.usage.sum()) == 3 * 16
    loss.backward()
    assert vq.encoder.proj_in.weight.grad is not None and vq.quantize.embedding.weight.grad is not None


@needs_deepspeed_module
def test_cosine_restarts_land_on_normalised_encoder_outputs():
    torch.manual_seed(0)
    vq = ViTVQGAN(**VIT)
    with torch.no_grad():
        vq.quantize.embedding.weight.mul_(100.0)  # far from unit norm, so a restart is visible
    obj = VQGANObjective(vq)
    obj(torch.rand(2, 3, 16, 16))
    rep = obj.codebook_report()
    assert 0 < rep["codes_used"] <= 32 and 1.0 <= rep["perplexity"] <= rep["codes_used"] + 1e-4
    usage = rep.pop("_usage")
    before = vq.quantize.embedding.weight.detach().clone()
    n = obj.restart_dead_codes(usage, noise=0.0)
    dead = usage < 1
    assert n == int(dead.sum()) > 0 and float(obj.usage.sum()) == 0.0
    w = vq.quantize.embedding.weight.detach()
    torch.testing.assert_close(w[dead].norm(dim=1), torch.ones(n))  # normalised projected encoder outputs
    assert torch.equal(w[~dead], before[~dead])
    rows = {tuple(r) for r in obj.last_z.tolist()}
    assert all(tuple(r) in rows for r in w[dead].tolist())


def test_build_tokenizer_errors(tmp_path):
    vq = ViTVQGAN(**VIT)
    exp = {"state_dict": vq.state_dict(), "config": vq.config, "arch": "vit_vqgan"}
    rebuilt = build_tokenizer(exp)
    assert isinstance(rebuilt, ViTVQGAN) and not any(p.requires_grad for p in rebuilt.parameters())
    for k, v in vq.state_dict().items():
        assert torch.equal(v, rebuilt.state_dict()[k]), k
    with pytest.raises(CheckpointError, match="16px"):
        build_tokenizer(exp, img_size=32)
    with pytest.raises(CheckpointError, match="unknown tokenizer arch"):
        build_tokenizer(dict(exp, arch="dall_e"))
    with pytest.raises(CheckpointError, match="without its 'arch'"):
        build_tokenizer({"state_dict": vq.state_dict()})
    from mage_fast.models import VIM
    vim = VIM(seq_len=16, codebook_size=64, num_classes=3, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(CheckpointError, match="VIM stage-2"):
        build_tokenizer({"state_dict": vim.state_dict()})
    with pytest.raises(CheckpointError, match="not a train/train_vim.py export"):
        load_vim({"state_dict": vq.state_dict()})
    torch.save({"epoch": 3}, tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="junk.pt is not a tokenizer checkpoint"):
        build_tokenizer(str(tmp_path / "junk.pt"))
    with pytest.raises(FileNotFoundError):
        build_tokenizer(str(tmp_path / "missing.pt"))


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        os.makedirs(root / c)
        for i in range(8):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def vit_tokenizer(tmp_path_factory):
    """A ViT-VQGAN trained 4 steps under the real launcher (ZeRO-2, patch-GAN, dead-code restarts)."""
    if DEEPSPEED is None:
        pytest.skip("deepspeed is not installed (a [test] extra)")
    out = tmp_path_factory.mktemp("vit_tok")
    proc = run(["--num_gpus", "1", "--master_port", "29621", "train/train_tokenizer.py", *VIT_ARGS, "--synthetic",
                 "--synthetic_length", "32", "--batch_size", "4", "--max_steps", "4", "--restart_every", "2",
                 "--disc_weight", "0.1", "--disc_start", "1", "--log_every", "2", "--num_workers", "0",
                 "--no_progress", "--deepspeed_config", "zero2", "--output_dir", str(out),
                 "--export", str(out / "tok.pt")], launcher=deepspeed_launcher())
    ok(proc)
    return out


@needs_deepspeed
def test_vit_tokenizer_training_and_export(vit_tokenizer):
    rows = _metrics(vit_tokenizer / "metrics.csv")
    assert len(rows) == 2 and all(math.isfinite(float(r["loss"])) for r in rows)
    assert {"codes_used", "perplexity", "codes_restarted", "d_loss", "g_loss"} <= set(rows[0])
    raw = torch.load(vit_tokenizer / "tok.pt", weights_only=True)
    assert set(raw) == {"state_dict", "config", "arch"} and raw["arch"] == "vit_vqgan"
    assert raw["config"]["patch_size"] == 4 and raw["config"]["code_dim"] == 8
    vq = build_tokenizer(str(vit_tokenizer / "tok.pt"))
    assert isinstance(vq, ViTVQGAN) and vq.n_embed == 64
    fresh = ViTVQGAN(**VIT)
    assert any(not torch.equal(v, fresh.state_dict()[k]) for k, v in vq.state_dict().items())  # it trained
    x = torch.rand(2, 3, 16, 16)
    _, _, (_, _, idx) = vq.encode(x)
    ids = idx.view(2, -1)
    assert ids.shape == (2, 16) and int(ids.max()) < 64
    rec = vq.decode_code(ids)
    assert rec.shape == (2, 3, 16, 16) and torch.isfinite(rec).all()
    torch.testing.assert_close(rec, vq.decode(vq.encode(x)[0]))


@pytest.fixture(scope="module")
def vit_cache(vit_tokenizer, image_folder):
    out = vit_tokenizer / "cache.pt"
    ok(run(["train/cache_tokens.py", "--data_path", image_folder, "--tokenizer", str(vit_tokenizer / "tok.pt"),
              "--img_size", "16", "--views", "2", "--plain_first", "--num_workers", "0", "--out", str(out)]))
    return out


@needs_deepspeed
def test_cache_tokens_with_vit_tokenizer(vit_tokenizer, vit_cache, image_folder):
    blob = torch.load(vit_cache, weights_only=True)
    vq = build_tokenizer(str(vit_tokenizer / "tok.pt"))
    assert blob["ids"].shape == (24, 2, 16) and blob["labels"].tolist() == [0] * 8 + [1] * 8 + [2] * 8
    meta = blob["meta"]
    assert meta["arch"] == "vit_vqgan" and meta["seq_len"] == 16 and meta["n_embed"] == 64
    assert meta["codebook_checksum"] == tokenizer_checksum(vq)
    from mage_fast.data import EvalTransform, ImageFolder
    plain = ImageFolder(image_folder, EvalTransform(16))
    x = torch.stack([plain[i][0] for i in range(3)])
    _, _, (_, _, idx) = vq.encode(x)
    assert torch.equal(blob["ids"][:3, 0].long(), idx.view(3, -1))  # view 0: the plain image's codes
    bad = run(["train/cache_tokens.py", "--data_path", image_folder, "--tokenizer", str(vit_tokenizer / "tok.pt"),
                "--img_size", "32", "--out", str(vit_tokenizer / "bad.pt")])
    assert bad.returncode != 0 and "16px" in bad.stderr


@needs_deepspeed
def test_train_vim_launcher_export_load_and_sample(tmp_path, vit_tokenizer, vit_cache, image_folder):
    out = tmp_path / "vim"
    proc = run(["--num_gpus", "1", "--master_port", "29622", "train/train_vim.py", *VIM_ARGS,
                 "--tokenizer", str(vit_tokenizer / "tok.pt"), "--token_cache", str(vit_cache), "--batch_size", "4",
                 "--max_steps", "3", "--warmup_steps", "1", "--lr", "1e-3", "--label_smoothing", "0.1",
                 "--deepspeed_config", "zero2", "--output_dir", str(out), "--export", str(out / "vim.pt")],
                launcher=deepspeed_launcher())
    ok(proc)
    assert "3 classes" in proc.stdout and "16 tokens of 64 codes" in proc.stdout and "ZeRO 2" in proc.stdout
    rows = _metrics(out / "metrics.csv")
    assert len(rows) == 3 and all(math.isfinite(float(r["loss"])) for r in rows)
    assert float(rows[0]["loss"]) == pytest.approx(math.log(64), abs=0.5)  # near uniform at the start
    raw = torch.load(out / "vim.pt", weights_only=True)
    assert set(raw) == {"model", "config", "tokenizer"} and raw["tokenizer"]["arch"] == "vit_vqgan"
    assert not any(k.startswith("tokenizer.") for k in raw["model"])
    assert raw["config"]["num_classes"] == 3 and raw["config"]["label_smoothing"] == 0.1
    vim = load_vim(str(out / "vim.pt"))
    assert not vim.training and vim.seq_len == 16 and vim.codebook_size == 64 and vim.depth == 2
    for k, v in raw["model"].items():
        assert torch.equal(vim.state_dict()[k], v), k
    imgs, ids = generate(vim, 3, labels=torch.tensor([0, 1, 2]), top_k=10, return_ids=True)
    assert imgs.shape == (3, 3, 16, 16) and ids.shape == (3, 16) and torch.isfinite(imgs).all()
    # evaluation subcommands on the export
    res = run(["train/evaluate.py", "vim_samples", "--ckpt", str(out / "vim.pt"), "--out", str(tmp_path / "g.png"),
                "--n", "5", "--batch_size", "2", "--top_k", "10", "--png_dir", str(tmp_path / "pngs")])
    ok(res)
    assert sorted(os.listdir(tmp_path / "pngs")) == [f"{i:05d}.png" for i in range(5)]
    assert Image.open(tmp_path / "pngs" / "00004.png").size == (16, 16) and os.path.isfile(tmp_path / "g.png")
    res = run(["train/evaluate.py", "vim_probe", "--ckpt", str(out / "vim.pt"), "--train_cache", str(vit_cache),
                "--test_cache", str(vit_cache), "--layer", "1"])
    ok(res)
    probe = json.loads(res.stdout.strip().splitlines()[-1])
    assert probe["layer"] == 1 and probe["dim"] == 32 and probe["train_n"] == 24 and 0 <= probe["test_accuracy"] <= 1
    res = run(["train/evaluate.py", "recon", "--tokenizer", str(out / "vim.pt"), "--data_path", image_folder,
                "--img_size", "16"])  # a VIM export's tokenizer, rebuilt by the same loader
    ok(res)
    rec = json.loads(res.stdout.strip().splitlines()[-1])
    assert rec["images"] == 24 and rec["codebook"] == 64 and math.isfinite(rec["mse"])


@needs_deepspeed
def test_train_vim_resume_after_sigkill_is_exact(tmp_path, vit_tokenizer, vit_cache):
    common = ["train/train_vim.py", *VIM_ARGS, "--tokenizer", str(vit_tokenizer / "tok.pt"), "--token_cache",
              str(vit_cache), "--batch_size", "4", "--accum_iter", "2", "--max_steps", "5", "--warmup_steps", "2",
              "--lr", "1e-2", "--save_every", "2"]  # 3 steps per epoch: the resumed run crosses an epoch
    a, b = tmp_path / "a", tmp_path / "b"
    ok(run([*common, "--output_dir", str(a), "--export", str(a / "vim.pt")]))
    crashed = run([*common, "--output_dir", str(b), "--simulate_crash_at_step", "3"])
    assert crashed.returncode == -9, crashed.stderr[-3000:]
    with open(b / "checkpoints" / "latest") as f:
        assert f.read().strip() == "step2"
    resumed = run([*common, "--output_dir", str(b), "--resume", "auto", "--export", str(b / "vim.pt")])
    ok(resumed)
    assert "resumed from" in resumed.stdout and "step 2, epoch 0, batch 4" in resumed.stdout
    sa, sb = (torch.load(p / "vim.pt", weights_only=True)["model"] for p in (a, b))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs after resume"


@needs_deepspeed
def test_train_vim_from_images_zero3_and_cache_mismatch(tmp_path, vit_tokenizer, vit_cache, image_folder):
    out = tmp_path / "img"
    proc = run(["train/train_vim.py", *VIM_ARGS, "--tokenizer", str(vit_tokenizer / "tok.pt"), "--data_path",
                 image_folder, "--batch_size", "4", "--max_steps", "2", "--num_workers", "0", "--lr", "1e-3",
                 "--deepspeed_config", "zero3", "--output_dir", str(out), "--export", str(out / "vim.pt")])
    ok(proc)
    assert "3 classes" in proc.stdout and "16px" in proc.stdout  # the ViT tokenizer fixes the size
    vim = load_vim(str(out / "vim.pt"))
    assert vim.num_classes == 3 and vim.tokenizer is not None
    # a cache made by another tokenizer is refused
    other = ViTVQGAN(**VIT)
    torch.save({"state_dict": other.state_dict(), "config": other.config, "arch": "vit_vqgan"}, tmp_path / "o.pt")
    bad = run(["train/train_vim.py", *VIM_ARGS, "--tokenizer", str(tmp_path / "o.pt"), "--token_cache",
                str(vit_cache), "--batch_size", "4", "--max_steps", "1"])
    assert bad.returncode != 0 and "different tokenizer" in bad.stderr


def test_tokenizer_export_of_vqgan_records_resolution():
    from mage_fast.models.vqgan import VQModel
    cfg = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32, embed_dim=32, n_embed=16)
    vq = VQModel(**cfg, resolution=8)
    exp = tokenizer_export({"state_dict": vq.state_dict(), "config": cfg}, img_size=8)
    assert exp["arch"] == "vqgan" and exp["config"]["resolution"] == 8
    rebuilt = build_tokenizer(exp)
    assert isinstance(rebuilt, VQModel) and rebuilt.resolution == 8
