"""Shared benchmark plumbing: environment header, robust timing, JSON output."""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

from mage_fast.info import cpu_instruction_sets, device_description, git_commit, versions

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> dict:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; seconds: median, min, max, IQR."""
    for _ in range(warmup):
        fn()
    sync(device)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        ts.append(time.perf_counter() - t0)
    return summarize(ts, repeats, warmup) if ts else {}


def summarize(ts: list, repeats: int, warmup: int) -> dict:
    """Median, min, max and inter-quartile range of timings in seconds."""
    ts = sorted(ts)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
    return {"median_s": statistics.median(ts), "min_s": ts[0], "max_s": ts[-1], "iqr_s": q[2] - q[0],
            "repeats": repeats, "warmup": warmup, "all_s": ts}


# The CPU kinds results are filed under (benchmarks/results/README.md); other CPUs get a generic name.
KNOWN_CPU_KINDS = ("zen3_avx2", "zen5_avx512bf16", "xeon_amx")


def cpu_kind(cpu: dict | None = None) -> str:
    """The machine kind of a CPU, from its model name (the vendor) and instruction sets
    (:func:`mage_fast.info.cpu_instruction_sets`, or ``cpu`` in its format): ``zen3_avx2`` (AMD,
    AVX2 without AVX-512), ``zen5_avx512bf16`` (AMD with AVX-512, AVX512-BF16 and AVX-VNNI, which Zen 4
    lacks), ``xeon_amx`` (Intel with AMX); otherwise ``x86_amx``, ``x86_avx512bf16``, ``x86_avx512``,
    ``x86_avx2`` by the best unit present, else the platform's machine name (e.g. ``aarch64``)."""
    cpu = cpu_instruction_sets() if cpu is None else cpu
    flags, vendor = cpu["flags"], cpu["model"].lower()

    def has(*names):
        return all(flags.get(n, False) for n in names)
    if "amd" in vendor and has("avx512f", "avx512_bf16", "avx_vnni"):
        return "zen5_avx512bf16"
    if "amd" in vendor and has("avx2") and not has("avx512f"):
        return "zen3_avx2"
    if "intel" in vendor and has("amx_bf16"):
        return "xeon_amx"
    for kind, needs in (("x86_amx", ("amx_bf16",)), ("x86_avx512bf16", ("avx512f", "avx512_bf16")),
                        ("x86_avx512", ("avx512f",)), ("x86_avx2", ("avx2",))):
        if has(*needs):
            return kind
    return (platform.machine() or "unknown").lower()


def gpu_kind(name: str) -> str:
    """A GPU's kind from its name: the first word with a digit, e.g. ``h100`` for "NVIDIA H100 80GB HBM3"."""
    words = name.lower().replace("nvidia", " ").replace("-", " ").split()
    return next((w for w in words if any(c.isdigit() for c in w)), "_".join(words) or "gpu")


def machine_kind(device: torch.device) -> str:
    """What decides a result's speed: the GPU's kind on CUDA, else the CPU's (:func:`cpu_kind`)."""
    if device.type == "cuda":
        return gpu_kind(torch.cuda.get_device_name(device))
    return cpu_kind()


def result_name(benchmark: str, device: torch.device, model: str | None = None, variant: str | None = None,
                ext: str = ".json") -> str:
    """A result file's default name, ``<benchmark>[_<model>]_<device>_<kind>[_<variant>].json``
    (benchmarks/results/README.md)."""
    dev = "cuda" if device.type == "cuda" else device.type
    return "_".join(p for p in (benchmark, model, dev, machine_kind(device), variant) if p) + ext


def environment(device: torch.device) -> dict:
    """The machine a result came from: the device, its kind (:func:`machine_kind`), the CPU's model and
    instruction sets (which decide fp32/bf16/int8 speed on a CPU, and the host's share on a GPU),
    versions, commit, threads, time."""
    return {"device": device_description(device), "machine_kind": machine_kind(device),
            "cpu": cpu_instruction_sets(), "versions": versions(), "commit": git_commit(),
            "torch_threads": torch.get_num_threads(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def print_header(title: str, env: dict) -> None:
    print(title)
    print(f"  device : {env['device']}")
    if "cpu" in env:
        print(f"  cpu    : {env['cpu']['model']} | {env['cpu']['summary']}")
    v = env["versions"]
    print(f"  torch {v['torch']} | python {v['python']} | mage_fast {v['mage_fast']} | commit {env['commit']} | "
          f"triton {v['triton']}")


def write_json(result: dict, path: str | None, default_name: str) -> str:
    path = path or os.path.join(RESULTS_DIR, default_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    return path
