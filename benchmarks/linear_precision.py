"""One ViT-B MLP block (768 -> 3072 -> GELU -> 768, 257 tokens per image) in every precision the
decoding modes can use on this CPU: fp32, bf16, torchao int8 (int8 weights per channel, dynamic
per-token int8 activations: the ``int8`` modes' layers) eager and under ``torch.compile``.

    PYTHONPATH=. python benchmarks/linear_precision.py [--batch 4] [--repeats 7] [--threads 1]

The paths run one after another inside every repeat (outside load falls on all of them) and are
timed in process CPU time; each path's speed-up is the median of its per-repeat ratios to fp32 in
the same repeat. Error: relative Frobenius error of the block's output against fp32. It decides the
CPU precision of the decoding modes: on a CPU with AMX or AVX512-BF16 the ``*_bf16`` modes, elsewhere fp32;
int8 only where AMX or AVX512-VNNI multiply it (docs/DECODING.md, "Hardware: bf16 and int8").
"""
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_header, result_name, summarize, write_json  # noqa: E402


def mlp(dim: int = 768, ratio: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(dim, dim * ratio), nn.GELU(), nn.Linear(dim * ratio, dim)).eval()


def paths(block: nn.Module, x: torch.Tensor) -> tuple[dict, dict]:
    """name -> zero-argument callable, and name -> why a path could not be built."""
    out, skipped = {"fp32": lambda: block(x)}, {}
    b16, x16 = copy.deepcopy(block).to(torch.bfloat16), x.to(torch.bfloat16)
    out["bf16"] = lambda: b16(x16).float()
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as e:
        skipped["int8"] = skipped["int8_compiled"] = f"torchao: {e}"
        return out, skipped
    q = copy.deepcopy(block)
    quantize_(q, Int8DynamicActivationInt8WeightConfig())
    out["int8"] = lambda: q(x)
    try:
        qc = torch.compile(q)
        qc(x)
        out["int8_compiled"] = lambda: qc(x)
    except Exception as e:  # inductor needs a C++ compiler; report, don't fail the benchmark
        skipped["int8_compiled"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return out, skipped


def main():
    from mage_fast.script_exit import ArgumentParser  # one-line usage errors, defaults in --help
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=4, help="images (default: 4)")
    ap.add_argument("--tokens", type=int, default=257, help="tokens per image (default: 257)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (default: 7)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default: 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    ap.add_argument("--json", default=None, help="default: results/linear_precision_cpu_<kind>.json, <kind> the "
                                                       "machine kind (benchmarks/results/README.md)")
    a = ap.parse_args()
    if a.batch < 1 or a.tokens < 1 or a.repeats < 1 or a.threads < 1 or a.warmup < 0:
        ap.error("--batch, --tokens, --repeats and --threads must be >= 1, --warmup >= 0")
    torch.set_num_threads(a.threads)
    env = environment(torch.device("cpu"))
    print_header("ViT-B MLP block: fp32 vs bf16 vs torchao int8 (paths alternate in each repeat, process CPU time)",
                 env)
    block = mlp()
    x = torch.randn(a.batch * a.tokens, 768, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        fns, skipped = paths(block, x)
        ref = fns["fp32"]()
        err = {k: ((f() - ref).norm() / ref.norm()).item() for k, f in fns.items()}
        for _ in range(a.warmup):
            for f in fns.values():
                f()
        times = {k: [] for k in fns}
        for _ in range(a.repeats):
            for k, f in fns.items():
                t0 = time.process_time()
                f()
                times[k].append(time.process_time() - t0)
    flops = 2 * 2 * x.shape[0] * 768 * 3072
    result = {"benchmark": "linear_precision", "env": env, "batch": a.batch, "tokens": a.tokens,
              "gflop_per_call": flops / 1e9, "skipped": skipped, "paths": {}}
    for k, ts in times.items():
        s = summarize(ts, a.repeats, a.warmup)
        ratio = statistics.median(f / t for f, t in zip(times["fp32"], ts))
        gflops = flops / 1e9 / s["median_s"] / a.threads
        result["paths"][k] = dict(s, speedup_vs_fp32=ratio, rel_error_vs_fp32=err[k], gflops=gflops)
        print(f"  {k:14s} {s['median_s'] * 1e3:8.1f} ms (min {s['min_s'] * 1e3:.1f}, max {s['max_s'] * 1e3:.1f})  "
              f"{ratio:5.2f}x fp32  {gflops:6.1f} GFLOP/s/thread  "
              f"rel. error {err[k]:.4f}")
    for k, why in skipped.items():
        print(f"  {k:14s} not run: {why}")
    print("wrote", write_json(result, a.json, result_name("linear_precision", torch.device("cpu"))))


if __name__ == "__main__":
    from mage_fast.script_exit import run_script  # noqa: E402
    run_script(main)
