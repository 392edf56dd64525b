"""The whole decoding loop as one captured graph (``generate(..., cuda_graph=True)``).

Every mode's shapes follow from the schedule alone and ``rng="torch"`` holds no host sync, so the
loop of T network passes and decode steps can be recorded once and replayed: on CUDA with
``torch.cuda.CUDAGraph`` (one launch instead of thousands of kernels per image batch). A captured
loop reads its inputs from static buffers (the starting ids, the per-image random keys, the class
tokens) and writes its outputs to static buffers; a replay copies the new inputs in and the
outputs out. Captures are kept per model state and settings (:data:`_GRAPHS`, a few at most), so
the first call with new settings pays for a warm-up run and the capture, and later calls replay.
Anything that changes the recorded work (batch size, steps, mode, temperature, guidance, order,
autocast, a weight changed in place) is part of the key and gets its own capture.
"""
from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Callable, Optional

import torch

from .quant import fingerprint

_MAX_GRAPHS = 4  # captures kept per model (each holds its own memory pool on CUDA)
_GRAPHS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class CudaGraphBackend:
    """Records ``fn`` into a ``torch.cuda.CUDAGraph`` after one warm-up run on a side stream
    (lazy initialisations, kernel compilation and the modes' weight copies happen there, not in
    the capture)."""

    def capture(self, fn: Callable[[], tuple]) -> tuple:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn()
        return self.out

    def replay(self) -> tuple:
        self.graph.replay()
        return self.out


def backend_for(device: torch.device):
    """The capture backend for ``device``: CUDA graphs on a CUDA device, else a clear error."""
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True captures the decoding loop on a CUDA device; the model is on "
                         f"{device.type}")
    return CudaGraphBackend()


def run_captured(model: torch.nn.Module, key: tuple, loop: Callable[..., tuple], inputs: dict,
                 device: torch.device) -> tuple:
    """``loop(**static_inputs) -> (sampled, ids)`` captured once per (model state, ``key``, input
    shapes) and replayed with ``inputs`` copied into its static buffers; returns fresh tensors."""
    shapes = tuple((k, None if v is None else (tuple(v.shape), v.dtype)) for k, v in sorted(inputs.items()))
    full_key = (fingerprint(model), key, shapes)
    graphs = _GRAPHS.setdefault(model, OrderedDict())
    entry = graphs.get(full_key)
    if entry is None:
        static = {k: None if v is None else v.clone() for k, v in inputs.items()}
        backend = backend_for(device)
        backend.capture(lambda: loop(**static))
        entry = graphs[full_key] = (backend, static)
        while len(graphs) > _MAX_GRAPHS:
            graphs.popitem(last=False)
    else:
        graphs.move_to_end(full_key)
    backend, static = entry
    for k, v in inputs.items():
        if v is not None:
            static[k].copy_(v)
    return tuple(t.clone() for t in backend.replay())


def clear(model: Optional[torch.nn.Module] = None) -> None:
    """Drop the captures of ``model`` (all models when None) and their memory."""
    if model is None:
        _GRAPHS.clear()
    else:
        _GRAPHS.pop(model, None)
