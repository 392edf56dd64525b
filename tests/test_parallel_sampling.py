"""Sampling at scale under the real torchrun launcher (gloo on the CPU), on the shipped model:
the files do not depend on the number of ranks or the batch size, byte for byte; a run killed with
SIGKILL and restarted with --resume completes the identical set; a folder of another run is
refused; the Frechet statistics accumulated across ranks equal those of `fid` on the folder."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from launch import find_script

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = find_script("torchrun")
GEN = ["generate", "--num-iter", "3", "--seed", "7", "--class-id", "all"]


def _env():
    e = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MAGE_FAST_DEBUG"):
        e.pop(k, None)
    return e


def _cmd(nproc, args, port):
    if nproc == 1:
        return [sys.executable, "-m", "mage_fast", *args]
    assert TORCHRUN, "torchrun not found beside the interpreter (it comes with torch)"
    return [sys.executable, TORCHRUN, "--nproc_per_node", str(nproc), "--master_port", str(port),
            "-m", "mage_fast", *args]


def _run(nproc, args, cwd, port=29731):
    r = subprocess.run(_cmd(nproc, args, port), cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    return r


def _descendants(pid):
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(pid):
    for p in [pid] + _descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _pngs(d):
    return {f: open(os.path.join(d, f), "rb").read() for f in sorted(os.listdir(d)) if f[0].isdigit()}


def test_two_ranks_and_any_batch_size_write_identical_files(tmp_path):
    one = _run(1, GEN + ["--num-images", "14", "--batch-size", "4", "--out", "one"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(2, GEN + ["--num-images", "14", "--batch-size", "4", "--out", "two"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    other_bs = _run(1, GEN + ["--num-images", "14", "--batch-size", "5", "--out", "bs5"], tmp_path)
    assert other_bs.returncode == 0, other_bs.stderr[-3000:]
    ref = _pngs(tmp_path / "one")
    assert len(ref) == 14
    assert _pngs(tmp_path / "two") == ref and _pngs(tmp_path / "bs5") == ref
    m = json.loads((tmp_path / "two" / "run.json").read_text())
    assert m["status"] == "complete" and m["processes"] == 2 and m["images_written_this_run"] == 14
    assert "x 2 processes" in two.stdout and two.stdout.count("wrote 14 PNGs") == 1  # rank 0 reports
    # a folder of another run is refused by every rank, one line on stderr, nothing changed
    again = _run(2, GEN[:-2] + ["--num-images", "14", "--out", "two"], tmp_path, port=29732)
    # (torchrun itself reports a failed child with its own traceback; no rank of ours crashed)
    assert again.returncode != 0 and "mage_fast/" not in again.stderr.split("error: ")[-1].split("Traceback")[0]
    assert "File \"" + os.path.join(REPO, "mage_fast") not in again.stderr
    assert again.stderr.count("error: ") == 1 and "holds another run" in again.stderr
    assert _pngs(tmp_path / "two") == ref


def test_sigkill_then_resume_completes_the_identical_set(tmp_path):
    args = GEN + ["--num-images", "120", "--batch-size", "1", "--grid", "0"]
    ref = _run(1, args + ["--out", "ref"], tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    p = subprocess.Popen(_cmd(2, args + ["--out", "run"], 29733), cwd=tmp_path, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    out = tmp_path / "run"
    t0 = time.time()
    while time.time() - t0 < 300:
        if out.is_dir() and sum(f[0].isdigit() for f in os.listdir(out)) >= 6:
            break
        if p.poll() is not None:
            pytest.fail("the run finished before it could be killed")
        time.sleep(0.02)
    _kill_tree(p.pid)  # the launcher and every rank, at once
    p.wait()
    time.sleep(0.5)
    partial = _pngs(out)
    assert 6 <= len(partial) < 120, len(partial)
    assert json.loads((out / "run.json").read_text())["status"] == "running"
    same = _run(2, args + ["--out", "run"], tmp_path, port=29734)  # without --resume: refused
    assert same.returncode != 0 and same.stderr.count("error: ") == 1 and "--resume" in same.stderr
    done = _run(2, args + ["--out", "run", "--resume"], tmp_path, port=29735)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming: {len(partial)} of 120" in done.stdout
    assert _pngs(out) == _pngs(tmp_path / "ref")
    assert not [f for f in os.listdir(out) if f.startswith(".tmp-")]
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_frechet_in_the_same_pass_equals_fid_on_the_folder(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch", reason="offline Frechet needs efficientnet-lite-pytorch "
                                                            "(a [test] extra)")
    r = _run(1, GEN + ["--num-images", "12", "--batch-size", "4", "--seed", "1", "--out", "ref"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    fid_args = ["--num-images", "12", "--batch-size", "3", "--fid-ref", "ref", "--ref-stats", "ref_stats.pt"]
    one = _run(1, GEN + fid_args + ["--out", "g1", "--fid-json", "g1.json"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(2, GEN + fid_args + ["--out", "g2", "--fid-json", "g2.json"], tmp_path, port=29736)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "WARNING: only 12 images" in one.stderr
    folder = _run(1, ["fid", "g1", "ref", "--min-samples", "2", "--json", "f.json"], tmp_path)
    assert folder.returncode == 0, folder.stderr[-3000:]
    a, b, c = (json.loads((tmp_path / f).read_text()) for f in ("g1.json", "g2.json", "f.json"))
    key = "frechet_efficientnet_lite0"
    assert a[key] > 1.0
    assert b[key] == pytest.approx(a[key], rel=1e-6) and c[key] == pytest.approx(a[key], rel=1e-6)
    assert a["num_generated"] == b["num_generated"] == 12 and a["features"] == "efficientnet_lite0"
    assert json.loads((tmp_path / "g2" / "run.json").read_text())["fid"][key] == b[key]
