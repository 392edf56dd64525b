"""A fault on one rank of several, under torchrun and under the deepspeed launcher (issue 30, part 2):
one ``error:`` line for the whole job, from the rank that saw it and naming it; every rank exits with
status 2 and none hangs (each launch has a deadline); a refusal writes nothing.

- Checks: a resume from a checkpoint of one rank gives only rank 1 a missing file (its random
  state), found in the checks every rank runs before anything is written.
- Later faults: a corrupt image in one rank's share of the data, met in the first step while the
  other rank waits in a collective (rank 1 under torchrun; rank 0 under deepspeed, whose process
  holds the job's store).
- A rank killed outright (SIGKILL) mid-training under the deepspeed launcher, rank 1 or rank 0 (whose
  process holds the job's store): the rank beside it names it.
- Sharded generation (``torchrun -m mage_fast generate``): a corrupt image in rank 1's share of the
  ``--fid-ref`` reference set (files ``rank::world``), read before the run folder is made.

torchrun itself always ends with status 1 and its own ChildFailedError report when a worker fails; the
workers' statuses are read from that report.
"""
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from launch import REPO, deepspeed_launcher, env, find_script, needs_deepspeed
from mage_fast.data.datasets import scan_image_folder
from mage_fast.data.sampler import ResumableSampler

TORCHRUN = find_script("torchrun")
TINY = ["train/pretrain.py", "--model", "tiny", "--img_size", "32", "--vqgan_config",
        '{"ch_mult": [1, 2, 2], "n_embed": 64}', "--max_steps", "1", "--batch_size", "2", "--no_progress"]
DEADLINE_S = 150


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(launcher, argv, cwd):
    if launcher == "torchrun":
        assert TORCHRUN, "torchrun not found beside the interpreter (it comes with torch)"
        cmd = [sys.executable, TORCHRUN, "--nproc_per_node", "2", "--master_port", _port()]
    else:
        cmd = [*deepspeed_launcher(), "--num_gpus", "2", "--master_port", _port()]
    e = env()
    e.pop("MAGE_FAST_DEBUG", None)
    if argv[0] != "-m":  # a script of this checkout; "-m mage_fast ..." runs the CLI
        argv = [os.path.join(REPO, argv[0]), *argv[1:]]
    return subprocess.run(cmd + argv, cwd=cwd, env=e, capture_output=True, text=True, timeout=DEADLINE_S)


def _one_error_line(proc, launcher, words):
    both = proc.stdout + proc.stderr
    errors = [ln for ln in both.splitlines() if "error: " in ln]
    assert len(errors) == 1, both[-4000:]
    for w in words:
        assert w in errors[0], f"{w!r} not in {errors[0]!r}"
    frames = [ln for ln in both.splitlines() if ln.strip().startswith('File "')]
    ours = [ln for ln in frames if any(f'"{os.path.join(REPO, d)}' in ln for d in ("mage_fast", "train"))]
    assert not ours, both[-4000:]  # no traceback from a rank (torchrun's own report has one, of its frames)
    assert "DistBackendError" not in both and "RuntimeError" not in both, both[-4000:]
    if launcher == "torchrun":
        # torchrun's report: one entry per failed rank, each with the rank's exit status
        codes = [int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+) \(pid", both)]
        assert proc.returncode == 1 and sorted(codes) == [2, 2], both[-4000:]
    else:
        assert proc.returncode == 2, both[-4000:]
        assert "Traceback" not in both, both[-4000:]


def _listing(d):
    return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs + [""])


@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("deepspeed", marks=needs_deepspeed)])
def test_checkpoint_missing_one_ranks_file_stops_every_rank_before_writing(tmp_path, launcher):
    step = tmp_path / "run" / "checkpoints" / "step1"
    step.mkdir(parents=True)
    (step.parent / "latest").write_text("step1")
    for f in ("mp_rank_00_model_states.pt", "rng_state_rank0.pt"):  # a checkpoint of a one-rank run
        torch.save({"step": 1}, step / f)
    before = _listing(tmp_path)
    proc = _launch(launcher, [*TINY, "--synthetic", "--output_dir", "run", "--resume", "auto"], tmp_path)
    _one_error_line(proc, launcher, ["rank 1:", "--resume", "rng_state_rank1.pt", "fewer ranks"])
    assert _listing(tmp_path) == before, "the refused run wrote something"


@pytest.mark.parametrize("launcher,rank", [("torchrun", 1), pytest.param("deepspeed", 0, marks=needs_deepspeed)])
def test_corrupt_image_in_one_ranks_share_ends_every_rank(tmp_path, launcher, rank):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(tmp_path / "data" / c / f"{i}.png")
    samples, _ = scan_image_folder(str(tmp_path / "data"))
    bad = samples[ResumableSampler(len(samples), rank, 2, seed=0).indices()[0]][0]  # in this rank's first batch
    with open(bad, "wb") as f:
        f.write(b"not an image")
    proc = _launch(launcher, [*TINY, "--data_path", "data", "--data_backend", "torch", "--num_workers", "1",
                              "--output_dir", "run"], tmp_path)
    _one_error_line(proc, launcher, [f"rank {rank}:", os.path.relpath(bad, tmp_path), "not a readable image"])


def test_generate_corrupt_reference_image_in_rank_1s_share_writes_nothing(tmp_path):
    from mage_fast.eval.frechet import sample_files
    pytest.importorskip("efficientnet_lite_pytorch", reason="--fid-ref needs efficientnet-lite-pytorch (a [test] extra)")
    rng = np.random.default_rng(0)
    (tmp_path / "ref").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "ref" / f"{i:02d}.png")
    files, _ = sample_files(str(tmp_path / "ref"))
    bad = files[1::2][0]  # rank 1's first reference image (sharded_stats: files[rank::world])
    with open(bad, "wb") as f:
        f.write(b"\x89PNG not an image")
    before = _listing(tmp_path)
    proc = _launch("torchrun", ["-m", "mage_fast", "generate", "--num-images", "2", "--num-iter", "2", "--fid-ref",
                                "ref", "--ref-stats", "ref_stats.pt", "--out", "gen"], tmp_path)
    _one_error_line(proc, "torchrun", ["rank 1:", os.path.relpath(bad, tmp_path), "not a readable image"])
    assert _listing(tmp_path) == before, "the refused run wrote something"


@needs_deepspeed
@pytest.mark.parametrize("victim", [1, 0])
def test_rank_killed_outright_under_deepspeed_is_named(tmp_path, victim):
    """SIGKILL of one rank mid-training (rank 1; or rank 0, whose process holds the job's store): the
    survivor says which rank it lost in one ``error:`` line, every process exits non-zero (the
    survivor 2, the killed rank -9, the launcher with the first failure it saw), within DEADLINE_S."""
    import psutil
    import threading
    import time
    cmd = [*deepspeed_launcher(), "--num_gpus", "2", "--master_port", _port(), os.path.join(REPO, TINY[0]),
           *TINY[1:], "--max_steps", "100000", "--synthetic", "--num_workers", "0", "--log_every", "1"]
    e = env()
    e.pop("MAGE_FAST_DEBUG", None)
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, started = [], threading.Event()

    def read():
        for ln in proc.stdout:
            lines.append(ln)
            if "total batch" in ln:  # rank 0's header: both engines are built, the steps begin
                started.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(DEADLINE_S), "".join(lines)[-4000:]
        time.sleep(2)  # into the steps' collectives
        ranks = {}
        for p in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if "pretrain.py" in " ".join(p.cmdline()) and "RANK" in p.environ():
                    ranks.setdefault(int(p.environ()["RANK"]), p)
        assert sorted(ranks) == [0, 1], "".join(lines)[-4000:]
        survivor = ranks[1 - victim]
        os.kill(ranks[victim].pid, signal.SIGKILL)
        code = proc.wait(timeout=DEADLINE_S)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = "".join(lines)
    errors = [ln for ln in out.splitlines() if "error: " in ln]
    assert len(errors) == 1, out[-4000:]
    assert f"rank {1 - victim}: rank {victim} (pid {ranks[victim].pid})" in errors[0], errors[0]
    assert "killed outright" in errors[0] and "Traceback" not in out, out[-4000:]
    assert code != 0, out[-4000:]  # the launcher; the survivor left with status 2 after its line (os._exit(2))
    assert not survivor.is_running(), "the surviving rank outlived the launcher"


def test_claim_files_of_ended_jobs_are_swept(tmp_path, monkeypatch):
    """The node-local claim file outlives its job (no rank may remove it while the others read it);
    the next claim removes those whose launcher has ended and leaves a living launcher's alone."""
    import tempfile

    from mage_fast import parallel
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    ended = subprocess.Popen(["true"])
    ended.wait()
    stale = tmp_path / f"mage_fast-{ended.pid}-29500.said"
    alive = tmp_path / f"mage_fast-{os.getpid()}-29501.said"
    foreign = tmp_path / "mage_fast-notapid-1.said"
    for f in (stale, alive, foreign):
        f.write_bytes(b"")
    monkeypatch.setenv("MASTER_PORT", "29502")
    assert parallel.claim_locally() is True
    assert not stale.exists()
    assert alive.exists() and foreign.exists()
    assert (tmp_path / f"mage_fast-{os.getppid()}-29502.said").exists()
    assert parallel.claim_locally() is False  # claimed already: a second rank stays quiet


def test_groups_made_after_setup_get_the_runs_timeout(monkeypatch):
    """DeepSpeed makes its data-parallel groups with ``new_group`` and no timeout, which torch gives
    its module default (30 minutes for gloo): after setup every new group gets
    ``MAGE_FAST_DIST_TIMEOUT`` instead, so a collective across a cut network ends in that time."""
    import datetime

    import torch.distributed.distributed_c10d as c10d

    from mage_fast import parallel
    monkeypatch.setattr(c10d, "default_pg_timeout", c10d.default_pg_timeout)  # restored after the test
    monkeypatch.setenv(parallel.TIMEOUT_ENV, "12.5")
    assert parallel.groups_inherit_timeout() == datetime.timedelta(seconds=12.5)
    assert c10d._get_default_timeout(c10d.Backend("gloo")) == datetime.timedelta(seconds=12.5)


def test_a_store_that_does_not_answer_counts_as_lost_in_bounded_time(monkeypatch):
    """A rank on its way out asks the job's store who reports; a store cut off the network can hold
    c10d's client past its own timeout, so the question is bounded (``STORE_ANSWER_S``) and the store
    is not asked again."""
    import threading
    import time

    from mage_fast import parallel
    release = threading.Event()

    class Silent:
        def add(self, key, amount):
            release.wait(60)
            return 1

    monkeypatch.setattr(parallel, "_store", lambda: Silent())
    monkeypatch.setattr(parallel, "STORE_ANSWER_S", 0.5)
    monkeypatch.setattr(parallel, "_store_lost", False)
    monkeypatch.setattr(parallel, "active", lambda: True)
    monkeypatch.setattr(parallel, "_leaving", False)  # claim_report marks this process as leaving
    t0 = time.monotonic()
    try:
        assert parallel.peer_failed() is None  # unreachable: the caller says it lost the store
        assert parallel.claim_report() is True  # not asked again: this rank speaks
        assert time.monotonic() - t0 < 1.5
    finally:
        release.set()
