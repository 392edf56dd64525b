"""What the op tests share: the backends they run on, the compiled extension, strided copies of inputs.

A test parametrized over backends takes a *target*, a dispatcher backend name, with ``"cuda"`` for
the compiled extension's CUDA kernels (the ``cpp`` backend given CUDA tensors) and ``"triton"`` on
the GPU where there is one, else in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET``).
:func:`backend_fn` returns the backend's function for a call, or skips the test with the reason the
dispatcher gives for declining it (no CUDA device, extension not built, triton not installed).

The compiled extension is built in place (``setup.py build_ext --inplace``, about a minute) when it
is not already loadable; ``MAGE_FAST_SKIP_EXT=1`` skips the tests of the ``cpp`` backend instead.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
from typing import Callable, Iterator, Sequence

import pytest
import torch

from conftest import REPO
from mage_fast import _ext
from mage_fast.ops.dispatch import Op

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SKIP_EXT = os.environ.get("MAGE_FAST_SKIP_EXT") == "1"


def _ensure_built() -> None:
    if SKIP_EXT or _ext.load() is not None:
        return
    env = dict(os.environ, MAX_JOBS=os.environ.get("MAX_JOBS", "1"))
    r = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=REPO, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, f"building mage_fast._C failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    _ext._tried = False
    assert _ext.load() is not None, _ext.status
    importlib.reload(importlib.import_module("mage_fast.backends.cpp"))


_ensure_built()
CPP = None if SKIP_EXT else _ext.load()
needs_cpp = pytest.mark.skipif(CPP is None, reason="MAGE_FAST_SKIP_EXT=1: compiled extension not built" if SKIP_EXT
                               else f"mage_fast._C is not built ({_ext.status})")


def device(target: str) -> str:
    """Where a target's tensors live; skips the test where that is a CUDA device and there is none."""
    if target == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device (the cpp backend's CUDA kernels need a CUDA GPU)")
        return "cuda"
    if target == "triton":
        return DEV
    return "cpu"


def backend_name(target: str) -> str:
    return "cpp" if target == "cuda" else target


@contextlib.contextmanager
def interpret_dispatch() -> Iterator[None]:
    """Let the Triton backend take CPU tensors (in the interpreter) inside the block."""
    old = os.environ.get("MAGE_FAST_TRITON_INTERPRET_DISPATCH")
    os.environ["MAGE_FAST_TRITON_INTERPRET_DISPATCH"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["MAGE_FAST_TRITON_INTERPRET_DISPATCH"]
        else:
            os.environ["MAGE_FAST_TRITON_INTERPRET_DISPATCH"] = old


def backend_fn(op: Op, target: str, *args, **kwargs) -> Callable:
    """The function of ``op``'s backend ``target`` for this call; skips, with the dispatcher's reason,
    where that backend declines it (the args must already be on ``device(target)``)."""
    if device(target) == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{op.name} on {target}: no CUDA device (needs a CUDA GPU)")
    name = backend_name(target)
    found = [b for b in op.backends if b.name == name]
    assert found, f"{op.name} has no backend {name!r} (it has {[b.name for b in op.backends]})"
    with interpret_dispatch():
        reason = found[0].supports(*args, **kwargs)
    if reason is not None:
        pytest.skip(f"{op.name} on {target}: {reason}")
    return found[0].fn


def run(op: Op, target: str, *args, **kwargs):
    """``op``'s backend ``target`` applied to the call (see :func:`backend_fn`)."""
    return backend_fn(op, target, *args, **kwargs)(*args, **kwargs)


def triton_kernels(name: str):
    """The kernel file ``mage_fast.triton.<name>``; skips where triton is not installed."""
    pytest.importorskip("triton", reason="triton not installed")
    return importlib.import_module(f"mage_fast.triton.{name}")


# ---------------------------------------------------------------- non-contiguous inputs

def spread(t: torch.Tensor) -> torch.Tensor:
    """Same values, every stride doubled; the skipped elements are NaN (floats) or -7 (ints)."""
    big = torch.full([2 * n for n in t.shape], float("nan") if t.is_floating_point() else -7, dtype=t.dtype,
                     device=t.device)
    out = big[tuple(slice(None, None, 2) for _ in t.shape)]
    out.copy_(t.detach())
    return out.requires_grad_(t.requires_grad)


def flipped(t: torch.Tensor) -> torch.Tensor:
    """Same values, column-major in the last two dimensions."""
    out = t.detach().transpose(-1, -2).contiguous().transpose(-1, -2)
    return out.requires_grad_(t.requires_grad)


def _leaf(t):
    return t.detach().clone().requires_grad_(t.requires_grad)


def _outputs(fn, args, grad_of=(), dy=None):
    """fn(*args) and, for the float args at positions grad_of, the gradients of <out, dy>."""
    args = [_leaf(a) if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*args)
    outs = list(out) if isinstance(out, tuple) else [out]
    if grad_of:
        wrt = [args[i] for i in grad_of]
        seed = dy if dy is not None else torch.ones_like(outs[0])
        outs += list(torch.autograd.grad(outs[0], wrt, seed))
    return [o.detach() for o in outs]


def check_strided(fn, args: list, strided_positions: Sequence[int], t, grad_of=(), dy=None) -> None:
    """``fn`` gives the same outputs (and gradients) when each argument in turn is replaced by a
    spread-out view (every stride doubled, NaN / out-of-range ids in between) or, from 2-D up, by a
    column-major copy: a kernel that indexes an argument as dense rows reads the wrong elements.
    ``t``: the tolerance (tolerances.STRIDED)."""
    want = _outputs(fn, args, grad_of, dy)
    for make in (spread, flipped):
        for i in strided_positions:
            if make is flipped and args[i].dim() < 2:
                continue
            moved = list(args)
            moved[i] = make(args[i])
            if make is spread:
                assert moved[i].stride() != args[i].stride()
            got = _outputs(fn, moved, grad_of, dy)
            for k, (g, w) in enumerate(zip(got, want)):
                assert torch.equal(g, w) or torch.allclose(g, w, rtol=t.rtol, atol=t.atol, equal_nan=False), \
                    f"{make.__name__}(arg {i}) changes output {k}: max diff {(g.float() - w.float()).abs().max()}"


def assert_close_to_lowp_reference(names: Sequence[str], got, ref, torch_lowp, atol: float) -> None:
    """Low-precision outputs against the fp32 reference ``ref``: each within twice torch's own error
    in that precision (``torch_lowp``, the reference run without upcasting) plus ``atol`` relative
    to the reference's scale."""
    for name, a, r, t in zip(names, got, ref, torch_lowp):
        err = (a.float() - r).abs().max().item()
        bound = 2 * (t.float() - r).abs().max().item() + atol * max(1.0, r.abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"
