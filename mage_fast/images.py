"""Writing generated images: PNG files the way the official script writes them, and grids."""
from __future__ import annotations

import math
import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image


def to_uint8(imgs: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float, nominally [0, 1] -> (B, H, W, 3) uint8, as the official script:
    ``clip(x * 255, 0, 255)`` then truncation to uint8 (not rounding), so FID inputs match."""
    x = imgs.detach().float().cpu().numpy().transpose(0, 2, 3, 1)
    return np.clip(x * 255, 0, 255).astype(np.uint8)


def save_pngs(imgs: torch.Tensor, out_dir: str, first_index: int = 0) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for i, arr in enumerate(to_uint8(imgs)):
        p = os.path.join(out_dir, f"{first_index + i:05d}.png")
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


def make_grid(images: Sequence[np.ndarray], ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """List of (H, W, 3) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) uint8 picture."""
    if not len(images):
        raise ValueError("no images to put in a grid")
    n = len(images)
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    h, w = images[0].shape[:2]
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return grid


def save_grid(images: Sequence[np.ndarray], path: str, ncol: int | None = None) -> str:
    Image.fromarray(make_grid(images, ncol)).save(path)
    return path
