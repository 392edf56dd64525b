"""How the repository's scripts (``train/*.py``, ``benchmarks/*.py``) end, as the ``python -m mage_fast`` CLI does.

A script refuses bad input with ``raise SystemExit("error: ...")``: Python prints that line and exits
with status 1. ``run_script(main)`` keeps the line and makes the status 2 (a usage error, as argparse
and the CLI report it), so a caller can tell bad input from a crash. Integer exits pass through. The
project's own input errors (:class:`~mage_fast.models.checks.InputError`,
:class:`~mage_fast.models.state_dict.CheckpointError`) raised anywhere under ``main`` end the same
way, as one ``error: ...`` line; ``MAGE_FAST_DEBUG=1`` shows their traceback instead.

Under a launcher (torchrun, deepspeed) with several ranks, the job says ``error: rank R: ...`` once:
the first rank to fail says it (:mod:`mage_fast.parallel`), the others leave with status 2 without a
word, and any exception on a rank (a crash, or a collective broken by a lost peer) ends that rank with
status 2 and at most that one line.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Callable, NoReturn


def run_script(main: Callable[[], object]) -> None:
    """Run a script's ``main()`` under the contract (:func:`guarded`) and exit with its status."""
    from mage_fast.models.checks import InputError
    from mage_fast.models.state_dict import CheckpointError
    sys.exit(guarded(main, (InputError, CheckpointError)))


def guarded(call: Callable[[], object], bad_input: tuple[type[BaseException], ...]) -> int:
    """Call ``call()`` and return its status: the int it returns, else 0. The one home of the error
    contract, for the CLI (:func:`mage_fast.cli.main`) and every script (:func:`run_script`):

    - an exception of a ``bad_input`` type, or ``SystemExit("error: ...")``: one ``error: ...`` line
      (:func:`refuse`) and status 2; ``MAGE_FAST_DEBUG=1`` raises the exception instead;
    - any other exception: its traceback in one process; on a rank of several, at most one line for
      the job and status 2 on every rank (:func:`rank_fault_exit`).

    On a rank of several a failure leaves the rank (:func:`leave_rank`) instead of returning."""
    from mage_fast import parallel
    try:
        code = call()
    except bad_input as e:
        if os.environ.get("MAGE_FAST_DEBUG"):
            raise
        return refuse(input_error_line(e))
    except SystemExit as e:
        if isinstance(e.code, str):
            if e.code.startswith("error: "):
                return refuse(e.code[len("error: "):])
            if parallel.claim_report():
                print(e.code, file=sys.stderr)
            leave_rank(2)
        if parallel.active() and e.code not in (0, None):
            leave_rank(e.code if isinstance(e.code, int) else 2)
        raise
    except Exception as e:
        if not parallel.active() or os.environ.get("MAGE_FAST_DEBUG"):
            raise  # one process: a crash keeps its traceback
        rank_fault_exit(e)  # a crash on one rank, or a collective broken by a failed peer
    return code if isinstance(code, int) else 0


def input_error_line(e: BaseException) -> str:
    """The one line a bad-input exception ends with: the project's own errors (``InputError``,
    ``CheckpointError``) with their whitespace folded, an ``OSError`` as ``<file>: <reason>``, any
    other exception's first line; its type's name when it says nothing."""
    from mage_fast.models.checks import InputError
    from mage_fast.models.state_dict import CheckpointError
    if isinstance(e, (InputError, CheckpointError)):
        msg = " ".join(str(e).split())
    elif isinstance(e, OSError) and not isinstance(e, FileNotFoundError) and e.filename:
        msg = f"{e.filename}: {e.strerror or e}"
    else:
        msg = str(e).strip()
    return msg.splitlines()[0] if msg else type(e).__name__


def refuse(msg: str) -> int:
    """Bad input: ``error: <msg>`` once for the job, then status 2. A rank of several says it only
    when it is the first to fail, naming itself, and leaves (:func:`leave_rank`); before the process
    group exists every rank meets the same input, so rank 0 alone says it. Returns 2 in one process."""
    from mage_fast import parallel
    if parallel.active():
        error_line(msg)
        leave_rank(2)
    if os.environ.get("RANK", "0") == "0":
        print(f"error: {msg}", file=sys.stderr, flush=True)
    return 2


def leave_rank(code: int = 2) -> NoReturn:
    """End a rank of several that is failing, now: flush what it printed, then ``os._exit``. Python's
    own exit would run the process group's C++ destructors while gloo's threads still serve a
    connection that a failed peer broke, and ``std::terminate`` (SIGABRT) could replace status 2.
    Everything the rank must undo (partial outputs) is undone before it gets here. One process:
    ``sys.exit``."""
    from mage_fast import parallel
    if not parallel.active():
        sys.exit(code)
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # a closed or broken stream: nothing more can be said through it
            pass
    os._exit(code)


def rank_fault_exit(e: BaseException) -> NoReturn:
    """An unexpected exception on one rank of several (a crash, or a collective broken by a lost
    peer): at most one line for the job, then the rank leaves with status 2 (:func:`leave_rank`)."""
    from mage_fast import parallel
    parallel._leave()  # the launcher's SIGTERM must not cut the choice of who speaks in two
    if parallel.peer_failed() is None:  # the store's host has gone: on this machine, it says why
        # on another machine, which cannot: this node says it lost it; killed here, the first to notice
        line = parallel.lost_store_line() or parallel._lost_store_host_line()
        parallel.claim_report()
        if line:
            print(f"error: {parallel.error_prefix()}{line}", file=sys.stderr, flush=True)
        parallel.stop_stranded_launcher()
    else:
        error_line(_rank_fault(e))
    leave_rank(2)


def error_line(msg: str) -> None:
    """``error: <msg>`` once for the whole job: a rank of several names itself, and says nothing
    when another rank has reported a failure first (:func:`mage_fast.parallel.claim_report`)."""
    from mage_fast import parallel
    if parallel.claim_report():
        print(f"error: {parallel.error_prefix()}{msg}", file=sys.stderr, flush=True)


def _rank_fault(e: BaseException) -> str:
    """One line for an unexpected exception on one rank of several (the peers leave with it)."""
    import torch.distributed as dist

    from mage_fast import parallel
    first = (str(e).strip().splitlines() or [""])[0]
    if isinstance(e, dist.DistError) or "gloo" in first.lower() or "nccl" in first.lower():
        lost = parallel.lost_peer_line()  # a peer on this machine killed outright: named
        if lost:
            return lost
        first = re.sub(r"^\[[^\]\s]+:\d+\]\s*", "", first)  # gloo's "[.../pair.cc:553] " source location
        return (f"a collective operation failed: another rank stopped or cannot be reached ({first}); the "
                f"launcher's log says which")
    return f"{type(e).__name__}: {first} (MAGE_FAST_DEBUG=1 shows the traceback)"


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
    (``--help`` shows the usage), with exit status 2 (from rank 0 only under a launcher). Its ``--help`` shows every default
    (:class:`HelpFormatter`) unless another ``formatter_class`` is given."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if os.environ.get("RANK", "0") != "0":  # under a launcher every rank parses the same command: rank 0 says it
            self.exit(2)
        self.exit(2, f"{self.prog}: error: {message}\n")
