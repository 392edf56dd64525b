"""Fuzzing the readers users feed (issue 30, part 4), with hypothesis: images (the CLI's loader for
inpaint / outpaint, the training ImageFolder), ``--mask`` images (the CLI's mask reader), checkpoints
(``MAGE.from_pretrained``, ``build_from_checkpoint``, the CLI's ``load_model``), model cards (the JSON
beside a checkpoint: the model's class names, the CLI's sampling defaults and ``--class-id``), tokenizer
exports (``--tokenizer`` as train/pretrain.py and train/cache_tokens.py read it), resume checkpoints
(the files of ``checkpoints/stepN/`` and ``latest`` that ``--resume auto`` checks and loads into a
DeepSpeed engine), run manifests (``run.json``, as ``--resume`` and ``fid`` read them), token caches and
``--ref-stats`` statistics caches.

Inputs: valid files truncated, with bytes flipped or overwritten, random bytes, valid archives with
wrong contents (wrong types, missing or mis-shaped tensors, configs of wrong types or sizes), JSON of
wrong types. Each reader must succeed or raise its documented exception: ``InputError`` (images, masks,
run manifests, token caches, resume checkpoints), ``CheckpointError`` (checkpoints, model cards,
tokenizer exports; the CLI's ``CLIError`` for paths and masks), and a statistics cache is recomputed
(the reader returns None), never another exception type; and no example may hang: each has a hard
deadline of :data:`DEADLINE_S` seconds (SIGALRM). Examples are derandomized; their number per reader
is stated in each test's ``settings`` (``max_examples``): 150 images, 100 training images, 100 masks,
30 + 50 checkpoints, 80 model cards, 30 + 60 tokenizer exports, 40 resume checkpoints, 80 run
manifests, 80 token caches, 80 statistics caches. The resume test makes its checkpoint with one
train/pretrain.py step first; the file takes a few minutes on one thread.
"""
import io
import json
import os
import signal
import tempfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (a [test] extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mage_fast.models.checkpoint import CheckpointError  # noqa: E402
from mage_fast.models.checks import InputError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET = os.path.join(REPO, "mage_fast", "assets", "mage_fmnist.pt")
DEADLINE_S = 10  # per example, hard (a hang fails the test); hypothesis' own deadline is off: the machine is shared
FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


class Hang(Exception):
    pass


def _alarm(signum, frame):
    raise Hang(f"a reader ran past its {DEADLINE_S} s deadline")


def _within_deadline(fn, *args, **kw):
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(DEADLINE_S)
    try:
        return fn(*args, **kw)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _expect(allowed, fn, *args, **kw):
    """``fn`` succeeds or raises one of ``allowed``; anything else (or a hang) fails the test."""
    try:
        return _within_deadline(fn, *args, **kw)
    except allowed:
        return None


def mutated(data: bytes):
    """Strategy: ``data`` truncated, with bytes flipped or overwritten, with a slice deleted or random
    bytes inserted; or random bytes."""
    n = len(data)
    flip = st.lists(st.tuples(st.integers(0, n - 1), st.integers(1, 255)), min_size=1, max_size=8).map(
        lambda fs: _apply(data, fs))
    head_flip = st.lists(st.tuples(st.integers(0, min(n, 256) - 1), st.integers(1, 255)), min_size=1,
                         max_size=4).map(lambda fs: _apply(data, fs))  # headers: where parsers decide most
    tail_flip = st.lists(st.tuples(st.integers(max(0, n - 256), n - 1), st.integers(1, 255)), min_size=1,
                         max_size=4).map(lambda fs: _apply(data, fs))  # zip central directories live at the end
    cut = st.integers(0, n - 1).map(lambda k: data[:k])
    delete = st.tuples(st.integers(0, n - 1), st.integers(1, 64)).map(lambda t: data[:t[0]] + data[t[0] + t[1]:])
    insert = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=64)).map(
        lambda t: data[:t[0]] + t[1] + data[t[0]:])
    return st.one_of(flip, head_flip, tail_flip, cut, delete, insert, st.binary(max_size=512))


def _apply(data: bytes, flips) -> bytes:
    b = bytearray(data)
    for i, x in flips:
        b[i] ^= x
    return bytes(b)


def _write(d, name, data: bytes) -> str:
    path = os.path.join(d, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _png(mode="RGB", size=(12, 10), fmt="PNG") -> bytes:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


IMAGES = [_png(), _png("L"), _png("P", fmt="GIF"), _png(fmt="JPEG"), _png("RGBA"), _png("I;16")]


# ------------------------------------------------------------------------------------------- images
@settings(max_examples=150, **FUZZ)
@given(data=st.sampled_from(IMAGES).flatmap(mutated))
def test_cli_image_loader(data):
    from mage_fast.images import load_image
    with tempfile.TemporaryDirectory() as d:
        out = _expect(InputError, load_image, _write(d, "x.png", data), 16, min_size=2)
    if out is not None:
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())


@settings(max_examples=100, **FUZZ)
@given(data=st.sampled_from(IMAGES).flatmap(mutated))
def test_training_image_folder(data):
    from mage_fast.data import EvalTransform, ImageFolder
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "c"))
        _write(os.path.join(d, "c"), "x.png", data)
        out = _expect(InputError, lambda: ImageFolder(d, EvalTransform(16))[0])
    if out is not None:
        assert out[0].shape == (3, 16, 16)


# -------------------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def asset_bytes():
    with open(ASSET, "rb") as f:
        return f.read()


def _load_checkpoint_all_ways(path):
    """Every way a user loads a checkpoint: the API (both names) and the CLI's loader."""
    import mage_fast
    from mage_fast.cli import CLIError, load_model
    from mage_fast.models.checkpoint import build_from_checkpoint
    allowed = (CheckpointError, InputError, CLIError)  # CLIError: the CLI's path checks
    for fn in (mage_fast.MAGE.from_pretrained, build_from_checkpoint, lambda p: load_model(p, None)[0]):
        model = _expect(allowed, fn, path)
        if model is None:
            return  # the same bytes are refused alike by the rest
        assert isinstance(model, mage_fast.MAGE)


@settings(max_examples=30, **FUZZ)
@given(st.data())
def test_checkpoint_bytes(asset_bytes, data):
    # the whole archive is large: most mutations land in tensor data (the CRC check), so the headers
    # and the central directory get their own strategies (head_flip, tail_flip in `mutated`)
    blob = data.draw(mutated(asset_bytes))
    with tempfile.TemporaryDirectory() as d:
        _load_checkpoint_all_ways(_write(d, "m.pt", blob))


JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats() | st.text(max_size=8),
                       lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                       max_leaves=6)


@pytest.fixture(scope="module")
def asset_blob():
    return torch.load(ASSET, map_location="cpu", weights_only=True)


@settings(max_examples=50, **FUZZ)
@given(st.data())
def test_checkpoint_valid_archive_wrong_contents(asset_blob, data):
    sd, cfg = dict(asset_blob["model"]), dict(asset_blob["config"])
    kind = data.draw(st.sampled_from(["config-value", "config-size", "vqgan-config-value", "drop-tensor",
                                      "drop-structural", "reshape-tensor", "tensor-to-other", "top-level"]))
    if kind == "config-size":  # a size that would build a model of any size before the strict load
        cfg[data.draw(st.sampled_from(sorted(cfg)))] = data.draw(st.integers(-2, 2 ** 31))
    elif kind == "drop-structural":  # the tensors the model's sizes are read from
        sd.pop(data.draw(st.sampled_from(sorted(k for k in sd if k.count(".") <= 2))))
        if data.draw(st.booleans()):
            cfg = {}
    elif kind == "config-value":
        cfg[data.draw(st.sampled_from(sorted(cfg)))] = data.draw(JSONISH)
    elif kind == "vqgan-config-value":
        vq = dict(cfg["vqgan_config"])
        vq[data.draw(st.sampled_from(sorted(vq)))] = data.draw(JSONISH)
        cfg["vqgan_config"] = vq
    elif kind == "drop-tensor":
        for k in data.draw(st.lists(st.sampled_from(sorted(sd)), min_size=1, max_size=5)):
            sd.pop(k, None)
    elif kind == "reshape-tensor":
        k = data.draw(st.sampled_from(sorted(sd)))
        shape = data.draw(st.lists(st.integers(0, 5), max_size=3))
        sd[k] = torch.zeros(shape)
    elif kind == "tensor-to-other":
        sd[data.draw(st.sampled_from(sorted(sd)))] = data.draw(JSONISH)
    obj = data.draw(JSONISH) if kind == "top-level" else {"model": sd, "config": cfg}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.pt")
        torch.save(obj, path)
        _load_checkpoint_all_ways(path)


@pytest.mark.parametrize("obj", ["", "mage_fast/assets/mage_fmnist256.pt", 3, None, [1]])
def test_checkpoint_holding_no_dict_is_refused_not_followed(tmp_path, obj):
    """A file whose top-level object is a string is a bad checkpoint, never a path to load next
    (hypothesis found '' reaching the path check as a FileNotFoundError)."""
    path = tmp_path / "m.pt"
    torch.save(obj, path)
    _load_checkpoint_all_ways(str(path))
    from mage_fast.models.checkpoint import build_from_checkpoint
    with pytest.raises(CheckpointError, match="expected a dict checkpoint"):
        build_from_checkpoint(str(path))


# ---------------------------------------------------------------------------------------- run.json
def _manifest():
    return {"kind": "generate", "model_sha256": "ab" * 32, "settings": {"seed": 0, "num_iter": 2}, "first_index": 0,
            "num_images": 2, "sample_pattern": "{:05d}.png", "image_size": 16, "status": "complete"}


def _read_run_folder(d):
    """The readers of a run folder: the manifest itself, ``fid`` / ``--fid-ref``'s sample list, and
    ``--resume`` (prepare_run with the manifest a resumed run would compare against)."""
    from mage_fast.runs import prepare_run, read_manifest, run_samples
    _expect(InputError, read_manifest, d)
    _expect(InputError, run_samples, d)
    _expect(InputError, prepare_run, d, dict(_manifest(), status=None), resume=True, image_size=16)


@settings(max_examples=80, **FUZZ)
@given(st.data())
def test_run_manifest(data):
    how = data.draw(st.sampled_from(["bytes", "value", "document"]))
    if how == "bytes":
        text = data.draw(mutated(json.dumps(_manifest()).encode()))
    else:
        m = _manifest()
        if how == "value":
            m[data.draw(st.sampled_from(sorted(m)))] = data.draw(JSONISH)
        else:
            m = data.draw(JSONISH)
        text = json.dumps(m).encode()
    with tempfile.TemporaryDirectory() as d:
        _write(d, "run.json", text)
        for i in range(2):
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(os.path.join(d, f"{i:05d}.png"))
        _read_run_folder(d)


# ------------------------------------------------------------------------------------- token caches
def _cache_blob():
    return {"ids": torch.randint(0, 64, (3, 2, 16), dtype=torch.int16), "labels": torch.zeros(3, dtype=torch.long),
            "meta": {"seq_len": 16, "n_embed": 64, "img_size": 16}}


def _save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@settings(max_examples=80, **FUZZ)
@given(st.data())
def test_token_cache(data):
    from mage_fast.data import TokenCache
    from mage_fast.training.common import check_token_cache
    how = data.draw(st.sampled_from(["bytes", "value", "tensor"]))
    if how == "bytes":
        raw = data.draw(mutated(_save(_cache_blob())))
    else:
        b = _cache_blob()
        key = data.draw(st.sampled_from(["ids", "labels", "meta"]))
        if how == "value":
            b[key] = data.draw(JSONISH)
        else:
            dtype = data.draw(st.sampled_from([torch.int16, torch.int64, torch.float32, torch.bool, torch.uint8]))
            shape = data.draw(st.lists(st.integers(0, 4), max_size=4))
            b[key] = torch.randint(-3, 100, shape).to(dtype)
        raw = _save(b)
    with tempfile.TemporaryDirectory() as d:
        path = _write(d, "tc.pt", raw)
        tc = _expect(InputError, TokenCache, path)
        if tc is not None:
            ids, label = tc[(0, 0)]
            assert ids.dtype == torch.long and isinstance(label, int)
        _expect(InputError, check_token_cache, path, 16, 64, None)


# -------------------------------------------------------------------------------- statistics caches
def _stats_blob():
    return {"mu": torch.zeros(4, dtype=torch.float64), "sigma": torch.eye(4, dtype=torch.float64), "n": 10,
            "content_sha256": "ab" * 32, "features": "efficientnet_lite0"}


@settings(max_examples=80, **FUZZ)
@given(st.data())
def test_stats_cache(data):
    """``--ref-stats``: a cache that is not whole and right is recomputed (the reader says so and
    returns None), never trusted and never a crash."""
    from mage_fast.eval.frechet import read_stats_cache
    how = data.draw(st.sampled_from(["bytes", "value", "document"]))
    if how == "bytes":
        raw = data.draw(mutated(_save(_stats_blob())))
    elif how == "value":
        b = _stats_blob()
        b[data.draw(st.sampled_from(sorted(b)))] = data.draw(JSONISH | st.builds(
            lambda s: torch.zeros(s, dtype=torch.float64), st.lists(st.integers(0, 5), max_size=3)))
        raw = _save(b)
    else:
        raw = _save(data.draw(JSONISH))
    with tempfile.TemporaryDirectory() as d:
        st_ = _within_deadline(read_stats_cache, _write(d, "ref.pt", raw), say=False)
    if st_ is not None:
        mu, sigma = st_["mu"], st_["sigma"]
        assert isinstance(mu, torch.Tensor) and mu.dim() == 1 and mu.is_floating_point()
        assert isinstance(sigma, torch.Tensor) and tuple(sigma.shape) == (mu.numel(), mu.numel())
        assert type(st_["n"]) is int and st_["n"] >= 2 and isinstance(st_.get("content_sha256"), str)


def test_the_valid_inputs_are_read():
    """The fuzzed files start from inputs each reader accepts."""
    from mage_fast.data import TokenCache
    from mage_fast.eval.frechet import read_stats_cache
    from mage_fast.images import load_image
    from mage_fast.runs import run_samples
    with tempfile.TemporaryDirectory() as d:
        for i, b in enumerate(IMAGES):
            assert load_image(_write(d, f"{i}.img", b), 16).shape == (3, 16, 16)
        assert len(TokenCache(_write(d, "tc.pt", _save(_cache_blob())))) == 3
        assert read_stats_cache(_write(d, "s.pt", _save(_stats_blob())), say=False) is not None
        _write(d, "run.json", json.dumps(_manifest()).encode())
        for i in range(2):
            Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(os.path.join(d, f"{i:05d}.png"))
        assert len(run_samples(d)) == 2
    assert zipfile.is_zipfile(ASSET)


# ------------------------------------------------------------------------------- inpaint/edit masks
@settings(max_examples=100, **FUZZ)
@given(data=st.sampled_from(IMAGES).flatmap(mutated))
def test_cli_mask_reader(data):
    """``inpaint`` / ``edit --mask``: a region, or the CLI's one line (CLIError) / InputError."""
    from mage_fast.cli import CLIError
    from mage_fast.cli._editing import _read_mask
    with tempfile.TemporaryDirectory() as d:
        region = _expect((CLIError, InputError), _read_mask, _write(d, "mask.png", data), 16)
    if region is not None:
        assert region.shape == (16, 16) and region.dtype == torch.bool and bool(region.any())


# -------------------------------------------------------------------------------------- model cards
CARD = {"description": "x", "class_conditional": True, "classes": ["a", "b", "c"],
        "sampling": {"num_iter": 4, "temperature": 1.0, "guidance": 2.0, "top_k": 50, "top_p": 0.9}}


def _read_card_all_ways(ckpt, card_path):
    """Every reader of ``<ckpt>.json``: the model's build (class names), the CLI's sampling defaults
    (with and without a class asked for), --class-id by number, name and 'all', the grid's names."""
    import argparse

    import mage_fast
    from mage_fast.cli import CLIError, class_names, resolve_class, sampling_defaults
    from mage_fast.models.checkpoint import build_from_checkpoint
    allowed = (CheckpointError, InputError, CLIError)
    model = _expect(allowed, build_from_checkpoint, ckpt)
    if model is None:
        return
    assert isinstance(model, mage_fast.MAGE)
    for class_id in (None, "1"):
        args = argparse.Namespace(num_iter=None, temperature=None, guidance=None, class_id=class_id, top_k=None,
                                  top_p=None)
        if _expect(allowed, sampling_defaults, ckpt, args) is None and args.num_iter is None:
            continue  # refused
        assert type(args.num_iter) is int and args.num_iter >= 1, card_path
        assert isinstance(args.temperature, (int, float)) and np.isfinite(args.temperature)
        assert isinstance(args.guidance, (int, float)) and np.isfinite(args.guidance)
        assert args.top_k is None or (type(args.top_k) is int and args.top_k >= 0)
        assert args.top_p is None or (isinstance(args.top_p, (int, float)) and 0 < args.top_p <= 1)
    for spec in ("0", "b", "all"):
        _expect(allowed, resolve_class, spec, ckpt, model)
    names = _expect(allowed, class_names, model, ckpt)
    assert names is None or all(isinstance(n, str) for n in names)


@pytest.fixture(scope="module")
def card_dir():
    with tempfile.TemporaryDirectory() as d:
        os.symlink(ASSET, os.path.join(d, "m.pt"))  # the card is <ckpt without extension>.json
        yield d


@settings(max_examples=80, **FUZZ)
@given(st.data())
def test_model_card(card_dir, data):
    how = data.draw(st.sampled_from(["bytes", "value", "sampling-value", "document"]))
    if how == "bytes":
        text = data.draw(mutated(json.dumps(CARD).encode()))
    else:
        card = json.loads(json.dumps(CARD))
        if how == "value":
            card[data.draw(st.sampled_from(sorted(card)))] = data.draw(JSONISH)
        elif how == "sampling-value":
            card["sampling"][data.draw(st.sampled_from(sorted(card["sampling"])))] = data.draw(JSONISH)
        else:
            card = data.draw(JSONISH)
        text = json.dumps(card).encode()
    card_path = _write(card_dir, "m.json", text)
    _read_card_all_ways(os.path.join(card_dir, "m.pt"), card_path)


# --------------------------------------------------------------------------------- tokenizer exports
@pytest.fixture(scope="module")
def tokenizer_blob(asset_blob):
    from mage_fast.models.checkpoint import tokenizer_export
    return tokenizer_export(asset_blob)  # {'state_dict', 'config', 'arch'}: what train_tokenizer.py writes


def _read_tokenizer_all_ways(path):
    """``--tokenizer`` as train/pretrain.py (the model's config, before args.json) and
    train/cache_tokens.py (the tokenizer built) read it."""
    import argparse
    pretrain, cache_tokens = _train_module("pretrain"), _train_module("cache_tokens")
    args = argparse.Namespace(model="tiny", tokenizer=path, vqgan_config=None, img_size=28, mlp_ratio=4.0,
                              mask_ratio_min=0.5, mask_ratio_max=1.0, mask_ratio_mu=0.55, mask_ratio_std=0.25,
                              dropout=0.1, **{k: None for k in pretrain.SIZE_KEYS})
    cfg = _expect((CheckpointError, InputError, SystemExit), pretrain.model_config, args)
    if cfg is not None:
        assert isinstance(cfg["vqgan_config"], dict)
    vq = _expect((CheckpointError, InputError, SystemExit), cache_tokens.load_tokenizer, path, 28)
    if vq is not None:
        assert vq.quantize.embedding.weight.dim() == 2


_MODULES = {}


def _train_module(name):
    """A script under train/ imported as a module (each once)."""
    if name not in _MODULES:
        import importlib.util
        spec = importlib.util.spec_from_file_location(f"_fuzz_{name}", os.path.join(REPO, "train", f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        _MODULES[name] = mod
    return _MODULES[name]


@settings(max_examples=30, **FUZZ)
@given(st.data())
def test_tokenizer_export_bytes(tokenizer_blob, data):
    blob = data.draw(mutated(_save(tokenizer_blob)))
    with tempfile.TemporaryDirectory() as d:
        _read_tokenizer_all_ways(_write(d, "tok.pt", blob))


@settings(max_examples=60, **FUZZ)
@given(st.data())
def test_tokenizer_export_wrong_contents(tokenizer_blob, data):
    sd, cfg = dict(tokenizer_blob["state_dict"]), dict(tokenizer_blob["config"])
    obj = {"state_dict": sd, "config": cfg, "arch": tokenizer_blob["arch"]}
    kind = data.draw(st.sampled_from(["config-value", "config-size", "arch", "drop-tensor", "reshape-tensor",
                                      "tensor-to-other", "top-level"]))
    if kind == "config-value":
        cfg[data.draw(st.sampled_from(sorted(cfg)))] = data.draw(JSONISH)
    elif kind == "config-size":
        cfg[data.draw(st.sampled_from(sorted(cfg)))] = data.draw(st.integers(-2, 2 ** 31))
    elif kind == "arch":
        obj["arch"] = data.draw(st.sampled_from(["vit_vqgan", "vqgan"]) | JSONISH)
    elif kind == "drop-tensor":
        for k in data.draw(st.lists(st.sampled_from(sorted(sd)), min_size=1, max_size=3)):
            sd.pop(k, None)
    elif kind == "reshape-tensor":
        sd[data.draw(st.sampled_from(sorted(sd)))] = torch.zeros(data.draw(st.lists(st.integers(0, 5), max_size=3)))
    elif kind == "tensor-to-other":
        sd[data.draw(st.sampled_from(sorted(sd)))] = data.draw(JSONISH)
    if kind == "top-level":
        obj = data.draw(JSONISH)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "tok.pt")
        torch.save(obj, path)
        _read_tokenizer_all_ways(path)


# ------------------------------------------------------------------------------ resume checkpoints
RESUME_ARGV = ["--model", "tiny", "--img_size", "32", "--vqgan_config", '{"ch_mult": [1, 2, 2], "n_embed": 64}',
               "--synthetic", "--synthetic_length", "8", "--max_steps", "1", "--batch_size", "2", "--save_every",
               "1", "--deepspeed_config", "zero1", "--no_progress", "--data_backend", "torch"]


@pytest.fixture(scope="module")
def resume_setup(tmp_path_factory):
    """A real checkpoint (``checkpoints/step1`` of a one-step train/pretrain.py run) and, in this
    process, the DeepSpeed engine ``--resume auto`` loads it into (a one-rank gloo group, removed
    with the environment it set when the module's tests end)."""
    import subprocess
    import sys
    pytest.importorskip("deepspeed", reason="resume checkpoints are DeepSpeed's")
    run = tmp_path_factory.mktemp("resume") / "run"
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "train", "pretrain.py"), *RESUME_ARGV, "--output_dir",
                           str(run)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved_env = dict(os.environ)
    import torch.distributed as dist
    pretrain = _train_module("pretrain")
    args = pretrain.parse_args([*RESUME_ARGV, "--output_dir", str(run), "--resume", "auto"])
    from mage_fast.training.common import build_engine
    from mage_fast.training.engine import setup_distributed
    from mage_fast.training.objective import MAGEObjective
    deepspeed = setup_distributed()
    try:
        model = pretrain.build_model(pretrain.model_config(args), args)
        engine, _, _ = build_engine(deepspeed, MAGEObjective(model), args, 1, 1e-3)
        yield str(run / "checkpoints"), args, engine
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)


def _expect_flag(allowed, fn, *args):
    try:
        _within_deadline(fn, *args)
        return False
    except allowed:
        return True


def _load_any(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@settings(max_examples=40, **FUZZ)
@given(st.data())
def test_resume_checkpoint(resume_setup, data):
    import argparse
    import shutil
    from mage_fast.training.common import check_resume
    from mage_fast.training.engine import load_checkpoint
    good, args, engine = resume_setup
    files = sorted(f for f in os.listdir(os.path.join(good, "step1")) if f.endswith(".pt"))
    name = data.draw(st.sampled_from(files))
    with open(os.path.join(good, "step1", name), "rb") as f:
        raw = f.read()
    how = data.draw(st.sampled_from(["bytes", "value", "document", "latest"]))
    with tempfile.TemporaryDirectory() as d:
        ckpt = os.path.join(d, "run", "checkpoints")
        shutil.copytree(good, ckpt)
        path = os.path.join(ckpt, "step1", name)
        if how == "bytes":
            _write(os.path.dirname(path), name, data.draw(mutated(raw)))
        elif how == "value":
            obj = _load_any(path)
            if isinstance(obj, dict) and obj:
                obj[data.draw(st.sampled_from(sorted(obj, key=str)))] = data.draw(JSONISH | st.builds(
                    torch.zeros, st.lists(st.integers(0, 4), max_size=3)))
            torch.save(obj, path)
        elif how == "document":
            torch.save(data.draw(JSONISH), path)
        else:  # the pointer to the step folder
            _write(ckpt, "latest", data.draw(st.sampled_from([b"step1", b"step2", b"", b"../step1", b"\xff\xfe"])
                                             | st.binary(max_size=16)))
        a = argparse.Namespace(**dict(vars(args), output_dir=os.path.dirname(ckpt)))
        if _expect_flag(InputError, check_resume, a):
            return  # refused before anything is written
        client = _expect(InputError, load_checkpoint, engine, ckpt)
    if client is not None:
        assert all(type(client[k]) is int and client[k] >= 0 for k in ("step", "epoch", "batch"))
