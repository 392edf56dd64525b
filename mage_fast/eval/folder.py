"""Batches of evaluation images from the items :func:`mage_fast.image_folder.list_image_folder`
lists (re-exported here for the evaluation code)."""
from __future__ import annotations

from typing import Iterator

import torch

from ..image_folder import list_image_folder  # noqa: F401 (re-exported)
from ..images import load_image


def iterate_images(items: list[tuple[str, int]], size: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (images (B, 3, size, size) in [0, 1], labels (B,))."""
    for i in range(0, len(items), batch_size):
        chunk = items[i: i + batch_size]
        yield (torch.stack([load_image(p, size) for p, _ in chunk]), torch.tensor([y for _, y in chunk]))
