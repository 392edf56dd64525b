"""One contract for every entry point (issue 30): bad input is refused with one clear line naming
the flag, file or argument and what was expected.

- Scripts (``train/``, ``benchmarks/``): exit status 2, the last line on stderr ``error: ...``, no
  traceback (``MAGE_FAST_DEBUG=1`` shows it), nothing written.
- The Python API: :class:`mage_fast.InputError` (or :class:`mage_fast.CheckpointError`) naming the
  argument; wrong types are refused, never rounded.
- Files a later run trusts are written atomically and honour the umask; an unreadable statistics
  cache is named and recomputed.

Every case is cheap: the shipped model for the API, subprocesses that stop before any training.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import mage_fast
from mage_fast.models.checks import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET = os.path.join(REPO, "mage_fast", "assets", "mage_fmnist.pt")
PRETRAIN = ["train/pretrain.py", "--model", "tiny", "--img_size", "32", "--max_steps", "1"]
SYNTH = [*PRETRAIN, "--synthetic"]
CACHE = ["train/cache_tokens.py", "--tokenizer", ASSET, "--img_size", "32"]
VIM = ["train/train_vim.py", "--tokenizer", ASSET, "--img_size", "32", "--max_steps", "1"]
DECODE = ["benchmarks/decode_throughput.py", "--model", "tiny"]
BENCHMARKS = ["ar_vs_mage", "codebook_nn_int16", "cpu_ops_quick", "kernels", "linear_precision", "parallel_sampling",
              "train_throughput", "train_precision_curve", "class_agreement", "decode_quality", "startup"]
REQUIRED = {"train_precision_curve": ["--token_cache", "x.pt"]}  # required flags show no default


# ------------------------------------------------------------------------------------ the Python API
@pytest.fixture(scope="module")
def model():
    return mage_fast.MAGE.from_pretrained(ASSET)


def _api_cases():
    from mage_fast.editing import inpaint, outpaint

    def box(m):
        return torch.ones(m.img_size, m.img_size, dtype=torch.bool)

    def img(m):
        return torch.rand(3, m.img_size, m.img_size)

    gen = dict(num_iter=1, rng="torch")
    return [  # (id, call(model), words the message must hold)
        ("generate-seed-float", lambda m: mage_fast.generate(m, 1, seed=1.5, **gen), ["seed", "integer", "1.5"]),
        ("generate-seed-negative", lambda m: mage_fast.generate(m, 1, seed=-1, **gen), ["seed", ">= 0"]),
        ("generate-official-seed-too-big", lambda m: mage_fast.generate(m, 1, seed=2 ** 40, num_iter=1),
         ["seed", "<="]),
        ("generate-class-ids-float-tensor", lambda m: mage_fast.generate(m, 1, class_ids=torch.tensor([1.7]), **gen),
         ["class_ids", "integer"]),
        ("generate-class-ids-float", lambda m: mage_fast.generate(m, 1, class_ids=1.7, **gen), ["class_ids"]),
        ("generate-class-ids-bool", lambda m: mage_fast.generate(m, 1, class_ids=torch.tensor([True]), **gen),
         ["class_ids"]),
        ("generate-batch-size-float", lambda m: mage_fast.generate(m, 2.0, **gen), ["batch_size", "integer"]),
        ("generate-path-for-model", lambda m: mage_fast.generate(ASSET, 1), ["model", "path", "from_pretrained"]),
        ("generate-tokenizer-for-model", lambda m: mage_fast.generate(m.vqgan, 1), ["model", "tokenizer"]),
        ("generate-state-dict-for-model", lambda m: mage_fast.generate(m.state_dict(), 1), ["model", "dict"]),
        ("generate-bad-schedule", lambda m: mage_fast.generate(m, 1, schedule="nope", **gen), ["mask schedule"]),
        ("inpaint-path-for-model", lambda m: inpaint(ASSET, img(m), box(m)), ["model", "path"]),
        ("inpaint-tokenizer-for-model", lambda m: inpaint(m.vqgan, img(m), box(m)), ["model", "tokenizer"]),
        ("inpaint-numpy-image", lambda m: inpaint(m, np.zeros((m.img_size, m.img_size, 3), np.uint8), box(m)),
         ["image", "torch.Tensor", "ndarray"]),
        ("inpaint-numpy-region", lambda m: inpaint(m, img(m), np.ones((m.img_size, m.img_size), bool)),
         ["region", "torch.Tensor"]),
        ("inpaint-image-2d", lambda m: inpaint(m, torch.rand(m.img_size, m.img_size), box(m)), ["image", "shape"]),
        ("inpaint-class-id-float", lambda m: inpaint(m, img(m), box(m), class_id=1.5), ["class_id", "integer"]),
        ("inpaint-seed-float", lambda m: inpaint(m, img(m), box(m), seed=0.5), ["seed", "integer"]),
        ("outpaint-numpy-image", lambda m: outpaint(m, np.zeros((m.img_size, m.img_size, 3)), (0, 0, 8, 8)),
         ["image", "torch.Tensor"]),
        ("outpaint-box-float", lambda m: outpaint(m, img(m), (0, 0, 8.5, 8)), ["box", "integer", "8.5"]),
        ("outpaint-box-three", lambda m: outpaint(m, img(m), (0, 0, 8)), ["box", "(x0, y0, x1, y1)"]),
        ("tokenize-numpy", lambda m: m.tokenize(np.zeros((1, 3, m.img_size, m.img_size), np.float32)),
         ["torch.Tensor", "ndarray"]),
    ]


API_CASES = _api_cases()


@pytest.mark.parametrize("call,words", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_with_input_error_naming_the_argument(model, call, words):
    with pytest.raises(InputError) as e:
        call(model)
    for w in words:
        assert w in str(e.value), f"{w!r} not in {str(e.value)!r}"


def test_wrong_types_are_also_type_errors(model):
    """InputTypeError is an InputError and, as before, a TypeError."""
    with pytest.raises(TypeError):
        mage_fast.generate(model, 1, class_ids=torch.tensor([1.7]), num_iter=1, rng="torch")
    assert mage_fast.InputError is InputError


def test_numpy_integers_are_integers(model):
    out = mage_fast.generate(model, 1, seed=np.int64(3), class_ids=[np.int64(1)], num_iter=1, rng="torch")
    ref = mage_fast.generate(model, 1, seed=3, class_ids=torch.tensor([1]), num_iter=1, rng="torch")
    assert torch.equal(out, ref)


# ------------------------------------------------------------------------------------------ scripts
def _bad_files(d):
    (d / "afile").write_text("x")
    (d / "no_images" / "a").mkdir(parents=True)
    (d / "no_images" / "a" / "readme.txt").write_text("x")
    (d / "no_classes").mkdir()
    (d / "bad.json").write_text('{"zero_optimization": ')
    (d / "list.json").write_text("[1, 2]")
    (d / "stage.json").write_text('{"zero_optimization": {"stage": 7}}')
    raw = open(ASSET, "rb").read()
    (d / "trunc.pt").write_bytes(raw[: len(raw) // 3])
    torch.save({"model": {"head.weight": torch.zeros(10, 64), "fc_norm.weight": torch.zeros(64)}}, d / "cls.pt")
    ck = d / "run" / "checkpoints"
    (ck / "step1").mkdir(parents=True)
    (ck / "latest").write_text("step1")
    (ck / "step1" / "mp_rank_00_model_states.pt").write_bytes(raw[:3000])  # a save cut short
    (d / "lost" / "checkpoints").mkdir(parents=True)
    (d / "lost" / "checkpoints" / "latest").write_text("step9")
    (d / "nolatest").mkdir()
    rng = np.random.default_rng(0)
    for name in ("gen", "ref"):
        (d / name).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / name / f"{i:05d}.png")
    # token caches for the tokenizer of ASSET at --img_size 32: 8 x 8 = 64 tokens, 256 codes
    ids = torch.randint(0, 256, (3, 2, 64), dtype=torch.int16)
    meta = dict(seq_len=64, n_embed=256, img_size=32)
    torch.save({"ids": ids, "labels": torch.zeros(3, dtype=torch.long), "meta": meta}, d / "tc.pt")
    whole = (d / "tc.pt").read_bytes()
    (d / "tc_trunc.pt").write_bytes(whole[: len(whole) // 2])
    torch.save({"ids": ids.clone().fill_(300), "labels": torch.zeros(3, dtype=torch.long)}, d / "tc_range.pt")
    torch.save({"ids": ids[:, :, :16].clone(), "meta": dict(meta, seq_len=16)}, d / "tc_seq.pt")
    torch.save({"ids": ids.float()}, d / "tc_float.pt")
    torch.save({"ids": ids, "labels": torch.zeros(5, dtype=torch.long)}, d / "tc_labels.pt")
    (d / "adir").mkdir()
    (d / "corrupt" / "a").mkdir(parents=True)
    (d / "corrupt" / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    (d / "ref_folder" / "a").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / "ref_folder" / "a" / "0.png")


SCRIPT_CASES = [  # (id, argv with OUT for a path that must not be created, words of the error line)
    ("decode-mode-bogus", [*DECODE, "--mode", "bogus", "--out", "OUT"], ["--mode bogus", "unknown decoding mode"]),
    ("decode-only-bogus", [*DECODE, "--only", "nope", "--out", "OUT"], ["--only nope", "vqgan_decode"]),
    ("decode-batch-sizes-0", [*DECODE, "--batch-sizes", "0", "--out", "OUT"], ["--batch-sizes", ">= 1", "got 0"]),
    ("decode-batch-sizes-text", [*DECODE, "--batch-sizes", "x", "--out", "OUT"], ["--batch-sizes", "invalid int"]),
    ("decode-num-iter-0", [*DECODE, "--num-iter", "0", "--out", "OUT"], ["--num-iter", ">= 1"]),
    ("decode-temperature-nan", [*DECODE, "--temperature", "nan", "--out", "OUT"], ["--temperature", "finite"]),
    ("decode-device-bogus", [*DECODE, "--device", "tpu", "--out", "OUT"], ["--device", "'tpu'"]),
    ("decode-ckpt-missing", [*DECODE, "--ckpt", "nope.pt", "--out", "OUT"], ["--ckpt nope.pt"]),
    ("decode-out-under-a-file", [*DECODE, "--out", "afile/d.json"], ["--out afile/d.json", "is a file"]),
    ("decode-out-a-folder", [*DECODE, "--out", "adir"], ["--out adir", "directory"]),
    ("pretrain-data-no-images", [*PRETRAIN, "--data_path", "no_images", "--output_dir", "OUT"],
     ["--data_path no_images", "no images"]),
    ("pretrain-data-no-classes", [*PRETRAIN, "--data_path", "no_classes", "--output_dir", "OUT"],
     ["--data_path no_classes", "class sub-folders"]),
    ("pretrain-output-dir-is-a-file", [*SYNTH, "--output_dir", "afile"], ["--output_dir afile", "is a file"]),
    ("pretrain-output-dir-under-a-file", [*SYNTH, "--output_dir", "afile/run"], ["--output_dir afile/run"]),
    ("pretrain-deepspeed-config-malformed", [*SYNTH, "--deepspeed_config", "bad.json", "--output_dir", "OUT"],
     ["--deepspeed_config bad.json", "JSON"]),
    ("pretrain-deepspeed-config-list", [*SYNTH, "--deepspeed_config", "list.json", "--output_dir", "OUT"],
     ["--deepspeed_config list.json", "JSON object"]),
    ("pretrain-deepspeed-config-stage", [*SYNTH, "--deepspeed_config", "stage.json", "--output_dir", "OUT"],
     ["--deepspeed_config stage.json", "stage"]),
    ("pretrain-deepspeed-config-missing", [*SYNTH, "--deepspeed_config", "zero9", "--output_dir", "OUT"],
     ["--deepspeed_config", "'zero9' not found"]),
    ("pretrain-tokenizer-truncated", [*SYNTH, "--tokenizer", "trunc.pt", "--output_dir", "OUT"],
     ["--tokenizer trunc.pt", "truncated"]),
    ("pretrain-tokenizer-classifier", [*SYNTH, "--tokenizer", "cls.pt", "--output_dir", "OUT"],
     ["--tokenizer cls.pt", "not a tokenizer"]),
    ("pretrain-tokenizer-text", [*SYNTH, "--tokenizer", "afile", "--output_dir", "OUT"], ["--tokenizer afile"]),
    ("pretrain-vqgan-config-list", [*SYNTH, "--vqgan_config", "[1]", "--output_dir", "OUT"],
     ["--vqgan_config", "JSON object"]),
    ("pretrain-mask-ratio-order", [*SYNTH, "--mask_ratio_min", "0.9", "--mask_ratio_max", "0.5", "--output_dir",
                                   "OUT"], ["--mask_ratio_min", "--mask_ratio_max"]),
    ("pretrain-resume-truncated", [*SYNTH, "--output_dir", "run", "--resume", "auto"],
     ["--resume", "mp_rank_00_model_states.pt", "cut short"]),
    ("pretrain-resume-latest-lost", [*SYNTH, "--output_dir", "lost", "--resume", "auto"],
     ["--resume", "step9", "missing"]),
    ("pretrain-resume-no-checkpoint", [*SYNTH, "--resume", "nolatest", "--output_dir", "OUT"],
     ["--resume nolatest", "no checkpoint"]),
    ("pretrain-corrupt-image-auto-backend", [*PRETRAIN, "--data_path", "corrupt", "--data_backend", "auto",
                                             "--batch_size", "1", "--num_workers", "0", "--no_progress"],
     ["corrupt/a/0.png", "not a readable image"]),  # auto: no DALI without a CUDA device; the file named
    *((f"pretrain-token-cache-{k}", [*PRETRAIN, "--tokenizer", ASSET, "--token_cache", f, "--output_dir", "OUT"],
       [f"--token_cache {f}", *w]) for k, f, w in (
        ("missing", "nope.pt", ["not found", "cache_tokens.py"]),
        ("truncated", "tc_trunc.pt", ["not a readable token cache"]),
        ("text", "afile", ["not a readable token cache"]),
        ("a-checkpoint", "cls.pt", ["not a token cache", "'ids'"]),
        ("ids-out-of-range", "tc_range.pt", ["token ids in [300, 300]", "[0, 256)"]),
        ("sequence-length", "tc_seq.pt", ["16-token grid", "64 tokens per image"]),
        ("float-ids", "tc_float.pt", ["integer tensor", "torch.float32"]),
        ("labels-count", "tc_labels.pt", ["'labels'", "3 class ids"]))),
    ("pretrain-dali-synthetic", [*SYNTH, "--data_backend", "dali", "--output_dir", "OUT"],
     ["--data_backend dali", "image folders"]),
    ("pretrain-dali-two-views", [*PRETRAIN, "--data_path", "corrupt", "--data_backend", "dali", "--contrastive_weight",
                                 "0.1", "--output_dir", "OUT"], ["--data_backend dali", "--contrastive_weight"]),
    ("pretrain-img-size-0", [*SYNTH, "--img_size", "0", "--output_dir", "OUT"], ["--img_size", ">= 1", "got 0"]),
    ("pretrain-num-workers-negative", [*SYNTH, "--num_workers", "-1", "--output_dir", "OUT"],
     ["--num_workers", ">= 0"]),
    ("pretrain-keep-last-negative", [*SYNTH, "--keep_last", "-2", "--output_dir", "OUT"], ["--keep_last", ">= 0"]),
    ("pretrain-synthetic-length-below-batch", [*SYNTH, "--synthetic_length", "8", "--output_dir", "OUT"],
     ["--synthetic_length 8", "--batch_size 32"]),
    ("pretrain-fewer-images-than-a-batch", [*PRETRAIN, "--data_path", "ref_folder", "--data_backend", "torch",
                                            "--no_progress"], ["1 samples", "no full batch of 32", "--batch_size"]),
    ("tokenizer-img-size-0", ["train/train_tokenizer.py", "--synthetic", "--img_size", "0", "--max_steps", "1",
                              "--output_dir", "OUT"], ["--img_size", ">= 1"]),
    ("cache-tokens-data-path-a-file", [*CACHE, "--data_path", "afile", "--out", "OUT"],
     ["--data_path afile", "not a directory"]),
    ("cache-tokens-data-path-missing", [*CACHE, "--data_path", "nope", "--out", "OUT"], ["--data_path nope"]),
    ("cache-tokens-out-a-folder", [*CACHE, "--data_path", "ref_folder", "--out", "adir"], ["--out adir", "directory"]),
    ("cache-tokens-out-under-a-file", [*CACHE, "--data_path", "ref_folder", "--out", "afile/x.pt"],
     ["--out afile/x.pt", "is a file"]),
    ("cache-tokens-img-size-not-a-multiple", [*CACHE, "--data_path", "ref_folder", "--img_size", "30", "--out", "OUT"],
     ["--img_size 30", "downsampling 4"]),
    ("cache-tokens-batch-size-0", [*CACHE, "--data_path", "ref_folder", "--batch_size", "0", "--out", "OUT"],
     ["--batch_size", ">= 1"]),
    ("cache-tokens-tokenizer-truncated", ["train/cache_tokens.py", "--tokenizer", "trunc.pt", "--img_size", "32",
                                          "--data_path", "ref_folder", "--out", "OUT"], ["--tokenizer trunc.pt"]),
    ("evaluate-recon-data-path-a-file", ["train/evaluate.py", "recon", "--tokenizer", ASSET, "--data_path", "afile",
                                         "--img_size", "32"], ["afile", "not an image folder"]),
    ("evaluate-recon-data-path-no-images", ["train/evaluate.py", "recon", "--tokenizer", ASSET, "--data_path",
                                            "no_images", "--img_size", "32"], ["no_images", "no images"]),
    ("vim-token-cache-sequence-length", [*VIM, "--token_cache", "tc_seq.pt", "--output_dir", "OUT"],
     ["--token_cache tc_seq.pt", "16-token grid", "64 tokens per image"]),  # the tokenizer's grid, before args.json
    ("vim-token-cache-ids-out-of-range", [*VIM, "--token_cache", "tc_range.pt", "--output_dir", "OUT"],
     ["--token_cache tc_range.pt", "token ids in [300, 300]"]),
    ("vim-img-size-not-a-multiple", [*VIM, "--synthetic", "--img_size", "30", "--output_dir", "OUT"],
     ["--img_size 30", "downsampling 4"]),
    ("vim-heads-do-not-split", [*VIM, "--synthetic", "--embed_dim", "65", "--output_dir", "OUT"],
     ["--embed_dim 65", "heads"]),
    ("vim-init-from-text", [*VIM, "--synthetic", "--init_from", "afile", "--output_dir", "OUT"],
     ["--init_from", "afile", "not a readable torch checkpoint"]),
    ("vim-init-from-a-folder", [*VIM, "--synthetic", "--init_from", "adir", "--output_dir", "OUT"],
     ["--init_from", "adir", "directory"]),
    ("vim-tokenizer-truncated", [*VIM[:1], "--tokenizer", "trunc.pt", "--synthetic", "--max_steps", "1",
                                 "--output_dir", "OUT"], ["--tokenizer trunc.pt"]),
    *((f"{b}-unknown-flag", [f"benchmarks/{b}.py", *REQUIRED.get(b, []), "--no-such-flag"],
       ["error: unrecognized arguments", "--no-such-flag"]) for b in BENCHMARKS),
    ("fid-ref-stats-a-folder", ["-m", "mage_fast", "fid", "gen", "ref", "--min-samples", "2", "--ref-stats", "adir",
                                "--json", "OUT"], ["--ref-stats adir", "directory"]),
]


def _script(cwd, argv, debug=False, path_first=None):
    env = dict(os.environ, PYTHONPATH=REPO if path_first is None else os.pathsep.join([path_first, REPO]),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("MAGE_FAST_DEBUG", None)
    if debug:
        env["MAGE_FAST_DEBUG"] = "1"
    argv = list(argv) if argv[0] == "-m" else [os.path.join(REPO, argv[0]), *argv[1:]]
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("entry_contract")
    _bad_files(d)
    return d


def _listing(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs + [""])


@pytest.mark.parametrize("argv,words", [c[1:] for c in SCRIPT_CASES], ids=[c[0] for c in SCRIPT_CASES])
def test_script_refuses_bad_input_with_one_line_and_status_2(bad_dir, argv, words):
    out = f"out_{abs(hash(tuple(argv)))}"
    argv = [out if a == "OUT" else a for a in argv]
    before = _listing(bad_dir)
    proc = _script(bad_dir, argv)
    both = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"exit {proc.returncode}\n{both[-3000:]}"
    assert "Traceback" not in both, both[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error" in ln]
    assert len(errors) == 1 and lines[-1] is errors[0], proc.stderr[-2000:]
    for w in words:
        assert w in lines[-1], f"{w!r} not in {lines[-1]!r}"
    assert _listing(bad_dir) == before, "the refused run wrote something"  # no args.json, no output folder


def _check_one_line(proc, words):
    both = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in both, f"exit {proc.returncode}\n{both[-3000:]}"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert [ln for ln in lines if "error" in ln] == lines[-1:], proc.stderr[-2000:]
    for w in words:
        assert w in lines[-1], f"{w!r} not in {lines[-1]!r}"


def test_explicit_dali_without_dali_installed_is_refused_before_writing(bad_dir, tmp_path):
    """``--data_backend dali`` where nvidia-dali is not installed (hidden here behind an ``nvidia``
    package without it): one line before args.json, whatever this machine has."""
    (tmp_path / "nvidia").mkdir()
    (tmp_path / "nvidia" / "__init__.py").write_text("")
    before = _listing(bad_dir)
    proc = _script(bad_dir, [*PRETRAIN, "--data_path", "ref_folder", "--data_backend", "dali", "--output_dir",
                             "out_nodali"], path_first=str(tmp_path))
    _check_one_line(proc, ["--data_backend dali", "nvidia-dali is not installed", "--data_backend torch"])
    assert _listing(bad_dir) == before, "the refused run wrote something"


@pytest.mark.skipif(not __import__("mage_fast.data", fromlist=["x"]).dali_available(),
                    reason="nvidia-dali not installed")
def test_corrupt_image_under_explicit_dali_is_named(bad_dir):
    """DALI's decoder stops its pipeline without naming the file; the file is found and named (on
    this machine DALI's CPU pipeline; a GPU's 'mixed' decoder goes through the same path)."""
    proc = _script(bad_dir, [*PRETRAIN, "--data_path", "corrupt", "--data_backend", "dali", "--batch_size", "1",
                             "--num_workers", "1", "--no_progress"])
    _check_one_line(proc, ["corrupt/a/0.png", "not a readable image", "DALI's decoder"])


def test_debug_shows_the_traceback(bad_dir):
    proc = _script(bad_dir, [*DECODE, "--batch-sizes", "0"], debug=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "InputError" in proc.stderr


@pytest.mark.parametrize("script", ["train/pretrain.py", "benchmarks/decode_throughput.py",
                                    *(f"benchmarks/{b}.py" for b in BENCHMARKS)])
def test_help_shows_every_default(bad_dir, script):
    proc = _script(bad_dir, [script, "--help"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout.split("options:", 1)[1]
    blocks, cur = [], None
    for ln in text.splitlines():
        s = ln.strip()
        if s.startswith("-") and ln.startswith("  -"):
            cur = [s]
            blocks.append(cur)
        elif cur is not None and s:
            cur.append(s)
    options = [b for b in blocks if not b[0].startswith(("-h", "--help"))]
    assert len(options) >= 2
    required = [f for args in REQUIRED.values() for f in args if f.startswith("--")]
    missing = [b[0].split()[0] for b in options if "default" not in " ".join(b) and b[0].split()[0] not in required]
    assert not missing, f"no default shown for {missing}"
    if script.endswith("pretrain.py"):
        for flag, value in (("--mask_ratio_min", "0.5"), ("--mask_ratio_std", "0.25")):
            block = next(" ".join(b) for b in options if b[0].startswith(flag))
            assert f"(default: {value})" in block, block


# ---------------------------------------------------------------------------------- files written
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, umask, mode):
    from mage_fast.eval.frechet import write_stats_cache
    from mage_fast.runs import save_atomic_png, write_json, write_manifest
    old = os.umask(umask)
    try:
        save_atomic_png(np.zeros((4, 4, 3), np.uint8), str(tmp_path / "00000.png"))
        write_manifest(str(tmp_path), {"kind": "generate", "num_images": 1})
        write_json(str(tmp_path / "r.json"), {"a": 1})
        write_stats_cache({"mu": torch.zeros(2), "sigma": torch.eye(2), "n": 2}, str(tmp_path / "s.pt"))
    finally:
        os.umask(old)
    for f in ("00000.png", "run.json", "r.json", "s.pt"):
        assert os.stat(tmp_path / f).st_mode & 0o777 == mode, f
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


class _Features:
    name = "test_features"

    def __call__(self, arrs):
        return torch.stack([torch.from_numpy(a.astype(np.float64)).mean(dim=(0, 1)) for a in arrs])


@pytest.mark.parametrize("content", ["truncated", "text", "tensor", "empty"])
def test_unreadable_statistics_cache_is_named_and_recomputed(tmp_path, capsys, content):
    from mage_fast.eval.frechet import sharded_stats
    rng = np.random.default_rng(0)
    files = []
    for i in range(4):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(files[-1])
    cache = tmp_path / "ref_stats.pt"
    good = sharded_stats(files, _Features(), cache=str(cache), progress=False)
    raw = cache.read_bytes()
    bad = {"truncated": raw[: len(raw) // 2], "text": b"not a cache\n", "empty": b""}
    if content == "tensor":
        torch.save(torch.zeros(3), cache)
    else:
        cache.write_bytes(bad[content])
    capsys.readouterr()
    again = sharded_stats(files, _Features(), cache=str(cache), progress=False)  # no crash: recomputed
    err = capsys.readouterr().err
    assert str(cache) in err and "recomputing" in err
    assert torch.equal(again["mu"], good["mu"]) and torch.equal(again["sigma"], good["sigma"])
    third = sharded_stats(files, _Features(), cache=str(cache), progress=False)  # rewritten whole: read back
    assert capsys.readouterr().err == "" and torch.equal(third["mu"], good["mu"])
