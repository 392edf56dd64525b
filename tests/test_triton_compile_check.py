"""Gates that need no GPU: the Triton kernels compile for sm_90 at the real shapes, fit, do not spill,
and the decode step's arithmetic is not contracted into fused multiply-adds.

Compiling runs in a subprocess without ``TRITON_INTERPRET`` (under the interpreter ``triton.jit`` gives
interpreted functions, which do not compile). The test compiles a representative subset, one config per
kernel group (``python -m mage_fast.triton.compile_check --subset``, about a minute); the full run,
every autotune config, writes benchmarks/results/gpu_resources_sm90.json.
"""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("triton", reason="triton not installed")
try:
    from triton.backends.nvidia import compiler as _nvidia  # noqa: F401
    HAVE_NVIDIA = True
except ImportError:
    HAVE_NVIDIA = False
needs_backend = pytest.mark.skipif(not HAVE_NVIDIA, reason="this Triton has no NVIDIA backend (ptxas)")

_SCRIPT = r"""
import json, sys
from mage_fast.triton import compile_check as cc, decode_step as ds
records, failures = cc.run((c for g in cc.ALL.values() for c in g(True)), 90, log=lambda *a, **k: None)
ptx = {}
for case in cc.decode_step_cases(True):
    for fusion in (None, True):
        if fusion:
            case.options = dict(case.options, enable_fp_fusion=True)
        k = cc.compile_case(case, 90)
        ptx[f"{case.kernel.fn.__name__} {'fused' if fusion else 'launcher'}"] = cc.contracted_fp32_ops(k.asm["ptx"])
json.dump({"records": records, "failures": failures, "ptx": ptx}, sys.stdout)
"""


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout)


@pytest.mark.slow
@needs_backend
def test_subset_compiles_fits_and_does_not_spill(compiled):
    assert not compiled["failures"], "\n".join(compiled["failures"])
    kernels = {r["kernel"] for r in compiled["records"]}
    assert {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_codebook_nn_kernel", "_sample_kernel",
            "_remask_kernel", "_ln_fwd_kernel", "_ln_bwd_kernel"} <= kernels
    for r in compiled["records"]:
        assert r["registers"] is not None and r["spill_store_bytes"] is not None, r
        assert r["launch_problem"] is None, f"{r['op']} {r['kernel']} {r['config']}: {r['launch_problem']}"
    # the tokenizer's autocast path (bf16 z, fp32 codebook) at D=256 used to spill in every config
    cb = [r for r in compiled["records"] if r["kernel"] == "_codebook_nn_kernel" and "autocast" in r["op"]]
    assert cb and all(r["spill_store_bytes"] == 0 and r["shared_bytes"] <= 232448 for r in cb), cb


@pytest.mark.slow
@needs_backend
def test_decode_step_arithmetic_is_not_contracted(compiled):
    for name, ops in compiled["ptx"].items():
        if name.endswith("launcher"):
            assert not any(ops.values()), f"{name}: contractible or fused fp32 ops in the PTX: {ops}"
    fused = compiled["ptx"]["_sample_kernel fused"]
    assert fused["fma.rn.f32"] > 0, f"with fp fusion on, the check sees no fma: it would not catch one ({fused})"


def test_judge_flags_unlaunchable_kernels_and_spilling_launchers():
    from mage_fast.triton import compile_check as cc
    base = dict(op="op", kernel="k", meta={}, config={"BLOCK": 1}, registers=64, spill_store_bytes=0,
                spill_load_bytes=0, shared_bytes=1024, num_warps=4)
    ok = dict(base, autotuned=True, launch_problem=None)
    too_big = dict(base, autotuned=True, shared_bytes=300000,
                   launch_problem=cc.launchable(dict(base, shared_bytes=300000), 4, 90))
    assert too_big["launch_problem"] and "shared memory" in too_big["launch_problem"]
    assert cc.launchable(dict(base, registers=255), 16, 90) is not None  # 255 x 512 threads > 64K registers
    assert cc.launchable(dict(base, registers=255), 8, 90) is None
    assert cc.judge([ok, too_big]) == []
    assert "NO LAUNCHABLE CONFIG" in cc.judge([too_big])[0]
    spilling = dict(ok, autotuned=False, spill_store_bytes=8)
    assert "SPILLS" in cc.judge([spilling])[0]
    assert cc.judge([dict(spilling, autotuned=True)]) == []  # the autotuner may pick another config


def test_contraction_scan_reads_ptx():
    from mage_fast.triton.compile_check import contracted_fp32_ops
    ptx = "fma.rn.f32 %r1, %r2, %r3, %r4;\n fma.rn.ftz.f32 %r5, %r1, %r1, %r1;\n mul.rn.f32 %r6, %r5, %r5;\n" \
          " mul.f32 %r7, %r6, %r6;\n add.rn.f32 %r8, %r7, %r7;"
    assert contracted_fp32_ops(ptx) == {"fma.rn.f32": 1, "mul.f32": 1, "add.f32": 0, "sub.f32": 0}


def test_gpu_resources_json_is_current():
    """The committed per-config resources cover every kernel group.

    Regenerate with ``python -m mage_fast.triton.compile_check`` (TRITON_INTERPRET unset)."""
    path = REPO / "benchmarks" / "results" / "gpu_resources_sm90.json"
    data = json.loads(path.read_text())
    ops = {r["op"].split()[0] for r in data["records"]}
    assert {"attention", "codebook", "decode", "layer_norm", "token_embed", "token_drop", "mlm"} <= ops
    assert data["failures"] == [], data["failures"]
    assert all("registers" in r and "spill_store_bytes" in r for r in data["records"] if "error" not in r)
