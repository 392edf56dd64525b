"""More than one machine, on this one (issue 30, part 3): two hosts made of network namespaces joined
by a veth pair, one torchrun node on each (gloo, c10d rendezvous, one rank per node), running the
project's own entry points.

- ZeRO-2 pre-training (train/pretrain.py) across the two nodes ends with exactly the parameters of one
  node with two ranks. Tolerance zero: with two ranks every gradient sum has two terms, and a + b ==
  b + a in floating point, so no reduction order can differ; the data shards, seeds and gloo's
  algorithms are those of the same two ranks whatever the transport.
- Sharded generation (``-m mage_fast generate``) writes files byte-identical to one process.
- Losing a node (SIGKILL to every process in its namespace: the launcher and its worker, which
  torchrun starts in a session of its own) once a checkpoint exists ends the other node within
  :data:`DEADLINE_S` with one ``error:`` line and a non-zero status; both directions are tried, the
  node that hosts the rendezvous store and the other one. The same command (``--resume auto``) then
  completes with the parameters of an uninterrupted run.
- A network cut (a blackhole route on each host: nothing is closed or refused) mid-training ends both
  nodes with one ``error:`` line each, within the process group's timeout and the stated margins.

Every launch runs inside the namespaces (the one-node references too), so teardown can
end every process it started and remove both namespaces, whatever happened. Without the right to
make namespaces (not root) the tests skip saying so; under CI that skip fails (conftest.py).
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest
import torch

from launch import REPO, env
from mage_fast.models.checkpoint import read_state_dict

DEADLINE_S = 60  # a lost node's peer exits within this after the kill (it reads the closed connections)
RUN_S = 240  # any one launch
SUBNET = "10.231.0"  # private addresses that live only inside the test's own namespaces
TRAIN = ["train/pretrain.py", "--model", "tiny", "--img_size", "32", "--vqgan_config",
         '{"ch_mult": [1, 2, 2], "n_embed": 64}', "--synthetic", "--synthetic_length", "64", "--batch_size", "2",
         "--num_workers", "0", "--max_steps", "12", "--save_every", "2", "--keep_last", "0", "--lr", "1e-2",
         "--warmup_steps", "1", "--seed", "3", "--deepspeed_config", "zero2", "--no_progress", "--resume", "auto"]
GENERATE = ["-m", "mage_fast", "generate", "--num-images", "6", "--batch-size", "1", "--num-iter", "2", "--seed",
            "7", "--class-id", "all", "--grid", "0"]
NS_NAME = re.compile(r"^mft(\d+)([ab])$")  # mft<pid of the pytest process><host>


def _ip_tool():
    return shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.isfile(p)), None)


def _ip(*args, check=True):
    return subprocess.run([_ip_tool(), *args], capture_output=True, text=True, timeout=30, check=check)


def _pids(ns):
    out = _ip("netns", "pids", ns, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def _kill_all(ns):
    """SIGKILL every process in namespace ``ns`` until none is left (a machine that stops)."""
    for _ in range(50):
        pids = _pids(ns)
        if not pids:
            return
        for p in pids:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    raise AssertionError(f"processes in namespace {ns} survive SIGKILL: {_pids(ns)}")


def _remove(ns):
    _kill_all(ns)
    _ip("netns", "del", ns, check=False)


def _remove_stale():
    """Namespaces left by a test process that was killed before its teardown ran."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        m = NS_NAME.match(line.split()[0]) if line.split() else None
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _remove(m.group(0))


@dataclass
class Host:
    ns: str
    dev: str
    addr: str

    def prefix(self):
        return [_ip_tool(), "netns", "exec", self.ns]


@dataclass
class Hosts:
    a: Host  # runs the rendezvous store (is_host=1)
    b: Host
    port: int = 29400

    def next_port(self):
        self.port += 1  # each namespace has its own ports: no clash with anything else on the machine
        return self.port


@pytest.fixture(scope="module")
def hosts():
    if _ip_tool() is None:
        pytest.skip("the ip tool (iproute2) is not installed: two hosts are made with `ip netns` and a veth pair")
    if os.geteuid() != 0:
        pytest.skip("making network namespaces (`ip netns add`) needs root: these multi-node tests run as root, "
                    "as CI does")
    _remove_stale()
    tag = f"mft{os.getpid()}"
    a, b = Host(tag + "a", f"v{tag}a"[:15], f"{SUBNET}.1"), Host(tag + "b", f"v{tag}b"[:15], f"{SUBNET}.2")
    made = []
    try:
        for h in (a, b):
            r = _ip("netns", "add", h.ns, check=False)
            if r.returncode:
                pytest.skip(f"`ip netns add` is not permitted here ({r.stderr.strip()}): two hosts cannot be made")
            made.append(h.ns)
        _ip("link", "add", a.dev, "netns", a.ns, "type", "veth", "peer", "name", b.dev, "netns", b.ns)
        for h in (a, b):
            _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", h.dev)
            _ip("-n", h.ns, "link", "set", h.dev, "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
        yield Hosts(a, b)
    finally:
        for ns in made:  # the veth pair goes with its namespaces
            _remove(ns)
        left = _ip("netns", "list", check=False).stdout
        assert not any(ns in left.split() for ns in made), left


def _env(host: Host):
    e = env()
    e.pop("MAGE_FAST_DEBUG", None)
    e["GLOO_SOCKET_IFNAME"] = host.dev  # gloo on the veth: the shared hostname resolves to neither host
    return e


def _torchrun(host: Host, nodes: Hosts, argv, port, job):
    """One node of a two-node job: torchrun with c10d rendezvous at host a, this host's own address."""
    if argv[0] != "-m":
        argv = [os.path.join(REPO, argv[0]), *argv[1:]]
    is_host = int(host is nodes.a)
    return [*host.prefix(), sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{nodes.a.addr}:{port}", "--rdzv_id", job,
            "--rdzv_conf", f"is_host={is_host},join_timeout=120", "--local_addr", host.addr, *argv]


class Job:
    """Both nodes of one launch, each writing its output to a log file."""

    def __init__(self, nodes: Hosts, argv, cwd, name, extra_env=None):
        port = nodes.next_port()
        self.logs, self.procs = {}, {}
        for key, host in (("a", nodes.a), ("b", nodes.b)):
            self.logs[key] = cwd / f"{name}.{key}.log"
            with open(self.logs[key], "w") as f:
                self.procs[key] = subprocess.Popen(_torchrun(host, nodes, argv, port, name), cwd=cwd,
                                                   env={**_env(host), **(extra_env or {})}, stdout=f,
                                                   stderr=subprocess.STDOUT)

    def log(self, key):
        return self.logs[key].read_text(errors="replace")

    def wait(self, key, timeout=RUN_S):
        try:
            return self.procs[key].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"node {key} did not finish in {timeout} s:\n{self.log(key)[-4000:]}") from None

    def finish(self):
        for k in ("a", "b"):
            rc = self.wait(k)
            assert rc == 0, f"node {k} exit {rc}:\n{self.log(k)[-4000:]}"


def _one_node(host: Host, nodes: Hosts, argv, cwd, nproc):
    """The reference on one host: ``nproc`` ranks under torchrun, or one plain process."""
    if argv[0] != "-m":
        argv = [os.path.join(REPO, argv[0]), *argv[1:]]
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                     "--master_port", str(nodes.next_port())]
    e = _env(host)
    e["GLOO_SOCKET_IFNAME"] = "lo"
    p = subprocess.run([*host.prefix(), *launcher, *argv], cwd=cwd, env=e, capture_output=True, text=True,
                       timeout=RUN_S)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


def _same_params(x, y):
    sx, sy = read_state_dict(str(x)), read_state_dict(str(y))
    assert sx.keys() == sy.keys()
    differ = [k for k in sx if not torch.equal(sx[k], sy[k])]
    assert not differ, f"{len(differ)} tensors differ, first {differ[0]}"


@pytest.fixture(scope="module")
def reference(hosts, tmp_path_factory):
    """ZeRO-2 pre-training on one node with two ranks: the run every multi-node run must equal."""
    d = tmp_path_factory.mktemp("one_node")
    _one_node(hosts.a, hosts, [*TRAIN, "--output_dir", "run", "--export", "run/mage.pt"], d, nproc=2)
    return d / "run"


def _train(out):
    return [*TRAIN, "--output_dir", out, "--export", f"{out}/mage.pt"]


def test_zero2_two_nodes_equal_one_node_with_two_ranks(hosts, reference, tmp_path):
    job = Job(hosts, _train("run"), tmp_path, "zero2")
    job.finish()
    both = job.log("a") + job.log("b")
    assert "world 2, ZeRO 2" in both and both.count("exported ") == 1  # rank 0 exports, on one of the nodes
    _same_params(tmp_path / "run" / "mage.pt", reference / "mage.pt")
    # the comparison means something: twelve steps moved the weights away from those of step 2
    early = torch.load(reference / "checkpoints" / "step2" / "mp_rank_00_model_states.pt", map_location="cpu",
                       weights_only=False)["module"]
    final = read_state_dict(str(reference / "mage.pt"))
    assert any(not torch.equal(final[k[len("model."):]], v) for k, v in early.items() if k.startswith("model.blocks."))


def test_sharded_generation_two_nodes_writes_the_files_of_one_process(hosts, tmp_path):
    _one_node(hosts.a, hosts, [*GENERATE, "--out", "one"], tmp_path, nproc=1)
    job = Job(hosts, [*GENERATE, "--out", "two"], tmp_path, "gen")
    job.finish()
    one, two = (sorted(os.listdir(tmp_path / d)) for d in ("one", "two"))
    pngs = [f for f in one if f.endswith(".png")]
    assert len(pngs) == 6 and one == two
    for f in pngs:
        assert (tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes(), f
    m = json.loads((tmp_path / "two" / "run.json").read_text())
    assert m["status"] == "complete" and m["processes"] == 2


def _latest(out):
    try:
        tag = (out / "checkpoints" / "latest").read_text().strip()
    except OSError:
        return None
    return int(tag[4:]) if tag.startswith("step") and tag[4:].isdigit() else None


def _wait_for_checkpoint(job, out, after_step, before):
    """Until a checkpoint past ``after_step`` exists, with both nodes running; ``before`` names what
    comes next, for the message when a node ended first."""
    t0 = time.time()
    while (_latest(out) or 0) <= after_step:
        for k, p in job.procs.items():
            if p.poll() is not None:
                raise AssertionError(f"node {k} ended (exit {p.returncode}) before the {before}:\n"
                                     f"{job.log(k)[-4000:]}")
        assert time.time() - t0 < RUN_S, "no checkpoint appeared"
        time.sleep(0.02)


def _lose_node_after_checkpoint(job, nodes, victim, out, after_step):
    """Wait for a checkpoint past ``after_step``, SIGKILL every process of host ``victim``; the other
    node must exit within DEADLINE_S. Returns (survivor's exit status, its log, the step saved)."""
    _wait_for_checkpoint(job, out, after_step, "kill")
    _kill_all(getattr(nodes, victim).ns)
    killed_at = time.time()
    job.wait(victim, timeout=10)
    other = "b" if victim == "a" else "a"
    rc = job.wait(other, timeout=DEADLINE_S)
    took = time.time() - killed_at
    assert took < DEADLINE_S
    step = _latest(out)
    assert step < 12 and not (out / "mage.pt").exists(), "the run finished before the node was lost"
    return rc, job.log(other), step


def _one_clear_error_line(log, *phrases):
    lines = [ln for ln in log.splitlines() if "error: " in ln]
    assert len(lines) == 1, log[-4000:]
    assert lines[0].startswith("error: rank "), lines[0]
    assert any(p in lines[0] for p in phrases), lines[0]
    ours = [ln for ln in log.splitlines() if ln.strip().startswith('File "')
            and any(f'"{os.path.join(REPO, d)}' in ln for d in ("mage_fast", "train"))]
    assert not ours, log[-4000:]  # no traceback from a rank (torchrun's own frames may follow)


def test_losing_either_node_ends_the_other_then_resume_completes_exactly(hosts, reference, tmp_path):
    out = tmp_path / "run"
    # the node that does not hold the rendezvous store is lost: the other one's rank says a collective failed
    first = Job(hosts, _train("run"), tmp_path, "kill_b")
    rc, log, saved = _lose_node_after_checkpoint(first, hosts, "b", out, after_step=0)
    assert rc != 0, log[-4000:]
    _one_clear_error_line(log, "a collective operation failed: another rank stopped or cannot be reached")
    assert re.search(r"exitcode\s*:\s*2 \(pid", log), log[-4000:]  # torchrun's report: our rank exited 2
    # the same command again resumes; now the node that holds the store is lost: the other says so
    second = Job(hosts, _train("run"), tmp_path, "kill_a")
    rc, log, saved_again = _lose_node_after_checkpoint(second, hosts, "a", out, after_step=saved)
    assert f"resumed from run/checkpoints/step{saved}:" in second.log("a") + second.log("b")
    assert rc != 0, log[-4000:]
    _one_clear_error_line(log, f"lost the job's store at {hosts.a.addr}:",
                          "a collective operation failed")  # when the store outlived its own rank by a moment
    # and once more: it completes with the parameters of an uninterrupted run
    third = Job(hosts, _train("run"), tmp_path, "resume")
    third.finish()
    assert f"step {saved_again}, epoch 0" in third.log("a") + third.log("b")
    _same_params(out / "mage.pt", reference / "mage.pt")


CUT_TIMEOUT_S = 10  # MAGE_FAST_DIST_TIMEOUT of the network-cut test


def _cut_network_mid_training(nodes, tmp_path, name):
    """Train across both nodes; once a checkpoint exists, cut the network between them: each host
    drops what it sends to the other (a blackhole route), as when a switch or cable fails, so no
    connection is closed or refused. Returns {node: (exit status, seconds from the cut, log)}; the
    routes go whatever happens."""
    from mage_fast import parallel
    out = tmp_path / name
    job = Job(nodes, _train(name), tmp_path, name, extra_env={parallel.TIMEOUT_ENV: str(CUT_TIMEOUT_S)})
    _wait_for_checkpoint(job, out, 0, "cut")

    def blackhole(op):  # each host drops what it sends to the other: no link goes down, nothing is refused
        for h, other in ((nodes.a, nodes.b), (nodes.b, nodes.a)):
            _ip("-n", h.ns, "route", op, "blackhole", f"{other.addr}/32")
    blackhole("add")
    cut_at, ended = time.time(), {}
    deadline = CUT_TIMEOUT_S + parallel.STORE_ANSWER_S + 2 * parallel.STRANDED_GRACE_S + 15
    try:
        for k in ("a", "b"):
            rc = job.wait(k, timeout=max(1.0, deadline - (time.time() - cut_at)))
            ended[k] = (rc, time.time() - cut_at, job.log(k))
    finally:
        blackhole("del")
        for k in ("a", "b"):
            if job.procs[k].poll() is None:
                _kill_all(getattr(nodes, k).ns)
    assert _latest(out) < 12 and not (out / "mage.pt").exists(), "the run finished before the cut"
    return ended


def test_a_network_cut_ends_both_nodes_within_the_timeout(hosts, tmp_path):
    """The network between the nodes is cut mid-training: both nodes end, non-zero, within the
    process group's timeout (``MAGE_FAST_DIST_TIMEOUT``), the wait for the store
    (``STORE_ANSWER_S``), the stranded agent's two grace periods (``STRANDED_GRACE_S``) and a
    margin, each with one ``error:`` line. The node holding the rendezvous store (a) says a
    collective failed; the other says it lost the store on the other machine, and its torchrun agent,
    which waits for that store past every timeout, is stopped."""
    ended = _cut_network_mid_training(hosts, tmp_path, "cut")
    for k, (rc, took, log) in ended.items():
        assert rc != 0, log[-4000:]
        if k == "a":
            _one_clear_error_line(log, "a collective operation failed: another rank stopped or cannot be reached")
        else:
            _one_clear_error_line(log, f"lost the job's store at {hosts.a.addr}:")


# ---------------------------------------------------------------- the lost-store line, without namespaces

def test_store_on_another_machine_is_told_from_this_machines_addresses(monkeypatch):
    from mage_fast import parallel
    for addr, remote in (("127.0.0.1", False), ("localhost", False), ("192.0.2.1", True),  # TEST-NET-1
                         ("name.invalid", False)):  # not resolvable: cannot tell, say nothing (as before)
        monkeypatch.setenv("MASTER_ADDR", addr)
        assert parallel.store_is_remote() is remote, addr
    monkeypatch.setenv("MASTER_ADDR", "192.0.2.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert "lost the job's store at 192.0.2.1:29500, on another machine" in parallel.lost_store_line()
    monkeypatch.setenv("LOCAL_RANK", "1")  # one line per node: its first local rank says it
    assert parallel.lost_store_line() is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # the store's process on this machine says why itself
    assert parallel.lost_store_line() is None


SIGTERM_AFTER_LOST_STORE = """
import os, signal, time
from mage_fast import parallel
parallel.peer_failed = lambda: None  # the job's store cannot be reached
parallel.active = lambda: True  # a rank of a two-rank job
parallel.watch_peers()
os.kill(os.getpid(), signal.SIGTERM)  # as torchrun's agent does once it has lost the store too
time.sleep(30)
"""


@pytest.mark.parametrize("store,said", [("192.0.2.1", True), ("127.0.0.1", False)])
def test_sigterm_after_the_store_is_lost_says_so_once_when_it_was_remote(store, said):
    """The launcher's SIGTERM can reach a rank before its own collective fails: the rank leaves with
    status 2, saying it lost the store's machine only when that machine is another one."""
    e = dict(env(), MASTER_ADDR=store, MASTER_PORT="29500", RANK="1", LOCAL_RANK="0", WORLD_SIZE="2")
    p = subprocess.run([sys.executable, "-c", SIGTERM_AFTER_LOST_STORE], env=e, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 2, p.stderr[-2000:]
    if said:
        lines = p.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: rank 1: lost the job's store at {store}:29500, on "
                                                       f"another machine: that node stopped"), p.stderr
    else:
        assert p.stderr == "", p.stderr
