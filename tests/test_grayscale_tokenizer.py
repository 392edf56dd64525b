"""The grayscale VQGAN (``grayscale=True``: one channel inside, three at the interface) at the
256-token geometry of the Fashion-MNIST recipe (32 px, downsampling 2 -> 16x16), its export and
reload through ``build_tokenizer`` / ``MAGE.from_pretrained`` / ``train/pretrain.py``'s config,
the padded data of ``train/prepare_fashion_mnist.py --pad_to`` and ``evaluate.py recon
--center_crop``."""
import gzip
import json
import pathlib
import sys
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import mage_fast
from mage_fast.models.checkpoint import build_tokenizer, infer_config, tokenizer_export
from mage_fast.models.vqgan import VQModel

TRAIN = pathlib.Path(__file__).resolve().parents[1] / "train"
sys.path.insert(0, str(TRAIN))
import evaluate as ev  # noqa: E402
import prepare_fashion_mnist as prep  # noqa: E402
import pretrain  # noqa: E402
import train_tokenizer  # noqa: E402

GRAY = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32, embed_dim=32, n_embed=64, grayscale=True)


def _gray_vq(seed=0):
    torch.manual_seed(seed)
    vq = VQModel(**GRAY, resolution=32).eval()
    with torch.no_grad():  # spread the codebook so that several codes are used
        vq.quantize.embedding.weight.normal_()
    return vq


def test_grayscale_shapes_and_equal_channels():
    vq = _gray_vq()
    assert vq.encoder.conv_in.weight.shape == (32, 1, 3, 3)
    assert vq.decoder.conv_out.weight.shape[0] == 1
    assert vq.downsample == 2 and vq.config["grayscale"] is True
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        z_q, _, (_, _, idx) = vq.encode(x)
        out = vq.decode(z_q)
        from_codes = vq.decode_code(idx.view(3, 16, 16))
    assert z_q.shape == (3, 32, 16, 16) and idx.shape == (3 * 256,)
    assert out.shape == (3, 3, 32, 32) and out.is_contiguous()
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])
    assert out.std() > 0  # not a constant picture
    torch.testing.assert_close(from_codes, out)


def test_grayscale_encoder_reads_the_channel_mean():
    vq = _gray_vq()
    x = torch.rand(2, 3, 32, 32)
    gray = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(vq.pre_quant(x), vq.pre_quant(gray))
        assert torch.equal(vq.encode(x)[2][2], vq.encode(gray)[2][2])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):  # the interface stays 3-channel
        vq.encode(torch.rand(2, 1, 32, 32))


def test_default_vqgan_has_no_grayscale_key_and_three_channels():
    vq = VQModel(ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=32, embed_dim=32, n_embed=64, resolution=32)
    assert "grayscale" not in vq.config and not vq.grayscale
    assert vq.encoder.conv_in.weight.shape[1] == 3 and vq.decoder.conv_out.weight.shape[0] == 3
    with pytest.raises(TypeError, match="grayscale must be True or False"):
        VQModel(**dict(GRAY, grayscale="yes"))


def test_tokenizer_export_round_trip(tmp_path):
    vq = _gray_vq()
    cfg = {k: v for k, v in GRAY.items()}
    path = tmp_path / "tok.pt"
    torch.save({"state_dict": vq.state_dict(), "config": cfg, "arch": "vqgan"}, path)
    assert tokenizer_export(str(path), 32)["config"]["grayscale"] is True
    rebuilt = build_tokenizer(str(path), 32)
    assert rebuilt.grayscale
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x)[0], vq(x)[0])


def _gray_mage(seed=0):
    torch.manual_seed(seed)
    model = mage_fast.MAGE(img_size=32, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=2,
                           decoder_num_heads=2, norm_layer=partial(nn.LayerNorm, eps=1e-6), vqgan_ckpt_path=None,
                           vqgan_config=dict(GRAY))
    return model.eval()


@pytest.mark.parametrize("with_config", [True, False])
def test_mage_from_pretrained_round_trip(tmp_path, with_config):
    model = _gray_mage()
    assert model.seq_len == 256 and model.vqgan.grayscale
    blob = {"model": model.state_dict()}
    if with_config:  # what train/pretrain.py exports
        blob["config"] = dict(img_size=32, embed_dim=64, depth=2, num_heads=4, decoder_embed_dim=32, decoder_depth=2,
                              decoder_num_heads=2, vqgan_config=dict(GRAY))
    else:  # rebuilt from the tensor shapes alone
        assert infer_config(model.state_dict())["vqgan_config"]["grayscale"] is True
    torch.save(blob, tmp_path / "mage.pt")
    back = mage_fast.MAGE.from_pretrained(str(tmp_path / "mage.pt"))
    assert back.vqgan.grayscale and back.seq_len == 256
    codes = torch.randint(0, 64, (2, 16, 16))
    with torch.no_grad():
        imgs = back.vqgan.decode_code(codes)
        torch.testing.assert_close(imgs, model.vqgan.decode_code(codes))
        samples = mage_fast.generate(back, 2, num_iter=4, seed=0)
    assert imgs.shape == (2, 3, 32, 32) and torch.equal(imgs[:, 0], imgs[:, 2])
    assert samples.shape == (2, 3, 32, 32) and torch.equal(samples[:, 0], samples[:, 1])


def test_pretrain_takes_grayscale_from_the_tokenizer_file(tmp_path):
    vq = _gray_vq()
    torch.save({"state_dict": vq.state_dict(), "config": dict(GRAY), "arch": "vqgan"}, tmp_path / "tok.pt")
    args = pretrain.parse_args(["--model", "tiny", "--img_size", "32", "--tokenizer", str(tmp_path / "tok.pt"),
                                "--synthetic", "--max_steps", "1"])
    cfg = pretrain.model_config(args)
    assert cfg["vqgan_config"]["grayscale"] is True
    json.dumps(cfg)  # the export's config stays JSON-able
    model = pretrain.build_model(cfg, args)  # loads the tokenizer file strictly
    assert model.vqgan.grayscale and model.seq_len == 256
    torch.testing.assert_close(model.vqgan.encoder.conv_in.weight, vq.encoder.conv_in.weight)


def test_train_tokenizer_grayscale_flag():
    base = ["--synthetic", "--img_size", "32", "--max_steps", "1", "--ch", "32", "--ch_mult", "1,2"]
    args = train_tokenizer.parse_args(base + ["--grayscale"])
    vq, cfg, arch = train_tokenizer.build_tokenizer_model(args)
    assert arch == "vqgan" and cfg["grayscale"] is True and vq.grayscale
    _, cfg_rgb, _ = train_tokenizer.build_tokenizer_model(train_tokenizer.parse_args(base))
    assert "grayscale" not in cfg_rgb
    with pytest.raises(SystemExit):
        train_tokenizer.parse_args(["--synthetic", "--img_size", "32", "--max_steps", "1", "--arch", "vit",
                                    "--patch_size", "4", "--grayscale"])


# ------------------------------------------------------------------------------------------ data
def test_pad_images_centres_on_black():
    imgs = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28) % 250 + 1
    imgs = imgs.astype(np.uint8)
    out = prep.pad_images(imgs, 32)
    assert out.shape == (2, 32, 32) and out.dtype == np.uint8
    assert np.array_equal(out[:, 2:30, 2:30], imgs)
    border = out.copy()
    border[:, 2:30, 2:30] = 0
    assert not border.any()
    odd = prep.pad_images(imgs[:, :27, :27], 32)  # margin 5: 2 before, 3 after
    assert np.array_equal(odd[:, 2:29, 2:29], imgs[:, :27, :27]) and not odd[:, 29:].any()
    with pytest.raises(ValueError, match="smaller"):
        prep.pad_images(imgs, 20)


def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_prepare_fashion_mnist_pad_to_writes_32px_folders(tmp_path):
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    src.mkdir()
    imgs = {}
    for prefix, n in (("train", 6), ("t10k", 4)):
        imgs[prefix] = rng.integers(1, 256, (n, 28, 28), dtype=np.uint8)
        _write_idx(src / f"{prefix}-images-idx3-ubyte.gz", imgs[prefix])
        _write_idx(src / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    prep.main(["--src", str(src), "--out", str(tmp_path / "out"), "--pad_to", "32"])
    png = tmp_path / "out" / "test" / prep.CLASSES[3] / "00003.png"
    with Image.open(png) as im:
        arr = np.asarray(im)
    assert arr.shape == (32, 32)
    assert np.array_equal(arr[2:30, 2:30], imgs["t10k"][3]) and arr[:2].sum() == 0 and arr[:, 30:].sum() == 0
    # the loaders read it back as a 3-channel 32x32 image with no resampling
    x = mage_fast.data.EvalTransform(32)(Image.open(png))
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x[0, 2:30, 2:30], torch.from_numpy(imgs["t10k"][3]).float() / 255)
    with pytest.raises(SystemExit):
        prep.main(["--src", str(src), "--out", str(tmp_path / "bad"), "--pad_to", "20"])


def test_recon_center_crop_scores_the_central_pixels(tmp_path, capsys):
    vq = _gray_vq()
    torch.save({"state_dict": vq.state_dict(), "config": dict(GRAY), "arch": "vqgan"}, tmp_path / "tok.pt")
    root = tmp_path / "imgs" / "c0"
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(3):
        a = np.zeros((32, 32), np.uint8)
        a[2:30, 2:30] = rng.integers(0, 256, (28, 28))
        Image.fromarray(a, mode="L").save(root / f"{i}.png")
    results = {}
    for crop in (0, 28):
        ev.main(["recon", "--tokenizer", str(tmp_path / "tok.pt"), "--data_path", str(tmp_path / "imgs"),
                 "--img_size", "32", "--center_crop", str(crop)])
        results[crop] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    xs, _ = ev._folder_tensor(str(tmp_path / "imgs"), 32)
    with torch.no_grad():
        rec = vq(xs)[0].clamp(0, 1)
    for crop, sl in ((0, slice(0, 32)), (28, slice(2, 30))):
        want = float(((rec - xs)[:, :, sl, sl] ** 2).mean())
        assert results[crop]["mse"] == pytest.approx(want, rel=1e-5)
    assert results[28]["scored_pixels"] == "central 28x28" and results[0]["mse"] != results[28]["mse"]
    assert results[0]["max_channel_gap"] == 0.0
    with pytest.raises(SystemExit):
        ev.main(["recon", "--tokenizer", str(tmp_path / "tok.pt"), "--data_path", str(tmp_path / "imgs"),
                 "--img_size", "32", "--center_crop", "40"])


def test_recon_picture_one_column_per_class(tmp_path):
    vq = _gray_vq()
    torch.save({"state_dict": vq.state_dict(), "config": dict(GRAY), "arch": "vqgan"}, tmp_path / "tok.pt")
    rng = np.random.default_rng(2)
    for c in ("c0", "c1"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), mode="L").save(
                tmp_path / "imgs" / c / f"{i}.png")
    xs, ys = ev._folder_tensor(str(tmp_path / "imgs"), 32)
    rows = ev.class_pairs(vq, xs, ys, 2)
    assert rows.shape == (8, 3, 32, 32)
    # row order: originals (c0, c1), their reconstructions, then the second images of each class
    torch.testing.assert_close(rows[0], xs[0])
    torch.testing.assert_close(rows[1], xs[3])
    torch.testing.assert_close(rows[4], xs[1])
    with torch.no_grad():
        torch.testing.assert_close(rows[2:4], vq(xs[[0, 3]])[0].clamp(0, 1))
    png = tmp_path / "pairs.png"
    ev.main(["recon", "--tokenizer", str(tmp_path / "tok.pt"), "--data_path", str(tmp_path / "imgs"),
             "--img_size", "32", "--png", str(png), "--png_per_class", "2"])
    with Image.open(png) as im:
        assert im.size == ((2 * 34 + 2) * 3, (4 * 34 + 2) * 3)
    with pytest.raises(SystemExit, match="class 0 has 3 images"):
        ev.class_pairs(vq, xs, ys, 4)
