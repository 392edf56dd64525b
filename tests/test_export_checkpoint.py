"""train/export_checkpoint.py: a saved step checkpoint exported as the run's own --export would
write it (the learning-curve probes of train/recipes/fmnist256.sh read these), on checkpoint
directories laid out as DeepSpeed writes them (module weights under 'module')."""
import json
import pathlib
import sys
from functools import partial

import pytest
import torch
import torch.nn as nn

import mage_fast
from mage_fast.models.checkpoint import build_tokenizer
from mage_fast.training.objective import MAGEObjective

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "train"))
import export_checkpoint as xc  # noqa: E402
import pretrain  # noqa: E402
import train_tokenizer  # noqa: E402


def _fake_run(run, script, argv, module_sd, tag="step7", dtype=None):
    run.mkdir(parents=True, exist_ok=True)
    (run / "args.json").write_text(json.dumps({"argv": [f"train/{script}", "--local_rank=0", *argv]}))
    d = run / "checkpoints" / tag
    d.mkdir(parents=True)
    if dtype is not None:
        module_sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in module_sd.items()}
    torch.save({"module": module_sd, "global_steps": 7}, d / "mp_rank_00_model_states.pt")
    (run / "checkpoints" / "latest").write_text(tag)


MAGE_ARGV = ["--model", "tiny", "--img_size", "32", "--vqgan_config",
             json.dumps({"ch_mult": [1, 2], "num_res_blocks": 1, "n_embed": 64, "grayscale": True}),
             "--synthetic", "--max_steps", "10", "--contrastive_weight", "1.0", "--output_dir", "unused"]


def test_pretrain_checkpoint_exports_a_loadable_mage(tmp_path):
    args = pretrain.parse_args(MAGE_ARGV)
    cfg = pretrain.model_config(args)
    torch.manual_seed(0)
    model = mage_fast.MAGE(**cfg, norm_layer=partial(nn.LayerNorm, eps=1e-6), vqgan_ckpt_path=None)
    objective = MAGEObjective(model, contrastive_weight=1.0)
    _fake_run(tmp_path / "run", "pretrain.py", MAGE_ARGV, objective.state_dict())
    res = xc.export(str(tmp_path / "run"), "latest", str(tmp_path / "out" / "m.pt"))
    assert res["tag"] == "step7" and res["step"] == 7
    blob = torch.load(tmp_path / "out" / "m.pt", weights_only=True)
    assert not any(k.startswith("head.") for k in blob["model"])  # the MAGE-C head is not exported
    back = mage_fast.MAGE.from_pretrained(str(tmp_path / "out" / "m.pt"))
    assert back.vqgan.grayscale and back.seq_len == 256
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k


def test_tokenizer_checkpoint_exports_a_buildable_tokenizer(tmp_path):
    argv = ["--synthetic", "--img_size", "32", "--max_steps", "5", "--ch", "32", "--ch_mult", "1,2",
            "--num_res_blocks", "1", "--z_channels", "32", "--n_embed", "64", "--grayscale"]
    vq, _, _ = train_tokenizer.build_tokenizer_model(train_tokenizer.parse_args(argv))
    with torch.no_grad():
        vq.quantize.embedding.weight.normal_()
    _fake_run(tmp_path / "tok", "train_tokenizer.py", argv, {f"vq.{k}": v for k, v in vq.state_dict().items()},
              tag="step5")
    xc.export(str(tmp_path / "tok"), "step5", str(tmp_path / "tok.pt"))
    rebuilt = build_tokenizer(str(tmp_path / "tok.pt"), 32)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)[0], vq.eval()(x)[0])


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(SystemExit, match="args.json"):
        xc.export(str(tmp_path / "nothing"), "latest", str(tmp_path / "x.pt"))
    args = pretrain.parse_args(MAGE_ARGV)
    model = mage_fast.MAGE(**pretrain.model_config(args), vqgan_ckpt_path=None)
    _fake_run(tmp_path / "run", "pretrain.py", MAGE_ARGV, MAGEObjective(model).state_dict())
    with pytest.raises(SystemExit, match=r"no checkpoint 'step9'.*have: step7"):
        xc.export(str(tmp_path / "run"), "step9", str(tmp_path / "x.pt"))
    _fake_run(tmp_path / "bf16", "pretrain.py", MAGE_ARGV, MAGEObjective(model).state_dict(), dtype=torch.bfloat16)
    with pytest.raises(SystemExit, match="no optimizer states"):
        xc.export(str(tmp_path / "bf16"), "latest", str(tmp_path / "x.pt"))
    (tmp_path / "vim").mkdir()
    (tmp_path / "vim" / "args.json").write_text(json.dumps({"argv": ["train/train_vim.py"]}))
    with pytest.raises(SystemExit, match="train_vim.py"):
        xc.export(str(tmp_path / "vim"), "latest", str(tmp_path / "x.pt"))
