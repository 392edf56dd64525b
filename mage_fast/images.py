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


def save_grid(images: Sequence[np.ndarray], path: str, ncol: int | None = None, min_tile: int = 64) -> str:
    """Write ``make_grid(images, ncol)`` as a PNG; tiles smaller than ``min_tile`` pixels are enlarged
    by an integer factor (nearest neighbour: each pixel stays a visible square), so a grid of 28-px
    samples is viewable. The individual PNGs are never resized."""
    h = images[0].shape[0] if len(images) else min_tile
    k = max(1, -(-min_tile // h))
    if k > 1:
        images = [np.repeat(np.repeat(im, k, axis=0), k, axis=1) for im in images]
    Image.fromarray(make_grid(images, ncol)).save(path)
    return path


def load_image(path: str, size: int) -> torch.Tensor:
    """An image file -> (3, size, size) float in [0, 1]: RGB, centre-cropped to a square, resized
    with bicubic filtering (PIL), as the official evaluation preprocessing does."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    if s != size:
        im = im.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def shade_tokens(img: np.ndarray, token_mask: np.ndarray, level: int = 128, alpha: float = 0.75) -> np.ndarray:
    """(H, W, 3) uint8 with the cells of ``token_mask`` (grid, grid) bool shaded grey."""
    g = token_mask.shape[0]
    cell = img.shape[0] // g
    m = np.kron(token_mask.astype(np.float32), np.ones((cell, cell), np.float32))[..., None]
    return (img * (1 - alpha * m) + level * alpha * m).astype(np.uint8)


def step_heatmap(fixed_at: np.ndarray, num_steps: int, size: int) -> np.ndarray:
    """(grid, grid) step at which each token was fixed (-1 = given) -> (size, size, 3) uint8:
    dark blue = early, yellow = late, grey = given."""
    g = fixed_at.shape[0]
    t = np.clip(fixed_at / max(1, num_steps - 1), 0, 1)
    rgb = np.stack([255 * t, 64 + 160 * t, 200 * (1 - t)], -1)
    rgb[fixed_at < 0] = 160
    return np.kron(rgb, np.ones((size // g, size // g, 1))).astype(np.uint8)
