"""Compile-check the CUDA sources with nvcc alone (no GPU, no CUDA torch needed).

Every csrc/cuda/*.cu is compiled with -c for sm_80 and sm_90a; the objects must define every C
launcher declared in csrc/cuda/launch.h; the .cu files and launch.h must not depend on torch.
Skips, saying why, where nvcc is absent.
"""
import os
import pathlib
import re
import shutil
import subprocess

import pytest

from conftest import REPO

CSRC = REPO / "csrc"
CU_FILES = sorted((CSRC / "cuda").glob("*.cu"))
ARCHS = {"sm80": ["-arch=sm_80"], "sm90a": ["-gencode", "arch=compute_90a,code=sm_90a"]}
NVCC_FLAGS = ["-std=c++17", "-O3", "--fmad=false", f"-I{CSRC}"]


def _nvcc():
    for cand in (shutil.which("nvcc"), os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if cand and os.path.isfile(cand):
            return cand
    return None


NVCC = _nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH or $CUDA_HOME/bin)")


def _launchers():
    return re.findall(r"\b(mage_fast_cuda_\w+)\s*\(", (CSRC / "cuda" / "launch.h").read_text())


def test_cuda_sources_exist_and_need_no_torch():
    assert CU_FILES, "no .cu files under csrc/cuda"
    torch_include = re.compile(r'#\s*include\s*[<"](torch|ATen|c10)/')
    for path in CU_FILES + [CSRC / "cuda" / "launch.h", CSRC / "cuda" / "common.cuh", *(CSRC / "common").glob("*.h")]:
        assert not torch_include.search(path.read_text()), f"{path.name} includes a torch header"
    assert len(_launchers()) >= 4


@needs_nvcc
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("cu", CU_FILES, ids=[p.name for p in CU_FILES])
def test_nvcc_compiles(cu, arch, tmp_path):
    obj = tmp_path / (cu.stem + ".o")
    r = subprocess.run([NVCC, "-c", *NVCC_FLAGS, *ARCHS[arch], str(cu), "-o", str(obj)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    assert obj.stat().st_size > 0


@needs_nvcc
def test_objects_define_every_launcher(tmp_path):
    defined = set()
    for cu in CU_FILES:
        obj = tmp_path / (cu.stem + ".o")
        r = subprocess.run([NVCC, "-c", *NVCC_FLAGS, "-arch=sm_80", str(cu), "-o", str(obj)], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        nm = subprocess.run(["nm", "--defined-only", str(obj)], capture_output=True, text=True, check=True).stdout
        defined |= {line.split()[-1] for line in nm.splitlines() if " T " in line}
    missing = set(_launchers()) - defined
    assert not missing, f"declared in launch.h but defined in no .cu file: {sorted(missing)}"


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not found")
def test_launch_header_is_plain_c(tmp_path):
    src = tmp_path / "c_user.c"
    src.write_text('#include "cuda/launch.h"\nint main(void) { return 0; }\n')
    r = subprocess.run(["gcc", "-std=c99", "-fsyntax-only", f"-I{CSRC}", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
def test_cuda_binding_parses(tmp_path):
    """ops_cuda.cpp against this torch's headers and the CUDA runtime headers (syntax only: a CPU torch
    ships the c10/cuda headers but not the generated cuda_cmake_macros.h, which is stubbed)."""
    torch = pytest.importorskip("torch")
    from torch.utils.cpp_extension import include_paths
    cuda_home = pathlib.Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    if not (cuda_home / "include" / "cuda_runtime_api.h").is_file():
        pytest.skip(f"CUDA runtime headers not found under {cuda_home}/include")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    real = pathlib.Path(torch.__file__).parent / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    (stub / "cuda_cmake_macros.h").write_text(real.read_text() if real.is_file() else "#pragma once\n")
    incs = [f"-I{CSRC}", f"-I{tmp_path / 'stub'}", *[f"-I{p}" for p in include_paths()], f"-I{cuda_home / 'include'}"]
    r = subprocess.run(["g++", "-std=c++20", "-fsyntax-only", "-w", *incs, str(CSRC / "cuda" / "ops_cuda.cpp")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]


def _nvdisasm():
    try:
        from triton import knobs
        path = knobs.nvidia.nvdisasm.path
    except Exception:
        return shutil.which("nvdisasm")
    return path if path and os.path.isfile(path) else shutil.which("nvdisasm")


NVDISASM = _nvdisasm()


@pytest.fixture(scope="module")
def sm90_kernels(tmp_path_factory):
    """{kernel name: (ptxas -v lines, SASS instructions)} of every .cu file for sm_90a."""
    if NVCC is None or NVDISASM is None:
        pytest.skip("nvcc or nvdisasm (shipped with Triton) not found")
    tmp = tmp_path_factory.mktemp("sm90")
    kernels = {}
    for cu in CU_FILES:
        cubin = tmp / (cu.stem + ".cubin")
        r = subprocess.run([NVCC, "-cubin", *NVCC_FLAGS, *ARCHS["sm90a"], "-Xptxas", "-v", str(cu), "-o", str(cubin)],
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-4000:]
        logs = {}
        for block in r.stderr.split("Compiling entry function '")[1:]:
            logs[block.split("'")[0]] = block
        sass = subprocess.run([NVDISASM, "-c", str(cubin)], capture_output=True, text=True, check=True).stdout
        for block in sass.split("//--------------------- .text.")[1:]:
            name = block.split(" ")[0]
            ins = [line.split("*/", 1)[1].strip() for line in block.splitlines()
                   if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
            kernels[name] = (logs.get(name, ""), ins)
    return kernels


def _pick(kernels, *parts):
    found = {k: v for k, v in kernels.items() if all(p in k for p in parts)}
    assert found, f"no kernel named with {parts} in {sorted(kernels)}"
    return found


def test_cuda_kernels_do_not_spill(sm90_kernels):
    for name, (log, _) in sm90_kernels.items():
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
        assert m and m.groups() == ("0", "0"), f"{name}: {m.group(0) if m else 'no ptxas report'}"


def test_fp32_nearest_neighbour_reads_shared_memory_128_bits_at_a_time(sm90_kernels):
    for name, (_, ins) in _pick(sm90_kernels, "nn_kernel").items():
        lds = [i for i in ins if i.startswith("LDS")]
        ffma = sum(i.startswith("FFMA") for i in ins)
        assert lds and all(i.startswith("LDS.128") for i in lds), f"{name}: narrow shared loads {lds[:4]}"
        assert ffma >= 8 * len(lds), f"{name}: {len(lds)} shared loads for {ffma} FMAs"


def test_tensor_core_nearest_neighbour_copies_by_cp_async(sm90_kernels):
    asynchronous = _pick(sm90_kernels, "nn_tc_kernel", "Lb1E")  # the ASYNC = true instantiations
    assert len(asynchronous) == 2  # fp16 and bf16
    for name, (_, ins) in asynchronous.items():
        assert sum(i.startswith("LDGSTS") for i in ins) >= 4, f"{name}: no cp.async (LDGSTS)"


def test_decode_step_reads_16_bit_logits_without_a_copy(sm90_kernels):
    assert len(_pick(sm90_kernels, "sample_kernel")) == 3  # fp32, fp16, bf16 logits
    binding = (CSRC / "cuda" / "ops_cuda.cpp").read_text()
    body = binding[binding.index("decode_step_cuda("):binding.index("TORCH_LIBRARY_IMPL")]
    assert "at::kFloat)" not in body.split("conf =")[0], "decode_step_cuda converts the logits to fp32"


def test_cuda_runtime_results_are_checked():
    bare = re.compile(r"^\s*(cudaGetDevice|cudaDeviceGetAttribute|cudaMemsetAsync|cudaSetDevice)\s*\(", re.M)
    for path in CU_FILES + [CSRC / "cuda" / "ops_cuda.cpp"]:
        hits = bare.findall(path.read_text())
        assert not hits, f"{path.name}: result of {hits} discarded"
