"""How the repository's scripts (``train/*.py``, ``benchmarks/*.py``) end, as the ``python -m mage_fast`` CLI does.

A script refuses bad input with ``raise SystemExit("error: ...")``: Python prints that line and exits
with status 1. ``run_script(main)`` keeps the line and makes the status 2 (a usage error, as argparse
and the CLI report it), so a caller can tell bad input from a crash. Integer exits pass through. The
project's own input errors (:class:`~mage_fast.models.checks.InputError`,
:class:`~mage_fast.models.checkpoint.CheckpointError`) raised anywhere under ``main`` end the same
way, as one ``error: ...`` line; ``MAGE_FAST_DEBUG=1`` shows their traceback instead.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable


def run_script(main: Callable[[], object]) -> None:
    from mage_fast.models.checkpoint import CheckpointError
    from mage_fast.models.checks import InputError
    try:
        code = main()
    except (InputError, CheckpointError) as e:
        if os.environ.get("MAGE_FAST_DEBUG"):
            raise
        msg = " ".join(str(e).split())  # one line, as the CLI prints it
        print(f"error: {msg or type(e).__name__}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            sys.exit(2)
        raise
    sys.exit(code if isinstance(code, int) else 0)


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose usage errors are one line, ``<prog>: error: <message>``
    (``--help`` shows the usage), with exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")
