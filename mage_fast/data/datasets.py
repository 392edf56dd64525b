"""Datasets for pre-training: an ImageFolder, synthetic images, and cached token ids.

Every dataset is indexed by ``(epoch, index)`` pairs (see :class:`ResumableSampler`), so the
augmentation of a sample depends only on (seed, epoch, index).
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import torch

from ..image_folder import (IMAGE_READ_ERRORS, ImageFolderNotFound, ImageReadError, list_image_folder,  # noqa: F401
                            open_image)  # (IMAGE_READ_ERRORS, ImageFolderNotFound, ImageReadError re-exported)
from ..models.checks import InputError
from .transforms import sample_rng

# The one image-folder reader (mage_fast.image_folder) under the name training code has used.
scan_image_folder = list_image_folder


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
    """The class layout ``root/<class>/...`` as :func:`mage_fast.image_folder.list_image_folder` lists
    it; ``transform(img, rng)`` gets a generator seeded by (seed, epoch, index). An image that cannot
    be decoded raises :class:`~mage_fast.image_folder.ImageReadError` naming it."""

    def __init__(self, root: str, transform: Callable, seed: int = 0):
        self.root = root
        self.samples, self.classes = list_image_folder(root)
        self.transform, self.seed = transform, seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key):
        epoch, index, view = _key(key)
        path, label = self.samples[index]
        with open_image(path) as img:
            x = self.transform(img, sample_rng(self.seed, epoch, index, view))
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


_ID_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


def read_token_cache(path: str, flag: str = "token cache", n_embed=None, seq_len=None) -> dict:
    """A token cache as ``train/cache_tokens.py`` writes it, checked: ``{'ids': (N, V, L) integer
    tensor, 'labels': (N,) integer tensor (zeros when absent), 'meta': dict}``, N, V, L > 0, ids in
    [0, codebook size) (``n_embed`` when given, else the cache's own ``meta['n_embed']``), L equal to
    ``meta['seq_len']`` and to ``seq_len`` when given. Anything else (missing, unreadable, cut short,
    another kind of file, ids out of range) is an :class:`~mage_fast.models.checks.InputError` with
    one line naming ``flag`` and the file."""
    name = f"{flag} {path}"
    remake = "make it with train/cache_tokens.py"
    if not os.path.isfile(path):
        raise InputError(f"{name} not found ({remake})")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # cut short, not a torch file, pickled objects weights_only refuses
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise InputError(f"{name} is not a readable token cache ({type(e).__name__}: {first}); {remake}") from None
    ids = blob.get("ids") if isinstance(blob, dict) else None
    if not isinstance(ids, torch.Tensor):
        raise InputError(f"{name} is not a token cache (expected a dict with an 'ids' tensor, as train/cache_tokens.py "
                         f"writes)")
    if ids.dim() != 3 or ids.dtype not in _ID_DTYPES or 0 in ids.shape:
        raise InputError(f"{name}: 'ids' must be a non-empty (images, views, tokens) integer tensor, got "
                         f"{ids.dtype} {tuple(ids.shape)}")
    labels = blob.get("labels")
    if labels is None:
        labels = torch.zeros(ids.shape[0], dtype=torch.long)
    if not isinstance(labels, torch.Tensor) or labels.dtype not in _ID_DTYPES or tuple(labels.shape) != ids.shape[:1]:
        raise InputError(f"{name}: 'labels' must be an integer tensor of {ids.shape[0]} class ids (one per image)")
    meta = blob.get("meta", {})
    if not isinstance(meta, dict):
        raise InputError(f"{name}: 'meta' must be a dict, got {type(meta).__name__}")
    for key, want, what in (("seq_len", seq_len, "tokens per image"), ("n_embed", n_embed, "codes")):
        have = meta.get(key)
        if have is not None and (type(have) is not int or have < 1):
            raise InputError(f"{name}: meta['{key}'] must be a positive integer, got {have!r}")
        if have is not None and want is not None and have != want:
            raise InputError(f"{name} holds ids of a {have}-{'code tokenizer' if key == 'n_embed' else 'token grid'}; "
                             f"the model has {want} {what}")
    if meta.get("seq_len") is not None and meta["seq_len"] != ids.shape[2]:
        raise InputError(f"{name}: meta says {meta['seq_len']} tokens per image, 'ids' holds {ids.shape[2]}")
    if seq_len is not None and ids.shape[2] != seq_len:
        raise InputError(f"{name} has {ids.shape[2]} tokens per image; the model has {seq_len}")
    vocab = n_embed if n_embed is not None else meta.get("n_embed")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        where = f"the vocabulary [0, {vocab})" if vocab is not None else "the vocabulary (ids are >= 0)"
        raise InputError(f"{name} holds token ids in [{lo}, {hi}], outside {where}; it was made with another "
                         f"tokenizer or is corrupt")
    if int(labels.min()) < 0:
        raise InputError(f"{name} holds negative class labels")
    return {"ids": ids, "labels": labels, "meta": meta}


class TokenCache(torch.utils.data.Dataset):
    """Token ids written by ``train/cache_tokens.py``: ``ids`` (N, V, L) for V augmented views per
    image; each (epoch, index) picks one view at random (seeded), so epochs see different views.
    The file is checked as :func:`read_token_cache` does (``InputError`` naming it)."""

    def __init__(self, path: str, seed: int = 0):
        blob = read_token_cache(path)
        self.ids = blob["ids"]  # (N, V, L) int16/int32
        self.labels = blob["labels"]
        self.meta = blob["meta"]
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
