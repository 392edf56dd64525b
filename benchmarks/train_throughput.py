"""Training throughput: images/s and peak memory per step, fast path vs the official-equivalent
reference path, with and without each fast op backend, in one run.

    python benchmarks/train_throughput.py                 # CPU: a small config (32px, 8x8 tokens)
    python benchmarks/train_throughput.py --model vit_base --img_size 256 --batch_size 64   # GPU

Variants (each in a fresh subprocess, so peak memory is its own):
  reference      every op on its plain-torch reference (MAGE_FAST_BACKEND=torch), MAGE.forward
  fast           default backend dispatch, the training objective (MAGEObjective)
  fast-no-<op>   fast with one op forced back to its reference (only ops whose fast backend
                 differs from the reference on this machine)
  fast-ids       fast, from token ids (a token cache: no tokenizer in the step)
A step is forward + backward + AdamW. Peak memory: CUDA max allocated on a GPU, else the peak
resident set size of the subprocess. Median and inter-quartile range over the timed steps.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _one(args) -> dict:
    import numpy as np
    import torch

    import mage_fast
    from mage_fast.ops.dispatch import Op
    from mage_fast.training import adamw, param_groups
    from mage_fast.training.objective import MAGEObjective
    sys.path.insert(0, os.path.join(REPO, "train"))
    from pretrain import PRESETS, TINY_VQGAN, OFFICIAL_VQGAN
    from functools import partial

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    vq = dict(TINY_VQGAN if args.model == "tiny" else OFFICIAL_VQGAN)
    if args.ch_mult:
        vq["ch_mult"] = [int(c) for c in args.ch_mult.split(",")]
    model = mage_fast.MAGE(**PRESETS[args.model], img_size=args.img_size, vqgan_config=vq, vqgan_ckpt_path=None,
                           norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).to(dev)
    model.check_input_range = False
    obj = MAGEObjective(model)
    opt = adamw(param_groups(obj, 0.05), 1e-4)
    x = torch.rand(args.batch_size, 3, args.img_size, args.img_size, device=dev)
    ids = model.tokenize(x) if args.variant == "fast-ids" else None
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16)

    def step():
        with amp:
            if args.variant == "reference":
                loss = model(x)[0]
            else:
                loss = obj(ids if ids is not None else x)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    chosen = {}
    for name, op in Op.registry.items():
        try:
            forced = op._forced_name()
            chosen[name] = forced or op.backends[0].name
        except Exception:
            chosen[name] = "?"
    return {"variant": args.variant, "median_s": med, "iqr_s": float(np.percentile(times, 75) - np.percentile(times, 25)),
            "images_per_s": args.batch_size / med, "tokens_per_s": args.batch_size * model.seq_len / med,
            "peak_mem_mb": peak / 2 ** 20, "backends": chosen}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", choices=["tiny", "vit_base", "vit_large"])
    ap.add_argument("--img_size", type=int, default=32)
    ap.add_argument("--ch_mult", default="1,2,2", help="tokenizer multipliers ('' for the preset's)")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="autocast to bf16 (GPU)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "train_throughput.json"))
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(_one(args)))
        return

    import torch
    import mage_fast
    from mage_fast.ops.dispatch import Op
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = "?"
    env = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "mage_fast": mage_fast.__version__,
           "python": platform.python_version(), "commit": commit}
    print("# " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print(f"# {args.model}, {args.img_size}px, batch {args.batch_size}, {args.steps} timed steps after {args.warmup}")
    fast_ops = [n for n, op in Op.registry.items() if op.backends[0].name != "torch"]
    variants = [("reference", {"MAGE_FAST_BACKEND": "torch"}), ("fast", {})]
    variants += [(f"fast-no-{n}", {f"MAGE_FAST_BACKEND_{n.upper()}": "torch"}) for n in fast_ops]
    variants += [("fast-ids", {})]
    base = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--img_size", str(args.img_size),
            "--ch_mult", args.ch_mult, "--batch_size", str(args.batch_size), "--steps", str(args.steps),
            "--warmup", str(args.warmup)] + (["--bf16"] if args.bf16 else [])
    results = []
    for name, extra in variants:
        envv = dict(os.environ, **extra)
        for k in [k for k in envv if k.startswith("MAGE_FAST_BACKEND") and k not in extra]:
            envv.pop(k)
        p = subprocess.run(base + ["--variant", name], env=envv, capture_output=True, text=True)
        if p.returncode:
            print(f"{name}: failed\n{p.stderr[-2000:]}")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        results.append(r)
        print(f"{name:28s} {r['images_per_s']:9.1f} img/s  {r['median_s'] * 1e3:8.1f} ms/step "
              f"(IQR {r['iqr_s'] * 1e3:.1f})  peak {r['peak_mem_mb']:8.0f} MB")
    ref = next((r for r in results if r["variant"] == "reference"), None)
    if ref:
        for r in results:
            r["speedup_vs_reference"] = r["images_per_s"] / ref["images_per_s"]
        print("speed-up vs reference: " + ", ".join(f"{r['variant']} {r['speedup_vs_reference']:.2f}x" for r in results))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"env": env, "args": vars(args), "results": results}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
