"""Backend selection for mage_fast ops.

Every op owns an :class:`Op` with an ordered list of backends. A backend says whether it can run
a given call (returning ``None``) or why it declines (a short reason). The first backend that
accepts is used; the plain-torch reference is always last and always accepts, so a call never
fails for lack of a backend. ``MAGE_FAST_BACKEND=<name>`` (all ops) or
``MAGE_FAST_BACKEND_<OP>=<name>`` (one op) forces a backend; :func:`force_backend` does the same
inside a ``with`` block.
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

_forced = threading.local()


@dataclass
class Backend:
    name: str
    fn: Callable
    supports: Callable[..., Optional[str]]  # same arguments as fn -> None (ok) or the reason


class NoBackendError(RuntimeError):
    pass


class Op:
    """A named op with ordered backends; ``op(*args)`` runs the first backend that accepts."""

    registry: dict[str, "Op"] = {}

    def __init__(self, name: str, reference: Callable):
        self.name = name
        self.backends: list[Backend] = [Backend("torch", reference, lambda *a, **k: None)]
        Op.registry[name] = self

    def register(self, name: str, fn: Callable, supports: Callable[..., Optional[str]]) -> None:
        """Add a backend in front of those already registered (later registration = higher priority)."""
        self.backends = [b for b in self.backends if b.name != name]
        self.backends.insert(0, Backend(name, fn, supports))

    def _forced_name(self) -> Optional[str]:
        stack = getattr(_forced, "stack", None)
        if stack:
            return stack[-1]
        return os.environ.get(f"MAGE_FAST_BACKEND_{self.name.upper()}") or os.environ.get("MAGE_FAST_BACKEND")

    def explain(self, *args, **kwargs) -> list[tuple[str, str]]:
        """(backend, verdict) for every backend, in priority order, for this call."""
        forced = self._forced_name()
        rows, chosen = [], False
        for b in self.backends:
            if forced is not None and b.name != forced:
                rows.append((b.name, f"not the forced backend {forced!r}"))
                continue
            try:
                reason = b.supports(*args, **kwargs)
            except Exception as e:  # a broken probe must not break the op
                reason = f"support check raised {type(e).__name__}: {e}"
            if reason is None and not chosen:
                rows.append((b.name, "selected"))
                chosen = True
            else:
                rows.append((b.name, reason or "available, lower priority"))
        return rows

    def select(self, *args, **kwargs) -> Backend:
        forced = self._forced_name()
        reasons = []
        for b in self.backends:
            if forced is not None and b.name != forced:
                continue
            reason = b.supports(*args, **kwargs)
            if reason is None:
                return b
            reasons.append(f"  {b.name}: {reason}")
        known = ", ".join(b.name for b in self.backends)
        if forced is not None and not reasons:
            raise NoBackendError(f"{self.name}: forced backend {forced!r} is not registered (known: {known})")
        raise NoBackendError(f"{self.name}: no backend accepts this call:\n" + "\n".join(reasons))

    def __call__(self, *args, **kwargs):
        return self.select(*args, **kwargs).fn(*args, **kwargs)


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Run every op inside the block on backend ``name`` (e.g. ``"torch"`` for the reference)."""
    stack = getattr(_forced, "stack", None)
    if stack is None:
        stack = _forced.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()
