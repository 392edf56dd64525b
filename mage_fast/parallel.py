"""Processes of one run under ``torchrun`` or the ``deepspeed`` launcher (``torch.distributed``; no
launcher of our own).

The launcher sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (multi-node through its own rendezvous
options); without them the run is one process and nothing here communicates. Generation shards by
batch: round k gives rank r the batch ``k * world + r``, so every rank runs the same number of
rounds (one small all-reduce per round reports progress) and each image is drawn exactly as a
one-process run draws it.

Failing together: a fault on one rank ends every rank with status 2 and one ``error:`` line for the
whole job.

- Checks: every rank checks its own inputs, then :func:`fail_together` (or :func:`checks_together`)
  gathers the outcome, before anything is written. The first failing rank raises its error (one line
  naming it); the others leave silently with status 2.
- Later faults: the rank that fails claims the report in the job's store (:func:`claim_report`, as
  ``run_script`` does); a rank whose collective then breaks finds the claim (:func:`peer_failed`)
  and leaves with status 2 without a word, and so does a rank that the launcher stops with SIGTERM
  after a peer failed. A collective that breaks with no claim (a peer killed) is reported by the rank
  that saw it. Where the store's host itself has gone (rank 0's process under the deepspeed
  launcher), the others leave with status 2 without a word: rank 0 said why, or the launcher
  reports how it ended. Where it has gone with another machine (torchrun's rendezvous host node, or
  rank 0's node under a multi-node deepspeed launch), nobody there can say why: the first local rank
  of each remaining node says that it lost that machine (:func:`lost_store_line`), and, under
  torchrun, makes sure the node's agent ends, which could otherwise wait for that store for ever
  (:func:`stop_stranded_launcher`).
- Every process group has a timeout (``MAGE_FAST_DIST_TIMEOUT`` seconds, default
  :data:`DEFAULT_TIMEOUT_S`), the groups DeepSpeed makes too (:func:`groups_inherit_timeout`), so a
  peer that vanishes without closing its connections (a node cut off the network) cannot hang the
  others for longer.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
from typing import Any, Optional

TIMEOUT_ENV = "MAGE_FAST_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0
_FAILED_KEY = "mage_fast/failed_ranks"
_leaving = False  # this process is on its way out with status 2: a launcher's SIGTERM waits for it
_watch_pid: Optional[int] = None
_previous_sigterm: Any = signal.SIG_DFL
_PEER_KEY = "mage_fast/peer/{}"
_peers: dict = {}  # rank -> (host, launcher pid, pid), recorded when the group starts (record_peers)


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    def env_int(name, default):
        v = os.environ.get(name)
        try:
            return int(v) if v is not None else default
        except ValueError:
            from .models.checks import InputError
            raise InputError(f"{name}={v!r} in the environment is not an integer (set by torchrun)") from None
    world = env_int("WORLD_SIZE", 1)
    return env_int("RANK", 0), world, env_int("LOCAL_RANK", 0)


def timeout() -> datetime.timedelta:
    """The process group's timeout: ``MAGE_FAST_DIST_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT_S`."""
    v = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(v) if v is not None else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        from .models.checks import InputError
        raise InputError(f"{TIMEOUT_ENV}={v!r} in the environment: expected a number of seconds > 0")
    return datetime.timedelta(seconds=seconds)


def groups_inherit_timeout() -> datetime.timedelta:
    """Make every process group made from now on get :func:`timeout` too, and return it.

    ``torch.distributed.new_group`` without a timeout gives a new group torch's module default
    (30 minutes for gloo), not the default group's; DeepSpeed makes its data-parallel groups that
    way, and ZeRO reduces gradients in them. A peer that vanishes from the network closes no
    connection, so only the timeout ends such a collective: set it for every group."""
    import torch.distributed.distributed_c10d as c10d
    t = timeout()
    for name in ("default_pg_timeout", "default_pg_nccl_timeout"):
        if isinstance(getattr(c10d, name, None), datetime.timedelta):
            setattr(c10d, name, t)
    return t


def init(device_type: str) -> bool:
    """Join the process group the launcher describes (nccl on GPUs, gloo on the CPU), with
    :func:`timeout`, and :func:`watch_peers`; False for one process."""
    rank, world, _ = dist_info()
    if world <= 1:
        return False
    import torch.distributed as dist
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", timeout=groups_inherit_timeout())
    watch_peers()
    return True


def watch_peers() -> None:
    """Make a launcher's SIGTERM sent because a peer failed end this rank with status 2 (torchrun
    and the deepspeed launcher stop the other ranks when one exits non-zero). A SIGTERM with no
    failed peer keeps its usual effect."""
    global _watch_pid, _previous_sigterm
    if _watch_pid == os.getpid():
        return
    _previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    _watch_pid = os.getpid()
    record_peers()


def record_peers() -> None:
    """Every rank's (host, launcher's pid, pid), through the job's store, kept by each rank: when a
    peer on this machine is killed outright (SIGKILL, the out-of-memory killer) and says nothing,
    the ranks beside it can tell which one it was (:func:`lost_peer_line`), also once the store has
    gone with it. Ranks that share a launcher process (the same ``torchrun`` agent or ``deepspeed``
    launcher on one host) are on one node."""
    import socket

    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return
    try:
        store, world = _store(), dist.get_world_size()
        store.set(_PEER_KEY.format(dist.get_rank()), f"{socket.gethostname()} {os.getppid()} {os.getpid()}")
        for r in range(world):  # each rank set its own just now: a short wait at most
            host, ppid, pid = store.get(_PEER_KEY.format(r)).decode().rsplit(" ", 2)
            _peers[r] = (host, int(ppid), int(pid))
    except Exception:  # a peer gone already: the next collective fails and says so; no names then
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie waits for its launcher to reap it
    except (OSError, IndexError):
        return False


def lost_peers() -> list:
    """The ranks beside this one (the same node: host and launcher process) whose process has ended."""
    import socket
    me = (socket.gethostname(), os.getppid())
    return [r for r, (host, ppid, pid) in sorted(_peers.items())
            if (host, ppid) == me and pid != os.getpid() and not _alive(pid)]


def lost_peer_line() -> Optional[str]:
    """What a rank says when a peer on its machine has ended without a word (its process is gone and
    no rank claimed a report): None when no such peer."""
    import time
    lost = lost_peers()
    for _ in range(50 if _peers else 0):  # a broken connection can come a moment before the process is gone
        if lost:
            break
        time.sleep(0.1)
        lost = lost_peers()
    if not lost:
        return None
    who = ", ".join(f"rank {r} (pid {_peers[r][2]})" for r in lost)
    return (f"{who} ended without saying why: killed outright (SIGKILL, or the out-of-memory killer: see dmesg); "
            f"every rank stops (a training run continues from its last checkpoint with --resume auto)")


def _marker() -> str:
    import tempfile
    return os.path.join(tempfile.gettempdir(), f"mage_fast-{os.getppid()}-{os.environ.get('MASTER_PORT', '0')}.said")


def _sweep_markers() -> None:
    """Remove the claim files of jobs whose launcher has ended: the claim must outlive the rank that
    made it (the others read it as they leave), so no rank can remove its own job's file."""
    import glob
    import tempfile
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "mage_fast-*-*.said")):
        try:
            pid = int(os.path.basename(path).split("-")[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            with contextlib.suppress(OSError):
                os.unlink(path)
        except (ValueError, OSError):  # not ours to judge (another user's launcher, a foreign name)
            continue


def claim_locally(create: bool = True) -> bool:
    """The report's claim among the ranks of this node, in a file beside them (the job's store may
    have gone with the process that held it): True for the first rank to claim. ``create=False``
    marks it claimed without asking (a rank that claimed it in the store). Files of ended jobs are
    swept first."""
    _sweep_markers()
    try:
        os.close(os.open(_marker(), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False
    except OSError:
        return create


def _on_sigterm(signum, frame):
    if os.getpid() == _watch_pid:  # not in a forked child (a DataLoader worker), whose store socket is a copy
        if _leaving:
            return  # already leaving with status 2: finish saying why
        failed = peer_failed()
        line = None
        if failed is False:  # no rank said why: a peer on this machine killed outright?
            line = lost_peer_line()
            if line is not None and not claim_report():
                line = None
        elif failed is None:
            line = lost_store_line() or _lost_store_host_line()
        if failed is not False or line is not None:
            for f in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    f.flush()
            if line:  # os.write: a print here could re-enter one the main thread is in
                with contextlib.suppress(OSError):
                    os.write(2, f"error: {error_prefix()}{line}\n".encode())
            os._exit(2)
    signal.signal(signal.SIGTERM, _previous_sigterm if _previous_sigterm is not None else signal.SIG_DFL)
    if callable(_previous_sigterm):
        _previous_sigterm(signum, frame)
    else:
        os.kill(os.getpid(), signal.SIGTERM)


def _lost_store_host_line() -> Optional[str]:
    """The store has gone with a process of this machine: when that process (rank 0's, under the
    deepspeed launcher) was killed without a word, the first of the others to notice says so."""
    line = lost_peer_line()
    return line if line is not None and claim_locally() else None


def _leave() -> None:
    """This rank is on its way out with status 2: a launcher's SIGTERM no longer cuts that short (or
    its ``error:`` line). SIG_IGN rather than a Python handler, which Python resets at exit."""
    global _leaving
    _leaving = True
    if _watch_pid == os.getpid():
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _store():
    import torch.distributed as dist
    return dist.distributed_c10d._get_default_store()


STORE_ANSWER_S = 15.0  # the longest a leaving rank waits for the job's store (it answers in milliseconds)
_store_lost = False  # the store did not answer once: a leaving rank does not ask it again


def _ask_store(key: str, amount: int) -> int:
    """``store.add(key, amount)`` within :data:`STORE_ANSWER_S` (or the process group's timeout, if
    shorter). A store on a machine cut off the network can leave c10d's client waiting far past its
    own timeout; the call runs in a thread, and a store that does not answer in time counts as lost
    (raises ``TimeoutError``) for the rest of this process."""
    global _store_lost
    import threading
    if _store_lost:
        raise TimeoutError("the job's store did not answer before")
    box: dict = {}

    def call():
        try:
            box["value"] = _store().add(key, amount)
        except Exception as e:  # noqa: BLE001 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=call, daemon=True, name="mage_fast-store")
    t.start()
    t.join(min(STORE_ANSWER_S, timeout().total_seconds()))
    if "value" in box:
        return box["value"]
    _store_lost = True
    raise box.get("error") or TimeoutError("the job's store did not answer")


def peer_failed() -> Optional[bool]:
    """Whether a rank of this job has claimed the report of a failure (:func:`claim_report`); None
    when the job's store cannot be reached: its host has stopped (rank 0's process under the deepspeed
    launcher, which says why itself, or the launcher reports how it ended)."""
    if not active():
        return False
    try:
        with _quiet_stderr():
            return _ask_store(_FAILED_KEY, 0) > 0
    except Exception:
        return None


def store_is_remote() -> bool:
    """Whether the job's store (``MASTER_ADDR``: torchrun's rendezvous host, or rank 0's process under
    the deepspeed launcher) is on another machine: ``MASTER_ADDR`` names none of this machine's
    addresses (an address this machine cannot bind to). False when unset or not resolvable."""
    import socket
    host = os.environ.get("MASTER_ADDR")
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_DGRAM)
    except OSError:
        return False
    for family, kind, _, _, addr in infos:
        try:
            with socket.socket(family, kind) as s:
                s.bind((addr[0], 0))
            return False  # an address of this machine
        except OSError:
            continue
    return bool(infos)


def lost_store_line() -> Optional[str]:
    """What a rank says when the job's store cannot be reached (:func:`peer_failed` is None) and it
    lived on another machine, which stopped or cannot be reached and so cannot say why: the first
    local rank of this node (``LOCAL_RANK`` 0) says it; None for the other local ranks, and where
    the store lived on this machine (its process said why, or the launcher reports how it ended)."""
    if dist_info()[2] != 0 or not store_is_remote():
        return None
    where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT', '?')}"
    return (f"lost the job's store at {where}, on another machine: that node stopped or cannot be reached "
            f"(its own log says why if it failed); resume the run with --resume when every node is back")


STRANDED_GRACE_S = 10.0  # how long a stranded launcher gets to end on its own, then after SIGTERM
# the watcher runs as ``python -c``: importing mage_fast there would import torch, so its gone() is
# :func:`_alive`'s test written again
_STOP_LAUNCHER = """
import os, signal, sys, time
pid, grace = int(sys.argv[1]), float(sys.argv[2])
def gone():
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
for sig in (signal.SIGTERM, signal.SIGKILL):
    end = time.monotonic() + grace
    while time.monotonic() < end:
        if gone():
            sys.exit(0)
        time.sleep(0.2)
    try:
        os.kill(pid, sig)
    except OSError:
        sys.exit(0)
"""


def stop_stranded_launcher() -> None:
    """Called by a rank leaving because the job's store on another machine cannot be reached. Under
    torchrun, this node's agent asks the same store for the rendezvous state, and where that machine
    was cut off the network (no connection closed), torch's client waits for it past every timeout
    and no signal handler runs: the agent would never notice that its ranks have left, and the node
    would never end. A detached watcher gives the agent :data:`STRANDED_GRACE_S` to end on its own,
    then sends SIGTERM, and SIGKILL after as long again. Nothing is started under another launcher,
    or where the store is on this machine."""
    if os.environ.get("TORCHELASTIC_RUN_ID") is None or not store_is_remote():
        return
    import subprocess
    with contextlib.suppress(OSError):
        subprocess.Popen([sys.executable, "-c", _STOP_LAUNCHER, str(os.getppid()), str(STRANDED_GRACE_S)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)


@contextlib.contextmanager
def _quiet_stderr():
    """File descriptor 2 to /dev/null for a moment: a store whose host has gone makes c10d print a
    C++ stack trace before it raises."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def claim_report() -> bool:
    """Called by a rank that is about to leave with an error: True when it is the job's first, and
    should print the one ``error:`` line; False when another rank has said why already. One process:
    always True."""
    _leave()
    if not active():
        return True
    try:
        with _quiet_stderr():
            first = _ask_store(_FAILED_KEY, 1) == 1
    except Exception:
        return True
    if first:
        claim_locally(create=False)  # the ranks beside it know it said why, even once the store has gone
    return first


def error_prefix() -> str:
    """``"rank R: "`` in a run of several ranks, else ``""``: the start of an ``error:`` line."""
    return f"rank {dist_info()[0]}: " if active() else ""


def fail_together(error: Optional[BaseException]) -> None:
    """The end of a phase of checks that every rank runs (before anything is written): when any
    rank's ``error`` is not None, every rank leaves. The lowest failing rank raises its own error
    (its caller prints the one line); every other rank raises ``SystemExit(2)`` and says nothing.
    One process: raises ``error`` when given."""
    if not active():
        if error is not None:
            raise error
        return
    import torch.distributed as dist
    said = None if error is None else (" ".join(str(error).split()) or type(error).__name__)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, said)
    failed = [r for r, e in enumerate(errors) if e is not None]
    if not failed:
        return
    _leave()
    if dist.get_rank() == failed[0]:
        raise error
    raise SystemExit(2)


@contextlib.contextmanager
def checks_together():
    """``with checks_together(): <checks>`` runs the checks on every rank and then
    :func:`fail_together` (a check that ends with ``SystemExit("error: ...")`` counts as failed)."""
    try:
        yield
    except (Exception, SystemExit) as e:
        if isinstance(e, SystemExit) and not isinstance(e.code, str):
            raise
        fail_together(e)
        raise
    fail_together(None)


def active() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank (pickled; for small objects)."""
    if not active():
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_sum(value: int) -> int:
    if not active():
        return value
    import torch
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t)
    return int(t.item())


def barrier() -> None:
    if active():
        import torch.distributed as dist
        dist.barrier()


def shutdown() -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard_rounds(num_batches: int, rank: int, world: int) -> list[list[int]]:
    """The batches of each round for ``rank``: round k holds batch ``k * world + rank`` when it
    exists (an empty round keeps the ranks in step).

    >>> shard_rounds(5, 1, 2)
    [[1], [3], []]
    """
    rounds = -(-num_batches // world)
    return [[b] if (b := k * world + rank) < num_batches else [] for k in range(rounds)]
