"""The MAGE training augmentation (random resized crop, horizontal flip, [0, 1] range) with
per-sample randomness derived from (seed, epoch, index), so the stream does not depend on the
number of loader workers and a resumed run sees exactly the images an uninterrupted one would."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image


def sample_rng(seed: int, epoch: int, index: int, view: int = 0) -> np.random.Generator:
    """The generator for one sample's augmentation: a function of (seed, epoch, index, view) only."""
    return np.random.default_rng([seed & 0xFFFFFFFF, epoch, index, view])


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: Tuple[float, float] = (0.2, 1.0),
                            ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """A crop box (left, top, right, bottom) covering ``scale`` of the area with aspect in ``ratio``
    (log-uniform), as torchvision's RandomResizedCrop: 10 tries, then a centre crop."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float32 in [0, 1] (no mean/std normalisation, as MAGE)."""
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class TrainTransform:
    """RandomResizedCrop(size, scale) + horizontal flip (p=0.5) + [0, 1] tensor.

    Args:
        size: output side (square).
        scale: crop area range (official MAGE: 0.2-1.0).
        flip: whether to flip horizontally with probability 0.5.
    """

    def __init__(self, size: int, scale: Tuple[float, float] = (0.2, 1.0), flip: bool = True):
        if not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {scale}")
        self.size, self.scale, self.flip = int(size), tuple(scale), flip

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        img = img.convert("RGB")
        box = random_resized_crop_box(img.width, img.height, rng, self.scale)
        img = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        if self.flip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return to_tensor(img)


class EvalTransform:
    """Resize to ``size`` (bicubic; no crop, the small datasets here are already centred) -> [0, 1]."""

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, img: Image.Image, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        img = img.convert("RGB")
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BICUBIC)
        return to_tensor(img)
