"""Training stack: recipe pieces, the objective, and end-to-end DeepSpeed runs of train/pretrain.py
(2-process ZeRO-2 under the real launcher, exact resume after SIGKILL, ZeRO-3 export) and the
tokenizer trainer. Tiny configs: 32x32 images, a (1, 2, 2) tokenizer -> 8x8 tokens."""
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

import mage_fast
from launch import deepspeed_launcher, needs_deepspeed, ok, run
from mage_fast.models.checkpoint import build_from_checkpoint, read_state_dict
from mage_fast.training import adamw, lr_at, param_groups, scaled_lr
from mage_fast.training.objective import MAGEObjective

SMALL_VQ = dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, embed_dim=32, n_embed=64)
TINY_ARGS = ["--model", "tiny", "--img_size", "32", "--vqgan_config",
             '{"ch_mult": [1, 2, 2], "n_embed": 64}', "--no_progress", "--log_every", "1"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(root / c)
        for i in range(16):
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return str(root)


def test_lr_rule_and_schedule():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert lr_at(0, 1.0, 10, 110) == 0.0 and lr_at(5, 1.0, 10, 110) == pytest.approx(0.5)
    assert lr_at(10, 1.0, 10, 110) == pytest.approx(1.0)
    assert lr_at(60, 1.0, 10, 110) == pytest.approx(0.5)
    assert lr_at(110, 1.0, 10, 110, min_lr=0.1) == pytest.approx(0.1)
    vals = [lr_at(s, 1.0, 10, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_param_groups_no_decay_on_1d_and_bias_and_skip_frozen():
    m = mage_fast.mage_vit_tiny(img_size=32, vqgan_config=SMALL_VQ)
    groups = {g["name"]: g for g in param_groups(m, 0.05)}
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in groups["no_decay"]["params"]}
    d = {names[id(p)] for p in groups["decay"]["params"]}
    assert "blocks.0.attn.qkv.bias" in nd and "norm.weight" in nd and "mlm_layer.bias" in nd
    assert "blocks.0.attn.qkv.weight" in d and "token_emb.word_embeddings.weight" in d
    assert groups["decay"]["weight_decay"] == 0.05 and groups["no_decay"]["weight_decay"] == 0.0
    assert not any(n.startswith("vqgan.") for n in nd | d)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert nd | d == trainable and not nd & d


@pytest.mark.parametrize("ac", [False, True], ids=["plain", "act_ckpt"])
def test_objective_equals_official_forward(ac):
    m = mage_fast.mage_vit_tiny(img_size=32, vqgan_config=SMALL_VQ)
    x = torch.rand(3, 3, 32, 32)
    torch.manual_seed(7)
    ref = m(x)[0]
    obj = MAGEObjective(m, activation_checkpointing=ac)
    torch.manual_seed(7)
    loss, stats = obj(x)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)  # code-only logits: same math, other kernel
    torch.manual_seed(7)
    ids = m.tokenize(x)
    torch.testing.assert_close(obj(ids)[0], ref, rtol=1e-6, atol=1e-6)  # token-cache path: same loss from ids
    loss.backward()
    assert m.blocks[0].attn.qkv.weight.grad is not None and m.vqgan.encoder.conv_in.weight.grad is None


def test_mage_c_two_views():
    m = mage_fast.mage_vit_tiny(img_size=32, vqgan_config=SMALL_VQ)
    obj = MAGEObjective(m, contrastive_weight=0.5)
    loss, stats = obj(torch.rand(4, 2, 3, 32, 32))
    assert torch.isfinite(loss) and stats["contrastive_loss"] > 0
    assert float(loss.detach()) == pytest.approx(float(stats["mlm_loss"] + 0.5 * stats["contrastive_loss"]), rel=1e-5)
    with pytest.raises(ValueError, match="two views"):
        obj(torch.rand(4, 3, 32, 32))


def test_class_conditional_objective_uses_labels():
    m = mage_fast.mage_vit_tiny(img_size=32, vqgan_config=SMALL_VQ)
    ids = m.tokenize(torch.rand(4, 3, 32, 32))
    labels = torch.tensor([0, 3, 9, 3])
    obj = MAGEObjective(m)
    m.class_dropout_prob = 0.0
    torch.manual_seed(3)
    ref = m.training_loss(ids, labels=labels)[0]
    torch.manual_seed(3)
    cond = obj(ids, labels)[0]
    torch.testing.assert_close(cond, ref, rtol=1e-6, atol=1e-6)
    torch.manual_seed(3)
    uncond = obj(ids)[0]
    assert abs(float(cond.detach()) - float(uncond.detach())) > 1e-6  # the class slot changes the encoder's input
    # MAGE-C passes the labels to both views
    obj_c = MAGEObjective(m, contrastive_weight=0.5)
    torch.manual_seed(3)
    loss_c, stats = obj_c(torch.stack([ids, ids], 1), labels)
    torch.manual_seed(3)
    loss_u, _ = obj_c(torch.stack([ids, ids], 1))
    assert torch.isfinite(loss_c) and abs(float(loss_c.detach()) - float(loss_u.detach())) > 1e-6


def test_loss_falls_on_fixed_batch():
    torch.manual_seed(0)
    m = mage_fast.mage_vit_tiny(img_size=32, vqgan_config=SMALL_VQ)
    obj = MAGEObjective(m)
    x = torch.rand(8, 3, 32, 32)
    ids = m.tokenize(x)
    opt = adamw(param_groups(obj, 0.05), lr=5e-3)
    losses = []
    for step in range(60):
        torch.manual_seed(step % 4)  # a few fixed mask draws
        loss, _ = obj(ids)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(obj.parameters(), 3.0)
        opt.step()
        losses.append(float(loss.detach()))
    first, last = np.mean(losses[:4]), np.mean(losses[-4:])
    assert math.isfinite(last) and last < first - 0.3, losses  # measured: 4.12 -> 3.61


@needs_deepspeed
def test_zero2_two_processes_deepspeed_launcher(tmp_path, image_folder):
    out = tmp_path / "run"
    proc = run(["--num_gpus", "2", "--master_port", "29611", "train/pretrain.py", *TINY_ARGS,
                 "--data_path", image_folder, "--batch_size", "4", "--max_steps", "3", "--num_workers", "1",
                 "--deepspeed_config", "zero2", "--output_dir", str(out), "--export", str(out / "mage.pt")],
                launcher=deepspeed_launcher())
    ok(proc)
    assert "world 2, ZeRO 2" in proc.stdout
    with open(out / "metrics.csv") as f:
        rows = f.read().splitlines()
    assert rows[0].startswith("step,") and "images_per_s" in rows[0] and len(rows) == 4
    assert os.path.isfile(out / "checkpoints" / "step3" / "rng_state_rank1.pt")
    _check_export(out / "mage.pt")


def _check_export(path):
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert set(raw) == {"model", "config"}
    model = build_from_checkpoint(str(path))  # strict
    fresh = mage_fast.mage_vit_tiny(img_size=32, vqgan_config=dict(SMALL_VQ))
    mage_fast.load_checkpoint(fresh, {"model": raw["model"]})  # the official {'model': sd} layout, strict
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, raw["model"][k]), k
    return model


@needs_deepspeed
def test_resume_after_sigkill_is_exact(tmp_path, image_folder):
    common = [*TINY_ARGS, "--data_path", image_folder, "--batch_size", "4", "--accum_iter", "2", "--max_steps", "7",
              "--warmup_steps", "2", "--blr", "1e-2", "--num_workers", "1", "--save_every", "3",
              "--deepspeed_config", "zero1", "--data_backend", "torch"]  # DALI resumes only approximately
    a, b = tmp_path / "a", tmp_path / "b"
    ok(run(["train/pretrain.py", *common, "--output_dir", str(a), "--export", str(a / "mage.pt")]))
    crashed = run(["train/pretrain.py", *common, "--output_dir", str(b), "--simulate_crash_at_step", "5"])
    assert crashed.returncode == -9, crashed.stderr[-3000:]  # killed by SIGKILL after step 5
    with open(b / "checkpoints" / "latest") as f:
        assert f.read().strip() == "step3"
    resumed = run(["train/pretrain.py", *common, "--output_dir", str(b), "--resume", "auto",
                    "--export", str(b / "mage.pt")])
    ok(resumed)
    assert "resumed from" in resumed.stdout and "step 3, epoch 0, batch 6" in resumed.stdout
    sa, sb = (read_state_dict(str(p / "mage.pt")) for p in (a, b))
    init = build_from_checkpoint(str(a / "mage.pt"))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs after resume"
    moved = sum(not torch.equal(v, mage_fast.mage_vit_tiny(img_size=32, vqgan_config=SMALL_VQ).state_dict()[k])
                for k, v in init.state_dict().items() if k.startswith("blocks."))
    assert moved > 0


@needs_deepspeed
def test_zero3_export_and_continue_from_checkpoint(tmp_path):
    out = tmp_path / "z3"
    ok(run(["train/pretrain.py", *TINY_ARGS, "--synthetic", "--synthetic_length", "16", "--batch_size", "4",
              "--max_steps", "2", "--num_workers", "0", "--deepspeed_config", "zero3", "--output_dir", str(out),
              "--export", str(out / "mage.pt")]))
    first = _check_export(out / "mage.pt")
    out2 = tmp_path / "cont"
    proc = run(["train/pretrain.py", *TINY_ARGS, "--synthetic", "--synthetic_length", "16", "--batch_size", "4",
                 "--max_steps", "1", "--num_workers", "0", "--init_from", str(out / "mage.pt"), "--lr", "0",
                 "--dropout", "0", "--output_dir", str(out2), "--export", str(out2 / "mage.pt")])
    ok(proc)
    second = read_state_dict(str(out2 / "mage.pt"))
    for k, v in first.state_dict().items():  # lr 0: continuing changes nothing
        assert torch.equal(v, second[k]), k
    # --dropout travels in the export's config (the official 0.1 stays implicit) and rebuilds
    assert "dropout" not in torch.load(out / "mage.pt", weights_only=True)["config"]
    assert torch.load(out2 / "mage.pt", weights_only=True)["config"]["dropout"] == 0.0
    rebuilt = mage_fast.MAGE.from_pretrained(str(out2 / "mage.pt"))
    ps = {m.p for m in rebuilt.modules() if isinstance(m, torch.nn.Dropout)}
    assert ps == {0.0} and {m.p for m in first.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}


@needs_deepspeed
def test_tokenizer_trainer_with_gan_and_restarts(tmp_path, image_folder):
    out = tmp_path / "tok"
    ok(run(["train/train_tokenizer.py", "--data_path", image_folder, "--img_size", "32", "--ch", "32",
              "--ch_mult", "1,2,2", "--num_res_blocks", "1", "--z_channels", "32", "--n_embed", "512",
              "--batch_size", "4", "--max_steps", "4", "--restart_every", "2", "--disc_weight", "0.1",
              "--disc_start", "1", "--log_every", "2", "--num_workers", "0", "--no_progress",
              "--deepspeed_config", "zero2", "--output_dir", str(out), "--export", str(out / "tok.pt")]))
    with open(out / "metrics.csv") as f:
        header = f.readline()
    assert "codes_restarted" in header and "d_loss" in header
    raw = torch.load(out / "tok.pt", weights_only=True)
    model = mage_fast.MAGE(img_size=32, embed_dim=64, depth=1, num_heads=4, decoder_embed_dim=32, decoder_depth=1,
                           decoder_num_heads=2, vqgan_ckpt_path=str(out / "tok.pt"), vqgan_config=raw["config"])
    assert model.codebook_size == 512 and model.seq_len == 64


@needs_deepspeed
def test_bf16_zero2_trains_and_exports_fp32(tmp_path):
    """bf16 MAGE-C (its contrastive head's BatchNorm keeps fp32 buffers) from a tokenizer file: the
    export is fp32, holds the tokenizer's own fp32 weights (not bf16-rounded), and equals what
    export_checkpoint.py consolidates from the last checkpoint."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train"))
    import export_checkpoint
    torch.manual_seed(1)
    vq = mage_fast.mage_vit_tiny(img_size=32, vqgan_config=dict(SMALL_VQ)).vqgan
    with torch.no_grad():
        for p in vq.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # not exactly representable in bf16
    tok = tmp_path / "tok.pt"
    torch.save({"state_dict": vq.state_dict(), "config": dict(SMALL_VQ), "arch": "vqgan"}, tok)
    out = tmp_path / "bf16"
    ok(run(["train/pretrain.py", *TINY_ARGS, "--synthetic", "--synthetic_length", "16", "--batch_size", "4",
              "--max_steps", "2", "--num_workers", "0", "--precision", "bf16", "--deepspeed_config", "zero2",
              "--contrastive_weight", "1.0", "--tokenizer", str(tok), "--save_every", "2",
              "--output_dir", str(out), "--export", str(out / "mage.pt")]))
    sd = read_state_dict(str(out / "mage.pt"))
    assert all(v.dtype in (torch.float32, torch.int64) for v in sd.values())
    for k, v in vq.state_dict().items():
        assert torch.equal(sd["vqgan." + k], v), k
    export_checkpoint.export(str(out), "step2", str(tmp_path / "step2.pt"))
    again = read_state_dict(str(tmp_path / "step2.pt"))
    assert again.keys() == sd.keys() and all(torch.equal(again[k], sd[k]) for k in sd)
    build_from_checkpoint(str(out / "mage.pt"))  # strict


@needs_deepspeed
def test_bf16_autocast_trains_with_fp32_weights(tmp_path):
    """--precision bf16-autocast: the engine stays fp32 (export equals the last checkpoint's own fp32
    weights), the forward runs under autocast, and the loss is logged and finite."""
    out = tmp_path / "ac"
    ok(run(["train/pretrain.py", *TINY_ARGS, "--synthetic", "--synthetic_length", "16", "--batch_size", "4",
            "--max_steps", "2", "--num_workers", "0", "--precision", "bf16-autocast", "--save_every", "2",
            "--output_dir", str(out), "--export", str(out / "mage.pt")]))
    sd = read_state_dict(str(out / "mage.pt"))
    assert all(v.dtype in (torch.float32, torch.int64) for v in sd.values())
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) >= 3 and all(math.isfinite(float(r.split(",")[2])) for r in rows[1:])
    build_from_checkpoint(str(out / "mage.pt"))
