"""The one image-folder reader (mage_fast.image_folder): training, evaluation and fid list the same
files from the same folder, in one sorted order, and name a file they cannot decode."""
import os

import numpy as np
import pytest
from PIL import Image

from mage_fast.data import ImageFolder, TrainTransform
from mage_fast.eval.folder import list_image_folder as eval_list
from mage_fast.eval.frechet import read_rgb, sample_files
from mage_fast.image_folder import ImageReadError, list_image_folder, list_images
from mage_fast.models.checks import InputError
from mage_fast.training.common import check_image_folder


def _png(path, value=0, ext_format=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path, format=ext_format)


@pytest.fixture
def class_tree(tmp_path):
    """Classes with the cases the three readers once disagreed on: a nested folder, extensions one
    of them took and another did not (.tif, .ppm, upper case), a hidden file and folder, a non-image,
    a run's picture name inside a class. Returns (root, the expected (path, label) list)."""
    root = tmp_path / "data"
    want = []
    for label, cls in enumerate(["cat", "dog"]):
        for name in ["b.png", "A.PNG", "c.tif", "d.ppm", "e.jpg", "grid.png"]:
            _png(str(root / cls / name), label, "JPEG" if name.endswith("jpg") else None)
        _png(str(root / cls / "nested" / "deep" / "f.webp"), label)
        _png(str(root / cls / ".hidden.png"), label)
        _png(str(root / cls / ".cache" / "g.png"), label)
        (root / cls / "notes.txt").write_text("not an image")
        want += [(str(root / cls / n), label) for n in ["A.PNG", "b.png", "c.tif", "d.ppm", "e.jpg", "grid.png"]]
        want.append((str(root / cls / "nested" / "deep" / "f.webp"), label))
    _png(str(root / ".hidden_class" / "h.png"))
    return root, want


def test_training_evaluation_and_fid_list_the_same_files(class_tree):
    root, want = class_tree
    training = ImageFolder(str(root), TrainTransform(8))
    assert training.samples == want and training.classes == ["cat", "dog"]
    assert eval_list(str(root)) == (want, ["cat", "dog"])
    fid_files, _note = sample_files(str(root), "REF_DIR")
    assert fid_files == list_images(str(root)) == [p for p, _ in want]
    check_image_folder(str(root))  # the training launcher's quick check accepts it too
    assert list_image_folder(str(root)) == list_image_folder(str(root))  # deterministic


def test_flat_folder_is_read_by_fid_only(tmp_path):
    """A folder of samples (no classes): fid takes its top-level images, not a run's pictures nor
    hidden files; training and evaluation ask for class folders; images both at the top level and
    in class folders are refused as ambiguous."""
    for name in ["00001.png", "00000.png", "grid.png", "process.png", ".tmp-00002.png"]:
        _png(str(tmp_path / "gen" / name))
    assert list_images(str(tmp_path / "gen")) == [str(tmp_path / "gen" / f"0000{i}.png") for i in (0, 1)]
    for reader in (eval_list, lambda r: ImageFolder(r, TrainTransform(8))):
        with pytest.raises(InputError, match="no class sub-folders"):
            reader(str(tmp_path / "gen"))
    _png(str(tmp_path / "gen" / "cls" / "x.png"))
    with pytest.raises(InputError, match="both at its top level and in sub-folders"):
        list_images(str(tmp_path / "gen"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(InputError, match="no images in"):
        list_images(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        list_image_folder(str(tmp_path / "missing"))


def test_an_undecodable_image_is_named_by_training_and_fid(class_tree):
    root, want = class_tree
    bad = want[1][0]
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n cut short")
    training = ImageFolder(str(root), TrainTransform(8))
    for read in (lambda: training[1], lambda: read_rgb(bad)):
        with pytest.raises(ImageReadError, match="not a readable image") as e:
            read()
        assert str(e.value).startswith(bad) and "\n" not in str(e.value)


def test_dali_loader_reads_the_readers_files(class_tree, monkeypatch):
    """The DALI pipeline is handed the reader's (path, label) list rather than walking the folder
    with its own filters: a stand-in nvidia.dali records what the file reader is given."""
    import sys
    import types

    import mage_fast.data.loader as loader
    root, want = class_tree
    seen = {}

    def file_reader(**kw):
        seen.update(kw)
        return "encoded", "labels"

    def pipeline_def(**_kw):
        def wrap(graph):
            return lambda: types.SimpleNamespace(build=graph)
        return wrap
    same = lambda x, **_kw: x  # noqa: E731
    dali = types.ModuleType("nvidia.dali")
    dali.fn = types.SimpleNamespace(readers=types.SimpleNamespace(file=file_reader),
                                    decoders=types.SimpleNamespace(image=same), random_resized_crop=same,
                                    crop_mirror_normalize=same, random=types.SimpleNamespace(coin_flip=lambda **kw: 0))
    dali.pipeline_def = pipeline_def
    dali.types = types.SimpleNamespace(RGB=0, INTERP_CUBIC=0, FLOAT=0)
    plugin = types.ModuleType("nvidia.dali.plugin.pytorch")

    def iterator(pipes, *_a, **_kw):  # builds each pipeline (the file reader is called then), yields nothing
        for pipe in pipes:
            pipe.build()
        return iter(())
    plugin.DALIGenericIterator = iterator
    plugin.LastBatchPolicy = types.SimpleNamespace(DROP=0)
    for name, mod in (("nvidia", types.ModuleType("nvidia")), ("nvidia.dali", dali),
                      ("nvidia.dali.plugin", types.ModuleType("nvidia.dali.plugin")),
                      ("nvidia.dali.plugin.pytorch", plugin)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(loader, "dali_available", lambda: True)
    epochs = loader.EpochLoader(loader.LoaderSpec("folder", str(root), img_size=8, batch_size=4, backend="dali"))
    assert epochs.backend == "dali" and epochs.num_samples == len(want)
    assert list(epochs.batches(0)) == []
    assert list(zip(seen["files"], seen["labels"])) == want and "file_root" not in seen
