"""Every command does what it says or stops with one clear line: the real CLI (``python -m
mage_fast`` in a subprocess) on the shipped model, case by case.

Each case asserts the exit status (2), that the last line on stderr is ``error: ...`` and names
what was expected, that no traceback is printed, and that nothing was written (the case's --out
folder or --json file does not exist afterwards). The subprocesses run three at a time in a module
fixture; each case is then its own test.
"""
import concurrent.futures as cf
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import mage_fast

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET = os.path.join(REPO, "mage_fast", "assets", "mage_fmnist.pt")


def _write_files(d):
    """Bad and awkward inputs, made once."""
    raw = open(ASSET, "rb").read()
    (d / "trunc.pt").write_bytes(raw[: len(raw) // 3])
    corrupt = bytearray(raw)
    corrupt[len(raw) // 2: len(raw) // 2 + 4096] = os.urandom(4096)
    (d / "corrupt.pt").write_bytes(bytes(corrupt))
    (d / "text.pt").write_text("this is not a checkpoint\n")
    (d / "empty.pt").write_bytes(b"")
    (d / "random.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    m = mage_fast.mage_vit_tiny()
    torch.save({"state_dict": m.vqgan.state_dict()}, d / "tokenizer.pt")
    torch.save({"model": {"head.weight": torch.zeros(10, 64), "fc_norm.weight": torch.zeros(64),
                          "pos_embed": torch.zeros(1, 50, 64)}}, d / "classifier.pt")
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(d / "in.png")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(d / "tiny.png")
    (d / "notimage.png").write_text("not a png")
    (d / "emptyimage.png").write_bytes(b"")
    (d / "adir.png").mkdir()
    (d / "afile").write_text("x")
    (d / "empty_folder").mkdir()
    (d / "no_images" / "classA").mkdir(parents=True)
    (d / "no_images" / "classA" / "readme.txt").write_text("x")
    for split in ("train", "test"):
        for c in ("a", "b"):
            (d / "data" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(d / "data" / split / c / f"{i}.png")
    (d / "gen").mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (28, 28, 3), dtype=np.uint8)).save(d / "gen" / f"{i:05d}.png")
    (d / "readonly").mkdir()
    os.chmod(d / "readonly", 0o555)


IMG = ["--image", "in.png"]
BOX = ["--box", "0,0,14,14"]
# (id, argv, words the error line must contain). --out OUT / --json OUT are replaced by a fresh path
# per case that must not exist afterwards.
CASES = [
    # unreadable checkpoints, in every command that loads one
    *[(f"generate-{bad}", ["generate", "--ckpt", f"{bad}.pt", "--out", "OUT"], [f"{bad}.pt", why])
      for bad, why in (("trunc", "truncated or corrupt"), ("corrupt", "fails its CRC-32 check"),
                       ("text", "not a torch file"), ("empty", "empty"), ("random", "not a readable"))],
    *[(f"{cmd}-{bad}", [cmd, "--ckpt", f"{bad}.pt", *extra, "--out", "OUT"], [f"{bad}.pt"])
      for cmd, extra in (("inpaint", IMG + BOX), ("outpaint", IMG + ["--keep-box", "0,0,14,14"]),
                         ("edit", IMG + BOX + ["--class-id", "1"]))
      for bad in ("corrupt", "random")],
    *[(f"eval-{bad}", ["eval", "probe", "--ckpt", f"{bad}.pt", "--train-dir", "data/train", "--test-dir",
                       "data/test", "--cache-dir", "", "--json", "OUT"], [f"{bad}.pt"])
      for bad in ("trunc", "text")],
    ("generate-ckpt-dir", ["generate", "--ckpt", "adir.png", "--out", "OUT"], ["is a directory", "checkpoint file"]),
    ("generate-ckpt-missing", ["generate", "--ckpt", "nope.pt", "--out", "OUT"], ["checkpoint not found"]),
    # checkpoints of the wrong kind
    *[(f"{cmd}-wrong-kind-{kind}", [cmd, "--ckpt", f"{kind}.pt", *extra, "--out", "OUT"],
       ["cannot build a MAGE", expect])
      for cmd, extra, kind, expect in (
          ("inpaint", IMG + BOX, "tokenizer", "VQGAN tokenizer"), ("inpaint", IMG + BOX, "classifier", "classifier"),
          ("outpaint", IMG + ["--keep-box", "0,0,14,14"], "tokenizer", "VQGAN tokenizer"),
          ("edit", IMG + BOX + ["--class-id", "1"], "classifier", "classifier"),
          ("generate", [], "classifier", "classifier"))],
    ("eval-wrong-kind", ["eval", "probe", "--ckpt", "tokenizer.pt", "--train-dir", "data/train", "--test-dir",
                         "data/test", "--cache-dir", "", "--json", "OUT"], ["cannot build a MAGE", "tokenizer"]),
    # sampling settings out of range
    ("num-iter-0", ["generate", "--num-iter", "0", "--out", "OUT"], ["--num-iter", ">= 1"]),
    ("num-iter-negative", ["inpaint", *IMG, *BOX, "--num-iter", "-3", "--out", "OUT"], ["--num-iter", ">= 1"]),
    ("temperature-negative", ["generate", "--temperature", "-1", "--out", "OUT"], ["--temperature", ">= 0"]),
    ("temperature-nan", ["generate", "--temperature", "nan", "--out", "OUT"], ["--temperature", "finite"]),
    ("guidance-negative", ["generate", "--class-id", "1", "--guidance", "-2", "--out", "OUT"], ["--guidance", ">= 0"]),
    ("top-k-negative", ["generate", "--top-k", "-1", "--out", "OUT"], ["--top-k", ">= 0"]),
    ("top-p-zero", ["generate", "--top-p", "0", "--out", "OUT"], ["--top-p", "(0, 1]"]),
    ("top-p-above-1", ["inpaint", *IMG, *BOX, "--top-p", "1.5", "--out", "OUT"], ["--top-p", "<= 1"]),
    ("top-p-official", ["generate", "--top-p", "0.9", "--rng", "official", "--out", "OUT"], ["top-k / top-p"]),
    ("guidance-without-class", ["generate", "--guidance", "2", "--out", "OUT"], ["--guidance needs --class-id"]),
    ("edit-guidance-without-class", ["inpaint", *IMG, *BOX, "--guidance", "1", "--out", "OUT"], ["--class-id"]),
    ("class-10", ["generate", "--class-id", "10", "--out", "OUT"], ["outside the model's 10 classes", "0..9"]),
    ("class-500", ["generate", "--class-id", "500", "--out", "OUT"], ["outside the model's 10 classes"]),
    ("class-negative", ["generate", "--class-id", "-1", "--out", "OUT"], ["outside the model's 10 classes"]),
    ("class-unknown-name", ["generate", "--class-id", "sock", "--out", "OUT"], ["tshirt_top", "ankle_boot"]),
    ("edit-class-all", ["edit", *IMG, *BOX, "--class-id", "all", "--out", "OUT"], ["one --class-id"]),
    ("edit-no-class", ["edit", *IMG, *BOX, "--out", "OUT"], ["edit needs --class-id"]),
    ("grow-negative", ["inpaint", *IMG, *BOX, "--grow", "-1", "--out", "OUT"], ["--grow", ">= 0"]),
    ("grid-0-ok-but-negative", ["generate", "--grid", "-1", "--out", "OUT"], ["--grid", ">= 0"]),
    ("num-images-0", ["generate", "--num-images", "0", "--out", "OUT"], ["--num-images", ">= 1"]),
    ("batch-size-0", ["generate", "--batch-size", "0", "--out", "OUT"], ["--batch-size", ">= 1"]),
    ("num-samples-negative", ["inpaint", *IMG, *BOX, "--num-samples", "-2", "--out", "OUT"],
     ["--num-samples", ">= 1"]),
    ("num-samples-0", ["outpaint", *IMG, "--keep-box", "0,0,14,14", "--num-samples", "0", "--out", "OUT"],
     ["--num-samples", ">= 1"]),
    ("seed-negative", ["generate", "--seed", "-5", "--out", "OUT"], ["--seed", ">= 0"]),
    ("seed-huge", ["generate", "--seed", str(2 ** 40), "--out", "OUT"], ["--seed", "<="]),
    ("rng-official-with-class", ["generate", "--rng", "official", "--class-id", "1", "--out", "OUT"],
     ["--rng official", "unconditional"]),
    ("rng-official-with-halton", ["generate", "--rng", "official", "--order", "halton", "--out", "OUT"],
     ["--rng official", "confidence order"]),
    ("cuda-graph-on-cpu", ["generate", "--cuda-graph", "--device", "cpu", "--out", "OUT"],
     ["--cuda-graph", "CUDA device", "--device cpu"]),
    ("device-bogus", ["generate", "--device", "bogus", "--out", "OUT"], ["--device", "auto, cpu, cuda"]),
    ("device-cuda-absent", ["generate", "--device", "cuda", "--out", "OUT"], ["no CUDA device"]),
    # output locations
    ("out-is-a-file", ["generate", "--out", "afile"], ["afile is a file", "folder"]),
    ("out-under-a-file", ["generate", "--out", "afile/sub"], ["is a file"]),
    ("out-read-only-fs", ["generate", "--out", "/proc/mage_fast_out"], ["not writable"]),
    ("inpaint-out-is-a-file", ["inpaint", *IMG, *BOX, "--out", "afile"], ["afile is a file"]),
    # images and masks
    ("image-missing", ["inpaint", "--image", "nope.png", *BOX, "--out", "OUT"], ["--image not found"]),
    ("image-directory", ["inpaint", "--image", "adir.png", *BOX, "--out", "OUT"], ["is a directory", "image file"]),
    ("image-not-an-image", ["inpaint", "--image", "notimage.png", *BOX, "--out", "OUT"],
     ["notimage.png", "not an image"]),
    ("image-empty", ["outpaint", "--image", "emptyimage.png", "--keep-box", "0,0,14,14", "--out", "OUT"],
     ["emptyimage.png is empty"]),
    ("image-1x1", ["inpaint", "--image", "tiny.png", *BOX, "--out", "OUT"], ["1x1", "at least"]),
    ("mask-missing", ["inpaint", *IMG, "--mask", "nomask.png", "--out", "OUT"], ["--mask not found"]),
    ("mask-not-an-image", ["inpaint", *IMG, "--mask", "notimage.png", "--out", "OUT"], ["not an image"]),
    ("no-box-no-mask", ["inpaint", *IMG, "--out", "OUT"], ["--box", "--mask"]),
    ("box-malformed", ["inpaint", *IMG, "--box", "1,2,3", "--out", "OUT"], ["x0,y0,x1,y1"]),
    # (the default model, mage_fmnist256, takes 32x32 images)
    ("box-outside-image", ["inpaint", *IMG, "--box", "0,0,64,64", "--out", "OUT"], ["<= 32", "32x32"]),
    ("keep-box-outside", ["outpaint", *IMG, "--keep-box", "0,0,256,256", "--out", "OUT"], ["--keep-box", "32"]),
    # eval and fid folders
    ("eval-missing-folder", ["eval", "probe", "--train-dir", "nope", "--test-dir", "data/test", "--json", "OUT"],
     ["image folder not found: nope"]),
    ("eval-empty-folder", ["eval", "fewshot", "--train-dir", "empty_folder", "--test-dir", "data/test",
                           "--json", "OUT"], ["no class sub-folders"]),
    ("eval-no-images", ["eval", "probe", "--train-dir", "no_images", "--test-dir", "data/test", "--json", "OUT"],
     ["holds no images"]),
    ("eval-limit-1", ["eval", "probe", "--train-dir", "data/train", "--test-dir", "data/test", "--limit", "1",
                      "--json", "OUT"], ["--limit", ">= 2"]),
    ("eval-json-is-dir", ["eval", "probe", "--train-dir", "data/train", "--test-dir", "data/test",
                          "--json", "adir.png"], ["--json", "is a directory"]),
    ("fid-missing-reference", ["fid", "gen", "nope", "--json", "OUT"], ["REF_DIR nope not found"]),
    ("fid-missing-generated", ["fid", "nope", "gen", "--json", "OUT"], ["GEN_DIR nope not found"]),
    ("fid-too-few", ["fid", "gen", "gen", "--json", "OUT"], ["3 image(s)", "--min-samples"]),
    ("fid-empty", ["fid", "empty_folder", "gen", "--json", "OUT"], ["no images in empty_folder"]),
]
if os.geteuid() != 0:  # root writes into a 0555 folder; the read-only file system case covers root
    CASES.append(("out-read-only-folder", ["generate", "--out", "readonly/out"], ["not writable"]))


def _cli(cwd, argv):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("MAGE_FAST_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "mage_fast", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_inputs")
    _write_files(d)
    jobs = {}
    with cf.ThreadPoolExecutor(max_workers=3) as pool:
        for cid, argv, _ in CASES:
            out = f"out_{cid}"
            argv = [out if a == "OUT" else a for a in argv]
            jobs[cid] = (out, pool.submit(_cli, d, argv))
        res = {cid: (d, out, f.result()) for cid, (out, f) in jobs.items()}
    yield res
    os.chmod(d / "readonly", 0o755)


@pytest.mark.parametrize("cid,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(results, cid, argv, words):
    d, out, proc = results[cid]
    both = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{both[-3000:]}"
    assert "Traceback" not in both, both[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    for w in words:
        assert w in lines[-1], f"{w!r} not in {lines[-1]!r}"
    assert not os.path.exists(d / out), f"{out} was written"
    assert not (d / "afile").is_dir() and (d / "afile").read_text() == "x"


SCRIPT_CASES = [  # the repository's scripts refuse bad input as the CLI does: status 2, one line
    (["train/export_checkpoint.py", "--run_dir", "no_run", "--out", "OUT"], ["no_run/args.json not found"]),
    (["train/cache_tokens.py", "--data_path", ".", "--tokenizer", "text.pt", "--img_size", "32", "--out", "OUT"],
     ["--tokenizer text.pt"]),
    (["benchmarks/decode_quality.py", "--merge", "text.pt", "--out", "OUT"], ["--merge text.pt"]),
]


@pytest.mark.parametrize("argv,words", SCRIPT_CASES, ids=[c[0][0] for c in SCRIPT_CASES])
def test_scripts_refuse_bad_input_with_status_2(results, argv, words):
    d = next(iter(results.values()))[0]  # the folder of bad files the CLI cases used
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    argv = [os.path.join(REPO, argv[0])] + ["script_out" if a == "OUT" else a for a in argv[1:]]
    proc = subprocess.run([sys.executable, *argv], cwd=d, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    for w in words:
        assert w in lines[-1], f"{w!r} not in {lines[-1]!r}"
    assert not os.path.exists(d / "script_out")


# ---------------------------------------------------------------------------------- the Python API
@pytest.fixture(scope="module")
def shipped():
    return mage_fast.MAGE.from_pretrained(ASSET)


def test_from_pretrained_is_in_eval_mode_and_knows_its_classes(shipped):
    assert not shipped.training and not any(m.training for m in shipped.modules())
    assert shipped.num_classes == 10 and shipped.class_names[8] == "bag"


def test_generate_refuses_settings_out_of_range(shipped):
    from mage_fast.models.checks import InputError
    for kw, words in ((dict(class_ids=torch.tensor([10])), "10-class model"),
                      (dict(class_ids=torch.tensor([500])), "10-class model"),
                      (dict(temperature=-1.0), "temperature"), (dict(temperature=float("inf")), "temperature"),
                      (dict(class_ids=torch.tensor([1]), guidance_scale=-1.0), "guidance_scale"),
                      (dict(num_iter=0), "num_iter")):
        with pytest.raises(InputError, match=words):
            mage_fast.generate(shipped, 1, rng="torch", **kw)
    with pytest.raises(InputError, match="grow"):
        from mage_fast.editing import inpaint
        inpaint(shipped, torch.rand(3, 28, 28), torch.ones(28, 28, dtype=torch.bool), grow=-1)


def test_generate_warns_on_a_model_in_training_mode(shipped):
    shipped.train()
    try:
        with pytest.warns(UserWarning, match="training mode"):
            mage_fast.generate(shipped, 1, num_iter=1, rng="torch")
    finally:
        shipped.eval()


def test_code_logits_accepts_only_codes_and_the_mask_id(shipped):
    from mage_fast.models.checks import InputError
    L, mask = shipped.seq_len, shipped.mask_token_label
    ok = torch.full((1, L), mask)
    ok[0, :3] = torch.tensor([0, 5, shipped.codebook_size - 1])
    assert shipped.code_logits(ok).shape == (1, L, shipped.codebook_size)
    for bad in (shipped.codebook_size, 1000, mask - 1, -1, 10 ** 6):
        ids = ok.clone()
        ids[0, 7] = bad
        with pytest.raises(InputError, match=f"got {bad}"):
            shipped.code_logits(ids)
    with pytest.raises(InputError, match="integer tensor"):
        shipped.code_logits(ok.float())
    with pytest.raises(InputError, match="shape"):
        shipped.code_logits(ok[:, :10])


def test_float64_and_float16_images_are_tokenized_as_float32(shipped):
    x = torch.rand(2, 3, 28, 28)
    ref = shipped.tokenize(x)
    assert torch.equal(shipped.tokenize(x.double()), ref)
    assert shipped.tokenize(x.half()).shape == ref.shape  # fp16 rounding may move a code; the call works
    assert shipped.probe_features(x.double()).dtype == torch.float32


def test_from_pretrained_explains_unreadable_files(tmp_path):
    from mage_fast import CheckpointError
    raw = open(ASSET, "rb").read()
    for name, data in (("trunc.pt", raw[:5000]), ("text.pt", b"hello\n"), ("empty.pt", b""),
                       ("random.pt", os.urandom(3000))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=name):
            mage_fast.MAGE.from_pretrained(str(tmp_path / name))
    with pytest.raises(CheckpointError, match="directory"):
        mage_fast.MAGE.from_pretrained(str(tmp_path))


# ------------------------------------------------------------------------------------ input images
def _load(path, size=28):
    from mage_fast.images import load_image
    notes = []
    return load_image(str(path), size, notes=notes, min_size=8), notes


def test_sixteen_bit_grayscale_keeps_its_levels(tmp_path):
    a = (np.linspace(0, 65535, 28 * 28).reshape(28, 28)).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    x, notes = _load(tmp_path / "g16.png")
    assert x.shape == (3, 28, 28) and not notes
    assert torch.allclose(x[0], torch.from_numpy(a / 65535.0).float(), atol=1e-6)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert len(torch.unique(x[0])) > 700  # not flattened to a few levels


def test_alpha_is_composited_over_a_stated_background(tmp_path):
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 128  # half transparent red
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    from mage_fast.images import load_image
    for bg, want in (("black", 200 * 128 / 255 / 255), ("white", (200 * 128 / 255 + 255 * 127 / 255) / 255)):
        notes = []
        x = load_image(str(tmp_path / "a.png"), 28, background=bg, notes=notes)
        assert x[0].mean().item() == pytest.approx(want, abs=1e-4)
        assert any(f"over {bg}" in n for n in notes)


def test_palette_images_go_through_their_palette(tmp_path):
    rgb = np.zeros((28, 28, 3), np.uint8)
    rgb[:, :14] = (10, 200, 30)
    rgb[:, 14:] = (250, 5, 90)
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=4).save(tmp_path / "p.png")
    x, _ = _load(tmp_path / "p.png")
    assert torch.allclose(x.permute(1, 2, 0) * 255, torch.from_numpy(rgb).float(), atol=1.0)


def test_crop_and_resize_are_reported_and_tiny_images_refused(tmp_path):
    from mage_fast.models.checks import InputError
    Image.fromarray(np.zeros((40, 56, 3), np.uint8)).save(tmp_path / "wide.png")
    x, notes = _load(tmp_path / "wide.png")
    assert x.shape == (3, 28, 28)
    assert any("centre-cropped to 40x40" in n for n in notes) and any("resized 40x40 -> 28x28" in n for n in notes)
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(tmp_path / "exact.png")
    assert _load(tmp_path / "exact.png")[1] == []
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(tmp_path / "one.png")
    with pytest.raises(InputError, match="1x1 pixels; expected at least 8x8"):
        _load(tmp_path / "one.png")


def test_eight_bit_rgb_loads_as_before(tmp_path):
    """The official preprocessing (centre crop, PIL bicubic on 8-bit RGB) is unchanged."""
    from mage_fast.images import load_image
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "c.png")
    im = Image.open(tmp_path / "c.png").convert("RGB").crop((5, 0, 55, 50)).resize((32, 32), Image.BICUBIC)
    want = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255).permute(2, 0, 1)
    assert torch.equal(load_image(str(tmp_path / "c.png"), 32), want)


# ------------------------------------------------------------------------------- run folders, fid
def test_run_folder_refuses_mixing_and_resumes(tmp_path):
    from mage_fast.models.checks import InputError
    from mage_fast.runs import MANIFEST, prepare_run, read_manifest, run_samples, save_atomic_png, finish_run
    out = str(tmp_path / "run")
    m = dict(kind="generate", model_sha256="abc", settings={"seed": 0}, first_index=0, num_images=3)
    assert prepare_run(out, m) == set() and read_manifest(out)["status"] == "running"
    img = np.zeros((28, 28, 3), np.uint8)
    save_atomic_png(img, os.path.join(out, "00000.png"))
    with pytest.raises(InputError, match="unfinished run"):
        run_samples(out)
    with pytest.raises(InputError, match="differs in settings.seed"):
        prepare_run(out, dict(m, settings={"seed": 1}))
    with pytest.raises(InputError, match="--resume"):
        prepare_run(out, m)
    (tmp_path / "run" / "00001.png").write_bytes(b"half a png")  # present but unreadable: redone
    assert prepare_run(out, m, resume=True, image_size=28) == {0}
    for i in (1, 2):
        save_atomic_png(img, os.path.join(out, f"{i:05d}.png"))
    finish_run(out)
    Image.fromarray(img).save(os.path.join(out, "process.png"))
    assert [os.path.basename(f) for f in run_samples(out)] == ["00000.png", "00001.png", "00002.png"]
    assert prepare_run(out, dict(m, settings={"seed": 1}), overwrite=True) == set()
    assert sorted(os.listdir(out)) == [MANIFEST]  # the old run's samples and pictures are gone
    foreign = tmp_path / "photos"
    foreign.mkdir()
    Image.fromarray(img).save(foreign / "holiday.png")
    with pytest.raises(InputError, match="not written by a mage_fast run"):
        prepare_run(str(foreign), m)


def test_generate_cli_run_folder_grid_and_resume(tmp_path):
    """--class-id all: one labelled column per class; a second run into the folder is refused; a run
    whose images were partly deleted is completed by --resume with the same images; fid reads only
    the manifest's samples (not process.png or grid.png)."""
    from mage_fast.cli import main
    from mage_fast.eval.frechet import sample_files
    out = tmp_path / "classes"
    args = ["generate", "--class-id", "all", "--num-images", "20", "--batch-size", "8", "--num-iter", "3",
            "--process", "--out", str(out)]
    assert main(args) == 0
    grid = np.asarray(Image.open(out / "grid.png"))
    tile = 32 * 2  # the default model's 32 px, enlarged x2 to the grid's 64-px minimum tile
    assert grid.shape[1] == 10 * (tile + 2) + 2  # ten columns, one per class
    assert grid.shape[0] > 2 * (tile + 2) + 2 + 10  # two rows plus a header of class names
    assert (grid[:12] < 128).any()  # the header holds dark text
    m = json.loads((out / "run.json").read_text())
    assert m["status"] == "complete" and m["settings"]["class_id"] == "all" and m["model_sha256"]
    files, note = sample_files(str(out))
    assert len(files) == 20 and note is None and not any("process" in f or "grid" in f for f in files)
    before = {i: (out / f"{i:05d}.png").read_bytes() for i in (3, 17)}
    assert main(args) == 2  # the same run again, without --resume or --overwrite
    for i in (3, 17):
        os.remove(out / f"{i:05d}.png")
    assert main(args + ["--resume"]) == 0
    assert all((out / f"{i:05d}.png").read_bytes() == before[i] for i in (3, 17))
    assert main(args[:-2] + ["--num-iter", "4", "--out", str(out)]) == 2  # other settings: refused


def test_process_picture_has_step_labels_and_a_legend(tmp_path):
    from mage_fast.cli import main
    assert main(["generate", "--num-images", "2", "--num-iter", "4", "--process", "--grid", "0",
                 "--out", str(tmp_path / "p")]) == 0
    assert not (tmp_path / "p" / "grid.png").exists()  # --grid 0: no grid
    pic = np.asarray(Image.open(tmp_path / "p" / "process.png"))
    tile = 32 * 2
    rows_h = 2 * (tile + 2) + 2
    assert pic.shape[0] > rows_h + 30  # a title, step labels and a legend around the rows
    assert pic.shape[1] == 5 * (tile + 2) + 2  # 4 steps + the "fixed at" column


def test_default_rng_is_per_image(tmp_path):
    """The CLI's default sampling keys each image by its index: batch size does not change it."""
    from mage_fast.cli import build_parser
    assert build_parser().parse_args(["generate"]).rng == "torch"


def test_eval_cache_is_keyed_by_the_data(tmp_path):
    """Two datasets, one checkpoint, one cache folder: each run reports its own data's accuracy."""
    from mage_fast.cli import main
    rng = np.random.default_rng(0)

    def folder(name, classes):
        for split in ("train", "test"):
            for c, v in enumerate(classes):
                p = tmp_path / name / split / f"c{c}"
                p.mkdir(parents=True)
                for i in range(6):
                    a = np.clip(rng.normal(v, 20, (28, 28)), 0, 255).astype(np.uint8)
                    Image.fromarray(a).save(p / f"{i}.png")
    folder("easy", [20, 230])
    folder("hard", [120, 125])
    res = {}
    for name in ("easy", "hard", "easy"):
        js = tmp_path / f"{name}.json"
        assert main(["eval", "fewshot", "--train-dir", str(tmp_path / name / "train"), "--test-dir",
                     str(tmp_path / name / "test"), "--shots", "3", "--seeds", "2", "--cache-dir",
                     str(tmp_path / "cache"), "--json", str(js)]) == 0
        res.setdefault(name, []).append(json.loads(js.read_text())["result"]["3"]["mean"])
    assert len(os.listdir(tmp_path / "cache")) == 4  # one file per (data, split), reused the third time
    assert res["easy"][0] == res["easy"][1] and res["easy"][0] > res["hard"][0]


def test_eval_limit_and_probe_lr_warning(tmp_path, capsys):
    from mage_fast.cli import main
    from mage_fast.cli.evaluate import _subset
    items = [(f"{i}.png", i % 2) for i in range(100)]
    a, b = _subset(items, 10, 0), _subset(items, 10, 0)
    assert a == b and len(a) == 10 and a == sorted(a, key=lambda t: int(t[0][:-4]))
    assert _subset(items, 10, 1) != a
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(2):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(5):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(tmp_path / split / f"c{c}" / f"{i}.png")
    common = ["eval", "probe", "--train-dir", str(tmp_path / "train"), "--test-dir", str(tmp_path / "test"),
              "--epochs", "2", "--cache-dir", ""]
    assert main(common + ["--blr", "0.1", "--limit", "6"]) == 0
    cap = capsys.readouterr()
    assert "6 training and 6 test images" in cap.out
    assert "warning: probe lr 0.1" in cap.err and "far from the official" in cap.err
    assert main(common) == 0
    cap = capsys.readouterr()
    assert "probe lr 6.4" in cap.out and "warning" not in cap.err


def test_fid_reports_how_it_chose_the_files_and_warns_on_small_sets(tmp_path, capsys):
    pytest.importorskip("efficientnet_lite_pytorch", reason="offline Frechet needs efficientnet-lite-pytorch "
                                                            "(a [test] extra)")
    from mage_fast.cli import main
    rng = np.random.default_rng(0)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / d / f"{i}.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a" / "process.png")
    assert main(["fid", str(tmp_path / "a"), str(tmp_path / "b"), "--min-samples", "4"]) == 0
    cap = capsys.readouterr()
    assert "(4 vs 4 images)" in cap.out  # process.png is not a sample
    assert "using all 4 image files" in cap.err and "WARNING: only 4 images" in cap.err


# ------------------------------------------------------------------------------------ help, version
def test_help_lists_every_command_and_default():
    env = dict(os.environ, PYTHONPATH=REPO)
    top = subprocess.run([sys.executable, "-m", "mage_fast", "--help"], capture_output=True, text=True, env=env)
    assert top.returncode == 0
    for cmd in ("generate", "inpaint", "outpaint", "edit", "eval", "fid", "info"):
        assert f"\n    {cmd}" in top.stdout, cmd
    assert "unconditional, or class-conditional" in top.stdout
    ver = subprocess.run([sys.executable, "-m", "mage_fast", "--version"], capture_output=True, text=True, env=env)
    assert ver.returncode == 0 and mage_fast.__version__ in ver.stdout and "torch" in ver.stdout
    from mage_fast.cli import build_parser
    p = build_parser()
    sub = next(a for a in p._actions if a.dest == "cmd")
    for name, sp in sub.choices.items():
        text = sp.format_help()
        for a in sp._actions:
            if a.option_strings and a.dest != "help" and a.help:
                assert "default" in (a.help + sp.formatter_class(prog="x")._get_help_string(a)), (name, a.dest)
        assert "usage:" in text


def test_readme_editing_examples_run_as_written(tmp_path):
    """The README's shipped-model block, command by command (the first writes the input image)."""
    text = open(os.path.join(REPO, "README.md")).read()
    block = text.split("<!-- shipped-model-examples -->")[1].split("```")[1]
    cmds = [ln.strip() for ln in block.replace("\\\n", " ").splitlines() if ln.strip().startswith("python -m")]
    assert {c.split()[3] for c in cmds} >= {"generate", "inpaint", "outpaint", "edit"}, cmds
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for c in cmds:
        argv = c.split("#")[0].split()
        r = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, (c, r.stderr[-2000:])
    for d in ("inp", "outp", "edit"):
        assert (tmp_path / d / "before_after.png").is_file() and (tmp_path / d / "run.json").is_file()
    shutil.rmtree(tmp_path)
