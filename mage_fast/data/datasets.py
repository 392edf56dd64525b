"""Datasets for pre-training: an ImageFolder, synthetic images, and cached token ids.

Every dataset is indexed by ``(epoch, index)`` pairs (see :class:`ResumableSampler`), so the
augmentation of a sample depends only on (seed, epoch, index).
"""
from __future__ import annotations

import os
from typing import Callable, List, Tuple

import numpy as np
import torch
from PIL import Image

from ..models.checks import InputError
from .transforms import sample_rng

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def scan_image_folder(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """``root/<class>/<image>`` -> ([(path, class_index)], classes), classes sorted by name."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class sub-folders; expected the ImageFolder layout root/<class>/<img>")
    samples = []
    for ci, c in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(os.path.join(root, c))):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(dirpath, f), ci))
    if not samples:
        raise ValueError(f"no images with extensions {IMG_EXTENSIONS} under {root}")
    return samples, classes


class ImageReadError(InputError):
    """A training image that cannot be decoded, named. Keeps its one-line message through a
    DataLoader worker, whose re-raise passes the worker's whole traceback as the message."""

    def __init__(self, msg: str):
        if "\nOriginal Traceback" in msg:  # "...\nmage_fast.data.datasets.ImageReadError: <msg>"
            msg = msg.rstrip().splitlines()[-1].split("ImageReadError: ", 1)[-1]
        super().__init__(msg)


def _key(key):
    """A dataset key: an index, (epoch, index) or (epoch, index, view)."""
    if isinstance(key, tuple):
        return (key + (0,))[:3] if len(key) == 2 else key
    return 0, int(key), 0


class TwoViews(torch.utils.data.Dataset):
    """Two independently augmented views of each sample, stacked: (2, ...) (for MAGE-C)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index, _ = _key(key)
        (a, label), (b, _) = self.dataset[(epoch, index, 0)], self.dataset[(epoch, index, 1)]
        return torch.stack([a, b]), label


class ImageFolder(torch.utils.data.Dataset):
    """ImageFolder layout; ``transform(img, rng)`` gets a generator seeded by (seed, epoch, index)."""

    def __init__(self, root: str, transform: Callable, seed: int = 0):
        self.root = root
        self.samples, self.classes = scan_image_folder(root)
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index, view = _key(key)
        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                x = self.transform(img, sample_rng(self.seed, epoch, index, view))
        except (OSError, SyntaxError, ValueError) as e:  # PIL: truncated, unidentified or malformed files
            raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e}); remove or replace "
                                 f"it") from e
        return x, label


class SyntheticImages(torch.utils.data.Dataset):
    """Random smooth images in [0, 1] (a smoke-test stand-in for real data), fixed per index."""

    def __init__(self, size: int, length: int = 1024, num_classes: int = 10, seed: int = 0):
        self.size, self.length, self.num_classes, self.seed = size, length, num_classes, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, key):
        epoch, index, view = _key(key)
        rng = sample_rng(self.seed, 0, index)
        low = torch.from_numpy(rng.random((3, 4, 4), dtype=np.float32))
        x = torch.nn.functional.interpolate(low[None], size=(self.size, self.size), mode="bilinear",
                                            align_corners=False)[0]
        if sample_rng(self.seed, epoch, index, view).random() < 0.5:
            x = x.flip(-1)
        return x.clamp_(0, 1), int(index % self.num_classes)


class TokenCache(torch.utils.data.Dataset):
    """Token ids written by ``train/cache_tokens.py``: ``ids`` (N, V, L) for V augmented views per
    image; each (epoch, index) picks one view at random (seeded), so epochs see different views."""

    def __init__(self, path: str, seed: int = 0):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"token cache not found: {path} (make one with train/cache_tokens.py)")
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(blob, dict) or "ids" not in blob:
            raise ValueError(f"{path} is not a token cache (expected a dict with 'ids')")
        self.ids = blob["ids"]  # (N, V, L) int16/int32
        if self.ids.dim() != 3:
            raise ValueError(f"token cache ids must be (N, views, L), got {tuple(self.ids.shape)}")
        self.labels = blob.get("labels", torch.zeros(self.ids.shape[0], dtype=torch.long))
        self.meta = blob.get("meta", {})
        self.seed = seed

    @property
    def num_views(self) -> int:
        return self.ids.shape[1]

    @property
    def seq_len(self) -> int:
        return self.ids.shape[2]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, key):
        epoch, index, view = _key(key)
        view = int(sample_rng(self.seed, epoch, index, view).integers(0, self.num_views))
        return self.ids[index, view].long(), int(self.labels[index])
