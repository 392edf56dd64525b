"""Data module: IDX reader, deterministic augmentation, resumable sharded sampling, folders, caches."""
import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from mage_fast.data import (EpochLoader, ImageFolder, LoaderSpec, ResumableSampler, TokenCache, TrainTransform,
                            choose_backend, random_resized_crop_box, read_idx, sample_rng)


def _write_idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + b"".join(struct.pack(">I", d) for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_read_idx_roundtrip_and_bad_magic(tmp_path):
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    _write_idx(tmp_path / "x-idx3-ubyte.gz", arr)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "x-idx3-ubyte.gz")), arr)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(str(tmp_path / "bad"))


def test_crop_box_within_image_and_scale():
    rng = np.random.default_rng(0)
    for _ in range(200):
        l, t, r, b = random_resized_crop_box(40, 30, rng, scale=(0.2, 1.0))
        assert 0 <= l < r <= 40 and 0 <= t < b <= 30
        assert (r - l) * (b - t) >= 0.2 * 40 * 30 * 0.8  # rounding slack


def test_transform_deterministic_per_sample_and_range():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8), mode="L")
    tf = TrainTransform(16, (0.2, 1.0))
    a, b = tf(img, sample_rng(0, 3, 7)), tf(img, sample_rng(0, 3, 7))
    c = tf(img, sample_rng(0, 4, 7))
    assert a.shape == (3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0


@pytest.mark.parametrize("world", [1, 3])
def test_sampler_shards_cover_epoch_and_resume_mid_epoch(world):
    n = 20
    samplers = [ResumableSampler(n, r, world, seed=5) for r in range(world)]
    for s in samplers:
        s.set_epoch(2)
    shards = [[i for _, i in s] for s in samplers]
    flat = sorted(i for sh in shards for i in sh)
    assert len(flat) == (n // world) * world and len(set(flat)) == len(flat)
    s = samplers[0]
    s.set_epoch(2, start=4)
    assert [i for _, i in s] == shards[0][4:]
    s.set_epoch(3)
    assert [i for _, i in s] != shards[0]  # a new order each epoch


def _folder(root, n_per_class=6, size=20):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def test_image_folder_and_loader_resume_positions(tmp_path):
    root = _folder(tmp_path / "imgs")
    ds = ImageFolder(str(root), TrainTransform(16))
    assert ds.classes == ["a", "b"] and len(ds) == 12
    loader = EpochLoader(LoaderSpec("folder", str(root), img_size=16, batch_size=4, num_workers=0, backend="torch"))
    full = [x for x, _ in loader.batches(1)]
    tail = [x for x, _ in loader.batches(1, start=1)]
    assert len(full) == 3 and all(torch.equal(a, b) for a, b in zip(full[1:], tail))


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImageFolder(str(tmp_path / "missing"), TrainTransform(8))
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="class sub-folders"):
        ImageFolder(str(tmp_path / "flat"), TrainTransform(8))
    with pytest.raises(ValueError, match="unknown data backend"):
        choose_backend("nvdali", "folder")
    with pytest.raises(ValueError, match="crop scale"):
        TrainTransform(8, (0.0, 1.0))


def test_auto_backend_picks_dali_only_with_a_cuda_device(monkeypatch):
    import mage_fast.data.loader as loader
    monkeypatch.setattr(loader, "dali_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    backend, why = choose_backend("auto", "folder")
    assert backend == "torch" and "CUDA" in why
    assert choose_backend("dali", "folder")[0] == "dali"  # asked for: DALI's CPU pipeline
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_backend("auto", "folder")[0] == "dali"


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_named_in_one_line(tmp_path, workers):
    from mage_fast.data.datasets import ImageReadError
    root = _folder(tmp_path / "imgs", n_per_class=2, size=24)
    bad = root / "a" / "0.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    loader = EpochLoader(LoaderSpec("folder", str(root), img_size=16, batch_size=4, num_workers=workers,
                                    backend="torch"))
    with pytest.raises(ImageReadError) as e:
        list(loader.batches(0))
    msg = str(e.value)
    assert str(bad) in msg and "not a readable image" in msg and "\n" not in msg and "Traceback" not in msg


def test_token_cache_views(tmp_path):
    ids = torch.arange(5 * 3 * 4, dtype=torch.int16).view(5, 3, 4)
    torch.save({"ids": ids, "labels": torch.arange(5), "meta": {"seq_len": 4}}, tmp_path / "c.pt")
    tc = TokenCache(str(tmp_path / "c.pt"))
    seen = {tuple(tc[(e, 2)][0].tolist()) for e in range(30)}
    assert len(seen) == 3 and all(row in {tuple(ids[2, v].tolist()) for v in range(3)} for row in seen)
    assert tc[(0, 2)][1] == 2


@pytest.mark.skipif(not __import__("mage_fast.data", fromlist=["x"]).dali_available(), reason="nvidia-dali not installed")
def test_dali_cpu_pipeline_matches_layout_and_range(tmp_path):
    root = _folder(tmp_path / "imgs", n_per_class=8, size=24)
    loader = EpochLoader(LoaderSpec("folder", str(root), img_size=16, batch_size=4, num_workers=1, backend="dali"))
    assert loader.backend == "dali"
    batches = list(loader.batches(0))
    assert len(batches) == loader.batches_per_epoch == 4
    x, y = batches[0]
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) > 0.5
    assert set(torch.cat([b[1] for b in batches]).tolist()) == {0, 1}


@pytest.mark.skipif(not __import__("mage_fast.data", fromlist=["x"]).dali_available(), reason="nvidia-dali not installed")
@pytest.mark.parametrize("workers", [1, 2])
def test_dali_resume_mid_epoch_gives_the_same_batches(tmp_path, workers):
    # what --resume auto relies on: an epoch restarted at batch 2 continues with the very batches
    # (pixels and labels) the uninterrupted epoch had; another epoch is another order/augmentation
    root = _folder(tmp_path / "imgs", n_per_class=8, size=24)
    loader = EpochLoader(LoaderSpec("folder", str(root), img_size=16, batch_size=4, num_workers=workers,
                                    backend="dali"))
    full, resumed = list(loader.batches(1)), list(loader.batches(1, start=2))
    assert len(full) == 4 and len(resumed) == 2
    for (xa, ya), (xb, yb) in zip(full[2:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(full[0][0], list(loader.batches(2))[0][0])
