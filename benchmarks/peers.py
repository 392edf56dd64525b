"""Peer runtimes: the exact network pass and the pixel decode in ONNX Runtime and OpenVINO, inside
mage_fast's own sampling loop.

What a CPU user might run instead of mage_fast: export the model to ONNX and run it in an
inference runtime. Two parts of a generation are exported with ``torch.onnx.export`` (the
TorchScript exporter, ``dynamo=False``, opset 17) with every op on its plain-torch reference
(``force_backend("torch")``):

- the network pass, ``model.code_logits``: (B, L) ids and (B,) class-slot ids -> (B, L, codebook)
  logits, the pass the ``exact`` mode runs at every step;
- the pixel decode: (B, L) code ids -> (B, 3, S, S) images through the tokenizer.

:class:`PeerRuntimes` exports each part once per batch size (the exporter cannot keep the batch
dynamic: a LayerNorm's shape becomes an input of the graph) and opens one session per runtime.
:meth:`PeerRuntimes.mode` hands a peer to :func:`mage_fast.generate` as a decoding mode, so the
sampler's loop (sampling, confidence, re-masking, the random numbers) is the one every mode runs;
only the network pass and the pixel decode run in the peer.

Peers (:data:`PEERS`): ``onnxruntime_fp32``, ``openvino_fp32`` (``INFERENCE_PRECISION_HINT`` f32:
OpenVINO's default on a CPU with bf16 units is bf16) and ``openvino_bf16`` (bf16 where the CPU
multiplies it natively: AVX512-BF16 or AMX). Both runtimes get the torch thread count.

The packages are the optional extra ``peers`` (``pip install 'mage_fast[peers]'``); nothing in
``mage_fast`` imports them.
"""
from __future__ import annotations

import importlib
import os
import tempfile
import time
import warnings
from typing import Optional

import torch

# name -> (runtime package, precision)
PEERS = {
    "onnxruntime_fp32": ("onnxruntime", "fp32"),
    "openvino_fp32": ("openvino", "fp32"),
    "openvino_bf16": ("openvino", "bf16"),
}
EXTRA_HINT = "pip install 'mage_fast[peers]'"


def _import_error(package: str) -> Optional[str]:
    try:
        importlib.import_module(package)
    except ImportError as e:
        return f"{package} is not importable ({type(e).__name__}: {e}; {EXTRA_HINT})"
    return None


def unavailable(names=None, flags=None) -> dict:
    """Why each peer in ``names`` (default: all of :data:`PEERS`) cannot run here: name -> reason
    (the peers that can run are absent). ``flags``: CPU flags to judge bf16 by instead of
    /proc/cpuinfo's."""
    from mage_fast.info import cpu_bf16_native_flags
    out = {}
    onnx_missing = _import_error("onnx")
    for name in names or PEERS:
        package, precision = PEERS[name]
        why = onnx_missing and f"{onnx_missing} (torch.onnx.export needs it)"
        why = why or _import_error(package)
        if why is None and precision == "bf16" and not cpu_bf16_native_flags(flags):
            why = "this CPU has neither AVX512-BF16 nor AMX bf16 (/proc/cpuinfo), so bf16 would be emulated"
        if why:
            out[name] = why
    return out


class _NetworkPass(torch.nn.Module):
    """The exact network pass as a module: (B, L) ids, (B,) class-slot ids -> (B, L, C) logits."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, class_tokens):
        return self.model.code_logits(ids, class_tokens, check=False)


class _PixelDecode(torch.nn.Module):
    """The tokenizer's pixel decode as a module: (B, L) code ids -> (B, 3, S, S) images."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model.decode_tokens(ids)


def export_onnx(model, batch: int, folder: str) -> tuple[str, str]:
    """Export the network pass and the pixel decode of ``model`` at batch ``batch`` into ``folder``;
    returns the two .onnx paths. The model is left in eval mode (the exporter can leave it training,
    with dropout on)."""
    from mage_fast.ops import force_backend
    dev = next(model.parameters()).device
    L = model.seq_len
    with torch.inference_mode(False), torch.no_grad():
        ids = torch.randint(0, model.codebook_size, (batch, L), generator=torch.Generator().manual_seed(0)).to(dev)
        masked = ids.clone()
        masked[:, ::2] = model.mask_token_label
        cls = torch.full((batch,), model.fake_class_label, dtype=torch.long, device=dev)
        net_path = os.path.join(folder, f"network_pass_b{batch}.onnx")
        pix_path = os.path.join(folder, f"pixel_decode_b{batch}.onnx")
        try:
            with force_backend("torch"), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the tracer's notes on Python scalars and shapes
                torch.onnx.export(_NetworkPass(model), (masked, cls), net_path, dynamo=False, opset_version=17,
                                  input_names=["ids", "class_tokens"], output_names=["logits"])
                torch.onnx.export(_PixelDecode(model), (ids,), pix_path, dynamo=False, opset_version=17,
                                  input_names=["ids"], output_names=["images"])
        finally:
            model.eval()
    return net_path, pix_path


class _OrtRunner:
    def __init__(self, path: str, threads: int):
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.precision = "fp32"

    def __call__(self, feeds: dict):
        return self.session.run(None, feeds)[0]


class _OvRunner:
    def __init__(self, path: str, threads: int, precision: str):
        import openvino as ov
        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(path), "CPU", {
            "INFERENCE_PRECISION_HINT": {"fp32": "f32", "bf16": "bf16"}[precision],
            "INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
        self.request = self.compiled.create_infer_request()
        ran = self.compiled.get_property("INFERENCE_PRECISION_HINT")  # what it runs, not what was asked
        self.precision = {"f32": "fp32", "bf16": "bf16"}.get(ran.get_type_name(), ran.get_type_name())

    def __call__(self, feeds: dict):
        self.request.infer(feeds)
        return self.request.get_output_tensor(0).data.copy()  # the request reuses its buffer


class PeerRuntimes:
    """Sessions of the peers ``names`` for one model (see the module docstring), built per batch
    size by :meth:`prepare`; ``threads`` (default: torch's) for every runtime. Close with
    :meth:`close` (or use as a context manager) to free the sessions and the exported files."""

    def __init__(self, model, names, threads: Optional[int] = None):
        bad = [n for n in names if n not in PEERS]
        if bad:
            raise ValueError(f"unknown peer {bad[0]!r}; choose from {sorted(PEERS)}")
        if next(model.parameters()).device.type != "cpu":
            raise ValueError("the peer runtimes run on the CPU: move the model there first")
        self.model, self.names = model, list(names)
        self.threads = threads or torch.get_num_threads()
        self._dir = tempfile.TemporaryDirectory(prefix="mage_fast_peers_")
        self._runners: dict = {}  # (name, part, batch) -> runner
        self.export_s: dict = {}  # batch -> seconds to export both parts
        self.open_s: dict = {}  # (name, batch) -> seconds to open both sessions
        self.reported: dict = {n: set() for n in self.names}  # name -> precisions its runtime reported

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._runners.clear()
        self._dir.cleanup()

    def prepare(self, batch: int) -> None:
        """Export both parts at ``batch`` (once) and open every peer's sessions for it."""
        if all((n, "net", batch) in self._runners for n in self.names):
            return
        t0 = time.perf_counter()
        net_path, pix_path = export_onnx(self.model, batch, self._dir.name)
        self.export_s[batch] = time.perf_counter() - t0
        for name in self.names:
            t0 = time.perf_counter()
            package, precision = PEERS[name]
            for part, path in (("net", net_path), ("pix", pix_path)):
                runner = _OrtRunner(path, self.threads) if package == "onnxruntime" \
                    else _OvRunner(path, self.threads, precision)
                self._runners[name, part, batch] = runner
                self.reported[name].add(runner.precision)
            self.open_s[name, batch] = time.perf_counter() - t0
        for path in (net_path, pix_path):  # the sessions hold the graphs now
            os.remove(path)

    def release(self, batch: int) -> None:
        """Free the sessions of ``batch``."""
        for key in [k for k in self._runners if k[2] == batch]:
            del self._runners[key]

    def describe(self) -> dict:
        """Per peer: runtime and version, the precision asked for and the one the runtime reports."""
        import importlib.metadata as md
        out = {}
        for name in self.names:
            package, precision = PEERS[name]
            runs = sorted(self.reported[name])
            out[name] = {"runtime": f"{package} {md.version(package)}", "precision": precision,
                         "runtime_reports": runs, "threads": self.threads,
                         "export": "torch.onnx.export(dynamo=False, opset_version=17), ops on their torch reference"}
        return out

    def _run(self, name: str, part: str, feeds: dict) -> torch.Tensor:
        batch = next(iter(feeds.values())).shape[0]
        if (name, part, batch) not in self._runners:
            self.prepare(batch)
        return torch.from_numpy(self._runners[name, part, batch](feeds))

    def network_pass(self, name: str, ids: torch.Tensor, class_tokens: Optional[torch.Tensor]) -> torch.Tensor:
        """(B, L) ids -> (B, L, codebook) fp32 logits in peer ``name`` (class slot: the fake class
        where ``class_tokens`` is None)."""
        if class_tokens is None:
            class_tokens = torch.full((ids.shape[0],), self.model.fake_class_label, dtype=torch.long)
        feeds = {"ids": ids.cpu().long().contiguous().numpy(),
                 "class_tokens": class_tokens.cpu().long().contiguous().numpy()}
        return self._run(name, "net", feeds).to(ids.device)

    def pixel_decode(self, name: str, ids: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        """(B, L) code ids -> (B, 3, S, S) fp32 images in peer ``name``, ``chunk`` images per call."""
        if chunk is not None and chunk < ids.shape[0]:
            return torch.cat([self.pixel_decode(name, part) for part in ids.split(chunk)])
        return self._run(name, "pix", {"ids": ids.cpu().long().contiguous().numpy()}).to(ids.device)

    def mode(self, name: str) -> "PeerMode":
        """Peer ``name`` as a decoding mode for :func:`mage_fast.generate` (``mode=...``)."""
        if name not in self.names:
            raise ValueError(f"peer {name!r} is not one of this set's {self.names}")
        return PeerMode(self, name)


class PeerMode:
    """A decoding mode whose network pass and pixel decode run in a peer runtime; the sampling loop
    around them is :func:`mage_fast.generate`'s."""

    def __init__(self, runtimes: PeerRuntimes, name: str):
        self.runtimes, self.name = runtimes, name

    def describe(self) -> str:
        package, precision = PEERS[self.name]
        return f"exact network pass and pixel decode exported to ONNX, run in {package} ({precision})"

    def build(self, model, counts, keys=None, choice=None) -> "PeerPass":
        if model is not self.runtimes.model:
            raise ValueError("this peer mode was built for another model")
        return PeerPass(self.runtimes, self.name)


class PeerPass:
    """One decoding run's network pass in a peer: ``pass_(ids, class_tokens, i)`` -> logits, and
    ``decode_images(ids, chunk)`` -> images, as :class:`mage_fast.decoding.NetworkPass`."""

    def __init__(self, runtimes: PeerRuntimes, name: str):
        self.runtimes, self.name = runtimes, name

    def __call__(self, ids: torch.Tensor, class_tokens: Optional[torch.Tensor], i: int) -> torch.Tensor:
        return self.runtimes.network_pass(self.name, ids, class_tokens)

    def decode_images(self, ids: torch.Tensor, chunk: Optional[int] = None) -> torch.Tensor:
        return self.runtimes.pixel_decode(self.name, ids, chunk)
