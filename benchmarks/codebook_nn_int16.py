"""Interleaved timing of codebook_nn paths: int16 screening (auto), the fp32 kernel, torch cdist+argmin.

    PYTHONPATH=. python benchmarks/codebook_nn_int16.py [--N 4096 --K 16384 --D 256] [--repeats 7]
        [--threads 2] [--metric l2] [--data gauss|clustered]

The three paths run one after another inside every repeat (so outside load falls on all of them);
prints median, min, max per path and the per-repeat ratios' median.
"""
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_header, result_name, summarize, write_json  # noqa: E402

import mage_fast  # noqa: F401
from mage_fast import _ext


def main():
    from mage_fast.script_exit import ArgumentParser  # one-line usage errors, defaults in --help
    ap = ArgumentParser()
    ap.add_argument("--N", type=int, default=4096)
    ap.add_argument("--K", type=int, default=16384)
    ap.add_argument("--D", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--metric", default="l2")
    ap.add_argument("--data", default="gauss")
    ap.add_argument("--no-cdist", action="store_true")
    ap.add_argument("--json", default=None, help="default: results/codebook_nn_int16_cpu_<kind>.json, <kind> the "
                                                       "machine kind (benchmarks/results/README.md)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    C = _ext.load()
    env = environment(torch.device("cpu"))
    print_header("codebook_nn: int16 screening vs fp32 kernel vs cdist+argmin (paths alternate in each repeat)", env)
    load_at_start = os.getloadavg()
    print("extension:", C.__file__, "threads:", torch.get_num_threads(), "load average:", load_at_start)
    torch.manual_seed(0)
    if a.data == "gauss":
        z, cb = torch.randn(a.N, a.D), torch.randn(a.K, a.D)
    else:  # codes around 64 centres, z near codes (a trained-VQ-like situation)
        centres = torch.randn(64, a.D) * 3
        cb = centres[torch.randint(0, 64, (a.K,))] + 0.3 * torch.randn(a.K, a.D)
        z = cb[torch.randint(0, a.K, (a.N,))] + 0.1 * torch.randn(a.N, a.D)
    op = torch.ops.mage_fast.codebook_nn

    def run_mode(mode):
        C._codebook_nn_set_mode(mode)
        try:
            return op(z, cb, a.metric)
        finally:
            C._codebook_nn_set_mode(0)

    paths = {"int16": lambda: run_mode(0), "fp32": lambda: run_mode(1)}
    if not a.no_cdist and a.metric == "l2":
        paths["cdist+argmin"] = lambda: torch.cdist(z, cb).argmin(1)
    res = {k: fn() for k, fn in paths.items()}  # warm-up
    run_mode(0)
    st = dict(C._codebook_nn_last_stats())
    print("int16 stats:", st, "equal int16 vs fp32:", bool(torch.equal(res["int16"], res["fp32"])),
          "mismatching rows:", int((res["int16"] != res["fp32"]).sum()))
    times = {k: [] for k in paths}
    for _ in range(a.repeats):
        for k, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    for k, ts in times.items():
        print(f"{k:13s} median {statistics.median(ts) * 1e3:8.1f} ms  min {min(ts) * 1e3:8.1f}  max {max(ts) * 1e3:8.1f}"
              f"  ({2 * a.N * a.K * a.D / statistics.median(ts) / 1e9:.0f} GFLOP/s-equivalent)")
    ratios = {}
    for ref in [k for k in paths if k != "int16"]:
        r = [x / y for x, y in zip(times[ref], times["int16"])]
        ratios[ref] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
        print(f"int16 speedup over {ref}: median {statistics.median(r):.2f}x  (min {min(r):.2f}, max {max(r):.2f})")
    out = write_json({"env": env, "load_average_at_start": load_at_start, "args": vars(a), "int16_stats": st,
                      "int16_equals_fp32": bool(torch.equal(res["int16"], res["fp32"])),
                      "paths": {k: summarize(ts, a.repeats, 1) for k, ts in times.items()},
                      "int16_speedup_per_repeat": ratios},
                     a.json, result_name("codebook_nn_int16", torch.device("cpu")))
    print("wrote", out)


if __name__ == "__main__":
    from mage_fast.script_exit import run_script  # noqa: E402
    run_script(main)
