"""Under CI (CI=true) a test that skips for any reason but a missing GPU fails: a [test] dependency
that is not installed is a broken setup, not a test that does not apply. Checked by running pytest
on a small test file with this project's conftest, with and without CI=true."""
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CASES = '''
import pytest
pytestmark = []

def test_dependency_missing():
    pytest.importorskip("surely_not_an_installed_module_xyz")

def test_needs_gpu():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.skipif(True, reason="deepspeed is not installed")
def test_marker_skip():
    pass

def test_runs():
    assert True
'''


def _run(tmp_path, ci: bool):
    d = tmp_path / ("ci" if ci else "local")
    d.mkdir()
    shutil.copy(os.path.join(REPO, "tests", "conftest.py"), d / "conftest.py")
    (d / "test_policy_cases.py").write_text(CASES)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfs", str(d)],
                          cwd=d, env=env, capture_output=True, text=True, timeout=300)


def test_only_gpu_skips_are_allowed_under_ci(tmp_path):
    local = _run(tmp_path, ci=False)
    assert local.returncode == 0 and "1 passed, 3 skipped" in local.stdout, local.stdout
    ci = _run(tmp_path, ci=True)
    assert ci.returncode == 1, ci.stdout
    # a skip inside the test fails it; a skip marker (applied at set-up) errors it: both fail the run
    assert "1 failed, 1 passed, 1 skipped, 1 error" in ci.stdout, ci.stdout
    assert "FAILED" in ci.stdout and "test_dependency_missing" in ci.stdout
    assert "ERROR" in ci.stdout and "test_marker_skip" in ci.stdout
    assert "SKIPPED" in ci.stdout and "needs a CUDA GPU" in ci.stdout
