"""Loads the compiled extension ``mage_fast._C`` (C++ CPU ops, CUDA ops where built).

Loading registers the ops in ``torch.ops.mage_fast``. A missing, stale or partial build never
makes ``import mage_fast`` fail: :func:`load` warns once and returns ``None``, and the
dispatcher falls back to the other backends. :data:`status` says what happened, for
``mage_fast.info`` and for the backends' ``supports`` reasons.

``MAGE_FAST_DISABLE_EXT=1`` skips loading (the ops then run on the other backends).
"""
from __future__ import annotations

import importlib
import os
import pathlib
import warnings
from types import ModuleType
from typing import Optional

import torch

ABI_VERSION = 1  # must equal MAGE_FAST_ABI_VERSION in csrc/module.cpp
OPS = ("codebook_nn", "decode_step", "gather_tokens", "scatter_tokens", "winograd_weight", "winograd_conv3x3",
       "group_norm_silu", "dropout", "attn_probs", "attn_dscores")

status: str = "not loaded yet"
_module: Optional[ModuleType] = None
_tried = False


def _newest_source_mtime(with_cuda: bool) -> float:
    """Newest mtime of the sources compiled into this build (0 when installed without sources)."""
    csrc = pathlib.Path(__file__).resolve().parents[1] / "csrc"
    if not csrc.is_dir():
        return 0.0
    dirs = [csrc, csrc / "cpu", csrc / "common"] + ([csrc / "cuda"] if with_cuda else [])
    return max((p.stat().st_mtime for d in dirs for p in d.glob("*") if p.suffix in (".cpp", ".h", ".cu", ".cuh")),
               default=0.0)


def load() -> Optional[ModuleType]:
    """The extension module, or ``None`` (with :data:`status` saying why) after one warning."""
    global _module, _tried, status
    if _tried:
        return _module
    _tried = True
    if os.environ.get("MAGE_FAST_DISABLE_EXT") == "1":
        status = "disabled by MAGE_FAST_DISABLE_EXT=1"
        return None
    try:
        mod = importlib.import_module("mage_fast._C")
    except ImportError as e:
        status = f"mage_fast._C is not built or does not load ({e})"
        warnings.warn(f"mage_fast: compiled ops unavailable, using fallbacks: {status}. Build with "
                      f"`python setup.py build_ext --inplace` (or pip install --no-build-isolation .)",
                      RuntimeWarning, stacklevel=3)
        return None
    problem = None
    if getattr(mod, "abi_version", None) != ABI_VERSION:
        problem = (f"mage_fast._C has ABI version {getattr(mod, 'abi_version', None)}, this package expects "
                   f"{ABI_VERSION}: rebuild the extension")
    else:
        missing = [op for op in OPS if not hasattr(torch.ops.mage_fast, op)]
        if missing:
            problem = f"mage_fast._C does not register {missing}: rebuild the extension"
    if problem is not None:
        status = problem
        warnings.warn(f"mage_fast: compiled ops disabled: {problem}", RuntimeWarning, stacklevel=3)
        return None
    so_mtime = os.stat(mod.__file__).st_mtime
    if _newest_source_mtime(bool(getattr(mod, "with_cuda", False))) > so_mtime:
        warnings.warn("mage_fast: mage_fast._C is older than the sources in csrc/ (stale build, still used); "
                      "rebuild with `python setup.py build_ext --inplace`", RuntimeWarning, stacklevel=3)
        status = f"loaded from {mod.__file__} (stale: older than csrc/)"
    else:
        status = f"loaded from {mod.__file__}"
    _module = mod
    return mod


def has_op(name: str) -> bool:
    """Whether ``torch.ops.mage_fast.<name>`` can be called: one of :data:`OPS`, all of which
    :func:`load` checks are registered before it hands out the extension."""
    return name in OPS and load() is not None


def with_cuda() -> bool:
    mod = load()
    return bool(mod is not None and getattr(mod, "with_cuda", False))
