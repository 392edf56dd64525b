"""Per-op kernel benchmark: every registered backend of every op against its plain-torch
reference and the library alternatives present, in one run.

For each case: median / min / max time over repeats after warm-up, and peak extra memory above
the inputs (CUDA: the allocator's peak; CPU: the process's peak resident set, reset before each
measurement through /proc/self/clear_refs). Backends that decline a case are listed with their
reason. JSON goes to benchmarks/results/kernels_<device>.json.

    python benchmarks/kernels.py                 # all ops, sizes for the device
    python benchmarks/kernels.py --ops codebook_nn decode_step --repeats 5
"""
from __future__ import annotations

import gc
import os
import sys
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_header, result_name, time_fn, write_json  # noqa: E402
from mage_fast.ops.dispatch import Op  # noqa: E402


# ----------------------------------------------------------------------------- memory
def _rss_peak_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def peak_extra_mib(fn: Callable, device: torch.device) -> float | None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set size
    except OSError:
        return None
    base = _rss_kb()
    fn()
    return max(0, _rss_peak_kb() - base) / 1024


# ----------------------------------------------------------------------------- cases
def cases(device: torch.device, full: bool):
    """op name -> list of (label, args, kwargs, alternatives {name: fn}, backward)."""
    cuda = device.type == "cuda"
    f32 = dict(device=device, dtype=torch.float32)
    low = torch.bfloat16 if cuda else torch.float32
    out = {}

    nn_sizes = [(65536, 262144, 256), (65536, 1024, 256)] if cuda else [(4096, 16384, 256), (4096, 1024, 256)]
    if not full and not cuda:
        nn_sizes = [(1024, 16384, 256), (1024, 1024, 256)]
    rows = []
    for N, K, D in nn_sizes:
        z, e = torch.randn(N, D, **f32), torch.randn(K, D, **f32)
        alts = {"torch cdist+argmin": (lambda z=z, e=e: torch.cdist(z, e).argmin(1))}
        rows.append((f"l2 N={N} K={K} D={D} fp32", (z, e, "l2"), {}, alts, False))
    zc, ec = torch.randn(8192 if cuda else 1024, 32, **f32), torch.randn(8192, 32, **f32)
    rows.append((f"cosine N={zc.shape[0]} K=8192 D=32 fp32", (zc, ec, "cosine"), {}, {}, False))
    out["codebook_nn"] = rows

    B = 64 if cuda else 32
    logits = torch.randn(B, 257, 2025, **f32)[:, 1:, :1024]  # the strided view sampling reads
    ids = torch.full((B, 256), 2024, dtype=torch.long, device=device)
    keys = torch.arange(B, device=device)
    out["decode_step"] = [(f"B={B} N=256 C=1024 (strided logits)", (logits, ids, keys, 0, 252, 5.7, 2024), {}, {}, False)]

    D = 768
    x = torch.randn(B, 257, D, **f32)
    idx = torch.sort(torch.rand(B, 257, device=device).argsort(1)[:, :129], 1).values
    idx[:, 0] = 0
    kept = torch.randn(B, 129, D, **f32)
    allm = torch.rand(B, 257, device=device) < 0.7
    allm[:, 0] = False
    pos = torch.randn(1, 257, D, **f32)
    out["gather_tokens"] = [(f"B={B} L=257 K=129 D={D}", (x, idx), {}, {}, False)]
    out["scatter_tokens"] = [(f"B={B} L=257 K=129 D={D}", (kept, idx, allm, pos), {}, {}, False)]

    rows = []
    for H, d in ((12, 64), (16, 48)):
        q, k, v = (torch.randn(B, H, 257, d, device=device, dtype=low, requires_grad=True) for _ in range(3))
        rows.append((f"B={B} H={H} N=257 d={d} {str(low).split('.')[-1]} fwd+bwd", (q, k, v),
                     dict(dropout_p=0.0, causal=False, scale=None), {}, True))
    out["attention"] = rows

    lg = torch.randn(B, 256, 1024, **f32)
    tgt = torch.randint(0, 1024, (B, 256), device=device)
    m = (torch.rand(B, 256, device=device) < 0.7).float()
    out["masked_ce"] = [(f"B={B} N=256 C=1024 fp32", (lg, tgt, m, 0.1), {}, {}, False)]

    def leaf(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_()

    Dd, V = 768, 2025
    head_args = (leaf(B, 256, Dd), leaf(D, Dd), leaf(D), leaf(D), leaf(D), torch.randn(V, D, **f32), leaf(V),
                 tgt, m, 1024, 0.1, 1e-5)
    out["mlm_head_loss"] = [(f"B={B} N=256 Dd={Dd} V={V} C=1024 fp32 fwd+bwd", head_args, {}, {}, True)]
    out["layer_norm"] = [(f"{B}x257x{D} {str(low).split('.')[-1]} fwd+bwd",
                          (leaf(B, 257, D, dtype=low), leaf(D), leaf(D), 1e-6), {}, {}, True)]
    ids_e = torch.randint(0, V, (B, 257), device=device)
    pos_e = torch.arange(257, device=device).expand(B, 257)
    out["token_embed"] = [(f"B={B} L=257 D={D} fp32 fwd+bwd",
                           (ids_e, pos_e, leaf(V, D), leaf(257, D), leaf(D), leaf(D), 1e-6), {}, {}, True)]
    return out


def run_case(fn, args, kwargs, backward, device, repeats):
    def call():
        r = fn(*args, **kwargs)
        if backward:
            (r.float().sum() if torch.is_tensor(r) else r[0].float().sum()).backward()
        return r
    t = time_fn(call, device, repeats, warmup=1)
    mem = peak_extra_mib(call, device)
    return t, mem


def main(argv=None):
    from mage_fast.script_exit import ArgumentParser  # one-line usage errors, defaults in --help
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ops", nargs="*", default=None, help="only these ops")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--full", action="store_true", help="CPU: the issue's full sizes (slower)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/kernels_<device>_<kind>.json, "
                                              "<kind> the machine kind: benchmarks/results/README.md)")
    args = p.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    repeats = args.repeats or (20 if device.type == "cuda" else 3)
    env = environment(device)
    print_header("kernel benchmark (time: median [min, max]; memory: peak extra MiB)", env)
    results = []
    for name, rows in cases(device, args.full).items():
        if args.ops and name not in args.ops:
            continue
        op = Op.registry[name]
        for label, a, kw, alts, bwd in rows:
            print(f"\n{name}: {label}")
            candidates = []
            for b in op.backends:
                reason = b.supports(*a, **kw)
                if reason is None:
                    candidates.append((b.name, b.fn))
                else:
                    print(f"  {b.name:<22} declined: {reason}")
                    results.append({"op": name, "case": label, "impl": b.name, "declined": reason})
            candidates += list(alts.items())
            timed = []
            for impl, fn in candidates:
                try:
                    t, mem = run_case(fn, () if impl in alts else a, {} if impl in alts else kw, bwd, device, repeats)
                except (RuntimeError, MemoryError) as e:  # e.g. out of memory for the reference
                    print(f"  {impl:<22} failed: {str(e).splitlines()[0][:100]}")
                    results.append({"op": name, "case": label, "impl": impl, "error": str(e).splitlines()[0]})
                    continue
                timed.append((impl, t, mem))
            ref_t = next((t["median_s"] for impl, t, _ in timed if impl == "torch"), None)
            for impl, t, mem in timed:
                speed = ref_t / t["median_s"] if ref_t else None
                mem_s = f"{mem:8.1f} MiB" if mem is not None else "     n/a"
                rel = f"  {speed:.2f}x vs torch reference" if speed else ""
                print(f"  {impl:<22} {1e3 * t['median_s']:9.3f} ms [{1e3 * t['min_s']:.3f}, {1e3 * t['max_s']:.3f}]"
                      f" {mem_s}{rel}")
                results.append({"op": name, "case": label, "impl": impl, "time": t, "peak_extra_mib": mem,
                                "speedup_vs_reference": speed})
    path = write_json({"benchmark": "kernels", "environment": env, "results": results}, args.out,
                      result_name("kernels", device))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    from mage_fast.script_exit import run_script  # noqa: E402
    run_script(main)
