"""A distributed sampler that can resume in the middle of an epoch."""
from __future__ import annotations

import math

import torch


class ResumableSampler(torch.utils.data.Sampler):
    """Yields ``(epoch, index)`` for this rank: a permutation seeded by ``seed + epoch`` (or the
    identity when ``shuffle`` is off), padded to a multiple of ``world_size`` and strided by rank,
    starting after the first ``start`` indices of this rank's share.

    ``set_epoch(epoch, start)`` selects the epoch and how many of this rank's samples were
    already consumed (the number of batches taken times the per-rank batch size).
    """

    def __init__(self, n: int, rank: int = 0, world_size: int = 1, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = True):
        if n <= 0:
            raise ValueError("the dataset is empty")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.n, self.rank, self.world_size = n, rank, world_size
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch, self.start = 0, 0
        self.per_rank = n // world_size if drop_last else math.ceil(n / world_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = int(epoch), int(start)

    def indices(self) -> list:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.per_rank * self.world_size
        order = (order + order[: max(0, total - self.n)])[:total]
        return order[self.rank:total:self.world_size]

    def __iter__(self):
        for i in self.indices()[self.start:]:
            yield (self.epoch, i)

    def __len__(self) -> int:
        return self.per_rank - self.start
