"""Processes of one sampling run under ``torchrun`` (``torch.distributed``; no launcher of our own).

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (multi-node through its own rendezvous
options); without them the run is one process and nothing here communicates. Generation shards by
batch: round k gives rank r the batch ``k * world + r``, so every rank runs the same number of
rounds (one small all-reduce per round reports progress) and each image is drawn exactly as a
one-process run draws it.
"""
from __future__ import annotations

import os
from typing import Any


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    def env_int(name, default):
        v = os.environ.get(name)
        try:
            return int(v) if v is not None else default
        except ValueError:
            from .models.checks import InputError
            raise InputError(f"{name}={v!r} in the environment is not an integer (set by torchrun)") from None
    world = env_int("WORLD_SIZE", 1)
    return env_int("RANK", 0), world, env_int("LOCAL_RANK", 0)


def init(device_type: str) -> bool:
    """Join the process group torchrun describes (nccl on GPUs, gloo on the CPU); False for one
    process."""
    rank, world, _ = dist_info()
    if world <= 1:
        return False
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return True


def active() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; for small objects)."""
    if not active():
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_sum(value: int) -> int:
    if not active():
        return value
    import torch
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def barrier() -> None:
    if active():
        import torch.distributed as dist
        dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_rounds(num_batches: int, rank: int, world: int) -> list[list[int]]:
    """The batches of each round for ``rank``: round k holds batch ``k * world + rank`` when it
    exists (an empty round keeps the ranks in step).

    >>> shard_rounds(5, 1, 2)
    [[1], [3], []]
    """
    rounds = -(-num_batches // world)
    return [[b] if (b := k * world + rank) < num_batches else [] for k in range(rounds)]
