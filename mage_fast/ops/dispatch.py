"""Backend selection for mage_fast ops.

Every op owns an :class:`Op` with an ordered list of backends. A backend says whether it can run
a given call (returning ``None``) or why it declines (a short reason). The first backend that
accepts is used; the plain-torch reference is always last and always accepts, so a call never
fails for lack of a backend. A backend may also *defer* a call it supports (``defer`` returns why,
e.g. a cost model predicting it slower): the call then goes to the next backend that accepts it,
unless that is only the reference, which a deferring backend still beats.
``MAGE_FAST_BACKEND=<name>`` (all ops) or ``MAGE_FAST_BACKEND_<OP>=<name>`` (one op) forces a
backend (ignoring deferral); :func:`force_backend` does the same inside a ``with`` block.
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
    defer: Optional[Callable[..., Optional[str]]] = None  # -> None, or why a later backend should run it


class NoBackendError(RuntimeError):
    pass


class Op:
    """A named op with ordered backends; ``op(*args)`` runs the first backend that accepts."""

    registry: dict[str, "Op"] = {}

    def __init__(self, name: str, reference: Callable):
        self.name = name
        self.backends: list[Backend] = [Backend("torch", reference, lambda *a, **k: None)]
        Op.registry[name] = self

    def register(self, name: str, fn: Callable, supports: Callable[..., Optional[str]],
                 defer: Optional[Callable[..., Optional[str]]] = None) -> None:
        """Add a backend in front of those already registered (later registration = higher priority)."""
        self.backends = [b for b in self.backends if b.name != name]
        self.backends.insert(0, Backend(name, fn, supports, defer))

    def _verdicts(self, args, kwargs) -> Iterator[tuple[Backend, Optional[str], Optional[str]]]:
        """(backend, reason it declines or None, reason it defers or None) in priority order, lazily."""
        forced = self._forced_name()
        for b in self.backends:
            if forced is not None and b.name != forced:
                yield b, f"not the forced backend {forced!r}", None
                continue
            try:
                reason = b.supports(*args, **kwargs)
            except Exception as e:  # a broken probe must not break the op
                reason = f"support check raised {type(e).__name__}: {e}"
            why = None
            if reason is None and forced is None and b.defer is not None:
                try:
                    why = b.defer(*args, **kwargs)
                except Exception:  # a broken cost model keeps the registered order
                    why = None
            yield b, reason, why

    def _choose(self, rows) -> Optional[Backend]:
        """The first accepting backend that does not defer; a deferring one beats only the reference."""
        deferred = None
        for b, reason, why in rows:
            if reason is not None:
                continue
            if why is not None:
                deferred = deferred or b
                continue
            return deferred if (deferred is not None and b is self.backends[-1]) else b
        return deferred

    def _forced_name(self) -> Optional[str]:
        stack = getattr(_forced, "stack", None)
        if stack:
            return stack[-1]
        return os.environ.get(f"MAGE_FAST_BACKEND_{self.name.upper()}") or os.environ.get("MAGE_FAST_BACKEND")

    def explain(self, *args, **kwargs) -> list[tuple[str, str]]:
        """(backend, verdict) for every backend, in priority order, for this call."""
        verdicts = list(self._verdicts(args, kwargs))
        chosen = self._choose(verdicts)
        rows = []
        for b, reason, why in verdicts:
            if b is chosen:
                rows.append((b.name, "selected" if why is None else f"selected (no other backend; it defers: {why})"))
            elif reason is None and why is not None:
                rows.append((b.name, f"deferred: {why}"))
            else:
                rows.append((b.name, reason or "available, lower priority"))
        return rows

    def select(self, *args, **kwargs) -> Backend:
        forced = self._forced_name()
        chosen = self._choose(self._verdicts(args, kwargs))  # stops at the first backend that takes the call
        if chosen is not None:
            return chosen
        reasons = [f"  {b.name}: {reason}" for b, reason, _ in self._verdicts(args, kwargs)
                   if forced is None or b.name == forced]
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
