"""The command line: generate writes PNGs the official way plus grid.png; info lists backends."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import mage_fast
from mage_fast.cli import CLIError, main
from mage_fast.images import make_grid, to_uint8

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/cli/ -> the repository


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    torch.save({"model": mage_fast.mage_vit_tiny().state_dict()}, path)
    return str(path)


def test_generate_writes_pngs_and_grid(tiny_ckpt, tmp_path):
    out = tmp_path / "gen"
    assert main(["generate", "--ckpt", tiny_ckpt, "--model", "tiny", "--num-images", "3", "--batch-size", "2",
                 "--num-iter", "2", "--temperature", "4.5", "--rng", "official", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["00000.png", "00001.png", "00002.png", "grid.png", "run.json"]
    im = np.asarray(Image.open(out / "00002.png"))
    assert im.shape == (256, 256, 3) and im.dtype == np.uint8
    # batch 1 (images 2..) is the official sampler at seed 1, batch size 2, first image
    model = mage_fast.MAGE.from_pretrained(tiny_ckpt).eval()
    expect = to_uint8(mage_fast.generate(model, 2, num_iter=2, temperature=4.5, seed=1))[0]
    assert np.array_equal(im, expect)
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == make_grid([im] * 3).shape


def test_generate_torch_rng_independent_of_batch_size(tiny_ckpt, tmp_path):
    for bs in (1, 3):
        assert main(["generate", "--ckpt", tiny_ckpt, "--num-images", "3", "--batch-size", str(bs), "--num-iter", "2",
                     "--rng", "torch", "--out", str(tmp_path / f"bs{bs}")]) == 0
    # The token ids are identical (tests/test_sampling.py); the VQGAN decode's convolutions round
    # differently at another batch size, so a pixel may land one level apart after truncation.
    for i in range(3):
        a = np.asarray(Image.open(tmp_path / "bs1" / f"{i:05d}.png")).astype(int)
        b = np.asarray(Image.open(tmp_path / "bs3" / f"{i:05d}.png")).astype(int)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.005


def test_generate_errors(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "error: checkpoint not found" in capsys.readouterr().err
    bogus = tmp_path / "x.pth"
    torch.save({"model": {}}, bogus)
    assert main(["generate", "--ckpt", str(bogus), "--model", "vit_huge", "--out", str(tmp_path / "o")]) == 2
    assert "error: --model must be one of" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_png_conversion_truncates_like_official():
    x = torch.tensor([[[[0.999]], [[1.7]], [[-0.2]]]])
    assert to_uint8(x).tolist() == [[[[254, 255, 0]]]]


def test_info_runs_as_module():
    r = subprocess.run([sys.executable, "-m", "mage_fast", "info"], capture_output=True, text=True, cwd=REPO,
                       timeout=120, env=dict(os.environ, PYTHONPATH=REPO))
    assert r.returncode == 0, r.stderr
    for op in ("attention", "codebook_nn", "decode_step", "gather_tokens", "scatter_tokens"):
        assert op in r.stdout
    assert "torch" in r.stdout and "op backends on cpu" in r.stdout


def test_sampling_defaults_from_model_card(tmp_path):
    import argparse
    import json

    from mage_fast.cli import sampling_defaults
    ckpt = tmp_path / "m.pt"
    ckpt.write_bytes(b"")
    args = argparse.Namespace(num_iter=None, temperature=None)
    sampling_defaults(str(ckpt), args)
    assert (args.num_iter, args.temperature) == (20, 6.0)  # official README setting without a card
    (tmp_path / "m.json").write_text(json.dumps({"sampling": {"temperature": 1.0, "num_iter": 8}}))
    args = argparse.Namespace(num_iter=None, temperature=None)
    sampling_defaults(str(ckpt), args)
    assert (args.num_iter, args.temperature) == (8, 1.0)
    args = argparse.Namespace(num_iter=3, temperature=2.5)  # explicit flags win
    sampling_defaults(str(ckpt), args)
    assert (args.num_iter, args.temperature) == (3, 2.5)
    # guidance: the card's when a class is asked for, 0 without one, an explicit flag wins
    (tmp_path / "m.json").write_text(json.dumps({"sampling": {"num_iter": 8, "guidance": 2.5}}))
    for class_id, flag, want in (("3", None, 2.5), (None, None, 0.0), ("all", 0.0, 0.0), ("1", 1.5, 1.5)):
        args = argparse.Namespace(num_iter=None, temperature=None, guidance=flag, class_id=class_id)
        sampling_defaults(str(ckpt), args)
        assert args.guidance == want, (class_id, flag)

    # the token filter: the card's unless a flag is given; none with the official sampler, which has none
    (tmp_path / "m.json").write_text(json.dumps({"sampling": {"top_p": 0.9, "top_k": 100}}))
    for rng, flags, want in (("torch", (None, None), (100, 0.9)), ("torch", (0, 1.0), (0, 1.0)),
                             ("official", (None, None), (None, None))):
        args = argparse.Namespace(num_iter=None, temperature=None, top_k=flags[0], top_p=flags[1], rng=rng)
        sampling_defaults(str(ckpt), args)
        assert (args.top_k, args.top_p) == want, (rng, flags)
    from mage_fast.models.state_dict import CheckpointError
    for bad in ({"top_p": 1.5}, {"top_p": 0}, {"top_k": -1}, {"top_k": 2.5}):
        (tmp_path / "m.json").write_text(json.dumps({"sampling": bad}))
        with pytest.raises(CheckpointError, match=f"'sampling.{next(iter(bad))}' must be"):
            sampling_defaults(str(ckpt), argparse.Namespace(num_iter=None, temperature=None, top_k=None, top_p=None))


def test_generate_records_the_token_filter(tiny_ckpt, tmp_path):
    import json
    out = tmp_path / "gen"
    assert main(["generate", "--ckpt", tiny_ckpt, "--num-images", "2", "--num-iter", "2", "--top-p", "0.8",
                 "--top-k", "0", "--out", str(out)]) == 0
    settings = json.loads((out / "run.json").read_text())["settings"]
    assert settings["top_p"] == 0.8 and "top_k" not in settings  # --top-k 0: no filter, not recorded


def test_class_id_by_name_number_and_all(tiny_ckpt, tmp_path):
    import json
    import shutil

    from mage_fast.cli import resolve_class
    ckpt = tmp_path / "cond.pth"
    shutil.copy(tiny_ckpt, ckpt)
    names = ["shirt", "bag", "boot"]
    (tmp_path / "cond.json").write_text(json.dumps({"class_conditional": True, "classes": names}))
    assert resolve_class(None, str(ckpt)) is None
    assert resolve_class("bag", str(ckpt)) == 1 and resolve_class("2", str(ckpt)) == 2
    assert resolve_class("all", str(ckpt)) == "all"
    with pytest.raises(CLIError, match="outside the model's 3 classes"):
        resolve_class("3", str(ckpt))
    with pytest.raises(CLIError, match="one of shirt, bag, boot"):
        resolve_class("sandal", str(ckpt))
    (tmp_path / "cond.json").write_text(json.dumps({"class_conditional": False}))
    with pytest.raises(CLIError, match="trained unconditionally"):
        resolve_class("1", str(ckpt))
    assert resolve_class("7", tiny_ckpt) == 7  # no card: any label number, the model checks its range
    with pytest.raises(CLIError, match="needs a model card"):
        resolve_class("all", tiny_ckpt)
    # 'all' cycles the classes over the images: image i is image i of a run with --class-id i mod 3
    (tmp_path / "cond.json").write_text(json.dumps({"class_conditional": True, "classes": names}))
    common = ["generate", "--ckpt", str(ckpt), "--model", "tiny", "--num-iter", "2", "--rng", "torch"]
    assert main(common + ["--num-images", "4", "--batch-size", "4", "--class-id", "all",
                          "--out", str(tmp_path / "all")]) == 0
    assert main(common + ["--num-images", "4", "--batch-size", "1", "--class-id", "boot",
                          "--out", str(tmp_path / "boot")]) == 0
    a = np.asarray(Image.open(tmp_path / "all" / "00002.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "boot" / "00002.png")).astype(int)
    assert np.abs(a - b).max() <= 1  # same image (batch-size rounding aside, as above)


def test_inpaint_outpaint_edit_commands(tiny_ckpt, tmp_path):
    import json
    import shutil

    ckpt = tmp_path / "cond.pth"
    shutil.copy(tiny_ckpt, ckpt)
    (tmp_path / "cond.json").write_text(json.dumps({"class_conditional": True, "classes": ["a", "b"],
                                                    "sampling": {"num_iter": 3, "temperature": 1.0}}))
    rng = np.random.default_rng(0)
    src = tmp_path / "in.png"
    Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(src)
    orig = np.asarray(Image.open(src)).astype(int)
    common = ["--ckpt", str(ckpt), "--model", "tiny", "--image", str(src), "--num-samples", "2"]
    assert main(["inpaint", *common, "--box", "0,0,64,64", "--out", str(tmp_path / "inp")]) == 0
    assert main(["outpaint", *common, "--keep-box", "64,64,192,192", "--out", str(tmp_path / "outp")]) == 0
    assert main(["edit", *common, "--box", "128,128,256,256", "--class-id", "b", "--out", str(tmp_path / "ed")]) == 0
    for d, (ncol, keep) in {"inp": (4, np.s_[128:, 128:]), "outp": (4, np.s_[96:160, 96:160]),
                            "ed": (4, np.s_[:64, :64])}.items():
        files = sorted(os.listdir(tmp_path / d))
        assert files == ["00000.png", "00001.png", "before_after.png", "run.json"], files
        res = np.asarray(Image.open(tmp_path / d / "00000.png")).astype(int)
        # far from the regenerated tokens (box grown by one 16-px token, then a blurred seam) the
        # pixels are the original's
        assert np.abs(res[keep] - orig[keep]).max() <= 1, d
        assert np.abs(res - orig).max() > 10  # and something was regenerated
        grid = np.asarray(Image.open(tmp_path / d / "before_after.png"))
        assert grid.shape[1] >= ncol * 256
    assert main(["edit", *common, "--box", "0,0,64,64", "--class-id", "all", "--out", str(tmp_path / "x")]) == 2
    assert main(["edit", *common, "--box", "0,0,64,64", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_grid_enlarges_small_tiles_only(tmp_path):
    from mage_fast.images import save_grid
    small = [np.full((28, 28, 3), v, dtype=np.uint8) for v in (0, 100, 200, 255)]
    g = np.asarray(Image.open(save_grid(small, str(tmp_path / "s.png"), ncol=2)))
    assert g.shape == make_grid([np.zeros((84, 84, 3), np.uint8)] * 4, 2).shape  # 28 px x 3
    assert (g[2:86, 88:172] == 100).all()  # the second tile, enlarged, pixel values kept
    big = [np.zeros((64, 64, 3), np.uint8)] * 2
    assert np.asarray(Image.open(save_grid(big, str(tmp_path / "b.png")))).shape == make_grid(big).shape


def test_cpu_description_names_the_model_and_its_vector_units():
    """Benchmarks name the machine: the CPU model and what decides bf16/int8 speed (AVX2, AVX-512, AMX)."""
    import torch
    from mage_fast.info import cpu_model, device_description
    d = device_description(torch.device("cpu"))
    assert cpu_model() in d and torch.backends.cpu.get_cpu_capability() in d
    amx, avx512_bf16 = bool(torch.cpu._is_amx_tile_supported()), bool(torch.cpu._is_avx512_bf16_supported())
    assert ("AMX" in d) == amx and ("AVX512-BF16" in d) == (avx512_bf16 and not amx)
    from mage_fast.decoding import bf16_native, int8_native
    assert bf16_native(torch.device("cpu")) == (amx or avx512_bf16)  # bf16 matrix products in hardware
    vnni = bool(torch.cpu._is_vnni_supported())
    assert int8_native(torch.device("cpu")) == (amx or vnni)  # int8 matrix products in hardware
    assert ("VNNI int8" in d) == (vnni and not amx)


def test_shipped_models_load_by_name(tmp_path, capsys, monkeypatch):
    """--ckpt NAME picks a shipped model from mage_fast/assets; an absent one is one clear line."""
    import mage_fast.cli.common as cli
    model, path = cli.load_model("mage_fmnist", None)
    assert path == cli.shipped_path("mage_fmnist") and model.seq_len == 49
    assert cli.DEFAULT_CKPT == next(cli.shipped_path(n) for n in cli.SHIPPED if os.path.isfile(cli.shipped_path(n)))
    monkeypatch.setattr(cli, "ASSETS", str(tmp_path))  # an install without the shipped files
    assert main(["generate", "--ckpt", "mage_fmnist", "--num-images", "1", "--out", str(tmp_path / "o")]) == 2
    assert "does not ship that model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
