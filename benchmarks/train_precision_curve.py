"""The loss curve of bf16 autocast training beside fp32, on real data, in one alternating run.

    python benchmarks/train_precision_curve.py --token_cache /work/runs13/cache/train_v3.pt --steps 300

Two copies of one randomly initialised model at the shipped model's size (mage_fmnist256's
config), one trained in fp32 and one under bf16 autocast, step by step in turn on the same batches
of cached token ids (train/cache_tokens.py) with the same masks and dropout draws, through
mage_fast's fast training step (MAGEObjective, fused AdamW, lr 1e-3 after 20 warm-up steps).
Writes each step's MLM loss for both and the gap between their moving averages to JSON. bf16 is
the option to take where the CPU multiplies bf16 natively (AMX, AVX512-BF16); elsewhere it is slow.
"""
from __future__ import annotations

import copy
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))


def parse_args(argv=None):
    from mage_fast.script_exit import ArgumentParser
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--token_cache", required=True, help="a train/cache_tokens.py cache of 256-token ids")
    ap.add_argument("--steps", type=int, default=300, help="steps of each precision (default: %(default)s)")
    ap.add_argument("--batch_size", type=int, default=32, help="(default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--window", type=int, default=25, help="moving-average window of the report (default: %(default)s)")
    ap.add_argument("--out", default=None,
                    help="JSON (default: benchmarks/results/train_precision_curve_cpu_<kind>.json, "
                         "<kind> the machine kind: benchmarks/results/README.md)")
    args = ap.parse_args(argv)
    if args.steps <= 0 or args.batch_size <= 0 or args.window <= 0 or args.threads < 0:
        ap.error("--steps, --batch_size and --window must be positive, --threads >= 0")
    if not os.path.isfile(args.token_cache):
        ap.error(f"--token_cache {args.token_cache}: no such file")
    return args


def main(argv=None):
    args = parse_args(argv)
    import torch
    import mage_fast
    from common import environment, print_header, result_name, write_json
    from mage_fast.training import adamw, param_groups
    from mage_fast.training.objective import MAGEObjective
    from mage_fast.training.schedule import lr_at
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cache = torch.load(args.token_cache, map_location="cpu", weights_only=True)
        ids_all = cache["ids"]
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one line
        raise SystemExit(f"error: --token_cache {args.token_cache} is not a token cache ({type(e).__name__}: {e})")
    shipped = torch.load(os.path.join(REPO, "mage_fast", "assets", "mage_fmnist256.pt"), map_location="cpu",
                         weights_only=False)
    cfg = dict(shipped["config"])
    if ids_all.dim() != 3 or ids_all.shape[2] != 256:
        raise SystemExit(f"error: --token_cache {args.token_cache} holds {tuple(ids_all.shape)} ids; expected "
                         f"(N, views, 256) for the 256-token model")
    torch.manual_seed(0)
    base = mage_fast.MAGE(**cfg, vqgan_ckpt_path=None).train()
    for p in base.vqgan.parameters():
        p.requires_grad_(False)
    runs = {}
    for name in ("fp32", "bf16"):
        m = copy.deepcopy(base)
        obj = MAGEObjective(m)
        runs[name] = (m, obj, adamw(param_groups(m, 0.05), 1e-3))
    env = environment(torch.device("cpu"))
    print_header(f"bf16 autocast beside fp32: {args.steps} steps of {args.batch_size}, shipped size, random init", env)
    g = torch.Generator().manual_seed(0)
    losses = {n: [] for n in runs}
    seconds = {n: 0.0 for n in runs}
    for step in range(args.steps):
        idx = torch.randint(0, ids_all.shape[0], (args.batch_size,), generator=g)
        view = torch.randint(0, ids_all.shape[1], (args.batch_size,), generator=g)
        ids = ids_all[idx, view].long()
        lr = lr_at(step, 1e-3, 20, args.steps, min_lr=1e-5)
        for name, (m, obj, opt) in runs.items():
            for group in opt.param_groups:
                group["lr"] = lr
            torch.manual_seed(1000 + step)  # the same masks and dropout draws for both
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                loss = obj(ids)[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 3.0)
            opt.step()
            seconds[name] += time.perf_counter() - t
            losses[name].append(float(loss.detach()))
        if (step + 1) % args.window == 0:
            w = args.window
            a, b = (sum(losses[n][-w:]) / w for n in ("fp32", "bf16"))
            print(f"  step {step + 1:5d}: fp32 {a:.4f}  bf16 {b:.4f}  (bf16 - fp32 {b - a:+.4f})", flush=True)
    w = args.window
    means = {n: [sum(v[i:i + w]) / w for i in range(0, len(v) - w + 1, w)] for n, v in losses.items()}
    gaps = [b - a for a, b in zip(means["fp32"], means["bf16"])]
    out = write_json({"env": env, "args": vars(args), "config": {k: v for k, v in cfg.items() if k != "vqgan_config"},
                      "loss": losses, "window_means": means, "gap_bf16_minus_fp32": gaps,
                      "seconds_per_step": {n: s / args.steps for n, s in seconds.items()}},
                     args.out, result_name("train_precision_curve", torch.device("cpu")))
    print(f"  s/step: fp32 {seconds['fp32'] / args.steps:.3f}, bf16 {seconds['bf16'] / args.steps:.3f}; "
          f"last window gap {gaps[-1]:+.4f}\nwrote {out}")


if __name__ == "__main__":
    from mage_fast.script_exit import run_script  # noqa: E402
    run_script(main)
