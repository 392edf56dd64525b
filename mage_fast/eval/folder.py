"""Reading ImageFolder-layout directories (root/<class>/<image>) with PIL, no torchvision."""
from __future__ import annotations

import os
from typing import Iterator

import torch

from ..images import load_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def list_image_folder(root: str) -> tuple[list[tuple[str, int]], list[str]]:
    """[(path, label)] sorted by class then file, and the class names (sorted folder names)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root} has no class sub-folders (expected root/<class>/<image>)")
    items = [(os.path.join(root, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not items:
        raise ValueError(f"{root} holds no images with extensions {IMAGE_EXTENSIONS}")
    return items, classes


def iterate_images(items: list[tuple[str, int]], size: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (images (B, 3, size, size) in [0, 1], labels (B,))."""
    for i in range(0, len(items), batch_size):
        chunk = items[i: i + batch_size]
        yield (torch.stack([load_image(p, size) for p, _ in chunk]), torch.tensor([y for _, y in chunk]))
