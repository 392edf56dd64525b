"""Quick CPU timings of the C++ ops against their references (the issue's two targets).

    PYTHONPATH=. python benchmarks/cpu_ops_quick.py [--repeats 5] [--small] [--threads T]

- codebook_nn at N=4096, K=16384, D=256 fp32: C++ vs torch cdist+argmin vs the reference formula,
  and peak extra memory of each, two ways: torch allocations seen by the profiler, and the rise of
  the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over the resident
  set before the call, which also counts the C++ kernel's own buffers.
- decode_step at B=32, N=256, C=1024: C++ vs decode_step_ref.
Median of --repeats runs after one warm-up; JSON to benchmarks/results/cpu_ops_quick.json.
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import statistics
import subprocess
import time

import torch

import mage_fast  # noqa: F401  (loads the extension and registers the backends)
from mage_fast import _ext
from mage_fast.ops.codebook import codebook_nn_ref
from mage_fast.ops.decode_step import decode_step_ref

ROOT = pathlib.Path(__file__).resolve().parents[1]


def timeit(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "runs": repeats}


def peak_extra_bytes(fn):
    """Peak bytes held by torch CPU allocations during fn, above what was live before (profiler)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0  # self (not inclusive) usage, so nested ops are not counted twice
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage != 0), key=lambda e: e.time_range.start)
    for e in events:
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def peak_rss_rise_bytes(fn):
    """VmHWM after fn minus VmRSS before it (Linux; None elsewhere)."""
    def field(name):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(name))
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set to the current one
        before = field("VmRSS:")
        fn()
        return field("VmHWM:") - before
    except OSError:
        return None


def env_header():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    return {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "commit": commit,
            "extension": _ext.status}


def main():
    from mage_fast.script_exit import ArgumentParser  # one-line usage errors, defaults in --help
    ap = ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--small", action="store_true", help="tiny shapes (smoke run)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {"env": env_header(), "rows": []}
    print(json.dumps(out["env"]))

    N, K, D = (256, 1024, 64) if args.small else (4096, 16384, 256)
    z, cb = torch.randn(N, D), torch.randn(K, D)
    cases = {
        "cpp": lambda: torch.ops.mage_fast.codebook_nn(z, cb, "l2"),
        "cdist+argmin": lambda: torch.cdist(z, cb).argmin(1),
        "reference": lambda: codebook_nn_ref(z, cb, "l2"),
    }
    base = None
    for name, fn in cases.items():
        t = timeit(fn, args.repeats)
        t["peak_extra_MiB_torch_alloc"] = peak_extra_bytes(fn) / 2**20
        rss = peak_rss_rise_bytes(fn)
        t["peak_rss_rise_MiB"] = None if rss is None else rss / 2**20
        if name == "cpp":
            base = t["median_s"]
        t["gflops"] = 2 * N * K * D / t["median_s"] / 1e9
        row = {"op": "codebook_nn", "shape": f"N={N} K={K} D={D} fp32 l2", "impl": name, **t}
        out["rows"].append(row)
    for row in out["rows"]:
        row["speedup_of_cpp"] = row["median_s"] / base
        print(f"{row['op']:12s} {row['impl']:14s} median {row['median_s'] * 1e3:8.1f} ms  "
              f"({row['gflops']:.0f} GFLOP/s)  peak torch alloc {row['peak_extra_MiB_torch_alloc']:.1f} MiB, "
              f"peak RSS rise {float('nan') if row['peak_rss_rise_MiB'] is None else row['peak_rss_rise_MiB']:.1f} MiB  "
              f"cpp is {row['speedup_of_cpp']:.2f}x faster")

    B, Nt, C = (4, 64, 128) if args.small else (32, 256, 1024)
    logits = torch.randn(B, Nt, C) * 3
    ids = torch.full((B, Nt), C, dtype=torch.long)
    ids[:, ::3] = torch.randint(0, C, (B, (Nt + 2) // 3))
    key = torch.randint(0, 2**32, (B,))
    mask_len = Nt // 2
    args_ds = (logits, ids, key, 3, mask_len, 2.5, C)
    t_cpp = timeit(lambda: torch.ops.mage_fast.decode_step(*args_ds), args.repeats)
    t_ref = timeit(lambda: decode_step_ref(*args_ds), args.repeats)
    same = all(torch.equal(a, b) for a, b in zip(torch.ops.mage_fast.decode_step(*args_ds), decode_step_ref(*args_ds)))
    for name, t in (("cpp", t_cpp), ("reference", t_ref)):
        row = {"op": "decode_step", "shape": f"B={B} N={Nt} C={C} fp32", "impl": name, **t,
               "speedup_of_cpp": t["median_s"] / t_cpp["median_s"], "outputs_equal": same}
        out["rows"].append(row)
        print(f"{'decode_step':12s} {name:14s} median {t['median_s'] * 1e3:8.1f} ms  "
              f"cpp is {row['speedup_of_cpp']:.2f}x faster  (outputs equal: {same})")

    res = ROOT / "benchmarks" / "results"
    res.mkdir(parents=True, exist_ok=True)
    from common import result_name
    variant = "_".join(v for v in ("small" if args.small else "", f"t{args.threads}" if args.threads else "") if v)
    path = res / result_name("cpu_ops_quick", torch.device("cpu"), variant=variant or None)
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    from mage_fast.script_exit import run_script  # noqa: E402
    run_script(main)
