"""The registry of named decoding modes: ``generate(mode=NAME)``, the CLI's ``--mode NAME``, the
``generate`` docstring, ``python -m mage_fast info`` and the README's table all read it.

A new mode is one class and one line::

    MODES.register("my_mode", MyPass, "one line saying what the pass computes")

where ``MyPass(model, masked_before, keys, draws)`` is a :class:`.protocol.NetworkPass`, or the
registered object is a :class:`.protocol.DecodingMode` (has ``build``), as the built-in
:class:`.modes.DecodeMode` presets are.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Iterator


class FactoryMode:
    """A :class:`.protocol.DecodingMode` from a factory (a pass class or a function) called as
    ``build`` is."""

    def __init__(self, factory):
        self.factory = factory

    def build(self, model, masked_before, keys=None, draws=None):
        return self.factory(model, masked_before, keys, draws)

    def __repr__(self) -> str:
        return f"FactoryMode({getattr(self.factory, '__qualname__', self.factory)!r})"


class ModeRegistry(Mapping):
    """Name -> decoding mode, in registration order, each with a one-line summary."""

    def __init__(self):
        self._modes: dict = {}
        self._summaries: dict = {}

    def register(self, name: str, mode, summary: str):
        """Add ``mode`` (a DecodingMode, or a factory of passes) under ``name``; returns the mode as
        stored. A name is registered once (:meth:`unregister` first to replace it)."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"a mode name is one word (letters, digits, _), got {name!r}")
        if name in self._modes:
            raise ValueError(f"decoding mode {name!r} is already registered")
        if not summary or "\n" in summary:
            raise ValueError(f"mode {name!r} needs a one-line summary")
        if not callable(getattr(mode, "build", None)):
            if not callable(mode):
                raise TypeError(f"mode {name!r} must have build(model, masked_before, keys, draws) or be a factory "
                                f"called that way; got {type(mode).__name__}")
            mode = FactoryMode(mode)
        self._modes[name] = mode
        self._summaries[name] = summary
        return mode

    def unregister(self, name: str) -> None:
        del self._modes[name]
        del self._summaries[name]

    def summary(self, name: str) -> str:
        return self._summaries[name]

    def __getitem__(self, name: str):
        return self._modes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._modes)

    def __len__(self) -> int:
        return len(self._modes)

    def table(self) -> list[tuple[str, str]]:
        """(name, summary) per mode, in registration order."""
        return [(n, self._summaries[n]) for n in self._modes]

    def markdown_table(self) -> str:
        """The modes as a Markdown table (the README's, which a test holds to this)."""
        rows = ["| mode | what the network pass does |", "|---|---|"]
        rows += [f"| `{n}` | {s} |" for n, s in self.table()]
        return "\n".join(rows)
