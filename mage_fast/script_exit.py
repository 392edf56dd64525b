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


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` shows every option's default, as the CLI's does (flags without help text too),
    except where the help already says it; the description keeps its layout."""

    def _format_action(self, action):
        if not action.help and action.option_strings and action.default is not argparse.SUPPRESS \
                and not action.required:
            import copy
            action = copy.copy(action)
            action.help = "(default: %(default)s)" if action.default is not None else "(default: none)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        h = action.help or ""
        if "default" in h or action.default is argparse.SUPPRESS or not action.option_strings or action.required:
            return h
        return h + (" (default: none)" if action.default is None else " (default: %(default)s)")


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose usage errors are one line, ``<prog>: error: <message>``
    (``--help`` shows the usage), with exit status 2. Its ``--help`` shows every default
    (:class:`HelpFormatter`) unless another ``formatter_class`` is given."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")
