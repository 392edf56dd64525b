"""Running the training scripts under test: a clean environment (no inherited rank variables, one
thread, this checkout first on PYTHONPATH) and a readable failure."""
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The interpreter's own scripts folder (a venv's bin/): `make test` runs .venv/bin/python without
# .venv/bin on PATH, so console scripts are looked up beside sys.executable first.
SCRIPTS = os.path.dirname(sys.executable)


def find_script(name: str):
    """A console script of this interpreter's environment (beside sys.executable), else on PATH."""
    return shutil.which(name, path=SCRIPTS) or shutil.which(name)


DEEPSPEED = find_script("deepspeed")
needs_deepspeed = pytest.mark.skipif(DEEPSPEED is None, reason="deepspeed is not installed (a [test] extra)")


def deepspeed_launcher() -> list[str]:
    """The real DeepSpeed launcher (its console script, run by this interpreter)."""
    return [sys.executable, DEEPSPEED]


def env():
    e = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1",
             PATH=SCRIPTS + os.pathsep + os.environ.get("PATH", ""))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def run(args, timeout=240, launcher=None):
    cmd = (launcher or [sys.executable]) + args
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=timeout)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
