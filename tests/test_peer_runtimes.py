"""The peer runtimes' checks (tests/peer_runtime_checks.py), run in a pytest process of their own.

ONNX Runtime and OpenVINO bring their own thread pools, allocators and signal handling into the
process that loads them; a test process that goes on to run the rest of the suite must not carry
them. So the checks run in a child pytest, and this test asserts that every one of them ran and
passed (none skipped: the runtimes come with the ``test`` extra)."""
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = os.path.join(REPO, "tests", "peer_runtime_checks.py")


def test_peer_runtime_checks_pass_in_their_own_process():
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", CHECKS],
                          cwd=REPO, capture_output=True, text=True, timeout=1500)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 10, tail
    assert not re.search(r"\d+ (failed|skipped|error)", summary), tail
