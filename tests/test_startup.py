"""Start-up: ``import mage_fast`` and building a model for a checkpoint pull in nothing heavy they do
not need, and result files are named after the machine kind the benchmarks derive from the CPU."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

# Optional or heavy modules that neither `import mage_fast` nor `generate`'s model build needs: each
# is imported where it is used (compiler stacks, quantization, peers, training, evaluation, data).
HEAVY = ("triton", "torch._dynamo", "torch._inductor", "sympy", "deepspeed", "torchao", "onnx", "onnxruntime",
         "openvino", "torchvision", "scipy", "nvidia.dali", "PIL", "mage_fast.triton", "mage_fast.training",
         "mage_fast.eval", "mage_fast.data")


def _modules_after(code: str) -> set:
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # as a user runs it
    out = subprocess.run([sys.executable, "-c", code + "\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_import_mage_fast_leaves_the_heavy_modules_out():
    mods = _modules_after("import mage_fast")
    assert "mage_fast.models.mage" in mods  # the package did load
    assert not [m for m in HEAVY if m in mods]


def test_building_the_shipped_model_leaves_the_heavy_modules_out():
    """The model for `generate` is built without drawing weights; that must not pull in what the meta
    device would (its normal_ imports torch._dynamo, and with it sympy and triton)."""
    mods = _modules_after("from mage_fast.cli import load_model\nmodel, _ = load_model(None, None)")
    assert not [m for m in HEAVY if m in mods and m != "PIL"]  # PIL: the CLI's images need it


def _cpu(model, flags):
    from mage_fast.info import cpu_instruction_sets
    return dict(cpu_instruction_sets(flags=flags), model=model)


ZEN3 = {"avx2", "fma", "sse4_2"}
ZEN5 = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx_vnni"}
ZEN4 = ZEN5 - {"avx_vnni"}
SPR = ZEN5 | {"amx_bf16", "amx_int8", "amx_tile"}


@pytest.mark.parametrize("model, flags, kind", [
    ("AMD EPYC 7B13 64-Core Processor", ZEN3, "zen3_avx2"),
    ("AMD EPYC 9B45 128-Core Processor", ZEN5, "zen5_avx512bf16"),
    ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", SPR, "xeon_amx"),
    ("AMD EPYC 9B14 96-Core Processor", ZEN4, "x86_avx512bf16"),  # Zen 4: no AVX-VNNI, not a known kind
    ("Intel(R) Xeon(R) CPU @ 2.20GHz", ZEN3 | {"avx512f", "avx512bw", "avx512vl"}, "x86_avx512"),
    ("Intel(R) Xeon(R) CPU @ 2.30GHz", ZEN3, "x86_avx2"),
], ids=["zen3", "zen5", "xeon_amx", "zen4-generic", "skylake-generic", "haswell-generic"])
def test_cpu_kind_from_vendor_and_instruction_sets(model, flags, kind):
    from common import KNOWN_CPU_KINDS, cpu_kind
    assert cpu_kind(_cpu(model, flags)) == kind
    assert (kind in KNOWN_CPU_KINDS) == (not kind.startswith("x86_"))


def test_result_names_carry_the_machine_kind(monkeypatch):
    import torch

    import common
    monkeypatch.setattr(common, "cpu_kind", lambda cpu=None: "zen3_avx2")
    cpu = torch.device("cpu")
    assert common.result_name("decode_throughput", cpu) == "decode_throughput_cpu_zen3_avx2.json"
    name = common.result_name("train_throughput", cpu, "shipped", "b1")
    assert name == "train_throughput_shipped_cpu_zen3_avx2_b1.json"
    assert common.gpu_kind("NVIDIA H100 80GB HBM3") == "h100" and common.gpu_kind("NVIDIA H200") == "h200"


def test_startup_script_writes_import_and_build_times(tmp_path, one_thread):
    import startup
    out = tmp_path / "s.json"
    startup.main(["--model", "tiny", "--repeats", "1", "--no-warmup", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["import"]["mage_fast"]["cpu"]["median_s"] > 0 and res["import"]["torch"]["wall"]["median_s"] > 0
    assert set(res["build"]) >= {"tiny, from a checkpoint", "tiny, random weights"}
    assert res["environment"]["machine_kind"]


@pytest.mark.parametrize("argv, words", [(["--repeats", "0"], "--repeats"), (["--ckpt", "nope.pt"], "--ckpt"),
                                         (["--model", "huge"], "--model")], ids=["repeats", "ckpt", "model"])
def test_startup_script_refuses_bad_values_with_one_line(tmp_path, argv, words):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    env.pop("MAGE_FAST_DEBUG", None)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "startup.py"), *argv],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "error: " in lines[0] and words in lines[0], \
        proc.stderr[-2000:]  # usage errors name the script first, as argparse does
